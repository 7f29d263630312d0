"""The Server Recovery Manager of one node, as a pure state machine (SPEC §6-§8).

Each node of a group runs one `SRM`. It is fed events (what the administrator
asked, what the peer said over the peer link, what the node's own monitors
saw) and answers with effects, as data, for the runtime to carry out: tell the
peer something, move users in the store, stop or start services, persist the
group's failover record. It never reads a clock or touches I/O.

One table, `_TABLE`, keyed by (state, event kind), holds every transition.
An administrator's action missing from the table is refused with
`ActionNotAllowed`; a monitor's or the peer's event missing from it changes
nothing (for example "critical service down" while already failed over).

Invariants:
- A node moves users only in TAKING_OVER, FALLING_BACK and
  FAILING_OVER_AFFECTED, and the node losing them has stopped serving them
  first (it asked for the move, or it is down/fenced), so a user is never
  active on two nodes.
- Every steady state offers exactly `model.allowed_actions(state)`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum, auto

from xmpp_ha.ha.model import Action, Reason, State, allowed_actions

# --- what comes in ----------------------------------------------------------------


class Event(Enum):
    ADMIN_FAILOVER = auto()  # the administrator fails this node over
    ADMIN_FALLBACK = auto()  # the administrator falls this node back
    ADMIN_RECOVER = auto()  # the administrator runs recovery (on either node)
    PEER_RECOVER = auto()  # the peer runs recovery and asks this node to restart too
    PEER_SEEN = auto()  # first heartbeat from the peer (carries its state)
    PEER_LOST = auto()  # heartbeat and lease timed out, or the peer announced its stop
    PEER_FAILED = auto()  # the peer entered Running in Failed Mode (carries a reason)
    SERVICES_DOWN = auto()  # a critical service (or the store) down longer than allowed
    SERVICES_UP = auto()  # every critical service runs again
    SERVICES_STARTED = auto()  # result of StartServices (ok or not)
    TAKE_OVER_REQUEST = auto()  # the peer is failing over: take its users
    TAKE_BACK_REQUEST = auto()  # the recovered peer wants its users back
    HAND_OVER_REQUEST = auto()  # auto-recovery: the peer (a failing backup) hands all users
    MOVE_FINISHED = auto()  # our own user move finished (ok or not)
    PEER_MOVE_FINISHED = auto()  # the peer's user move for us finished (ok or not)
    AUTO_FALLBACK_DUE = auto()  # failed over and healthy for the automatic fallback delay
    TRANSITION_TIMEOUT = auto()  # a transition state lasted too long: give up, offer recovery


PEER_EVENTS = frozenset(
    {Event.TAKE_OVER_REQUEST, Event.TAKE_BACK_REQUEST, Event.HAND_OVER_REQUEST,
     Event.PEER_MOVE_FINISHED, Event.PEER_FAILED, Event.PEER_RECOVER}
)  # fmt: skip

ADMIN_EVENTS = {
    Event.ADMIN_FAILOVER: Action.FAILOVER,
    Event.ADMIN_FALLBACK: Action.FALLBACK,
    Event.ADMIN_RECOVER: Action.RECOVERY,
}


@dataclass(frozen=True, slots=True)
class Trigger:
    event: Event
    reason: Reason = Reason.NORMAL  # why (peer's reason, or the kind of failure)
    ok: bool = True  # for *_FINISHED and SERVICES_STARTED
    peer_state: State | None = None  # for PEER_SEEN
    move: Move | None = None  # for PEER_MOVE_FINISHED: which move the peer finished


# --- what goes out ----------------------------------------------------------------


class Move(Enum):
    TAKE_OVER = "take-over"  # the peer's users to this node
    GIVE_BACK = "give-back"  # the peer's users, held here, back to the peer
    TAKE_ALL = "take-all"  # auto-recovery: every user of the group to this node


class PeerSignal(Enum):
    TAKE_OVER_REQUEST = "take-over-request"
    TAKE_BACK_REQUEST = "take-back-request"
    HAND_OVER_REQUEST = "hand-over-request"
    MOVE_FINISHED = "move-finished"
    FAILED = "failed"
    RECOVER = "recover"


@dataclass(frozen=True, slots=True)
class SendPeer:
    """Tell the peer; the runtime delivers it once the peer link is up, in order."""

    signal: PeerSignal
    reason: Reason
    ok: bool = True
    move: Move | None = None


@dataclass(frozen=True, slots=True)
class MoveUsers:
    """Move users in the store (fenced compare-and-set per user).

    The runtime records the move as the group's transition before it starts and
    clears it when it ends, so that an SRM restarted half-way resumes it; then it
    answers with MOVE_FINISHED.
    """

    move: Move
    reason: Reason


@dataclass(frozen=True, slots=True)
class StopServices:
    """Stop the critical services (users are disconnected); the SRM keeps running."""


@dataclass(frozen=True, slots=True)
class StartServices:
    pass


@dataclass(frozen=True, slots=True)
class DisconnectUsers:
    """Drop this node's client sessions: its users are about to be served by the peer."""


@dataclass(frozen=True, slots=True)
class Restart:
    """Recovery: the runtime restarts this SRM from the store's record."""


@dataclass(frozen=True, slots=True)
class PersistRequest:
    """Record that this node asked its peer to move users (so a restart resumes waiting)."""

    move: Move


@dataclass(frozen=True, slots=True)
class Persist:
    """Record in the store which node is failed over (None: both serve their own)."""

    failed_over: str | None
    by_admin: bool = False  # failed over by the administrator: services stay stopped


@dataclass(frozen=True, slots=True)
class PersistFailedMode:
    """Record that the group runs in failed mode (cleared by recovery)."""


@dataclass(frozen=True, slots=True)
class ResetAssignments:
    """Recovery: every user back to its home node; the failover record cleared."""


Effect = (
    SendPeer | MoveUsers | StopServices | StartServices | DisconnectUsers | Restart | Persist
    | PersistFailedMode | ResetAssignments | PersistRequest
)  # fmt: skip


class ActionNotAllowed(Exception):
    def __init__(self, action: Action, state: State) -> None:
        super().__init__(
            f"{action.value} is not allowed while the node is '{state.value}'"
            f" (allowed: {', '.join(sorted(a.value for a in allowed_actions(state))) or 'none'})"
        )
        self.action = action
        self.state = state


# --- the store's record, read at start --------------------------------------------


@dataclass(frozen=True, slots=True)
class GroupRecord:
    """What the shared store says about the group when an SRM starts."""

    failed_over: str | None = None  # the node whose users are on its peer
    by_admin: bool = False
    failed_mode: bool = False
    transition: Move | None = None  # a user move started and not finished
    transition_node: str | None = None  # the node carrying out that move


# --- the machine ------------------------------------------------------------------


@dataclass
class SRM:
    node: str
    peer: str
    state: State = State.INITIALIZING
    reason: Reason = Reason.INITIALIZATION
    peer_state: State | None = None  # last state the peer reported
    peer_alive: bool = False  # seen, and not lost since
    peer_lost: bool = False  # lost (timeout or announced stop) and not seen since
    history: list[tuple[State, Reason]] = field(default_factory=list)

    @classmethod
    def start(
        cls, node: str, peer: str, record: GroupRecord, *, ha_enabled: bool = True,
        services_ok: bool = True,
    ) -> tuple[SRM, list[Effect]]:  # fmt: skip
        """The state an SRM (re)starts in, from the store's record (SPEC §8 rows 5-9, 18, 21)."""
        srm = cls(node, peer)
        init = Reason.INITIALIZATION
        if not ha_enabled:
            srm._enter(State.UNKNOWN, Reason.UNKNOWN)
            return srm, []
        if record.failed_mode:
            srm._enter(State.FAILED_MODE, Reason.UNKNOWN)
            return srm, []
        if record.transition is not None and record.transition_node == node:
            state = _MOVER_STATE[record.transition]  # row 8: resume our own move
            srm._enter(state, init)
            return srm, [MoveUsers(record.transition, init)]
        if record.transition is not None and record.transition_node == peer:
            srm._enter(_MOVED_STATE[record.transition], init)  # row 9: the peer moves for us
            return srm, []
        if record.failed_over == node:
            if record.by_admin:
                srm._enter(State.IDLE, init)
                return srm, [StopServices()]
            srm._enter(State.FAILED_OVER if services_ok else State.FAILED_OVER_CS_DOWN, init)
            return srm, []
        if record.failed_over == peer:
            srm._enter(State.BACKUP_MODE, init)
            return srm, []
        return srm, []  # Initializing until the peer is seen or its absence is sure

    def handle(self, trigger: Trigger) -> list[Effect]:
        if trigger.event is Event.PEER_SEEN:
            self.peer_alive, self.peer_lost = True, False
            self.peer_state = trigger.peer_state
        elif trigger.event is Event.PEER_LOST:
            self.peer_alive, self.peer_lost = False, True
        elif trigger.event in PEER_EVENTS:  # a word from the peer proves it is there
            self.peer_alive, self.peer_lost = True, False
        handler = _TABLE.get((self.state, trigger.event))
        if handler is None:
            action = ADMIN_EVENTS.get(trigger.event)
            if action is not None:
                raise ActionNotAllowed(action, self.state)
            return []
        return handler(self, trigger)

    def peer_reported(self, state: State) -> None:
        """Every heartbeat carries the peer's state; auto-recovery depends on it."""
        self.peer_state = state

    @property
    def actions(self) -> frozenset[Action]:
        return allowed_actions(self.state)

    # --- helpers ---------------------------------------------------------------

    def _enter(self, state: State, reason: Reason) -> None:
        self.state = state
        self.reason = reason
        self.history.append((state, reason))

    def _fail(self, reason: Reason, *, tell_peer: bool = True) -> list[Effect]:
        self._enter(State.FAILED_MODE, reason)
        effects: list[Effect] = [PersistFailedMode()]
        if tell_peer:
            effects.append(SendPeer(PeerSignal.FAILED, reason))
        return effects

    def _peer_can_serve(self) -> bool:
        return self.peer_state is State.FAILED_OVER

    # --- transitions (one method per table row group) --------------------------------

    def _peer_seen(self, trigger: Trigger) -> list[Effect]:
        if trigger.peer_state is State.FAILED_MODE:
            return self._fail(Reason.UNKNOWN, tell_peer=False)  # row 21
        if trigger.peer_state in (State.BACKUP_MODE, State.TAKING_OVER):
            # the peer holds (or is taking) our users though the record did not say so yet:
            # wait for it to confirm, as a node being failed over
            self._enter(State.FAILING_OVER, Reason.INITIALIZATION)
            return [
                DisconnectUsers(),
                SendPeer(PeerSignal.TAKE_OVER_REQUEST, Reason.INITIALIZATION),
            ]
        self._enter(State.NORMAL, Reason.NORMAL)
        return []

    def _admin_failover(self, trigger: Trigger) -> list[Effect]:
        self._enter(State.FAILING_OVER, Reason.ADMIN)  # row 2
        # our services stop once the peer moved the users (_was_taken_over): it activates
        # their standby sessions first, so dual-connected clients switch without a gap
        return [
            PersistRequest(Move.TAKE_OVER),
            SendPeer(PeerSignal.TAKE_OVER_REQUEST, Reason.ADMIN),
        ]

    def _services_down(self, trigger: Trigger) -> list[Effect]:
        reason = trigger.reason  # CRITICAL_SERVICE_DOWN or DATABASE_FAILURE
        self._enter(State.FAILING_OVER, reason)  # rows 12, 13 (on the way)
        return [
            DisconnectUsers(),
            PersistRequest(Move.TAKE_OVER),
            SendPeer(PeerSignal.TAKE_OVER_REQUEST, reason),
        ]

    def _take_over(self, trigger: Trigger) -> list[Effect]:
        reason = trigger.reason
        if trigger.event is Event.PEER_LOST and self.state is State.INITIALIZING:
            reason = Reason.PEER_DOWN_DURING_INIT  # row 18
        self._enter(State.TAKING_OVER, reason)  # rows 2, 16, 17
        return [MoveUsers(Move.TAKE_OVER, reason)]

    def _took_over(self, trigger: Trigger) -> list[Effect]:
        if not trigger.ok:
            return self._fail(Reason.TAKEOVER_FAILED)  # row 19
        self._enter(State.BACKUP_MODE, self.reason)  # rows 3, 12, 13, 16, 17, 18
        by_admin = self.reason is Reason.ADMIN
        return [
            Persist(self.peer, by_admin=by_admin),
            SendPeer(PeerSignal.MOVE_FINISHED, self.reason, move=Move.TAKE_OVER),
        ]

    def _was_taken_over(self, trigger: Trigger) -> list[Effect]:
        if trigger.move is not Move.TAKE_OVER:
            return []
        if not trigger.ok:
            return self._fail_after_failover_request(Reason.TAKEOVER_FAILED)
        by_admin = self.reason is Reason.ADMIN
        persist = Persist(self.node, by_admin=by_admin)  # also right when the mover restarted
        if by_admin:
            self._enter(State.IDLE, Reason.ADMIN)  # row 3
            return [persist, StopServices()]
        self._enter(State.FAILED_OVER_CS_DOWN, self.reason)  # rows 12, 13
        return [persist]

    def _taken_over_unawares(self, trigger: Trigger) -> list[Effect]:
        """The peer took our users while we could not hear it (frozen, partitioned)."""
        if trigger.move not in (Move.TAKE_OVER, Move.TAKE_ALL):
            return []
        self._enter(State.FAILED_OVER, trigger.reason)
        return [DisconnectUsers()]

    def _already_here(self, trigger: Trigger) -> list[Effect]:
        """A take-over request for users this backup already holds: confirm it."""
        return [SendPeer(PeerSignal.MOVE_FINISHED, trigger.reason, move=Move.TAKE_OVER)]

    def _fallback(self, trigger: Trigger) -> list[Effect]:
        reason = Reason.AUTO_FALLBACK if trigger.event is Event.AUTO_FALLBACK_DUE else Reason.ADMIN
        services_stopped = self.state is State.IDLE
        self._enter(State.TAKING_BACK, reason)  # rows 4, 10
        if services_stopped:
            return [StartServices()]  # then SERVICES_STARTED asks the peer
        return self._services_started(Trigger(Event.SERVICES_STARTED))

    def _services_started(self, trigger: Trigger) -> list[Effect]:
        if not trigger.ok:
            return self._fail(Reason.START_CS_FAILED)  # row 14
        if self.peer_lost:  # nobody to give the users back: take them all
            return self._take_all(Trigger(Event.PEER_LOST, Reason.PEER_DOWN))
        return [SendPeer(PeerSignal.TAKE_BACK_REQUEST, self.reason)]

    def _give_back(self, trigger: Trigger) -> list[Effect]:
        self._enter(State.FALLING_BACK, trigger.reason)  # rows 4, 9, 10
        return [MoveUsers(Move.GIVE_BACK, trigger.reason)]

    def _gave_back(self, trigger: Trigger) -> list[Effect]:
        if not trigger.ok:
            return self._fail(Reason.TAKEBACK_FAILED)  # row 20
        reason = self.reason
        self._enter(State.NORMAL, Reason.NORMAL)
        effects: list[Effect] = [
            Persist(None),
            SendPeer(PeerSignal.MOVE_FINISHED, reason, move=Move.GIVE_BACK),
        ]
        if self.peer_lost:  # the peer died while we handed its users back: take them again
            return [*effects, *self._take_over(Trigger(Event.PEER_LOST, Reason.PEER_DOWN))]
        return effects

    def _took_back(self, trigger: Trigger) -> list[Effect]:
        if trigger.move is not Move.GIVE_BACK:
            return []
        if not trigger.ok:
            return self._fail(Reason.TAKEBACK_FAILED, tell_peer=False)
        services_stopped = self.state is State.IDLE  # restarted while taking back (row 9)
        self._enter(State.NORMAL, Reason.NORMAL)
        return [StartServices()] if services_stopped else []

    def _services_up(self, trigger: Trigger) -> list[Effect]:
        self._enter(State.FAILED_OVER, self.reason)  # row 11
        return []

    def _services_down_failed_over(self, trigger: Trigger) -> list[Effect]:
        self._enter(State.FAILED_OVER_CS_DOWN, trigger.reason)
        return []

    def _backup_services_down(self, trigger: Trigger) -> list[Effect]:
        if self._peer_can_serve():  # rows 22, 23: auto-recovery
            reason = (
                Reason.AUTO_RECOVER_DB_FAILURE
                if trigger.reason is Reason.DATABASE_FAILURE
                else Reason.AUTO_RECOVER_CS_DOWN
            )
            self._enter(State.BACKUP_ACTIVATED, reason)
            return [DisconnectUsers(), SendPeer(PeerSignal.HAND_OVER_REQUEST, reason)]
        return self._fail(trigger.reason)  # row 15

    def _take_all(self, trigger: Trigger) -> list[Effect]:
        self._enter(State.FAILING_OVER_AFFECTED, trigger.reason)  # rows 22, 23
        return [MoveUsers(Move.TAKE_ALL, trigger.reason)]

    def _took_all(self, trigger: Trigger) -> list[Effect]:
        if not trigger.ok:
            return self._fail(Reason.TAKEOVER_FAILED)
        self._enter(State.BACKUP_MODE, self.reason)
        return [
            Persist(self.peer),
            SendPeer(PeerSignal.MOVE_FINISHED, self.reason, move=Move.TAKE_ALL),
        ]

    def _handed_over(self, trigger: Trigger) -> list[Effect]:
        if trigger.move is not Move.TAKE_ALL:
            return []
        if not trigger.ok:
            return self._fail(Reason.TAKEOVER_FAILED, tell_peer=False)
        self._enter(State.FAILED_OVER_CS_DOWN, self.reason)
        return []

    def _peer_failed(self, trigger: Trigger) -> list[Effect]:
        return self._fail_after_failover_request(trigger.reason)  # rows 14, 15, 19, 20

    def _fail_after_failover_request(self, reason: Reason) -> list[Effect]:
        """Failed mode (the peer knows: it failed itself). A manual failover under way
        (row 19) stops our services all the same, as its success would have."""
        stop = self.state is State.FAILING_OVER and self.reason is Reason.ADMIN
        failed = self._fail(reason, tell_peer=False)
        return [*failed, StopServices()] if stop else failed

    def _recover(self, trigger: Trigger) -> list[Effect]:
        effects: list[Effect] = []
        if trigger.event is Event.ADMIN_RECOVER:  # the peer restarts on our word
            effects = [DisconnectUsers(), ResetAssignments(),
                       SendPeer(PeerSignal.RECOVER, Reason.ADMIN)]  # fmt: skip
        else:
            effects = [DisconnectUsers()]  # the users' homes change under us
        self._enter(State.INITIALIZING, Reason.INITIALIZATION)
        return [*effects, StartServices(), Restart()]

    def _peer_lost_in_transition(self, trigger: Trigger) -> list[Effect]:
        return self._fail(Reason.UNKNOWN, tell_peer=False)


# who moves, and the state of the node the move is for, per kind of move
_MOVER_STATE = {
    Move.TAKE_OVER: State.TAKING_OVER,
    Move.GIVE_BACK: State.FALLING_BACK,
    Move.TAKE_ALL: State.FAILING_OVER_AFFECTED,
}
_MOVED_STATE = {
    Move.TAKE_OVER: State.FAILING_OVER,
    Move.GIVE_BACK: State.TAKING_BACK,
    Move.TAKE_ALL: State.BACKUP_ACTIVATED,
}

_Handler = Callable[[SRM, Trigger], list[Effect]]
S, E = State, Event
_TABLE: dict[tuple[State, Event], _Handler] = {
    # start-up
    (S.INITIALIZING, E.PEER_SEEN): SRM._peer_seen,
    (S.INITIALIZING, E.PEER_LOST): SRM._take_over,
    (S.INITIALIZING, E.TAKE_OVER_REQUEST): SRM._take_over,
    (S.INITIALIZING, E.PEER_FAILED): SRM._peer_failed,
    # normal operation
    (S.NORMAL, E.ADMIN_FAILOVER): SRM._admin_failover,
    (S.NORMAL, E.SERVICES_DOWN): SRM._services_down,
    (S.NORMAL, E.TAKE_OVER_REQUEST): SRM._take_over,
    (S.NORMAL, E.PEER_LOST): SRM._take_over,
    (S.NORMAL, E.PEER_FAILED): SRM._peer_failed,
    # failover
    (S.FAILING_OVER, E.PEER_MOVE_FINISHED): SRM._was_taken_over,
    (S.FAILING_OVER, E.PEER_FAILED): SRM._peer_failed,
    (S.FAILING_OVER, E.PEER_LOST): SRM._peer_lost_in_transition,
    (S.FAILING_OVER, E.TAKE_OVER_REQUEST): SRM._peer_lost_in_transition,  # both asked (D9)
    (S.NORMAL, E.PEER_MOVE_FINISHED): SRM._taken_over_unawares,
    (S.BACKUP_MODE, E.PEER_MOVE_FINISHED): SRM._taken_over_unawares,
    (S.BACKUP_MODE, E.TAKE_OVER_REQUEST): SRM._already_here,
    (S.IDLE, E.PEER_FAILED): SRM._peer_failed,  # row 15, the failed-over side
    (S.FAILED_OVER, E.PEER_FAILED): SRM._peer_failed,
    (S.FAILED_OVER_CS_DOWN, E.PEER_FAILED): SRM._peer_failed,
    (S.BACKUP_ACTIVATED, E.PEER_LOST): SRM._peer_lost_in_transition,
    (S.TAKING_OVER, E.MOVE_FINISHED): SRM._took_over,
    # failed over
    (S.IDLE, E.ADMIN_FALLBACK): SRM._fallback,
    (S.FAILED_OVER, E.ADMIN_FALLBACK): SRM._fallback,
    (S.FAILED_OVER, E.AUTO_FALLBACK_DUE): SRM._fallback,
    (S.FAILED_OVER, E.SERVICES_DOWN): SRM._services_down_failed_over,
    (S.FAILED_OVER, E.HAND_OVER_REQUEST): SRM._take_all,
    (S.FAILED_OVER, E.PEER_LOST): SRM._take_all,  # the backup died: serve everyone here
    (S.FAILED_OVER_CS_DOWN, E.SERVICES_UP): SRM._services_up,
    # fallback
    (S.TAKING_BACK, E.SERVICES_STARTED): SRM._services_started,
    (S.TAKING_BACK, E.PEER_MOVE_FINISHED): SRM._took_back,
    (S.IDLE, E.PEER_MOVE_FINISHED): SRM._took_back,
    (S.FAILED_OVER, E.PEER_MOVE_FINISHED): SRM._took_back,
    (S.TAKING_BACK, E.PEER_FAILED): SRM._peer_failed,
    (S.TAKING_BACK, E.PEER_LOST): SRM._peer_lost_in_transition,
    (S.BACKUP_MODE, E.TAKE_BACK_REQUEST): SRM._give_back,
    (S.BACKUP_MODE, E.SERVICES_DOWN): SRM._backup_services_down,
    (S.BACKUP_MODE, E.PEER_FAILED): SRM._peer_failed,
    (S.FALLING_BACK, E.MOVE_FINISHED): SRM._gave_back,
    # auto-recovery
    (S.BACKUP_ACTIVATED, E.PEER_MOVE_FINISHED): SRM._handed_over,
    (S.BACKUP_ACTIVATED, E.PEER_FAILED): SRM._peer_failed,
    (S.FAILING_OVER_AFFECTED, E.MOVE_FINISHED): SRM._took_all,
    # recovery
    (S.FAILED_MODE, E.ADMIN_RECOVER): SRM._recover,
    (S.FAILED_MODE, E.PEER_RECOVER): SRM._recover,
    (S.UNKNOWN, E.ADMIN_RECOVER): SRM._recover,
    (S.UNKNOWN, E.PEER_RECOVER): SRM._recover,
}
TRANSITION_STATES = frozenset(
    {S.TAKING_OVER, S.FAILING_OVER, S.FALLING_BACK, S.TAKING_BACK, S.BACKUP_ACTIVATED,
     S.FAILING_OVER_AFFECTED}
)  # fmt: skip
for _state in State:
    # the peer's recovery restarts this SRM whatever its state (D3)
    _TABLE.setdefault((_state, E.PEER_RECOVER), SRM._recover)
for _state in TRANSITION_STATES:
    # a transition that never ends (its peer vanished mid-way) gives up: recovery is offered
    _TABLE[(_state, E.TRANSITION_TIMEOUT)] = SRM._peer_lost_in_transition
del S, E, _state
