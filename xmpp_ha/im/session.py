"""One client connection: drives the stream machine, SASL, binding and dispatch.

A `ClientSession` receives decrypted bytes from its transport, turns them into
stream events, and handles each in order. Handlers that need the store return
an awaitable; while one runs, later events wait in a backlog so the order of
a client's stanzas is kept, and reading pauses when the backlog grows.

Life cycle: connected -> (TLS) -> authenticated -> bound -> closed, or
hibernated (XEP-0198 resumable) -> resumed on a new connection | expired.
On the way out every unacknowledged message is re-delivered or stored
offline, and available presence is withdrawn from everyone who saw it.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Protocol

from xmpp_ha.core.errors import StanzaCondition, StanzaError, StreamCondition
from xmpp_ha.core.jid import JID, InvalidJID
from xmpp_ha.im.manager import SessionManager, UserRecord
from xmpp_ha.protocol import ns, stream
from xmpp_ha.protocol.scram import (
    SaslFailure,
    ScramServer,
    derive_credentials,
    fake_credentials,
    parse_plain,
)
from xmpp_ha.protocol.sm import StreamManagement
from xmpp_ha.protocol.stanzas import MESSAGE, StanzaHeader, error_reply
from xmpp_ha.protocol.stream import C2SStream
from xmpp_ha.protocol.xml import serialize
from xmpp_ha.store.repository import StoreUnavailable

log = logging.getLogger(__name__)

_BACKLOG_PAUSE = 64  # events waiting before we stop reading from the socket
_ACK_INTERVAL = 100  # stanzas in one loop iteration before an <r/> among them (else at its end)
_STANDBY_NAMESPACES = frozenset(
    {ns.PING, ns.DISCO_INFO, ns.DUAL}
)  # what an inactive session may ask


class Transport(Protocol):
    """What a session needs from its connection (implemented by net.c2s)."""

    peer_address: str

    def write(self, data: bytes) -> None: ...
    def at_turn_end(self, callback: Callable[[], None]) -> None:
        """Call `callback` just before what this turn of the loop wrote is sent."""

    def start_tls(self) -> None: ...
    def close(self) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...


class ClientSession:
    def __init__(
        self, manager: SessionManager, transport: Transport, *, standby_only: bool = False
    ) -> None:
        self.manager = manager
        self.transport = transport
        # came through the standby door of a node whose services are stopped: may log in
        # and bind an inactive standby session, nothing else
        self.standby_only = standby_only
        self.stream = C2SStream(
            domain=manager.domain,
            new_stream_id=lambda: manager.new_token(12),
            max_stanza_bytes=manager.limits.max_stanza_bytes,
            extra_features=self._extra_features,
        )
        now = manager.clock.now()
        self.connected_at = now
        self.last_received = now
        self.ping_sent_at: float | None = None
        self.jid: JID | None = None
        self.record: UserRecord | None = None
        self.available = False
        self.priority = 0
        self.presence: ET.Element | None = None  # last broadcast available presence
        self.directed: set[str] = set()  # JIDs that got directed available presence
        self.roster_requested = False
        self.carbons = False
        self.resume_token = ""
        self.listed = False  # in the manager's registry, bind announced to hooks
        self.standby = False  # bound but inactive (dual connections): gets nothing routed
        self._activation: asyncio.Future[None] | None = None  # see activate()
        # activated, its presence not sent yet: messages wait for it (not the offline store)
        self.presence_due = False
        self.moved_away = False  # ended because its user moved to the other node
        self.offline_lookup: asyncio.Future[bool] | None = None  # see look_for_offline()
        self.hibernated_until: float | None = None
        self.attributes: dict[str, object] = {}  # per-session data of plug-ins
        self._scram: ScramServer | None = None
        self._auth_username = ""
        self._auth_real = False
        self._auth_failures = 0
        self._backlog: deque[stream.StreamEvent] | None = None
        self._undelivered: list[ET.Element] = []  # sent after the stream closed
        # receipts asked for (see receipt()): outbound count to cover, future to resolve
        self._receipts: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._ack_requested = False  # an <r/> is due at the end of this loop iteration
        self._our_request: int | None = None  # outbound count our unanswered <r/> asks about
        # the client's requests: inbound numbers of messages not yet on their way, the
        # count its last <r/> asked about while some were not, the last 'h' we sent
        self._unsettled: dict[int, None] = {}
        self._client_asked: int | None = None
        self._ack_sent: int | None = None
        self._closed = False
        manager.connections.add(self)

    # --- transport callbacks -----------------------------------------------

    def data_received(self, data: bytes) -> None:
        may_serve = self.manager.hooks.may_serve
        if self.jid is not None and may_serve is not None and not may_serve():
            log.warning("fenced: dropping %s instead of serving it", self.jid)
            self.transport.close()  # another node may serve this user now
            return
        self.last_received = self.manager.clock.now()
        self.ping_sent_at = None
        events = self.stream.receive_data(data)
        sm = self.stream.sm
        if self._our_request is not None and sm is not None and sm.covers(self._our_request):
            self._our_request = None  # answered: ask again for what was sent since
            if sm.unacked_count:
                self._want_ack()
        if self._receipts:
            self._settle_receipts()
        if self._backlog is not None:
            self._backlog.extend(events)
            if len(self._backlog) > _BACKLOG_PAUSE:
                self.transport.pause_reading()
        else:
            self._run(deque(events))
        self.flush()

    def tls_established(self) -> None:
        self.stream.tls_established()
        self.flush()

    def connection_lost(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.manager.connections.discard(self)
        self.manager.spawn(self._ended())

    # --- output -------------------------------------------------------------

    def flush(self) -> None:
        data = self.stream.data_to_send()
        if data:
            self.transport.write(data)
        if self.stream.closed and not self._closed:
            self._forget_resumption()  # a closed stream ends the session; only a lost one waits
            self.manager.unbind(self)  # from now on stanzas for this JID go elsewhere
            self.transport.close()

    def _forget_resumption(self) -> None:
        if self.resume_token:
            if self.manager.resumable.get(self.resume_token) is self:
                del self.manager.resumable[self.resume_token]
            self.resume_token = ""

    def send(self, stanza: ET.Element) -> None:
        """Deliver one stanza to this client (or keep it for resumption if hibernated)."""
        if self.hibernated_until is not None:
            assert self.stream.sm is not None
            self.stream.sm.track_outbound(stanza)
            if self.stream.sm.overflowed:
                self._forget_resumption()
                self.expire_hibernation()
            return
        if self.stream.closed or (self._closed and self.stream.sm is None):
            self._undelivered.append(stanza)  # handed on when the session terminates
            return
        self.stream.send_stanza(stanza)
        if self.stream.sm is not None:
            if self.stream.sm.overflowed:
                self.stream.fail(
                    StreamCondition.POLICY_VIOLATION, "too many unacknowledged stanzas"
                )
            else:
                self._want_ack()
        self.flush()

    def receipt(self) -> asyncio.Future[None] | None:
        """A future resolved once the client acknowledged (XEP-0198) everything sent to it
        so far, or once this session handed it on (it ended or hibernated); None when
        nothing will be acknowledged (no stream management)."""
        sm = self.stream.sm
        if sm is None or self.hibernated_until is not None or self._closed or self.stream.closed:
            return None
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._receipts.append((sm.outbound_sent, future))
        self._want_ack()
        return future

    def _want_ack(self) -> None:
        """Ask the client to acknowledge what was sent (XEP-0198 <r/>), once at the end of
        this loop iteration, and not while an earlier request is unanswered: one request
        per round trip. A session that ends hands on what the client did not acknowledge
        (a switch to the peer): with a request per 5 stanzas that was up to seconds of
        traffic the client already had, delivered twice; now it is what was on its way."""
        if not self._ack_requested:
            self._ack_requested = True
            self.transport.at_turn_end(self._request_ack)

    def _request_ack(self) -> None:
        self._ack_requested = False
        sm = self.stream.sm
        if sm is None or self._closed or not sm.unacked_count:
            return
        if self._our_request is not None and not sm.covers(self._our_request):
            return  # the answer to the last request asks again (data_received)
        self._our_request = sm.outbound_sent
        self.stream.request_ack()
        self.flush()

    def _settle_receipts(self, *, all_of_them: bool = False) -> None:
        sm = self.stream.sm
        while self._receipts and (
            all_of_them or (sm is not None and sm.covers(self._receipts[0][0]))
        ):
            _, future = self._receipts.popleft()
            if not future.done():
                future.set_result(None)

    @property
    def can_receive(self) -> bool:
        """A stanza sent now reaches the client, or is handed on when the session ends
        (its resumption, another resource, offline storage); False once it ended."""
        return self.record is not None

    def close_stream(self, condition: StreamCondition | None = None, text: str = "") -> None:
        if condition is None:
            self.stream.close()
        else:
            self.stream.fail(condition, text)
        self.flush()

    def replaced_by_conflict(self) -> None:
        """A newer bind took this full JID: this session ends, its presence goes."""
        self.manager.unbind(self)
        self._forget_resumption()
        if self.hibernated_until is not None:
            self.expire_hibernation()
            return
        self.close_stream(StreamCondition.CONFLICT, "replaced by a new session")

    # --- event processing ---------------------------------------------------

    def _run(self, events: deque[stream.StreamEvent]) -> None:
        while events:
            pending = self._dispatch(events.popleft())
            if pending is not None:
                self._backlog = events
                self.manager.spawn(self._drain(pending))
                return

    async def _drain(self, pending: Awaitable[None]) -> None:
        try:
            await self._guard(pending)
            self.flush()
            assert self._backlog is not None
            while self._backlog:
                step = self._dispatch(self._backlog.popleft())
                if step is not None:
                    await self._guard(step)
                self.flush()
        finally:
            self._backlog = None
            if not self._closed:
                self.transport.resume_reading()
            self.flush()

    def beside(self, work: Awaitable[None]) -> None:
        """Run work for this session without holding up its next stanzas; a store failure
        ends the stream, as in stanza processing."""
        self.manager.spawn(self._guard(work))

    async def _guard(self, pending: Awaitable[None]) -> None:
        try:
            await pending
        except StoreUnavailable as exc:
            log.warning("store unavailable while serving %s: %s", self.jid, exc)
            self.close_stream(StreamCondition.INTERNAL_SERVER_ERROR, "store unavailable")

    def _dispatch(self, event: stream.StreamEvent) -> Awaitable[None] | None:
        if isinstance(event, stream.StanzaReceived):
            return self._on_stanza(event.stanza, event.number)
        if isinstance(event, stream.AckRequested):
            self._client_asked = event.handled
            self._acknowledge()
            return None
        if isinstance(event, stream.TLSRequested):
            self.flush()  # <proceed/> leaves in plaintext before the switch
            self.transport.start_tls()
            return None
        if isinstance(event, stream.SaslStarted):
            return self._sasl_start(event)
        if isinstance(event, stream.SaslResponse):
            return self._sasl_step(event.data)
        if isinstance(event, stream.SaslAborted):
            self._scram = None
            return None
        if isinstance(event, stream.BindRequested):
            return self._bind(event)
        if isinstance(event, stream.SMEnableRequested):
            self._enable_sm(event.resume)
            return None
        if isinstance(event, stream.ResumeRequested):
            return self._resume(event)
        if isinstance(event, stream.StreamEnded):
            self.flush()
            self.transport.close()
        return None

    def _on_stanza(self, stanza: ET.Element, number: int | None = None) -> Awaitable[None] | None:
        try:
            header = StanzaHeader.of(stanza)
            if self.standby and not self._standby_may_send(stanza, header):
                raise StanzaError(
                    StanzaCondition.NOT_ALLOWED, "inactive session: activate it first"
                )
            if header.kind == "message":
                pending = self.manager.messages.outbound(self, stanza, header)
                if pending is not None:  # on its way in order; the client reads on meanwhile
                    if number is not None:
                        self._unsettled[number] = None
                    self.manager.spawn(self._settling(stanza, pending, number))
                return None
            if header.kind == "presence":
                pending = self.manager.presence.outbound(self, stanza, header)
            else:
                pending = self.manager.iq.outbound(self, stanza, header)
        except StanzaError as error:
            self._answer_error(stanza, error)
            return None
        return None if pending is None else self._answering(stanza, pending)

    def _standby_may_send(self, stanza: ET.Element, header: StanzaHeader) -> bool:
        """An inactive session talks to the server only: pings, disco, dual requests."""
        to = header.to
        if header.kind != "iq" or (
            to is not None and (to.local or to.domain != self.manager.domain)
        ):
            return False
        if header.type in ("result", "error"):
            return True  # answers to the server's pings and pushes
        return len(stanza) > 0 and ns.namespace_of(stanza[0].tag) in _STANDBY_NAMESPACES

    async def _settling(
        self, stanza: ET.Element, pending: Awaitable[None], number: int | None
    ) -> None:
        try:
            await self._answering(stanza, pending)
        finally:
            if number is not None:
                self._unsettled.pop(number, None)
                if self._client_asked is not None:
                    self._acknowledge()
                    self.flush()

    def _acknowledge(self) -> None:
        """Answer the client's last <r/> (XEP-0198) for the stanzas before it that are safely
        on their way: a message handed to the peer node is acknowledged once the peer has
        it, so that the client sends it again after a switch if this node dies first (the
        count used to include messages still on the peer link: lost with a killed node).
        What could not be acknowledged yet is, on our own, once it is."""
        asked = self._client_asked
        if asked is None:
            return
        oldest = next(iter(self._unsettled), None)
        handled = asked if oldest is None or oldest > asked else oldest - 1
        if handled != self._ack_sent:
            self._ack_sent = handled
            self.stream.send_ack(handled)
        if handled == asked:
            self._client_asked = None

    async def _answering(self, stanza: ET.Element, pending: Awaitable[None]) -> None:
        try:
            await pending
        except StanzaError as error:
            self._answer_error(stanza, error)

    def _answer_error(self, stanza: ET.Element, error: StanzaError) -> None:
        if stanza.get("type") != "error":
            self.send(error_reply(stanza, error, sender=stanza.get("to") or ""))

    # --- SASL ---------------------------------------------------------------

    def _sasl_start(self, event: stream.SaslStarted) -> Awaitable[None] | None:
        if not (self.manager.switches.authentication or self.standby_only):
            self.stream.sasl_failure("temporary-auth-failure", "authentication service stopped")
            return None
        if event.mechanism == "PLAIN":
            return self._plain(event.initial_response or b"")
        self._scram = ScramServer(event.mechanism, self.manager.new_token(24))  # type: ignore[arg-type]
        self._auth_username = ""
        if event.initial_response is None:
            self.stream.sasl_challenge(b"")
            return None
        return self._sasl_step(event.initial_response)

    def _sasl_step(self, data: bytes) -> Awaitable[None] | None:
        scram = self._scram
        if scram is None:
            return self._sasl_failed(SaslFailure("malformed-request"))
        if not self._auth_username:
            return self._scram_first(scram, data)
        try:
            final = scram.client_final(data)
            if not self._auth_real:
                raise SaslFailure("not-authorized")
        except SaslFailure as failure:
            return self._sasl_failed(failure)
        self._authenticated(final)
        return None

    async def _scram_first(self, scram: ScramServer, data: bytes) -> None:
        try:
            username = self._check_user(scram.client_first(data), scram.authzid)
        except SaslFailure as failure:
            await self._sasl_failed(failure)
            return
        mechanism = scram.mechanism
        credentials = await self.manager.repo.get_credentials(username, mechanism)
        self._auth_real = credentials is not None
        if credentials is None:  # answer exactly as for a wrong password
            credentials = fake_credentials(mechanism, username, self.manager.fake_secret)
        self._auth_username = username
        self.stream.sasl_challenge(scram.server_first(credentials))

    async def _plain(self, data: bytes) -> None:
        try:
            authzid, username, password = parse_plain(data)
            username = self._check_user(username, authzid)
            credentials = await self.manager.repo.get_credentials(username, "SCRAM-SHA-256")
            if credentials is None:
                raise SaslFailure("not-authorized")
            loop = asyncio.get_running_loop()
            derived = await loop.run_in_executor(
                None, derive_credentials, password, "SCRAM-SHA-256", credentials.salt,
                credentials.iterations,
            )  # fmt: skip
            if not hmac.compare_digest(derived.stored_key, credentials.stored_key):
                raise SaslFailure("not-authorized")
        except (SaslFailure, ValueError) as failure:
            await self._sasl_failed(
                failure if isinstance(failure, SaslFailure) else SaslFailure("not-authorized")
            )
            return
        self._auth_username = username
        self._authenticated(b"")

    def _check_user(self, username: str, authzid: str) -> str:
        try:
            user = JID.make(username, self.manager.domain)
        except InvalidJID as exc:
            raise SaslFailure("not-authorized") from exc
        if authzid and authzid not in (str(user), user.local):
            raise SaslFailure("invalid-authzid")
        return user.local

    def _authenticated(self, additional: bytes) -> None:
        self.manager.throttle.succeeded(self.transport.peer_address)
        self._scram = None
        self.stream.sasl_success(self._auth_username, additional)

    async def _sasl_failed(self, failure: SaslFailure) -> None:
        self._scram = None
        self._auth_username = ""
        self._auth_failures += 1
        delay = self.manager.throttle.failed(self.transport.peer_address, self.manager.clock.now())
        if delay > 0:
            await asyncio.sleep(delay)
        if self._closed:
            return
        self.stream.sasl_failure(failure.condition)
        if self._auth_failures >= self.manager.limits.max_auth_failures_per_stream:
            self.stream.fail(StreamCondition.POLICY_VIOLATION, "too many failed authentications")
        self.flush()

    # --- binding and stream management ---------------------------------------

    def _extra_features(self) -> list[ET.Element]:
        features: list[ET.Element] = []
        for provider in self.manager.hooks.stream_features:
            features.extend(provider(self))
        return features

    async def _bind(self, event: stream.BindRequested) -> None:
        if event.standby and self.standby_only:
            await self._bind_standby(event)
            return
        guard = self.manager.hooks.login_guard
        if self.standby_only:  # an active session here: pointed at the node that serves
            refusal = await guard(self.stream.username) if guard is not None else None
            if refusal is not None:
                self.stream.fail(refusal.condition, refusal.text, refusal.other_host)
            else:
                self.stream.fail(StreamCondition.SYSTEM_SHUTDOWN, "services stopped")
            return
        if not self.manager.switches.session_manager:
            self.stream.bind_failed(event.iq_id, "service-unavailable")
            return
        if event.standby:
            await self._bind_standby(event)
            return
        if guard is not None:
            refusal = await guard(self.stream.username)
            if refusal is not None:
                self.stream.fail(refusal.condition, refusal.text, refusal.other_host)
                return
        resource = event.resource or self.manager.new_token(9)
        try:
            jid = JID.make(self.stream.username, self.manager.domain, resource)
        except InvalidJID:
            self.stream.bind_failed(event.iq_id, "bad-request", "modify")
            return
        try:
            record = await self.manager.bind(self, jid)
        except StanzaError as error:
            self.stream.bind_failed(event.iq_id, error.condition.element_name, error.error_type)
            return
        self.jid = jid
        self.record = record
        if self._closed:  # the connection went while the roster loaded
            self.manager.unbind(self)
            self.record = None
            return
        self.stream.bind_succeeded(event.iq_id, jid)

    async def _bind_standby(self, event: stream.BindRequested) -> None:
        """Bind an inactive session (dual connections), if the HA layer accepts it here."""
        guard = self.manager.hooks.standby_guard
        refusal = (
            StanzaError(StanzaCondition.FEATURE_NOT_IMPLEMENTED, "no dual connections here")
            if guard is None
            else await guard(self.stream.username)
        )
        try:
            jid = JID.make(self.stream.username, self.manager.domain, event.resource or
                           self.manager.new_token(9))  # fmt: skip
        except InvalidJID:
            refusal = StanzaError(StanzaCondition.BAD_REQUEST)
        if refusal is not None:
            self.stream.bind_failed(event.iq_id, refusal.condition.element_name,
                                    refusal.error_type, refusal.text)  # fmt: skip
            return
        if self._closed:
            return
        self.jid = jid
        self.standby = True
        self.manager.bind_standby(self, jid)
        self.stream.bind_succeeded(event.iq_id, jid, standby=True)

    @property
    def activation_started(self) -> bool:
        return self._activation is not None

    async def activate(self) -> None:
        """Make this standby session active: it joins the registry and gets what any
        freshly bound session gets (the client then sends its presence). Concurrent
        calls (the client asked while the server pushed) share one activation."""
        if self._activation is None:
            self._activation = asyncio.ensure_future(self._activate())
        await asyncio.shield(self._activation)

    async def _activate(self) -> None:
        assert self.standby and self.jid is not None
        self.presence_due = True
        try:  # listed as a standby until bound: messages for the user wait meanwhile
            record = await self.manager.bind(self, self.jid)
        finally:
            self.manager.drop_standby(self)
        self.standby = False
        self.record = record
        if self._closed:  # the connection went while the roster loaded
            self.manager.unbind(self)
            self.record = None
            return
        self.manager.messages.look_for_offline(self)

    def _enable_sm(self, resume: bool) -> None:
        sm = StreamManagement(ack_interval=_ACK_INTERVAL)  # <r/> at turn ends: _want_ack()
        self.stream.defer_acks = True  # <a/> once what came before is on its way: _acknowledge
        if resume and self.jid is not None and not self.standby:  # a standby is the fallback
            self.resume_token = self.manager.new_token(18)
            self.manager.resumable[self.resume_token] = self
            timeout = int(self.manager.limits.sm_resume_timeout)
            self.stream.sm_enabled(sm, self.resume_token, timeout)
        else:
            self.stream.sm_enabled(sm)

    async def _resume(self, event: stream.ResumeRequested) -> None:
        old = self.manager.resumable.get(event.previd)
        if old is None or old.jid is None or old.jid.local != self.stream.username:
            self.stream.sm_failed("item-not-found")
            return
        assert old.stream.sm is not None
        sm = old.stream.sm
        try:
            sm.acknowledge(event.handled)
        except Exception:  # noqa: BLE001 - a bad h from the client ends the resumption
            del self.manager.resumable[event.previd]
            self.stream.sm_failed("unexpected-request")
            self.manager.spawn(old._terminate())
            return
        still_open = old.hibernated_until is None
        self._adopt(old, event.previd)  # first: closing the old stream must not unbind us
        if still_open:  # the old connection is still open: it ends, this one takes over
            old.close_stream(StreamCondition.CONFLICT, "resumed on another connection")
            old._closed = True
            self.manager.connections.discard(old)
        assert self.jid is not None
        self.stream.defer_acks = True
        for stanza in self.stream.resumed(self.jid, sm, event.previd):
            self.stream.send_raw(serialize(stanza))
        self.flush()

    def _adopt(self, old: ClientSession, resume_token: str) -> None:
        """Take over a session being resumed; the client keeps its resumption id."""
        assert old.jid is not None and old.record is not None
        self.jid = old.jid
        self.record = old.record
        self.available = old.available
        self.priority = old.priority
        self.presence = old.presence
        self.directed = old.directed
        self.roster_requested = old.roster_requested
        self.carbons = old.carbons
        self.attributes = old.attributes
        self.listed, old.listed = old.listed, False
        self.resume_token = resume_token
        self.manager.resumable[resume_token] = self
        if old.record.sessions.get(old.jid.resource) is old:
            old.record.sessions[old.jid.resource] = self
        old.record = None
        old.jid = None
        old.hibernated_until = None

    # --- timers and the end -------------------------------------------------

    def check_timers(self, now: float) -> None:
        limits = self.manager.limits
        if self.jid is None:
            if now - self.connected_at > limits.handshake_timeout:
                self.close_stream(StreamCondition.CONNECTION_TIMEOUT, "log in faster")
            return
        if self.ping_sent_at is not None:
            if now - self.ping_sent_at > limits.ping_timeout:
                # presumed dead, not closed: a resumable session may still come back
                log.info("%s did not answer a ping: dropping the connection", self.jid)
                self.transport.close()
        elif now - self.last_received > limits.idle_timeout:
            self.ping_sent_at = now
            ping = ET.Element(
                ns.tag(ns.CLIENT, "iq"),
                {"type": "get", "id": "ping-" + self.manager.new_token(6), "to": str(self.jid),
                 "from": self.manager.domain},
            )  # fmt: skip
            ET.SubElement(ping, ns.tag(ns.PING, "ping"))
            self.send(ping)

    async def _ended(self) -> None:
        """The connection is gone: hibernate for resumption, or terminate."""
        if self.standby:
            self.manager.unbind(self)  # nothing was routed to it: nothing to hand on
            return
        if self.jid is None or self.record is None:
            return
        if self.resume_token and self.manager.resumable.get(self.resume_token) is self:
            self.hibernated_until = self.manager.clock.now() + self.manager.limits.sm_resume_timeout
            self._settle_receipts(all_of_them=True)  # kept here for resumption: handed on
            return
        await self._terminate()

    def expire_hibernation(self) -> None:
        self.hibernated_until = None
        self.manager.spawn(self._terminate())

    async def _terminate(self) -> None:
        """Withdraw presence and hand every unacknowledged message on."""
        record, jid = self.record, self.jid
        if record is None or jid is None:
            return
        self.manager.unbind(self)
        self.record = None
        if self.available:
            self.available = False
            gone = self.manager.hooks.presence_gone
            if gone is None or not gone(self, jid, record):
                self.manager.presence.went_offline(self, jid, record)
        unacked = self.stream.sm.unacked() if self.stream.sm is not None else []
        messages = [stanza for stanza in (*unacked, *self._undelivered) if stanza.tag == MESSAGE]
        self._undelivered = []
        pending = self.manager.messages.redeliver(messages)
        # they are this node's to deliver now: a peer waiting for their receipt may go on
        # (waiting for the hand-over itself could wait on that same peer: a cycle)
        self._settle_receipts(all_of_them=True)
        for step in pending:
            await step
