"""A deterministic, in-memory presence redundancy group: two SRMs, two detectors, one store.

The simulation plays the runtime around the pure `SRM` and `Detector` (DESIGN §4):
it carries out their effects as the node runtime would and feeds back what comes
of them, on a manual clock. Nothing here sleeps, opens a socket or reads a clock.

What it models:
- the shared store's group record (`GroupRecord` fields) and user assignment
  (which node each user is on); `Persist`, `PersistFailedMode` and
  `ResetAssignments` are written at once (the runtime retries a write until the
  store takes it); a `MoveUsers` is recorded as the group's transition, then
  completes at once or when the test says (`finish_move`), succeeding or not,
  clears the transition and answers MOVE_FINISHED; a move by a node that lost
  the store fails at once (a store error) and records nothing;
- each node's critical services (stopped by the administrator, by the SRM, or
  failing to start) and its connection to the store;
- the peer link: `SendPeer` effects arrive as the matching triggers, in order;
  they wait in the sender's queue while the link is cut or the receiver is down
  or frozen, and are lost if the sender dies; heartbeats every interval carry
  the sender's state and are never queued;
- leases: a live node with the store renews its lease every step; a node reads
  its peer's lease every step and tells its detector when it advanced;
- serving: a node holds sessions for users. While it can serve (running, not
  fenced, every critical service and the store up, in a state of
  `SERVING_STATES`) it takes the users assigned to it; when it cannot, it drops
  them all; it drops the users it moves away itself (GIVE_BACK). It is not told
  when its peer moves users away from it: that is the SRM's job, and
  `violations` records every moment a user is held by both nodes. A frozen node
  is fenced (drops its sessions) once its own lease is older than the heartbeat
  timeout.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from xmpp_ha.ha.detector import Detector, Timing
from xmpp_ha.ha.model import Action, Reason, State
from xmpp_ha.ha.srm import (
    SRM,
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

NODES = ("n1", "n2")
SERVICES = ("router", "presence", "sync-agent")
FAST = Timing(
    heartbeat_interval=1.0,
    heartbeat_timeout=4.0,
    init_heartbeat_timeout=8.0,
    critical_service_delay=3.0,
    auto_fallback=False,
    auto_fallback_delay=10.0,
)

# States in which a node accepts and keeps the sessions of the users assigned to it.
# Left out: Initializing (the SRM has not decided yet), Idle (services stopped), Failing
# Over and Backup Activated (users disconnected, handing them over), Failed Over with
# Critical Services Not Running (cannot serve). Running in Failed Mode serves: entering
# it neither stops the services nor disconnects anyone.
SERVING_STATES = frozenset(
    {
        State.NORMAL,
        State.BACKUP_MODE,
        State.TAKING_OVER,
        State.TAKING_BACK,
        State.FALLING_BACK,
        State.FAILED_OVER,
        State.FAILING_OVER_AFFECTED,
        State.FAILED_MODE,
        State.UNKNOWN,
    }
)

ADMIN_TRIGGERS = {
    Action.FAILOVER: Event.ADMIN_FAILOVER,
    Action.FALLBACK: Event.ADMIN_FALLBACK,
    Action.RECOVERY: Event.ADMIN_RECOVER,
}

_SIGNAL_EVENTS = {
    PeerSignal.TAKE_OVER_REQUEST: Event.TAKE_OVER_REQUEST,
    PeerSignal.TAKE_BACK_REQUEST: Event.TAKE_BACK_REQUEST,
    PeerSignal.HAND_OVER_REQUEST: Event.HAND_OVER_REQUEST,
    PeerSignal.MOVE_FINISHED: Event.PEER_MOVE_FINISHED,
    PeerSignal.FAILED: Event.PEER_FAILED,
    PeerSignal.RECOVER: Event.PEER_RECOVER,
}


class SimulationError(Exception):
    """The test asked for something the simulated pair cannot do (our bug, not the SRM's)."""


@dataclass
class PendingMove:
    node: str
    generation: int  # the SRM incarnation that asked for it
    move: Move
    reason: Reason


@dataclass
class Node:
    name: str
    peer: str
    srm: SRM
    detector: Detector
    generation: int = 0  # bumped at every SRM (re)start
    running: bool = True
    frozen: bool = False
    store_ok: bool = True
    stopped_services: set[str] = field(default_factory=set)  # by the administrator
    stopped_by_srm: bool = False  # StopServices
    start_fails: bool = False  # StartServices answers ok=False
    sessions: set[str] = field(default_factory=set)
    next_heartbeat: float = 0.0
    seen_peer_lease: float | None = None
    outbox: deque[SendPeer] = field(default_factory=deque)
    deferred: list[tuple[str, int | None, Trigger]] = field(default_factory=list)

    @property
    def live(self) -> bool:
        return self.running and not self.frozen

    @property
    def services_up(self) -> bool:
        return not self.stopped_services and not self.stopped_by_srm

    @property
    def healthy(self) -> bool:
        return self.services_up and self.store_ok


@dataclass
class Pair:
    """Two nodes of one group; `users` maps each user to its home node."""

    timing: Timing = FAST
    users: dict[str, str] = field(
        default_factory=lambda: {"alice": "n1", "bob": "n1", "carol": "n2", "dave": "n2"}
    )
    ha_enabled: bool = True
    auto_moves: bool = True  # complete each MoveUsers at once
    move_ok: bool = True  # outcome of the moves that complete on their own
    step: float = 1.0
    start: bool = True  # boot both nodes at construction
    now: float = 0.0
    record: GroupRecord = field(default_factory=GroupRecord)
    assignment: dict[str, str] = field(default_factory=dict)
    link_up: bool = True
    leases: dict[str, float] = field(default_factory=dict)
    nodes: dict[str, Node] = field(default_factory=dict)
    pending_moves: list[PendingMove] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    _work: deque[tuple[str, int | None, Trigger]] = field(default_factory=deque)
    _draining: bool = False

    def __post_init__(self) -> None:
        self.assignment = dict(self.users)
        for name in NODES:
            peer = NODES[1 - NODES.index(name)]
            srm, _ = SRM.start(name, peer, self.record, ha_enabled=self.ha_enabled)
            self.nodes[name] = Node(name, peer, srm, Detector(self.timing, self.now), running=False)
        if self.start:
            for name in NODES:
                self.boot(name)

    # --- what the tests look at ------------------------------------------------------

    def state(self, name: str) -> tuple[State, Reason]:
        srm = self.nodes[name].srm
        return srm.state, srm.reason

    def states(self) -> tuple[tuple[State, Reason], tuple[State, Reason]]:
        return self.state("n1"), self.state("n2")

    def srm(self, name: str) -> SRM:
        return self.nodes[name].srm

    def served_by(self, name: str) -> set[str]:
        return set(self.nodes[name].sessions)

    def server_of(self, user: str) -> str | None:
        holders = [name for name in NODES if user in self.nodes[name].sessions]
        if len(holders) > 1:
            raise AssertionError(f"{user} is served by both nodes")
        return holders[0] if holders else None

    def servers(self) -> dict[str, str | None]:
        return {user: self.server_of(user) for user in self.users}

    def home_users(self, name: str) -> set[str]:
        return {user for user, home in self.users.items() if home == name}

    def assigned_to(self, name: str) -> set[str]:
        return {user for user, node in self.assignment.items() if node == name}

    # --- time ---------------------------------------------------------------------

    def advance(self, seconds: float) -> None:
        end = self.now + seconds
        while self.now + self.step <= end + 1e-9:
            self._tick(self.now + self.step)
        if self.now < end:
            self._tick(end)

    def _tick(self, now: float) -> None:
        self.now = now
        live = [node for node in self.nodes.values() if node.live]
        for node in live:
            if node.store_ok:
                self.leases[node.name] = now
        self._refresh()
        self._flush()
        for node in live:
            if node.live and now + 1e-9 >= node.next_heartbeat:
                node.next_heartbeat = now + self.timing.heartbeat_interval
                self._heartbeat(node)
        for node in live:
            if node.live and node.store_ok:
                lease = self.leases.get(node.peer)
                if lease is not None and (
                    node.seen_peer_lease is None or lease > node.seen_peer_lease
                ):
                    node.seen_peer_lease = lease
                    node.detector.lease_advanced(now)
        for node in live:
            if not node.live:
                continue
            node.detector.services(now, all_up=node.services_up, store_ok=node.store_ok)
            for trigger in node.detector.tick(now, node.srm.state):
                self._feed(node.name, trigger)
        self._refresh()

    def _heartbeat(self, sender: Node) -> None:
        receiver = self.nodes[sender.peer]
        if not (self.link_up and receiver.live):
            return
        receiver.srm.peer_reported(sender.srm.state)
        for trigger in receiver.detector.heartbeat(self.now, sender.srm.state):
            self._feed(receiver.name, trigger)

    # --- node operations ------------------------------------------------------------

    def boot(self, name: str, *, stopped: Iterable[str] = (), store_ok: bool = True) -> None:
        """Start a node (first start or after a kill/stop); its services and store come up
        except the `stopped` services (and the store when not `store_ok`)."""
        node = self.nodes[name]
        if node.running:
            raise SimulationError(f"{name} is already running")
        self._log(f"boot {name}")
        node.running = True
        node.frozen = False
        node.store_ok = store_ok
        node.stopped_services = set(stopped)
        node.stopped_by_srm = False
        node.sessions.clear()
        self._start_srm(node)

    def kill(self, name: str) -> None:
        """Power off: silent to the peer, lease stops, sessions and outgoing queue lost."""
        node = self._running(name)
        self._log(f"kill {name}")
        node.running = False
        node.frozen = False
        node.sessions.clear()
        node.outbox.clear()
        node.deferred.clear()
        self._cancel_moves(name)
        self._refresh()

    def stop(self, name: str) -> None:
        """Graceful shutdown: the peer gets the stop announcement (if the link is up)."""
        node = self._running(name)
        self._log(f"stop {name}")
        node.running = False
        node.frozen = False
        node.sessions.clear()
        node.outbox.clear()
        node.deferred.clear()
        self._cancel_moves(name)
        self._refresh()
        peer = self.nodes[node.peer]
        if self.link_up and peer.live:
            for trigger in peer.detector.peer_stopping():
                self._feed(peer.name, trigger)

    def reboot(self, name: str) -> None:
        self.kill(name)
        self.boot(name)

    def freeze(self, name: str) -> None:
        node = self._running(name)
        self._log(f"freeze {name}")
        node.frozen = True

    def unfreeze(self, name: str) -> None:
        node = self._running(name)
        self._log(f"unfreeze {name}")
        node.frozen = False
        self._work.extend(node.deferred)
        node.deferred.clear()
        # the runtime catches up: renew the lease, read the peer's, before any timer fires
        if node.store_ok:
            self.leases[name] = self.now
            lease = self.leases.get(node.peer)
            if lease is not None and (node.seen_peer_lease is None or lease > node.seen_peer_lease):
                node.seen_peer_lease = lease
                node.detector.lease_advanced(self.now)
        self._settle()

    def restart_srm(self, name: str) -> None:
        """Restart the SRM only: services keep running, the node's move in flight is lost."""
        node = self._live(name)
        self._start_srm(node)

    def stop_service(self, name: str, service: str = "presence") -> None:
        self._running(name).stopped_services.add(service)
        self._log(f"stop service {service} on {name}")
        self._refresh()

    def start_service(self, name: str, service: str = "presence") -> None:
        self._running(name).stopped_services.discard(service)
        self._log(f"start service {service} on {name}")
        self._refresh()

    def start_all_services(self, name: str) -> None:
        node = self._running(name)
        node.stopped_services.clear()
        node.stopped_by_srm = False
        self._refresh()

    def lose_store(self, name: str) -> None:
        self._running(name).store_ok = False
        self._log(f"{name} lost the store")
        self._refresh()

    def restore_store(self, name: str) -> None:
        self._running(name).store_ok = True
        self._log(f"{name} has the store again")
        self._refresh()

    def set_start_fails(self, name: str, fails: bool = True) -> None:
        self.nodes[name].start_fails = fails

    def cut_link(self) -> None:
        self._log("link cut")
        self.link_up = False

    def restore_link(self) -> None:
        self._log("link restored")
        self.link_up = True
        self._settle()

    def admin(self, name: str, action: Action) -> None:
        """An administrator's request; raises ActionNotAllowed as the SRM does."""
        node = self._live(name)
        before = node.srm.state
        effects = node.srm.handle(Trigger(ADMIN_TRIGGERS[action]))
        self._log(
            f"admin {action.value} on {name}: {before.value} -> {node.srm.state.value} {effects}"
        )
        self._apply(node, effects)
        self._settle()

    def failover(self, name: str) -> None:
        self.admin(name, Action.FAILOVER)

    def fallback(self, name: str) -> None:
        self.admin(name, Action.FALLBACK)

    def recover(self, name: str) -> None:
        self.admin(name, Action.RECOVERY)

    def movable(self) -> list[PendingMove]:
        """Pending user moves whose node runs (a frozen node's move does not progress)."""
        return [move for move in self.pending_moves if self.nodes[move.node].live]

    def finish_move(self, ok: bool = True) -> None:
        """Complete the oldest pending user move of a live node."""
        movable = self.movable()
        if not movable:
            raise SimulationError("no user move can finish")
        self.pending_moves.remove(movable[0])
        self._complete(movable[0], ok)
        self._settle()

    # --- the runtime --------------------------------------------------------------------

    def _running(self, name: str) -> Node:
        node = self.nodes[name]
        if not node.running:
            raise SimulationError(f"{name} is not running")
        return node

    def _live(self, name: str) -> Node:
        node = self._running(name)
        if node.frozen:
            raise SimulationError(f"{name} is frozen")
        return node

    def _log(self, text: str) -> None:
        self.log.append(f"t={self.now:g} {text}")

    def _start_srm(self, node: Node) -> None:
        self._cancel_moves(node.name)
        node.generation += 1
        srm, effects = SRM.start(
            node.name,
            node.peer,
            self.record,
            ha_enabled=self.ha_enabled,
            services_ok=node.healthy,
        )
        node.srm = srm
        node.detector = Detector(self.timing, self.now)
        node.next_heartbeat = self.now
        node.seen_peer_lease = self.leases.get(node.peer)
        if node.store_ok:
            self.leases[node.name] = self.now
        self._log(f"SRM start {node.name} -> {srm.state.value}/{srm.reason.value} {effects}")
        self._apply(node, effects)
        self._settle()

    def _cancel_moves(self, name: str) -> None:
        self.pending_moves = [move for move in self.pending_moves if move.node != name]

    def _feed(self, name: str, trigger: Trigger, generation: int | None = None) -> None:
        self._work.append((name, generation, trigger))
        self._settle()

    def _settle(self) -> None:
        """Carry out everything that follows, then look at who serves whom."""
        self._refresh()
        self._flush()
        self._drain()
        self._refresh()

    def _drain(self) -> None:
        if self._draining:
            return
        self._draining = True
        try:
            while self._work:
                name, generation, trigger = self._work.popleft()
                node = self.nodes[name]
                if not node.running or (generation is not None and generation != node.generation):
                    continue  # local feedback for an SRM that is gone
                if node.frozen:  # it handles them once it runs again
                    node.deferred.append((name, generation, trigger))
                    continue
                before = (node.srm.state, node.srm.reason)
                effects = node.srm.handle(trigger)
                after = (node.srm.state, node.srm.reason)
                if effects or before != after:
                    self._log(
                        f"{name} {trigger.event.name}({trigger.reason.value}"
                        f"{'' if trigger.ok else ', failed'}) {before[0].value}/{before[1].value}"
                        f" -> {after[0].value}/{after[1].value} {effects}"
                    )
                self._apply(node, effects)
                self._refresh()
                self._flush()
        finally:
            self._draining = False

    def _apply(self, node: Node, effects: list[Effect]) -> None:
        for effect in effects:
            if isinstance(effect, SendPeer):
                node.outbox.append(effect)
            elif isinstance(effect, MoveUsers):
                self._start_move(node, effect)
            elif isinstance(effect, StopServices):
                node.stopped_by_srm = True
            elif isinstance(effect, StartServices):
                if node.start_fails:
                    ok = False
                else:
                    node.stopped_by_srm = False
                    node.stopped_services.clear()
                    ok = True
                self._work.append(
                    (node.name, node.generation, Trigger(Event.SERVICES_STARTED, ok=ok))
                )
            elif isinstance(effect, DisconnectUsers):
                node.sessions.clear()
            elif isinstance(effect, Restart):
                self._start_srm(node)
            elif isinstance(effect, Persist):
                self.record = replace(
                    self.record, failed_over=effect.failed_over, by_admin=effect.by_admin
                )
            elif isinstance(effect, PersistRequest):
                if node.store_ok and self.record.transition is None:
                    self.record = replace(
                        self.record, transition=effect.move, transition_node=node.peer
                    )
            elif isinstance(effect, PersistFailedMode):
                self.record = replace(self.record, failed_mode=True)
            elif isinstance(effect, ResetAssignments):
                self.record = GroupRecord()
                self.assignment = dict(self.users)
            else:  # pragma: no cover - a new effect kind the simulation does not know
                raise SimulationError(f"unknown effect {effect!r}")

    def _start_move(self, node: Node, effect: MoveUsers) -> None:
        pending = PendingMove(node.name, node.generation, effect.move, effect.reason)
        if not node.store_ok:  # the store error makes it fail before anything is recorded
            self._work.append(
                (node.name, node.generation, Trigger(Event.MOVE_FINISHED, effect.reason, ok=False))
            )
            return
        self.record = replace(self.record, transition=effect.move, transition_node=node.name)
        if self.auto_moves:
            self._complete(pending, self.move_ok)
        else:
            self.pending_moves.append(pending)

    def _complete(self, pending: PendingMove, ok: bool) -> None:
        mover = self.nodes[pending.node]
        peer = mover.peer
        if ok:
            if pending.move is Move.TAKE_OVER:
                moved = {user for user, home in self.users.items() if home == peer}
                target = mover.name
            elif pending.move is Move.GIVE_BACK:
                moved = {
                    user
                    for user, home in self.users.items()
                    if home == peer and self.assignment[user] == mover.name
                }
                target = peer
                mover.sessions -= moved  # the mover itself fences the users it gives away
            else:
                moved = set(self.users)
                target = mover.name
            for user in moved:
                self.assignment[user] = target
        self.record = replace(self.record, transition=None, transition_node=None)
        self._log(f"move {pending.move.value} by {pending.node} {'done' if ok else 'failed'}")
        self._work.append(
            (
                pending.node,
                pending.generation,
                Trigger(Event.MOVE_FINISHED, pending.reason, ok=ok),
            )
        )

    def _flush(self) -> None:
        if not self.link_up:
            return
        for node in self.nodes.values():
            receiver = self.nodes[node.peer]
            if not (node.live and receiver.live):
                continue
            while node.outbox:
                signal = node.outbox.popleft()
                self._work.append(
                    (
                        receiver.name,
                        None,
                        Trigger(
                            _SIGNAL_EVENTS[signal.signal],
                            signal.reason,
                            ok=signal.ok,
                            move=signal.move,
                        ),
                    )
                )
        self._drain()

    def _fenced(self, node: Node) -> bool:
        lease = self.leases.get(node.name)
        return node.frozen and (lease is None or self.now - lease > self.timing.heartbeat_timeout)

    def _refresh(self) -> None:
        """Sessions follow what each node can serve; record any user held by both."""
        for node in self.nodes.values():
            if not node.running or self._fenced(node):
                node.sessions.clear()
            elif node.frozen:
                continue  # keeps what it had, takes nobody new
            elif node.healthy and node.srm.state in SERVING_STATES:
                # the runtime reconciles sessions with the store's assignments at every
                # reload (after moves, on the peer's word, and every sync-agent pass)
                node.sessions &= self.assigned_to(node.name)
            else:
                node.sessions.clear()
        for node in self.nodes.values():
            if node.live and node.healthy and node.srm.state in SERVING_STATES:
                node.sessions |= self.assigned_to(node.name)
        both = self.nodes["n1"].sessions & self.nodes["n2"].sessions
        if both:
            violation = (
                f"t={self.now:g} {sorted(both)} served by both nodes"
                f" (n1 {self.state('n1')[0].value}, n2 {self.state('n2')[0].value})"
            )
            if not self.violations or self.violations[-1] != violation:
                self.violations.append(violation)
