"""The session manager (the model's "JSM"): who is online here, and where stanzas go.

It owns the registry of connections, bound sessions (by user and resource)
and hibernated stream-management sessions, and the single routing primitive
`deliver()` for stanzas addressed to a user of this domain. Feature services
(roster, presence, messages, server IQs) hang off it and call back into it.

Rules:
- A user's roster is cached in memory while the user has a session here and
  is written through to the store; only the node serving a user changes it.
- A full JID is bound once: a new bind of the same full JID ends the old
  session with `<conflict/>`.
- A stanza is never dropped silently where the RFCs ask for an error, and a
  message that cannot be delivered to a session goes to offline storage.
"""

from __future__ import annotations

import asyncio
import logging
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from xmpp_ha.core.batch import Batcher
from xmpp_ha.core.clock import Clock
from xmpp_ha.core.errors import StanzaCondition, StanzaError, StreamCondition
from xmpp_ha.core.jid import JID
from xmpp_ha.im.hooks import Hooks
from xmpp_ha.im.throttle import AuthThrottle
from xmpp_ha.protocol.stanzas import OFFLINE_TYPES, SUBSCRIPTION_TYPES, StanzaHeader, error_reply
from xmpp_ha.store.repository import (
    PendingSubscription,
    Repository,
    RosterItem,
    StoreUnavailable,
)

if TYPE_CHECKING:
    from xmpp_ha.im.session import ClientSession

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Limits:
    handshake_timeout: float = 30.0
    idle_timeout: float = 300.0
    ping_timeout: float = 60.0
    max_stanza_bytes: int = 262144
    sm_resume_timeout: float = 300.0
    auth_fail_delay: float = 1.0
    auth_fail_delay_max: float = 30.0
    offline_messages_per_user: int = 1000
    in_transit_per_user: int = 10000  # stanzas on their way to one user without a session here
    standby_hold: float = 10.0  # s a message waits for a standby session's activation
    max_resources_per_user: int = 10
    max_auth_failures_per_stream: int = 5


@dataclass(frozen=True, slots=True)
class _InTransit:
    """A stanza for a user without a session here, waiting for its turn."""

    stanza: ET.Element
    header: StanzaHeader
    may_forward: bool
    done: asyncio.Future[None]


@dataclass
class ServiceSwitches:
    """Parts of the session manager an administrator can stop (SPEC §3 critical services)."""

    session_manager: bool = True  # binds sessions; stopped: sessions end, binds refused
    router: bool = True  # routes stanzas between entities; stopped: they bounce
    presence_engine: bool = True  # processes presence; stopped: presence bounces
    authentication: bool = True  # runs SASL; stopped: temporary-auth-failure


class UserRecord:
    """One user with at least one session on this node."""

    __slots__ = ("username", "bare", "sessions", "roster", "pending_in")

    def __init__(
        self,
        username: str,
        bare: JID,
        roster: dict[str, RosterItem],
        pending_in: dict[str, PendingSubscription],
    ) -> None:
        self.username = username
        self.bare = bare
        self.sessions: dict[str, ClientSession] = {}
        self.roster = roster
        self.pending_in = pending_in

    def available(self) -> list[ClientSession]:
        return [s for s in self.sessions.values() if s.available]

    def presence_due(self) -> bool:
        """A session just activated (dual connections) is about to send its presence."""
        return any(s.presence_due for s in self.sessions.values())

    def interested(self) -> Iterator[ClientSession]:
        """Sessions that asked for the roster and so get roster pushes (RFC 6121 §2.1.6)."""
        return (s for s in self.sessions.values() if s.roster_requested)


class SessionManager:
    def __init__(
        self,
        *,
        domain: str,
        repo: Repository,
        clock: Clock,
        new_token: Callable[[int], str],
        limits: Limits | None = None,
        hooks: Hooks | None = None,
    ) -> None:
        from xmpp_ha.im.messages import MessageService
        from xmpp_ha.im.presence import PresenceService
        from xmpp_ha.im.roster import RosterService
        from xmpp_ha.im.server_iq import IqService

        self.domain = domain
        self.repo = repo
        self.clock = clock
        self.new_token = new_token
        self.limits = limits or Limits()
        self.hooks = hooks or Hooks()
        self.switches = ServiceSwitches()
        self.throttle = AuthThrottle(
            base=self.limits.auth_fail_delay, cap=self.limits.auth_fail_delay_max
        )
        self.connections: set[ClientSession] = set()
        self.users: dict[str, UserRecord] = {}
        self.resumable: dict[str, ClientSession] = {}
        # inactive sessions (dual connections): bound, never routed to; username -> resource
        self.standby: dict[str, dict[str, ClientSession]] = {}
        self._loading: dict[str, asyncio.Future[UserRecord]] = {}
        self._in_transit: dict[str, deque[_InTransit]] = {}  # username -> stanzas, oldest first
        self._available_waiters: dict[str, list[asyncio.Future[None]]] = {}  # _until_available
        # users bound at one time (a failover's activations, a login storm) load together,
        # in one transaction however many (under load every extra round costs a lot)
        self._load_user: Batcher[str, tuple[list[RosterItem], list[PendingSubscription]]] = Batcher(
            repo.load_users, max_batch=10_000
        )
        self._locks: dict[str, list[Any]] = {}  # username -> [lock, holders and waiters]
        self.roster = RosterService(self)
        self.presence = PresenceService(self)
        self.messages = MessageService(self)
        self.iq = IqService(self)
        self.server_jid = JID.make("", domain)
        self.fake_secret = new_token(32).encode()  # keys fake SCRAM salts for unknown users
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, work: Awaitable[None]) -> asyncio.Future[None]:
        """Run work in the background; failures are logged, never lost silently."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background work failed", exc_info=task.exception())

    async def settle(self, rounds: int = 10) -> None:
        """Wait for background work (session endings, offline writes) to finish: what
        runs now, then what that started, for at most `rounds` rounds (stanzas that keep
        arriving from the peer node keep starting new work)."""
        for _ in range(rounds):
            if not self._tasks:
                return
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # --- registry -----------------------------------------------------------

    @property
    def bound_sessions(self) -> int:
        return sum(len(record.sessions) for record in self.users.values())

    def bare(self, username: str) -> JID:
        return JID(username, self.domain)

    @asynccontextmanager
    async def user_lock(self, username: str):  # type: ignore[no-untyped-def]
        """Serialises changes to one user's roster across concurrent sessions."""
        entry = self._locks.get(username)
        if entry is None:
            entry = self._locks[username] = [asyncio.Lock(), 0]
        entry[1] += 1  # holders and waiters: the lock is dropped only when none is left
        try:
            async with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if entry[1] == 0 and self._locks.get(username) is entry:
                del self._locks[username]

    def became_available(self, username: str) -> None:
        """A session of the user sent its initial presence here."""
        for waiter in self._available_waiters.pop(username, ()):
            if not waiter.done():
                waiter.set_result(None)

    async def _until_available(self, username: str, timeout: float) -> None:
        """Wait (at most `timeout` s) until a session of the user here is available."""
        record = self.users.get(username)
        if record is not None and record.available():
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters = self._available_waiters.setdefault(username, [])
        waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            pass
        finally:
            if waiter in waiters:
                waiters.remove(waiter)
            if not waiters and self._available_waiters.get(username) is waiters:
                del self._available_waiters[username]

    async def _record_for(self, username: str) -> UserRecord:
        record = self.users.get(username)
        if record is not None:
            return record
        loading = self._loading.get(username)
        if loading is not None:
            return await asyncio.shield(loading)
        future: asyncio.Future[UserRecord] = asyncio.get_running_loop().create_future()
        self._loading[username] = future
        try:
            roster, pending = await self._load_user(username)
            record = UserRecord(
                username,
                self.bare(username),
                {item.contact: item for item in roster},
                {request.contact: request for request in pending},
            )
            self.users[username] = record
            future.set_result(record)
            return record
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters re-raise it
            raise
        finally:
            del self._loading[username]

    async def bind(self, session: ClientSession, jid: JID) -> UserRecord:
        record = await self._record_for(jid.local)
        previous = record.sessions.get(jid.resource)
        if previous is None and len(record.sessions) >= self.limits.max_resources_per_user:
            if not record.sessions:
                self._drop_record_if_empty(record)
            raise StanzaError(StanzaCondition.RESOURCE_CONSTRAINT, "too many resources")
        record.sessions[jid.resource] = session  # taken first, so the record stays alive
        session.listed = True
        if previous is not None and previous is not session:
            previous.replaced_by_conflict()
        for listener in self.hooks.session_bound:
            listener(session)
        return record

    def bind_standby(self, session: ClientSession, jid: JID) -> None:
        """Register an inactive session; an older one of the same full JID ends (conflict)."""
        sessions = self.standby.setdefault(jid.local, {})
        previous = sessions.get(jid.resource)
        sessions[jid.resource] = session
        if previous is not None and previous is not session:
            previous.close_stream(StreamCondition.CONFLICT, "replaced by a new standby session")

    def drop_standby(self, session: ClientSession) -> None:
        if session.jid is None:
            return
        sessions = self.standby.get(session.jid.local)
        if sessions is not None and sessions.get(session.jid.resource) is session:
            del sessions[session.jid.resource]
            if not sessions:
                del self.standby[session.jid.local]

    @property
    def standby_sessions(self) -> int:
        return sum(len(sessions) for sessions in self.standby.values())

    def unbind(self, session: ClientSession) -> None:
        """Take a session out of the registry (its presence is handled by the caller)."""
        if session.standby:
            self.drop_standby(session)
            return
        record = session.record
        if record is None or session.jid is None:
            return
        if record.sessions.get(session.jid.resource) is session:
            del record.sessions[session.jid.resource]
        if session.listed:
            session.listed = False
            for listener in self.hooks.session_closed:
                listener(session)
        self._drop_record_if_empty(record)

    def _drop_record_if_empty(self, record: UserRecord) -> None:
        if not record.sessions and self.users.get(record.username) is record:
            del self.users[record.username]

    def session_for(self, jid: JID) -> ClientSession | None:
        record = self.users.get(jid.local)
        return record.sessions.get(jid.resource) if record is not None else None

    # --- routing ------------------------------------------------------------

    def is_local_user(self, jid: JID) -> bool:
        return jid.domain == self.domain and bool(jid.local)

    def route(self, stanza: ET.Element, header: StanzaHeader) -> Awaitable[None] | None:
        """Send a stanza to any address: a local user, this server, or a refusal."""
        to = header.to
        if not self.switches.router:
            if header.type != "error":
                return self.bounce(stanza, StanzaError(StanzaCondition.SERVICE_UNAVAILABLE))
            return None
        if to is None or to.domain != self.domain:
            if header.type != "error":
                return self.bounce(stanza, StanzaError(StanzaCondition.REMOTE_SERVER_NOT_FOUND))
            return None
        if not to.local:
            return None  # server-generated replies to the server itself end here
        return self.deliver(stanza, header)

    def deliver(
        self, stanza: ET.Element, header: StanzaHeader, *, may_forward: bool = True
    ) -> Awaitable[None] | None:
        """Hand a stanza to the local user it is addressed to (header.to has a localpart).

        A user without a session here gets the stanza through its queue of
        stanzas in transit (to the peer node, the offline store or the account
        handler), processed in order by one task, so that nothing waits for
        the store or the peer link but the stanzas for that one user. The
        returned awaitable completes when the stanza has been handled; a
        sender that must not block (a client session) need not await it.
        """
        assert header.to is not None
        username = header.to.local
        queue = self._in_transit.get(username)
        if queue is None:
            record = self.users.get(username)
            if (
                record is not None
                and not (header.kind == "message" and record.presence_due())
                and not (may_forward and self._served_elsewhere(username))
            ):
                return self._deliver_to(record, stanza, header, confirm=not may_forward)
            queue = self._in_transit[username] = deque()
            self.spawn(self._forward_in_transit(username, queue))
        elif len(queue) >= self.limits.in_transit_per_user:
            if header.type not in ("error", "result"):
                return self.bounce(stanza, StanzaError(
                    StanzaCondition.RESOURCE_CONSTRAINT, "too many stanzas on their way to this user"
                ))  # fmt: skip
            return None
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue.append(_InTransit(stanza, header, may_forward, done))
        return done

    def _served_elsewhere(self, username: str) -> bool:
        served_elsewhere = self.hooks.served_elsewhere
        return served_elsewhere is not None and served_elsewhere(username)

    def deliver_here(self, stanza: ET.Element, header: StanzaHeader) -> Awaitable[None] | None:
        """Deliver on this node only (a stanza another node forwarded here): never forward."""
        return self.deliver(stanza, header, may_forward=False)

    def _deliver_to(
        self, record: UserRecord, stanza: ET.Element, header: StanzaHeader, *, confirm: bool = False
    ) -> Awaitable[None] | None:
        """`confirm` (a stanza another node handed over): messages count as delivered once
        the receiving clients acknowledged them."""
        if header.kind == "message":
            return self.messages.deliver_local(record, stanza, header, confirm=confirm)
        if header.kind == "presence":
            return self.presence.deliver_local(record, stanza, header, from_peer=confirm)
        return self.iq.deliver_local(record, stanza, header)

    async def _forward_in_transit(self, username: str, queue: deque[_InTransit]) -> None:
        """Handle one user's stanzas in transit, oldest first, until none is left."""
        try:
            while queue:
                item = queue[0]
                try:
                    await self._deliver_absent(
                        item.stanza, item.header, may_forward=item.may_forward
                    )
                except Exception as exc:
                    queue.popleft()
                    if not item.may_forward:  # the node that forwarded it handles the failure
                        if not item.done.done():
                            item.done.set_exception(exc)
                        continue
                    if not isinstance(exc, (StoreUnavailable, StanzaError)):
                        log.error("delivering to %s failed", username, exc_info=exc)
                    await self._refuse_in_transit(item, exc)
                else:
                    queue.popleft()
                if not item.done.done():
                    item.done.set_result(None)
        finally:
            if self._in_transit.get(username) is queue:
                del self._in_transit[username]
            for item in queue:  # only when cancelled (shutdown): tell the waiting senders
                if not item.done.done():
                    item.done.cancel()

    async def _refuse_in_transit(self, item: _InTransit, exc: Exception) -> None:
        if isinstance(exc, StanzaError):
            error = exc
        else:
            log.warning("cannot deliver a %s to %s: %s", item.header.kind, item.header.to, exc)
            error = StanzaError(StanzaCondition.INTERNAL_SERVER_ERROR, "the store is unavailable")
        if item.header.type not in ("error", "result"):
            await _awaited(self.bounce(item.stanza, error))

    async def _deliver_absent(
        self, stanza: ET.Element, header: StanzaHeader, *, may_forward: bool
    ) -> None:
        assert header.to is not None
        username = header.to.local
        route_remote = self.hooks.route_remote if may_forward else None
        if route_remote is not None and await route_remote(username, stanza):
            return
        if header.kind == "presence" and header.type not in SUBSCRIPTION_TYPES:
            return  # presence for someone offline is dropped (RFC 6121 §4.3.2, §4.6.3)
        record = self.users.get(username)
        held = header.kind == "message" and (
            username in self.standby or (record is not None and record.presence_due())
        )
        if held:
            # its standby session here is about to be activated (its node is unreachable),
            # or was just activated and its presence is on its way: hand the message over
            # then rather than through the offline store, after what waited there (the
            # flush at presence holds the user's lock)
            await self._until_available(username, self.limits.standby_hold)
            record = self.users.get(username)
            if record is not None and not record.available():
                for session in record.sessions.values():
                    session.presence_due = False  # no presence came: stop holding
        async with self.user_lock(username) if held else nullcontext():
            record = self.users.get(username)
            if record is not None:  # the user bound (or was activated) while we asked
                await _awaited(self._deliver_to(record, stanza, header, confirm=not may_forward))
                return
        if header.kind == "message" and header.type in OFFLINE_TYPES:
            # stored, or refused when the queue is full or the user does not exist
            await self.messages.deliver_offline(username, stanza, header)
            return
        if not await self.repo.user_exists(username):
            if header.kind != "presence" and header.type not in ("error", "result"):
                await _awaited(
                    self.bounce(stanza, StanzaError(StanzaCondition.SERVICE_UNAVAILABLE))
                )
            return
        if header.kind == "message":
            await self.messages.deliver_offline(username, stanza, header)
        elif header.kind == "presence":
            await self.presence.deliver_offline(username, stanza, header)
        else:
            await _awaited(self.iq.for_account(stanza, header))

    def bounce(self, stanza: ET.Element, error: StanzaError) -> Awaitable[None] | None:
        """Return an error to the stanza's sender; errors about errors are dropped."""
        if stanza.get("type") == "error" or not stanza.get("from"):
            return None
        reply = error_reply(stanza, error)
        return self.route(reply, StanzaHeader.of(reply))

    # --- housekeeping -------------------------------------------------------

    def sweep(self, now: float) -> None:
        """Time out silent connections, ping idle ones, expire hibernated sessions."""
        for session in list(self.connections):
            session.check_timers(now)
        for token, session in list(self.resumable.items()):
            if session.hibernated_until is not None and now >= session.hibernated_until:
                del self.resumable[token]
                session.expire_hibernation()

    def end_hibernated(self, which: Callable[[str], bool]) -> None:
        """End the hibernated (XEP-0198 resumable) sessions of the users `which` selects:
        they moved to the other node and cannot resume here; what those sessions had not
        delivered is handed on."""
        for token, session in list(self.resumable.items()):
            jid = session.jid
            if session.hibernated_until is not None and jid is not None and which(jid.local):
                del self.resumable[token]
                session.expire_hibernation()

    def close_sessions(
        self,
        condition: StreamCondition,
        text: str = "",
        *,
        only: Callable[[ClientSession], bool] | None = None,
    ) -> int:
        """End client streams (all, or those `only` selects); returns how many."""
        closed = 0
        for session in list(self.connections):
            if only is None or only(session):
                session.close_stream(condition, text)
                closed += 1
        return closed

    async def shutdown(self) -> None:
        self.close_sessions(StreamCondition.SYSTEM_SHUTDOWN)
        for session in list(self.resumable.values()):
            session.expire_hibernation()
        self.resumable.clear()
        await asyncio.sleep(0)
        await self.settle()


async def _awaited(pending: Awaitable[None] | None) -> None:
    if pending is not None:
        await pending
