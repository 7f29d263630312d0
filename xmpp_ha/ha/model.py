"""The redundancy model's vocabulary (SPEC §7, §8): node states, reasons, actions.

Names are the SPEC's, printed as-is by the admin API, the CLI and the web page.
"""

from __future__ import annotations

from enum import Enum


class State(Enum):
    INITIALIZING = "Initializing"  # SRM is starting
    IDLE = "Idle"  # failed over by the admin, services stopped; fallback may be started
    NORMAL = "Normal"  # working normally; failover may be started
    BACKUP_MODE = "Running in Backup Mode"  # backing up its peer; the peer's users are here
    TAKING_OVER = "Taking Over"  # taking over the peer's users
    FAILING_OVER = "Failing Over"  # being taken over by the peer
    FAILED_OVER = "Failed Over"  # failed over, critical services back up; ready for fallback
    FAILED_OVER_CS_DOWN = "Failed Over with Critical Services Not Running"  # some stopped
    FALLING_BACK = "Falling Back"  # handing the users back to the recovered peer
    TAKING_BACK = "Taking Back"  # the recovered node is taking its users back
    FAILED_MODE = "Running in Failed Mode"  # an error during a transition or in backup mode
    BACKUP_ACTIVATED = "Backup Activated"  # auto-recovery: this backup hands all users over
    FAILING_OVER_AFFECTED = "Failing Over Affected Services"  # auto-recovery: takes all users
    UNKNOWN = "Unknown"  # state unknown (e.g. HA not enabled)

    @property
    def steady(self) -> bool:
        return self in STEADY_STATES


STEADY_STATES = frozenset(
    {State.IDLE, State.NORMAL, State.BACKUP_MODE, State.FAILED_OVER, State.FAILED_OVER_CS_DOWN,
     State.FAILED_MODE}
)  # fmt: skip


class Reason(Enum):
    NORMAL = "Normal"  # nothing happened
    ADMIN = "On Admin Request"  # an administrator asked
    INITIALIZATION = "Initialization"  # the SRM (re)started
    AUTO_FALLBACK = "Automatic Fallback"  # the automatic fallback delay elapsed
    CRITICAL_SERVICE_DOWN = "Critical Service Down"  # longer than the allowed delay
    DATABASE_FAILURE = "Database Failure"  # the shared store is unreachable from this node
    START_CS_FAILED = "Start of Critical Services Failed"  # while taking back
    PEER_DOWN = "Peer Down"  # heartbeats and store lease stopped
    PEER_REBOOT = "Peer Reboot"  # the peer announced its shutdown
    PEER_DOWN_DURING_INIT = "Peer Down During Initialization"  # never seen since start-up
    TAKEOVER_FAILED = "Take Over Users Failed"  # moving users during takeover failed
    TAKEBACK_FAILED = "Take Back Users Failed"  # moving users during fallback failed
    UNKNOWN = "Unknown"  # restarted beside a failed peer, or an internal error
    AUTO_RECOVER_DB_FAILURE = "Auto Recover Database Failure"  # backup lost its store
    AUTO_RECOVER_CS_DOWN = "Auto Recover Critical Service Down"  # backup lost a service


class Action(Enum):
    FAILOVER = "failover"  # move this node's users to its peer
    FALLBACK = "fallback"  # move this node's users back to it
    RECOVERY = "recovery"  # restart the SRM on both nodes of the group


ALLOWED_ACTIONS: dict[State, frozenset[Action]] = {
    State.NORMAL: frozenset({Action.FAILOVER}),
    State.IDLE: frozenset({Action.FALLBACK}),
    State.FAILED_OVER: frozenset({Action.FALLBACK}),
    State.FAILED_MODE: frozenset({Action.RECOVERY}),
    State.UNKNOWN: frozenset({Action.RECOVERY}),
}


def allowed_actions(state: State) -> frozenset[Action]:
    return ALLOWED_ACTIONS.get(state, frozenset())


# The administrator's next step for each (state, reason); SPEC §8 "recommended action".
_RECOMMENDED: dict[tuple[State, Reason], str] = {
    (State.IDLE, Reason.ADMIN): "Start a manual fallback when ready.",
    (State.IDLE, Reason.INITIALIZATION): "Start a manual fallback when ready.",
    (State.FAILED_OVER, Reason.INITIALIZATION): "Services are up again: start a manual fallback.",
    (
        State.FAILED_OVER,
        Reason.CRITICAL_SERVICE_DOWN,
    ): "Services are up again: start a manual fallback.",
    (State.FAILED_OVER_CS_DOWN, Reason.CRITICAL_SERVICE_DOWN): (
        "Start the stopped critical service (or reboot the node), then fall back."
    ),
    (State.FAILED_OVER_CS_DOWN, Reason.DATABASE_FAILURE): (
        "Restore the node's store connection (or reboot), then fall back."
    ),
    (State.FAILED_OVER_CS_DOWN, Reason.INITIALIZATION): (
        "Start the stopped critical services, then fall back."
    ),
    (State.FAILED_MODE, Reason.START_CS_FAILED): (
        "Run recovery (reboot the node if services still do not start), then fall back."
    ),
    (State.FAILED_MODE, Reason.CRITICAL_SERVICE_DOWN): "Run recovery.",
    (State.FAILED_MODE, Reason.TAKEOVER_FAILED): "Check the store, then run recovery.",
    (State.FAILED_MODE, Reason.TAKEBACK_FAILED): "Check the store, then run recovery.",
    (State.FAILED_MODE, Reason.UNKNOWN): "Run recovery.",
    (State.FAILED_MODE, Reason.DATABASE_FAILURE): "Restore the store, then run recovery.",
    (State.BACKUP_MODE, Reason.PEER_DOWN): (
        "Restore the peer (network or SRM), then fall back; run recovery if both fail."
    ),
    (State.BACKUP_MODE, Reason.PEER_REBOOT): "Bring the peer up, then fall back.",
    (State.BACKUP_MODE, Reason.PEER_DOWN_DURING_INIT): "When the peer is up, fall back.",
    (State.UNKNOWN, Reason.UNKNOWN): "Enable HA, or restart the SRM on both nodes.",
}


def recommended_action(state: State, reason: Reason) -> str:
    text = _RECOMMENDED.get((state, reason))
    if text is not None:
        return text
    if state is State.NORMAL:
        return "None: the node is healthy."
    if state is State.BACKUP_MODE:
        return "None until the peer is ready; then fall back."
    if state is State.FAILED_OVER:
        return "Start a manual fallback when ready."
    if state is State.FAILED_OVER_CS_DOWN:
        return "Start the stopped critical services, then fall back."
    if state is State.FAILED_MODE:
        return "Run recovery."
    if not state.steady:
        return "Wait: a transition is in progress."
    return "Restart the SRM on both nodes."
