"""A node's part in its presence redundancy group: the SRM at work.

This adapter wires the pure SRM and failure detector to the world: the peer
link (heartbeats, signals, routed stanzas), the store (leases, the group's
failover record, fenced user moves), the critical services, and the session
manager's hooks (who may log in here, where a stanza for a user on the peer
goes, whether this node may serve at all). All timing is read here.

Fencing: a node serves only while its own store lease is fresh. Its peer
takes its users over only after the lease stopped advancing for the
heartbeat timeout, and this node stops serving a little earlier than that
(one heartbeat interval), so a frozen or partitioned node never serves users
that moved. When it recovers it restarts its SRM from the store's record.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from xmpp_ha.core.clock import Clock
from xmpp_ha.core.errors import StreamCondition
from xmpp_ha.ha.detector import Detector, Timing
from xmpp_ha.ha.groups import GroupError, SRMParams
from xmpp_ha.ha.model import Reason, State, recommended_action
from xmpp_ha.ha.srm import (
    SRM,
    ActionNotAllowed,
    DisconnectUsers,
    Effect,
    Event,
    GroupRecord,
    Move,
    MoveUsers,
    PeerSignal,
    Persist,
    PersistFailedMode,
    PersistRequest,
    ResetAssignments,
    Restart,
    SendPeer,
    StartServices,
    StopServices,
    Trigger,
)
from xmpp_ha.im.hooks import LoginRefusal
from xmpp_ha.im.manager import SessionManager
from xmpp_ha.protocol.xml import serialize
from xmpp_ha.runtime.lease import LeaseKeeper, LeaseTiming
from xmpp_ha.runtime.services import Services
from xmpp_ha.store.cluster import Assignment, ClusterStore
from xmpp_ha.store.repository import StoreUnavailable

log = logging.getLogger("xmpp_ha.srm")

_SIGNAL_EVENTS = {
    PeerSignal.TAKE_OVER_REQUEST: Event.TAKE_OVER_REQUEST,
    PeerSignal.TAKE_BACK_REQUEST: Event.TAKE_BACK_REQUEST,
    PeerSignal.HAND_OVER_REQUEST: Event.HAND_OVER_REQUEST,
    PeerSignal.MOVE_FINISHED: Event.PEER_MOVE_FINISHED,
    PeerSignal.FAILED: Event.PEER_FAILED,
    PeerSignal.RECOVER: Event.PEER_RECOVER,
}


def timing_of(params: SRMParams) -> Timing:
    return Timing(
        heartbeat_interval=params.heartbeat_interval,
        heartbeat_timeout=params.heartbeat_timeout,
        init_heartbeat_timeout=params.initialization_heartbeat_timeout,
        critical_service_delay=params.critical_service_down_delay,
        auto_fallback=params.enable_automatic_fallback,
        auto_fallback_delay=params.automatic_fallback_delay,
    )


@dataclass
class PeerInfo:
    name: str
    host: str
    c2s_port: int
    service_port: int
    admin_port: int


class Redundancy:
    """The SRM of one node, with everything it drives."""

    def __init__(
        self,
        *,
        node_name: str,
        group: str,
        peer: PeerInfo | None,
        cluster: ClusterStore,
        manager: SessionManager,
        services: Services,
        clock: Clock,
        params: SRMParams,
        send_peer: Callable[[dict[str, Any]], None],
        peer_connected: Callable[[], bool],
        lease: LeaseKeeper,
    ) -> None:
        self.node = node_name
        self.group = group
        self.peer = peer
        self.cluster = cluster
        self.lease = lease  # ours renewed, the peer's read, from a thread of its own
        lease.timing = self._lease_timing
        self.manager = manager
        self.services = services
        self.clock = clock
        self.params = params
        self._send_peer = send_peer
        self._peer_connected = peer_connected
        self.detector = Detector(timing_of(params), clock.now())
        self.srm = SRM(node_name, peer.name if peer else "")
        self.assignments: dict[str, Assignment] = {}
        self.peer_status: dict[str, Any] | None = None
        self.incarnation = ""
        self.peer_incarnation: str | None = None  # the peer SRM's, from its heartbeats
        self.fenced = False
        self._peer_lease: int | None = None
        self._effects: asyncio.Queue[Effect | Trigger] = asyncio.Queue()
        # while Idle, a standby-only listener on the client port (dual connections)
        self.standby_door: Callable[[bool], Awaitable[None]] | None = None
        # users now served here: returns the work started for them (standby activations)
        self.on_arrival: Callable[[list[str]], list[asyncio.Future[None]]] | None = None
        self._tasks: list[asyncio.Task[object]] = []
        self._reloads: dict[int, asyncio.Future[None]] = {}  # our reload requests, by id
        self._reload_ids = itertools.count(1)

    # --- life cycle --------------------------------------------------------------

    async def start(self, *, ha_enabled: bool) -> None:
        await self.reload_assignments()
        record = await self.cluster.get_record(self.group)
        self._restart_srm(record, ha_enabled=ha_enabled)
        self.lease.start()
        self._tasks = [
            asyncio.create_task(self._worker(), name="srm-effects"),
            asyncio.create_task(self._monitor_loop(), name="srm-monitor"),
        ]

    def _restart_srm(self, record: GroupRecord, *, ha_enabled: bool = True) -> None:
        peer = self.peer.name if self.peer else ""
        srm, effects = SRM.start(
            self.node, peer, record, ha_enabled=ha_enabled and self.peer is not None,
            services_ok=self.services.critical_up(),
        )  # fmt: skip
        self.srm = srm
        self.incarnation = secrets.token_hex(8)  # signals to an older SRM of ours are stale
        self.detector = Detector(timing_of(self.params), self.clock.now())
        log.info("SRM %s starts as %s/%s", self.node, srm.state.value, srm.reason.value)
        for effect in effects:
            self._effects.put_nowait(effect)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.lease.stop()

    # --- inputs ------------------------------------------------------------------

    def feed(self, trigger: Trigger) -> None:
        """Hand a trigger to the SRM; its effects run in order on the worker."""
        self._effects.put_nowait(trigger)

    def admin(self, event: Event) -> None:
        """Run an administrator's action now; raises ActionNotAllowed with a clear message."""
        before = (self.srm.state, self.srm.reason)
        effects = self.srm.handle(Trigger(event, Reason.ADMIN))
        self._log_change(before, event)
        for effect in effects:
            self._effects.put_nowait(effect)

    def on_peer_message(self, message: dict[str, Any]) -> None:
        kind = message.get("t")
        now = self.clock.now()
        if kind == "hb":
            incarnation = message.get("inc")
            self.peer_incarnation = str(incarnation) if incarnation else None
            state = _state(message.get("state"))
            self.peer_status = (
                message.get("status") if isinstance(message.get("status"), dict) else None
            )
            if state is not None:
                self.srm.peer_reported(state)
                for trigger in self.detector.heartbeat(now, state):
                    self.feed(trigger)
        elif kind == "signal":
            addressed_to = message.get("to")
            if addressed_to and addressed_to != self.incarnation:
                log.info("dropping a stale %s signal (for an earlier SRM)", message.get("signal"))
                return
            if message.get("from"):  # a signal names its sender: answers reach this SRM
                self.peer_incarnation = str(message["from"])
            signal = PeerSignal(str(message.get("signal")))
            move = Move(str(message["move"])) if message.get("move") else None
            reason = Reason(str(message.get("reason", Reason.NORMAL.value)))
            if signal is PeerSignal.MOVE_FINISHED:
                self._spawn_reload()
            self.feed(Trigger(_SIGNAL_EVENTS[signal], reason, ok=bool(message.get("ok", True)),
                              move=move))  # fmt: skip
        elif kind == "stopping":
            for trigger in self.detector.peer_stopping():
                self.feed(trigger)
        elif kind == "reload":
            request_id = message.get("id")
            self._spawn_reload(request_id if isinstance(request_id, int) else None)
        elif kind == "reloaded":
            waiter = self._reloads.get(message.get("id"))  # type: ignore[arg-type]
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

        else:
            log.warning("unknown peer message %r", kind)

    def apply_params(self, params: SRMParams) -> None:
        """Parameters changed at runtime take effect at the next timer."""
        self.params = params
        self.detector.timing = timing_of(params)
        self.services.monitor_authentication = params.monitor_authentication_service

    def heartbeat_message(self, status: dict[str, Any]) -> dict[str, Any]:
        return {"t": "hb", "state": self.srm.state.value, "reason": self.srm.reason.value,
                "inc": self.incarnation, "status": status}  # fmt: skip

    # --- hooks for the session manager ----------------------------------------------

    def may_serve(self) -> bool:
        return self.peer is None or (not self.fenced and not self.lease.stale())

    def _lease_timing(self) -> LeaseTiming:
        """The peer takes over no earlier than heartbeat_timeout after it read our last
        renewal, which started at `lease.last_ok`; we stop serving half an interval
        before that. A loop that did not turn for a timeout less an interval renews
        no more."""
        interval, timeout = self.params.heartbeat_interval, self.params.heartbeat_timeout
        return LeaseTiming(interval=interval, stale_after=timeout - interval / 2,
                           stall_limit=max(timeout - interval, 2 * _monitor_period(interval)))  # fmt: skip

    async def login_guard(self, username: str) -> LoginRefusal | None:
        """Serve the user here only where the store assigns it and no move is under way."""
        if self.peer is None or self.srm.state is State.UNKNOWN:
            return None  # no redundancy: every user is served here
        go_to_peer = LoginRefusal(
            StreamCondition.SEE_OTHER_HOST, "", f"{self.peer.host}:{self.peer.c2s_port}"
        )
        if not self.may_serve():
            return go_to_peer
        state = self.srm.state
        if state in _NO_LOGINS:
            return LoginRefusal(
                StreamCondition.SYSTEM_SHUTDOWN, f"node is {state.value}: log in again shortly"
            )
        assignment = await self._assignment(username)
        if assignment is None or assignment.current_node in (None, self.node):
            if state is State.FALLING_BACK and self.home_of(username) == self.peer.name:
                return go_to_peer  # being handed back right now
            return None
        return go_to_peer

    async def _assignment(self, username: str) -> Assignment | None:
        cached = self.assignments.get(username)
        if cached is not None:
            return cached
        fresh = await self.cluster.get_assignment(username)
        if fresh is not None:
            self.assignments[username] = fresh
        return fresh

    def user_here(self, username: str) -> bool:
        assignment = self.assignments.get(username)
        return assignment is not None and assignment.current_node == self.node

    def user_on_peer(self, username: str) -> bool:
        assignment = self.assignments.get(username)
        return (
            self.peer is not None
            and assignment is not None
            and assignment.current_node == self.peer.name
        )

    # --- the effects worker -------------------------------------------------------

    async def _worker(self) -> None:
        while True:
            item = await self._effects.get()
            try:
                if isinstance(item, Trigger):
                    before = (self.srm.state, self.srm.reason)
                    try:
                        effects = self.srm.handle(item)
                    except ActionNotAllowed as exc:
                        log.warning("%s", exc)
                        continue
                    self._log_change(before, item.event)
                    for effect in effects:
                        await self._run(effect)
                else:
                    await self._run(item)
            except Exception:
                log.exception("SRM effect failed: %r", item)

    def _log_change(self, before: tuple[State, Reason], event: Event) -> None:
        after = (self.srm.state, self.srm.reason)
        if after != before:
            log.info("SRM %s: %s/%s -> %s/%s on %s", self.node, before[0].value, before[1].value,
                     after[0].value, after[1].value, event.name)  # fmt: skip

    async def _run(self, effect: Effect) -> None:
        if isinstance(effect, SendPeer):
            message: dict[str, Any] = {"t": "signal", "signal": effect.signal.value,
                                       "reason": effect.reason.value, "ok": effect.ok,
                                       "to": self.peer_incarnation,
                                       "from": self.incarnation}  # fmt: skip
            if effect.move is not None:
                message["move"] = effect.move.value
            self._send_peer(message)
        elif isinstance(effect, MoveUsers):
            ok = await self._move(effect.move)
            self.feed(Trigger(Event.MOVE_FINISHED, effect.reason, ok=ok, move=effect.move))
        elif isinstance(effect, StopServices):
            self._disconnect(lambda username: True)  # clients are pointed at the backup
            await self.services.stop_all()
            if self.standby_door is not None and self.srm.state is State.IDLE:
                await self.standby_door(True)
        elif isinstance(effect, StartServices):
            if self.standby_door is not None:
                await self.standby_door(False)
            ok = await self.services.start_all()
            self.feed(Trigger(Event.SERVICES_STARTED, ok=ok))
        elif isinstance(effect, DisconnectUsers):
            self._disconnect(lambda username: True)
        elif isinstance(effect, Persist):
            await self.cluster.set_failed_over(self.group, effect.failed_over, effect.by_admin)
        elif isinstance(effect, PersistRequest):
            if self.peer is not None:
                try:  # so that an SRM restarted while waiting resumes waiting
                    await self.cluster.begin_transition(self.group, effect.move, self.peer.name)
                except (StoreUnavailable, GroupError) as exc:
                    log.warning("cannot record the failover request: %s", exc)
        elif isinstance(effect, PersistFailedMode):
            await self.cluster.set_failed_mode(self.group, True)
        elif isinstance(effect, ResetAssignments):
            await self._reset_assignments()
        elif isinstance(effect, Restart):
            await self.services.start_all()
            self._restart_srm(await self.cluster.get_record(self.group))
            await self.reload_assignments()

    async def _move(self, move: Move) -> bool:
        """Fenced move in the store; the users' sessions on the losing side end first."""
        assert self.peer is not None
        peer = self.peer.name
        try:
            await self.cluster.begin_transition(self.group, move, self.node)
            if move is Move.TAKE_OVER:
                moved = await self.cluster.move_users(peer, self.node)
            elif move is Move.GIVE_BACK:
                moved = await self.cluster.give_back(self.node, peer)
            else:
                moved = await self.cluster.take_all(self.node, [self.node, peer])
            await self.cluster.end_transition(self.group)
        except (StoreUnavailable, GroupError) as exc:
            log.error("moving users (%s) failed: %s", move.value, exc)
            return False
        log.info("moved %d users (%s)", len(moved), move.value)
        if move is Move.GIVE_BACK:
            # the users' sessions here end only once the peer pushed the activation of
            # their standby sessions there: dual-connected clients switch without a loss.
            # Meanwhile what arrives here for them is routed to the peer.
            await self.reload_assignments(end_moved_sessions=False)
            await self._peer_reloaded()
        # dual-connected clients hear of their move from us (a pushed activation) before
        # the peer, told the move is done, ends their sessions there
        await self._reload_and_push()
        self._send_peer({"t": "reload"})
        if move is not Move.GIVE_BACK and self.srm.reason in _PEER_GONE:
            # the peer died with their sessions: their contacts here must hear they are gone
            self.manager.spawn(self._announce_offline(moved))
        return True

    async def _announce_offline(self, usernames: list[str]) -> None:
        for username in usernames:
            if username not in self.manager.users and username not in self.manager.standby:
                # not already back, logged in here, nor about to be (its standby session)
                try:
                    await self.manager.presence.announce_offline(username)
                except StoreUnavailable as exc:
                    log.warning("cannot announce %s offline: %s", username, exc)

    async def _reset_assignments(self) -> None:
        assert self.peer is not None
        await self.cluster.reset_to_home([self.node, self.peer.name])
        await self.cluster.end_transition(self.group)
        await self.cluster.set_failed_over(self.group, None, False)
        await self.cluster.set_failed_mode(self.group, False)

    def home_of(self, username: str) -> str | None:
        assignment = self.assignments.get(username)
        return assignment.home_node if assignment is not None else None

    def _disconnect(self, which: Callable[[str], bool]) -> None:
        """End client sessions; clients are pointed at the peer (see-other-host)."""
        peer = self.peer
        condition = StreamCondition.SEE_OTHER_HOST if peer else StreamCondition.SYSTEM_SHUTDOWN
        other_host = f"{peer.host}:{peer.c2s_port}" if peer else ""
        for session in list(self.manager.connections):
            if session.standby and not self.fenced:
                continue  # inactive: kept for the user's next move here
            if session.jid is not None and which(session.jid.local):
                session.moved_away = peer is not None
                session.stream.fail(condition, "", other_host)
                session.flush()
        self.manager.end_hibernated(which)

    async def reload_assignments(
        self, *, end_moved_sessions: bool = True
    ) -> list[asyncio.Future[None]]:
        """Refresh the assignment cache, then end sessions of users no longer served here
        and tell `on_arrival` about users served here now; returns what that started."""
        before = self.assignments
        try:
            self.assignments = await self.cluster.all_assignments()
        except StoreUnavailable as exc:
            log.warning("cannot reload assignments: %s", exc)
            return []
        if end_moved_sessions and self.peer is not None and self.srm.state is not State.UNKNOWN:
            self._disconnect(self._moved_away)
            arrived = [
                username
                for username, now in self.assignments.items()
                if now.current_node == self.node
                and (username not in before or before[username].current_node != self.node)
            ]
            if arrived and self.on_arrival is not None:
                return self.on_arrival(arrived)
        return []

    async def refresh_assignment(self, username: str) -> Assignment | None:
        """The user's assignment read from the store now (and cached)."""
        fresh = await self.cluster.get_assignment(username)
        if fresh is not None:
            self.assignments[fresh.username] = fresh
        return fresh

    async def claim_from_peer(self, usernames: list[str]) -> list[str]:
        """Serve these users here where the peer serves them now (one fenced move)."""
        assert self.peer is not None
        moved = await self.cluster.claim_users(usernames, self.peer.name, self.node)
        for username in moved:
            old = self.assignments.get(username)
            self.assignments[username] = Assignment(
                username, old.home_node if old else None, self.node, (old.epoch if old else 0) + 1
            )
        return moved

    async def give_user(self, username: str, seen: Assignment) -> bool:
        """Hand one user served here to the peer if its assignment is still `seen` (a
        fenced move); its sessions here end."""
        assert self.peer is not None
        if not await self.cluster.claim(username, self.peer.name, seen.epoch):
            return False
        self.assignments[seen.username] = Assignment(
            seen.username, seen.home_node, self.peer.name, seen.epoch + 1
        )
        self._disconnect(lambda name: name == seen.username)
        return True

    def _moved_away(self, username: str) -> bool:
        assignment = self.assignments.get(username)
        return assignment is not None and assignment.current_node not in (None, self.node)

    async def _reload_and_push(self) -> None:
        """Reload the assignments; returns once the standby activations of the users now
        served here are pushed (or after `_PUSH_WAIT`)."""
        activations = await self.reload_assignments()
        if activations:
            await asyncio.wait(activations, timeout=_PUSH_WAIT)

    async def _reload(self, answer_to: int | None) -> None:
        await self._reload_and_push()
        if answer_to is not None:  # the peer moved users here and waits for their pushes
            self._send_peer({"t": "reloaded", "id": answer_to})

    async def _peer_reloaded(self) -> None:
        """Ask the peer to reload the assignments; returns once it pushed the activations
        of the users it has now (or after `_PUSH_WAIT`: a peer of an older version does
        not answer)."""
        request_id = next(self._reload_ids)
        waiter = self._reloads[request_id] = asyncio.get_running_loop().create_future()
        self._send_peer({"t": "reload", "id": request_id})
        try:
            await asyncio.wait_for(waiter, _PUSH_WAIT)
        except TimeoutError:
            log.info("the peer did not confirm its reload within %.1f s", _PUSH_WAIT)
        finally:
            del self._reloads[request_id]

    def _spawn_reload(self, answer_to: int | None = None) -> None:
        self._tasks.append(asyncio.create_task(self._reload(answer_to)))
        self._tasks = [task for task in self._tasks if not task.done()]

    # --- loops ---------------------------------------------------------------------

    async def _watch_lease(self) -> None:
        """Fence while our lease is stale, unfence once it is fresh again, and tell the
        detector when the peer's lease advanced."""
        if self.lease.stale():
            if self.peer is not None and not self.fenced:
                self._fence()
            self.lease.stale_handled()
            return
        if self.fenced:
            try:
                await self._unfence()
            except StoreUnavailable as exc:
                log.info("SRM %s stays fenced: %s", self.node, exc)  # tried again next turn
                return
        counter, read_at = self.lease.peer_counter, self.lease.peer_read_at
        if counter != self._peer_lease and read_at is not None:
            self._peer_lease = counter
            self.detector.lease_advanced(read_at)

    def _fence(self) -> None:
        log.warning("SRM %s: own lease is stale: fencing (no user is served here)", self.node)
        self.fenced = True
        self._disconnect(lambda username: True)

    async def _unfence(self) -> None:
        log.warning("SRM %s: lease renewed again: restarting the SRM from the store", self.node)
        self.fenced = False  # before the reload: it may start standby activations
        try:
            await self.reload_assignments()
            record = await self.cluster.get_record(self.group)
        except StoreUnavailable:
            self.fenced = True
            raise
        self._restart_srm(record)

    async def _monitor_loop(self) -> None:
        period = _monitor_period(self.params.heartbeat_interval)
        last = self.clock.now()
        while True:
            await asyncio.sleep(period)
            now = self.clock.now()
            if now - last > period + self.params.heartbeat_interval:
                log.warning("SRM %s did not run for %.1f s", self.node, now - last - period)
                self.detector.stalled(now)
            last = now
            store_ok = self.services["store"].healthy()
            self.detector.services(now, all_up=self.services.critical_up(), store_ok=store_ok)
            await self._watch_lease()
            self.lease.loop_turned()  # after the fence above: a thawed node fences first
            if self.peer is None or self.fenced:
                continue  # fenced: judged again from the store's record once the lease is back
            for trigger in self.detector.tick(now, self.srm.state):
                self.feed(trigger)

    # --- status ----------------------------------------------------------------------

    def state_view(self) -> dict[str, Any]:
        srm = self.srm
        return {
            "state": srm.state.value,
            "reason": srm.reason.value,
            "recommended_action": recommended_action(srm.state, srm.reason),
            "allowed_actions": sorted(action.value for action in srm.actions),
            "peer_connected": self._peer_connected(),
            "peer_partitioned": self.detector.peer_partitioned(self.clock.now()),
            "fenced": self.fenced,
        }


def _monitor_period(heartbeat_interval: float) -> float:
    return min(1.0, heartbeat_interval / 2)


_PUSH_WAIT = 2.0  # s a move waits for the standby activations it started before going on
_PEER_GONE = frozenset({Reason.PEER_DOWN, Reason.PEER_REBOOT, Reason.PEER_DOWN_DURING_INIT})

# states in which no login is accepted: a move is about to change who serves whom
_NO_LOGINS = frozenset(
    {State.INITIALIZING, State.FAILING_OVER, State.BACKUP_ACTIVATED, State.TAKING_BACK}
)


def _state(value: object) -> State | None:
    try:
        return State(str(value))
    except ValueError:
        return None


def stanza_payload(username: str, stanza: ET.Element) -> dict[str, object]:
    return {"user": username, "xml": serialize(stanza, parent_ns="").decode()}
