"""Dual connections (docs/dual-connections.md) for an ordinary slixmpp client.

The `ha_dual` plug-in is the third driver of `client_sim.dual.DualCore`, next to the
asyncio and gevent drivers of client_sim's own stream: it tells the core what happens
and carries out the actions it returns; it decides nothing itself.

    import client_sim.slixmpp_dual  # registers "ha_dual"

    xmpp = slixmpp.ClientXMPP("alice@example.org/laptop", "secret")
    xmpp.register_plugin("xep_0198")  # before ha_dual when configured
    xmpp.register_plugin("ha_dual", {"keepalive_interval": 10.0})
    xmpp.add_event_handler("ha_dual_switched", lambda downtime: print(downtime.seconds))
    xmpp.connect(host, port)

Events fired on the application's object: `ha_dual_standby` (the server's name of the
node where a standby session is now bound), `ha_dual_active` (that name, once its
standby session is active and carries the application's stream) and `ha_dual_switched`
(the `client_sim.dual.Downtime` of the switch, once a round trip on the new session
came back). Without the offer (HA off, no TLS) the plug-in does nothing.

How the application carries on over the standby's connection: from the session start
on, the application's `transport` is a `_Wire`, a stand-in that writes to whichever TLS
connection is active, and each real connection's protocol is a `_Seam` that feeds the
application's parser while that connection is the active one. A lost active connection
is reported to the plug-in, not to slixmpp: the application sees no `disconnected`, no
`session_end` and no new `session_start`. The standby session is an internal
`ClientXMPP` (STARTTLS, SASL, a bind with `<standby/>`, XEP-0198 without resumption).
When its activation comes (the answer to our request or a push), it stops handling what
it parses next; at the end of that chunk of input the plug-in moves into the
application's object, in one synchronous step:
- the TLS transport (its protocol becomes a `_Seam` of the application) and the XML
  parser with its state (parser, depth, root, stream id);
- the XEP-0198 counters of the new stream (the server counts per stream: handled, seq,
  last ack, unacknowledged queue), without a resumption id;
- what the standby had queued for sending, and what it parsed after the activation
  (replayed through the application's input path: filters, XEP-0198, handlers).
Then it writes the application's last broadcast presence, its directed presences and
every stanza the old stream never had acknowledged (counted on the new stream), and
aborts the old connection if it is still open. While no session is active the
application keeps sending: its stanzas go nowhere but stay in its XEP-0198 queue, and
are among those sent again. Incoming messages are de-duplicated by (from, id) after
XEP-0198 counted them (an `in` filter), so the application's handlers see each once.

Rules for the application: enable `xep_0198` (the plug-in depends on it); do not enable
`xep_0199`'s keepalive (it reconnects, which is a new login): the plug-in's own
keepalive (`keepalive_interval`, `keepalive_timeout`; 0 turns it off) detects a silent
active connection. `disconnect()` and `abort()` end both sessions. When no switch is
possible (no standby, or the activation refused), the application is told
`disconnected` as without the plug-in, and the plug-in starts again at its next
`session_start`. The core names nodes by "host:port" (of the active connection and of
the plans); the server's node names come from the plans.

Relies on slixmpp 1.x internals (checked with 1.17): `XMLStream.parser`, `xml_depth`,
`xml_root`, `_spawn_event`, `waiting_queue`, `scheduled_events`, `_run_out_filters`,
the `xep_0198` plug-in's counters and `_handle_outgoing`, and the bind feature's order.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import random
import xml.etree.ElementTree as ET
from collections.abc import Callable, Coroutine
from typing import Any, ClassVar, cast

from slixmpp import JID, ClientXMPP, Iq, Message, Presence
from slixmpp.exceptions import IqError, IqTimeout
from slixmpp.plugins.base import BasePlugin, register_plugin
from slixmpp.stanza import StreamError
from slixmpp.xmlstream import StanzaBase, tostring
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher.base import MatcherBase

from client_sim.dual import (
    Action,
    Activate,
    DualCore,
    OpenStandby,
    Probe,
    Promote,
    Relogin,
    RequestPlan,
)
from xmpp_ha.protocol import ns

log = logging.getLogger(__name__)
_PROBE_PREFIX = "ha-dual-probe-"  # messages to ourselves that time a switch

PLAN = ns.tag(ns.DUAL, "plan")
ACTIVATE = ns.tag(ns.DUAL, "activate")
STANDBY = ns.tag(ns.DUAL, "standby")
DUAL = ns.tag(ns.DUAL, "dual")
PING = "{urn:xmpp:ping}ping"
_BIND = "{urn:ietf:params:xml:ns:xmpp-bind}bind"
_FEATURES = "{http://etherx.jabber.org/streams}features"
_STANZAS = "{urn:ietf:params:xml:ns:xmpp-stanzas}"
_BIND_ORDER = 10000  # slixmpp's feature_bind registers 'bind' with this order
_AVAILABLE = ("available", "away", "chat", "dnd", "xa")


def _write_now(xmpp: ClientXMPP, stanza: StanzaBase) -> None:
    """Write a stanza at once, counted by XEP-0198 as its `out_sync` filter would."""
    cast(Any, xmpp.plugin["xep_0198"])._handle_outgoing(stanza)
    xmpp.send_raw(tostring(stanza.xml, xmlns=xmpp.default_ns, stream=xmpp, top_level=True))


def _condition(stanza: StanzaBase) -> str:
    error = stanza.xml.find("{jabber:client}error")
    for child in error if error is not None else ():
        if child.tag.startswith(_STANZAS):
            return str(child.tag[len(_STANZAS) :])
    return "undefined-condition"


class _Test(MatcherBase):
    def __init__(self, test: Callable[[StanzaBase], bool]) -> None:
        super().__init__(None)
        self._test = test

    def match(self, xml: StanzaBase) -> bool:
        return self._test(xml)


class _Wire:
    """The application's `transport` while the plug-in runs: writes go to the active TLS
    connection, or nowhere while there is none (XEP-0198 keeps them for the switch)."""

    def __init__(self, owner: HADual, target: asyncio.Transport) -> None:
        self.owner = owner
        self.target: asyncio.Transport | None = target

    def write(self, data: bytes) -> None:
        if data.strip() == self.owner.xmpp.stream_footer.encode():
            self.owner._app_closes()
        if self.target is not None:
            self.target.write(data)

    def close(self) -> None:
        self.owner._app_aborts()

    def abort(self) -> None:
        self.owner._app_aborts()

    def is_closing(self) -> bool:
        return self.target is None or self.target.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default if self.target is None else self.target.get_extra_info(name, default)


class _Seam(asyncio.Protocol):
    """The protocol of one real connection that carries (or carried) the application."""

    def __init__(self, owner: HADual, transport: asyncio.Transport) -> None:
        self.owner = owner
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.owner._deliver(self.transport, data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner._transport_lost(self.transport, exc)


class _Standby(ClientXMPP):
    """The inactive session: logs in, binds with `<standby/>`, answers pushes, and hands
    its stream over once activated."""

    def __init__(self, owner: HADual, jid: str, password: str) -> None:
        super().__init__(jid, password)
        self.owner = owner
        self.activation_id = ""
        self.answers: list[StanzaBase] = []  # activation answers and pushes of the current chunk
        self.handover: list[ET.Element] | None = None  # parsed after the activation
        self.register_plugin("xep_0198", {"allow_resume": False})
        self.register_plugin("xep_0199")  # answers the server's pings
        self.unregister_feature("bind", _BIND_ORDER)
        self.register_feature("bind", self._bind_standby, restart=False, order=_BIND_ORDER)
        self.register_handler(
            Callback("ha_dual activation", _Test(self._is_activation), self._on_activation,
                     instream=True)
        )  # fmt: skip
        self.add_event_handler("session_start", lambda _e: owner._standby_bound(self))
        self.add_event_handler("connection_failed", lambda _e: owner._standby_gone(self))
        self.add_event_handler("disconnected", lambda _e: owner._standby_gone(self))

    async def _bind_standby(self, features: Any) -> bool:
        iq = self.Iq()
        iq["type"] = "set"
        iq.enable("bind")
        iq["bind"]["resource"] = self.requested_jid.resource
        iq["bind"].xml.append(ET.Element(STANDBY))
        try:
            result = await cast(Any, iq).send(timeout=self.owner.config["request_timeout"])
        except (IqError, IqTimeout) as exc:
            log.info("%s: standby refused: %s", self.requested_jid, exc)
            self.discard()
            return False
        if result.xml.find(f"{_BIND}/{STANDBY}") is None:  # bound active: not ours to use
            log.warning("%s: the server bound an active session", self.requested_jid)
            self.discard()
            return False
        self.boundjid = JID(result["bind"]["jid"])
        self.bound = True
        self.features.add("bind")
        if "session" not in features["features"]:  # else feature_session starts it
            self.sessionstarted = True
            self.event("session_start")
        return False

    def _is_activation(self, stanza: StanzaBase) -> bool:
        if not isinstance(stanza, Iq):
            return False
        if stanza["type"] == "set":
            return stanza.xml.find(ACTIVATE) is not None
        return bool(self.activation_id) and stanza["id"] == self.activation_id

    def _on_activation(self, stanza: StanzaBase) -> None:
        if stanza["type"] == "set":
            _write_now(self, cast(Any, stanza).reply())
        if stanza["type"] != "error":  # active from here on: the rest is the app's
            self.handover = []
        self.answers.append(stanza)

    def _spawn_event(self, xml: ET.Element) -> None:
        if self.handover is not None:
            self.handover.append(xml)
            return
        super()._spawn_event(xml)

    def data_received(self, data: bytes | str) -> None:
        super().data_received(data)
        if self.answers:
            answers, self.answers = self.answers, []
            self.owner._standby_answered(self, answers)

    def discard(self) -> None:
        """Stop everything of this session (its connection, if still ours, is aborted)."""
        self.cancel_connection_attempt()
        for name in list(self.scheduled_events):
            self.cancel_schedule(name)
        self.abort()
        if self._run_out_filters is not None:
            self._run_out_filters.cancel()


class HADual(BasePlugin):
    """Dual connections of the application's `ClientXMPP` (see the module docstring)."""

    name = "ha_dual"
    description = "xmpp-ha dual connections (urn:xmpp-ha:dual:0)"
    dependencies: ClassVar[set[str]] = {"xep_0198"}
    default_config: ClassVar[dict[str, Any]] = {
        "keepalive_interval": 10.0,  # s between pings on the active session; 0: none
        "keepalive_timeout": 5.0,  # s without an answer: the active session is lost
        "standby_timeout": 10.0,  # s to connect, log in and bind a standby session
        "request_timeout": 10.0,  # s to wait for a plan or a bind answer
    }

    def plugin_init(self) -> None:
        self.core = DualCore(nodes={}, jitter=lambda: random.uniform(0.5, 1.0))
        self.names: dict[str, str] = {}  # "host:port" -> the server's node name
        self.offered = False  # the last features with <bind/> offered dual connections
        self.wire: _Wire | None = None  # set while the plug-in runs
        self.standby: _Standby | None = None
        self._loop = self.app.loop
        self._closing = False
        self._delivering = False
        self._lost_reported = False
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._probes = itertools.count(1)
        self._probe_id = ""
        self._presence: StanzaBase | None = None  # the last broadcast presence sent
        self._directed: dict[str, StanzaBase] = {}  # directed presence sent, by full JID
        xmpp = self.xmpp
        xmpp.register_handler(
            Callback("ha_dual features", _Test(lambda s: s.xml.tag == _FEATURES),
                     self._on_features, instream=True)
        )  # fmt: skip
        xmpp.register_handler(
            Callback("ha_dual crossed push", _Test(self._is_push), self._on_crossed_push,
                     instream=True)
        )  # fmt: skip
        xmpp.add_event_handler("stream_negotiated", self._on_negotiated)
        xmpp.add_filter("in", self._filter_in)  # after xep_0198's: it counts first
        xmpp.add_filter("out_sync", self._record_presence)

    def plugin_end(self) -> None:
        self._disarm()
        xmpp = self.xmpp
        xmpp.remove_handler("ha_dual features")
        xmpp.remove_handler("ha_dual crossed push")
        xmpp.del_event_handler("stream_negotiated", self._on_negotiated)
        xmpp.del_filter("in", self._filter_in)
        xmpp.del_filter("out_sync", self._record_presence)

    @property
    def app(self) -> ClientXMPP:
        """The application's object (a client: the plug-in is for clients)."""
        return cast(ClientXMPP, self.xmpp)

    @property
    def serving_node(self) -> str | None:
        """The server's name of the node of the active session (when a plan named it)."""
        active = self.core.active
        return None if active is None else self.names.get(active, active)

    # --- the application's stream -----------------------------------------------------

    def _on_features(self, features: StanzaBase) -> None:
        if features.xml.find(_BIND) is not None:
            self.offered = features.xml.find(DUAL) is not None

    def _on_negotiated(self, _event: Any) -> None:
        """Bound, and XEP-0198 enabled: what we send from now on is counted by both ends."""
        transport = self.app.transport
        self._closing = self._lost_reported = False
        if not self.offered or not self.app.bound or transport is None:
            return
        if isinstance(transport, _Wire):
            return
        if transport.get_extra_info("ssl_object") is None:
            return
        host, port = transport.get_extra_info("peername")[:2]
        key = f"{host}:{port}"
        self.core.nodes[key] = (host, port)
        self.wire = _Wire(self, transport)
        self.app.transport = cast(asyncio.Transport, self.wire)
        transport.set_protocol(_Seam(self, transport))
        self._run(self.core.active_started(self._loop.time(), key, dual_offered=True))
        if self.config["keepalive_interval"]:
            self._spawn(self._keepalive(self.wire))

    def _deliver(self, transport: asyncio.Transport, data: bytes) -> None:
        if self.wire is None or self.wire.target is not transport:
            return  # a connection we switched away from
        self._delivering = True
        try:
            self.app.data_received(data)
        finally:
            self._delivering = False

    def _transport_lost(self, transport: asyncio.Transport, exc: Exception | None) -> None:
        wire = self.wire
        if wire is None or wire.target is not transport:
            return
        wire.target = None
        if self._closing:
            self._disarm()
            self._report_lost(exc)
            return
        log.info("%s: active connection lost (%s)", self.app.boundjid, exc)
        self._run(self.core.active_lost(self._loop.time(), []))

    def _drop_active(self, why: str) -> None:
        """The active session is unusable though its connection is open: leave it."""
        wire = self.wire
        if wire is None or wire.target is None:
            return
        log.info("%s: leaving the active connection: %s", self.app.boundjid, why)
        old, wire.target = wire.target, None
        old.set_protocol(asyncio.Protocol())
        old.abort()
        self._run(self.core.active_lost(self._loop.time(), []))

    def _app_closes(self) -> None:
        """The application ends its stream: no switch from now on."""
        if self._closing:
            return
        self._closing = True
        self._stop_work()
        if self.standby is not None:
            standby, self.standby = self.standby, None
            standby.discard()

    def _app_aborts(self) -> None:
        wire = self.wire
        if wire is None:
            return
        if self._delivering and not self._closing:  # the server ended the stream
            self._drop_active("the stream ended")
            return
        self._app_closes()
        if wire.target is not None:
            wire.target.abort()  # its connection_lost tells the application
        else:
            self._disarm()
            self._loop.call_soon(self._report_lost, None)

    def _report_lost(self, exc: Exception | None) -> None:
        """Tell the application its connection is gone, as slixmpp would have."""
        if self._lost_reported:
            return
        self._lost_reported = True
        self.app.connection_lost(exc)

    def _filter_in(self, stanza: StanzaBase) -> StanzaBase | None:
        wire = self.wire
        if wire is None:
            return stanza
        if isinstance(stanza, StreamError):
            # the old node closes its side (see-other-host) when a switch is on its way:
            # the standby carries on; without one the application handles it itself
            if self._delivering and wire.target is not None and self.core.standby is not None:
                self._drop_active(f"stream error {stanza['condition']}")
                return None
            return stanza
        if isinstance(stanza, Message) and stanza["type"] != "error":
            sender, message_id = str(stanza["from"]), str(stanza["id"])
            own = stanza["from"].bare == self.app.boundjid.bare
            if own and message_id.startswith(_PROBE_PREFIX):
                if message_id == self._probe_id:  # else a late copy the old node handed on
                    self._probe_id = ""
                    self._run(self.core.probe_returned(self._loop.time()))
                    if self.core.downtimes:
                        self.app.event("ha_dual_switched", self.core.downtimes[-1])
                return None
            if not self.core.message_received(sender, message_id):
                return None
        return stanza

    def _record_presence(self, stanza: StanzaBase) -> StanzaBase:
        if isinstance(stanza, Presence):
            to, kind = stanza["to"], stanza["type"]
            if not to:
                self._presence = stanza if kind in _AVAILABLE else None
            elif kind in _AVAILABLE:
                self._directed[to.full] = stanza
            elif kind == "unavailable":
                self._directed.pop(to.full, None)
        return stanza

    def _is_push(self, stanza: StanzaBase) -> bool:
        return (
            isinstance(stanza, Iq)
            and stanza["type"] == "set"
            and stanza.xml.find(ACTIVATE) is not None
        )

    def _on_crossed_push(self, stanza: StanzaBase) -> None:
        """A push that crossed our request arrives on the session already active."""
        cast(Any, stanza).reply().send()

    async def _keepalive(self, wire: _Wire) -> None:
        while self.wire is wire:
            await asyncio.sleep(self.config["keepalive_interval"])
            target = wire.target
            if target is None or self.wire is not wire:
                continue
            iq = self.app.Iq()
            iq["type"], iq["to"] = "get", self.app.boundjid.domain
            iq.xml.append(ET.Element(PING))
            try:
                await cast(Any, iq).send(timeout=self.config["keepalive_timeout"])
            except IqError:
                pass  # an answer all the same
            except IqTimeout:
                if wire.target is target:
                    self._drop_active("keepalive unanswered")

    # --- the standby session ---------------------------------------------------------

    async def _open_standby(self, action: OpenStandby) -> None:
        app = self.app
        standby = _Standby(self, app.boundjid.full, app.password)
        standby.enable_direct_tls = False
        standby.enable_plaintext = False
        standby.ssl_context = app.ssl_context
        standby.ca_certs = app.ca_certs
        self.standby = standby
        standby.connect(action.host, action.port)
        await asyncio.sleep(self.config["standby_timeout"])
        if self.standby is standby and self.core.standby is None:
            log.info("%s: standby on %s not bound in time", app.boundjid, action.node)
            standby.discard()
            self._standby_gone(standby)

    def _standby_bound(self, standby: _Standby) -> None:
        if self.standby is not standby or self.core.standby_opening is None:
            standby.discard()
            return
        key = self.core.standby_opening
        self.app.event("ha_dual_standby", self.names.get(key, key))
        self._run(self.core.standby_started(self._loop.time()))

    def _standby_gone(self, standby: _Standby) -> None:
        if self.standby is not standby:
            return
        log.info("%s: standby session lost or refused", self.app.boundjid)
        self.standby = None
        standby.cancel_connection_attempt()  # slixmpp would retry for ever
        if self.wire is not None and not self._closing:
            self._run(self.core.standby_lost(self._loop.time()))

    def _standby_answered(self, standby: _Standby, answers: list[StanzaBase]) -> None:
        for answer in answers:
            if self.standby is not standby:
                break  # switched (or given up) already: a crossed answer
            now = self._loop.time()
            if answer["type"] == "set":
                self._run(self.core.activated(now, pushed=True))
            elif answer["type"] == "result":
                self._run(self.core.activated(now))
            else:
                actions = self.core.activation_refused(now, _condition(answer))
                if self.core.standby is None:  # given up on it
                    self.standby = None
                    standby.discard()
                self._run(actions)
        if self.standby is standby and standby.handover is not None:
            log.error("%s: activated standby not taken over", self.app.boundjid)

    def _activate(self) -> None:
        standby = self.standby
        if standby is None or standby.transport is None:
            return
        iq = standby.Iq()
        iq["type"] = "set"
        iq["id"] = standby.activation_id = standby.new_id()
        iq.xml.append(ET.Element(ACTIVATE))
        _write_now(standby, iq)

    # --- the switch ---------------------------------------------------------------------

    def _promote(self, _action: Promote) -> None:
        """The standby's connection carries the application's stream from now on."""
        standby, wire, app = self.standby, self.wire, self.app
        if standby is None or wire is None or standby.transport is None:
            return
        self.standby = None
        sm, standby_sm = app.plugin["xep_0198"], standby.plugin["xep_0198"]
        unacked = [stanza for _seq, stanza in sm.unacked_queue]
        if wire.target is not None:  # pushed while the old one was fine (or frozen)
            old, wire.target = wire.target, None
            old.set_protocol(asyncio.Protocol())
            old.abort()
        transport, standby.transport = standby.transport, None
        app.parser, app.xml_depth, app.xml_root = (
            standby.parser,
            standby.xml_depth,
            standby.xml_root,
        )
        standby.parser = None
        app.socket, app.stream_id = standby.socket, standby.stream_id
        wire.target = transport
        transport.set_protocol(_Seam(self, transport))
        # the new stream's XEP-0198 state is the standby's: the server counts per stream
        sm.handled, sm.seq, sm.last_ack = standby_sm.handled, standby_sm.seq, standby_sm.last_ack
        sm.unacked_queue = collections.deque(standby_sm.unacked_queue)
        sm.enabled_in, sm.enabled_out = standby_sm.enabled_in, standby_sm.enabled_out
        sm.window_counter, sm.sm_id = standby_sm.window_counter, None
        while not standby.waiting_queue.empty():
            app.waiting_queue.put_nowait(standby.waiting_queue.get_nowait())
            standby.waiting_queue.task_done()
        handover, standby.handover = standby.handover or [], None
        standby.discard()
        # presence as on a new login, then what the old stream never had acknowledged
        again = [self._presence, *self._directed.values()]
        again += [s for s in unacked if not isinstance(s, Iq | Presence)]
        sent = [stanza for stanza in again if stanza is not None]
        for stanza in sent:
            _write_now(app, stanza)
        for xml in handover:
            app._spawn_event(xml)
        node = self.serving_node
        log.info("%s: active on %s, %d stanzas sent again (XEP-0198 seq %d, acked %d, h %d)",
                 app.boundjid, node, len(sent), sm.seq, sm.last_ack, sm.handled)  # fmt: skip
        app.event("ha_dual_active", node)

    def _probe(self) -> None:
        """A message to our own full JID: its return ends the switch's downtime."""
        if self.wire is None or self.wire.target is None:
            return
        self._probe_id = f"{_PROBE_PREFIX}{next(self._probes)}"
        probe = self.app.make_message(self.app.boundjid.full, "probe", mtype="chat")
        probe["id"] = self._probe_id
        probe.send()

    def _give_up(self) -> None:
        """No switch possible: the application learns its connection is gone."""
        log.info("%s: no standby to switch to", self.app.boundjid)
        wire = self.wire
        if wire is not None and wire.target is not None:
            old, wire.target = wire.target, None
            old.set_protocol(asyncio.Protocol())
            old.abort()
        self._disarm()
        self.core.standby = self.core.standby_opening = None
        self._loop.call_soon(self._report_lost, None)

    # --- running the core ------------------------------------------------------------------

    def _run(self, actions: list[Action]) -> None:
        for action in actions:
            self._do(action)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        due = self.core.due()
        if due is not None and self.wire is not None and not self._closing:
            self._timer = self._loop.call_at(due, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self._run(self.core.tick(self._loop.time()))

    def _do(self, action: Action) -> None:
        if self.wire is None or self._closing:
            return
        if isinstance(action, RequestPlan):
            self._spawn(self._request_plan(self.wire))
        elif isinstance(action, OpenStandby):
            self._spawn(self._open_standby(action))
        elif isinstance(action, Activate):
            self._activate()
        elif isinstance(action, Promote):
            self._promote(action)
        elif isinstance(action, Probe):
            self._probe()
        elif isinstance(action, Relogin):
            self._give_up()

    async def _request_plan(self, wire: _Wire) -> None:
        target = wire.target
        if target is None:
            return
        iq = self.app.Iq()
        iq["type"] = "get"
        iq.xml.append(ET.Element(PLAN))
        try:
            answer = (await cast(Any, iq).send(timeout=self.config["request_timeout"])).xml
        except IqError as exc:
            answer = exc.iq.xml
        except IqTimeout:
            if self.wire is not wire or wire.target is not target:
                return  # asked on a session that ended: the switch asks again
            answer = ET.Element("timeout")
        self._run(self._plan_answer(answer, self._loop.time()))

    def _plan_answer(self, answer: ET.Element, now: float) -> list[Action]:
        plan = answer.find(PLAN)
        if answer.get("type") != "result" or plan is None:
            log.info("%s: no plan: %s", self.app.boundjid, ET.tostring(answer)[:200])
            return self.core.plan_refused(now)
        host = plan.get("host", "")
        try:
            port, delay = int(plan.get("port", "")), float(plan.get("delay", ""))
        except ValueError:
            return self.core.plan_refused(now)
        key = f"{host}:{port}"
        self.names[key] = plan.get("node", key)
        return self.core.plan(now, key, host, port, delay)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task: asyncio.Task[None] = self._loop.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _stop_work(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for task in list(self._tasks):
            if task is not asyncio.current_task():
                task.cancel()

    def _disarm(self) -> None:
        self._stop_work()
        self.wire = None
        if self.standby is not None:
            standby, self.standby = self.standby, None
            standby.discard()


register_plugin(HADual)
