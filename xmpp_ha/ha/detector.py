"""Failure detection for one node, pure: turns observations and time into SRM triggers.

Observations come from the runtime with the time they were made: a heartbeat
from the peer, the peer's store lease advancing, the peer announcing its
stop, the health of the local critical services. `tick(now)` reports what
the passage of time decided. Nothing here reads a clock.

Rules (SPEC §4, DESIGN §4):
- The peer is lost when neither a heartbeat nor an advance of its lease was
  seen for the heartbeat timeout (the initialization heartbeat timeout until
  the peer was seen once). A peer whose lease still advances is partitioned,
  not dead: it is not reported lost, so its users are not taken wholesale.
- A peer that announced its stop is lost at once, as Peer Reboot.
- Critical services (or the store) down continuously for the critical
  service down delay report SERVICES_DOWN at every tick, all of them up
  report SERVICES_UP at every tick: level-triggered, so a state that cannot
  act on it (Initializing, a transition) acts once it can.
- With automatic fallback on, a node Failed Over (services up) for the
  fallback delay reports AUTO_FALLBACK_DUE once per such period.
- A transition state that lasts longer than the initialization plus the
  normal heartbeat timeout reports TRANSITION_TIMEOUT once.
"""

from __future__ import annotations

from dataclasses import dataclass

from xmpp_ha.ha.model import Reason, State
from xmpp_ha.ha.srm import Event, Trigger


@dataclass(frozen=True, slots=True)
class Timing:
    heartbeat_interval: float = 15.0
    heartbeat_timeout: float = 60.0
    init_heartbeat_timeout: float = 120.0
    critical_service_delay: float = 90.0
    auto_fallback: bool = False
    auto_fallback_delay: float = 1800.0


class Detector:
    def __init__(self, timing: Timing, now: float) -> None:
        self.timing = timing
        self.started_at = now
        self.last_heartbeat: float | None = None
        self.last_lease_advance: float | None = None
        self.peer_seen = False
        self.peer_lost = False
        self.services_down_since: float | None = None
        self.services_down_reason = Reason.CRITICAL_SERVICE_DOWN
        self.failed_over_since: float | None = None
        self.auto_fallback_reported = False
        self.state: State | None = None
        self.state_since = now
        self.transition_timeout_reported = False

    # --- observations ----------------------------------------------------------

    def heartbeat(self, now: float, peer_state: State) -> list[Trigger]:
        self.last_heartbeat = now
        first = not self.peer_seen or self.peer_lost
        self.peer_seen = True
        self.peer_lost = False
        if first:
            return [Trigger(Event.PEER_SEEN, peer_state=peer_state)]
        return []

    def lease_advanced(self, now: float) -> None:
        self.last_lease_advance = now

    def stalled(self, now: float) -> None:
        """We did not run for a while (frozen, overloaded): silence from the peer over
        that time proves nothing, so its timeout starts again from now."""
        if self.last_heartbeat is not None:
            self.last_heartbeat = now
        if self.last_lease_advance is not None:
            self.last_lease_advance = now
        self.started_at = max(self.started_at, now - self.peer_timeout / 2)

    def peer_stopping(self) -> list[Trigger]:
        self.peer_lost = True
        return [Trigger(Event.PEER_LOST, Reason.PEER_REBOOT)]

    def services(self, now: float, *, all_up: bool, store_ok: bool) -> None:
        """Local health as observed now."""
        if all_up and store_ok:
            self.services_down_since = None
            return
        self.services_down_reason = (
            Reason.DATABASE_FAILURE if not store_ok else Reason.CRITICAL_SERVICE_DOWN
        )
        if self.services_down_since is None:
            self.services_down_since = now

    # --- time --------------------------------------------------------------------

    @property
    def peer_timeout(self) -> float:
        return (
            self.timing.heartbeat_timeout if self.peer_seen else self.timing.init_heartbeat_timeout
        )

    def peer_partitioned(self, now: float) -> bool:
        """Heartbeats lost while the lease still advances (for the status page)."""
        return self._silent(now, self.last_heartbeat) and not self._silent(
            now, self.last_lease_advance
        )

    def _silent(self, now: float, last: float | None) -> bool:
        return now - (last if last is not None else self.started_at) > self.peer_timeout

    def tick(self, now: float, state: State) -> list[Trigger]:
        triggers: list[Trigger] = []
        if not self.peer_lost and self._silent(now, self.last_heartbeat):
            if self._silent(now, self.last_lease_advance):
                self.peer_lost = True
                triggers.append(Trigger(Event.PEER_LOST, Reason.PEER_DOWN))
        # level-triggered: states that cannot act on it ignore it until one can
        if self.services_down_since is None:
            triggers.append(Trigger(Event.SERVICES_UP))
        elif now - self.services_down_since >= self.timing.critical_service_delay:
            triggers.append(Trigger(Event.SERVICES_DOWN, self.services_down_reason))
        triggers.extend(self._auto_fallback(now, state))
        triggers.extend(self._transition_timeout(now, state))
        return triggers

    @property
    def transition_timeout(self) -> float:
        """Long enough for a peer to restart and answer; then the transition is stuck."""
        return self.timing.init_heartbeat_timeout + self.timing.heartbeat_timeout

    def _transition_timeout(self, now: float, state: State) -> list[Trigger]:
        from xmpp_ha.ha.srm import TRANSITION_STATES

        if state is not self.state:
            self.state, self.state_since = state, now
            self.transition_timeout_reported = False
        if (
            state in TRANSITION_STATES
            and not self.transition_timeout_reported
            and now - self.state_since > self.transition_timeout
        ):
            self.transition_timeout_reported = True
            return [Trigger(Event.TRANSITION_TIMEOUT, Reason.UNKNOWN)]
        return []

    def _auto_fallback(self, now: float, state: State) -> list[Trigger]:
        if state is not State.FAILED_OVER or not self.timing.auto_fallback:
            self.failed_over_since = None
            self.auto_fallback_reported = False
            return []
        if self.failed_over_since is None:
            self.failed_over_since = now
        if self.auto_fallback_reported:
            return []
        if now - self.failed_over_since >= self.timing.auto_fallback_delay:
            self.auto_fallback_reported = True
            return [Trigger(Event.AUTO_FALLBACK_DUE, Reason.AUTO_FALLBACK)]
        return []
