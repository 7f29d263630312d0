"""The failure detector: peer loss, partitions, stop announcements, service health, auto fallback."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from xmpp_ha.ha.detector import Detector, Timing
from xmpp_ha.ha.model import Reason, State
from xmpp_ha.ha.srm import Event, Trigger

TIMING = Timing(
    heartbeat_interval=1.0,
    heartbeat_timeout=4.0,
    init_heartbeat_timeout=8.0,
    critical_service_delay=3.0,
    auto_fallback=False,
    auto_fallback_delay=10.0,
)
AUTO = Timing(
    heartbeat_interval=1.0,
    heartbeat_timeout=4.0,
    init_heartbeat_timeout=8.0,
    critical_service_delay=3.0,
    auto_fallback=True,
    auto_fallback_delay=10.0,
)
START = 100.0

PEER_DOWN = Trigger(Event.PEER_LOST, Reason.PEER_DOWN)
PEER_REBOOT = Trigger(Event.PEER_LOST, Reason.PEER_REBOOT)
SERVICES_UP = Trigger(Event.SERVICES_UP)
CRITICAL_DOWN = Trigger(Event.SERVICES_DOWN, Reason.CRITICAL_SERVICE_DOWN)
DATABASE_DOWN = Trigger(Event.SERVICES_DOWN, Reason.DATABASE_FAILURE)
FALLBACK_DUE = Trigger(Event.AUTO_FALLBACK_DUE, Reason.AUTO_FALLBACK)


def lost(triggers: list[Trigger]) -> list[Trigger]:
    return [trigger for trigger in triggers if trigger.event is Event.PEER_LOST]


def health(triggers: list[Trigger]) -> list[Trigger]:
    return [
        trigger for trigger in triggers if trigger.event in (Event.SERVICES_UP, Event.SERVICES_DOWN)
    ]


def fallback(triggers: list[Trigger]) -> list[Trigger]:
    return [trigger for trigger in triggers if trigger.event is Event.AUTO_FALLBACK_DUE]


# --- the peer ---------------------------------------------------------------------------


def test_initialization_timeout_applies_until_the_peer_is_seen() -> None:
    detector = Detector(TIMING, START)
    assert detector.peer_timeout == TIMING.init_heartbeat_timeout
    # longer than the heartbeat timeout, not longer than the initialization one
    assert lost(detector.tick(START + TIMING.heartbeat_timeout + 1, State.INITIALIZING)) == []
    assert lost(detector.tick(START + TIMING.init_heartbeat_timeout, State.INITIALIZING)) == []
    assert lost(detector.tick(START + TIMING.init_heartbeat_timeout + 0.5, State.INITIALIZING)) == [
        PEER_DOWN
    ]
    assert detector.peer_lost
    # reported once, not at every tick
    assert lost(detector.tick(START + 50, State.INITIALIZING)) == []


def test_first_heartbeat_reports_the_peer_and_its_state() -> None:
    detector = Detector(TIMING, START)
    assert detector.heartbeat(START + 1, State.BACKUP_MODE) == [
        Trigger(Event.PEER_SEEN, peer_state=State.BACKUP_MODE)
    ]
    assert detector.heartbeat(START + 2, State.BACKUP_MODE) == []  # only the first
    assert detector.peer_seen and not detector.peer_lost


def test_heartbeat_timeout_applies_once_the_peer_was_seen() -> None:
    detector = Detector(TIMING, START)
    detector.heartbeat(START + 1, State.NORMAL)
    assert detector.peer_timeout == TIMING.heartbeat_timeout
    last = START + 1
    assert lost(detector.tick(last + TIMING.heartbeat_timeout, State.NORMAL)) == []
    assert lost(detector.tick(last + TIMING.heartbeat_timeout + 0.5, State.NORMAL)) == [PEER_DOWN]


def test_regular_heartbeats_keep_the_peer() -> None:
    detector = Detector(TIMING, START)
    now = START
    for _ in range(200):
        now += TIMING.heartbeat_interval
        detector.heartbeat(now, State.NORMAL)
        assert lost(detector.tick(now + 0.5, State.NORMAL)) == []


def test_a_lost_peer_heard_again_is_seen_again() -> None:
    detector = Detector(TIMING, START)
    detector.heartbeat(START, State.NORMAL)
    assert lost(detector.tick(START + 5, State.NORMAL)) == [PEER_DOWN]
    assert detector.heartbeat(START + 20, State.FAILED_OVER) == [
        Trigger(Event.PEER_SEEN, peer_state=State.FAILED_OVER)
    ]
    assert not detector.peer_lost
    assert lost(detector.tick(START + 24, State.BACKUP_MODE)) == []
    assert lost(detector.tick(START + 24.5, State.BACKUP_MODE)) == [PEER_DOWN]


def test_peer_whose_lease_advances_is_partitioned_not_lost() -> None:
    detector = Detector(TIMING, START)
    detector.heartbeat(START, State.NORMAL)
    now = START
    for _ in range(60):  # heartbeats stop; the lease in the store goes on
        now += TIMING.heartbeat_interval
        detector.lease_advanced(now)
        assert lost(detector.tick(now + 0.5, State.NORMAL)) == []
    assert detector.peer_partitioned(now + 0.5)
    assert not detector.peer_lost
    # the lease stops too: lost one heartbeat timeout after its last advance
    assert lost(detector.tick(now + TIMING.heartbeat_timeout, State.NORMAL)) == []
    assert lost(detector.tick(now + TIMING.heartbeat_timeout + 0.5, State.NORMAL)) == [PEER_DOWN]


def test_peer_never_heard_but_leasing_at_start_up_is_not_lost() -> None:
    detector = Detector(TIMING, START)
    for second in range(1, 40):
        detector.lease_advanced(START + second)
        assert lost(detector.tick(START + second + 0.5, State.INITIALIZING)) == []
    assert detector.peer_partitioned(START + 39.5)


def test_not_partitioned_while_heartbeats_arrive() -> None:
    detector = Detector(TIMING, START)
    detector.heartbeat(START + 1, State.NORMAL)
    detector.lease_advanced(START + 1)
    assert not detector.peer_partitioned(START + 2)
    assert not detector.peer_partitioned(START + 20)  # both silent: lost, not partitioned


def test_peer_stop_announcement_is_peer_reboot_at_once() -> None:
    detector = Detector(TIMING, START)
    detector.heartbeat(START + 1, State.NORMAL)
    assert detector.peer_stopping() == [PEER_REBOOT]
    assert detector.peer_lost
    # no second report (Peer Down) when the heartbeat timeout passes afterwards
    assert lost(detector.tick(START + 60, State.BACKUP_MODE)) == []
    assert detector.heartbeat(START + 61, State.FAILED_OVER) == [
        Trigger(Event.PEER_SEEN, peer_state=State.FAILED_OVER)
    ]


@settings(max_examples=200, deadline=None)
@given(
    gaps=st.lists(st.floats(min_value=0.1, max_value=6.0), min_size=1, max_size=40),
    leases=st.booleans(),
)
def test_lost_exactly_when_silent_longer_than_the_timeout(gaps: list[float], leases: bool) -> None:
    """Heartbeats (or lease advances) at random gaps: lost iff a gap exceeds the timeout."""
    detector = Detector(TIMING, START)
    detector.heartbeat(START, State.NORMAL)
    now = START
    reported = False
    for gap in gaps:
        due = now + gap
        triggers = lost(detector.tick(due, State.NORMAL))
        if gap > TIMING.heartbeat_timeout and not reported:
            assert triggers == [PEER_DOWN]
            reported = True
        else:
            assert triggers == []
        now = due
        if leases:
            detector.lease_advanced(now)
        elif detector.heartbeat(now, State.NORMAL):
            reported = False  # seen again after the loss


# --- local services ---------------------------------------------------------------------


def test_services_up_is_reported_at_every_tick() -> None:
    detector = Detector(TIMING, START)
    for second in range(5):
        detector.services(START + second, all_up=True, store_ok=True)
        assert health(detector.tick(START + second, State.NORMAL)) == [SERVICES_UP]


def test_critical_service_down_for_the_delay() -> None:
    detector = Detector(TIMING, START)
    down_at = START + 10
    for second in range(3):  # observed down at every tick, as the runtime does
        detector.services(down_at + second, all_up=False, store_ok=True)
        assert health(detector.tick(down_at + second, State.NORMAL)) == []
    detector.services(down_at + 2.9, all_up=False, store_ok=True)
    assert health(detector.tick(down_at + 2.9, State.NORMAL)) == []
    assert health(detector.tick(down_at + TIMING.critical_service_delay, State.NORMAL)) == [
        CRITICAL_DOWN
    ]
    # level-triggered: again at every tick while down
    assert health(detector.tick(down_at + 4, State.FAILING_OVER)) == [CRITICAL_DOWN]
    assert health(detector.tick(down_at + 5, State.FAILED_OVER_CS_DOWN)) == [CRITICAL_DOWN]


def test_store_unreachable_is_a_database_failure() -> None:
    detector = Detector(TIMING, START)
    detector.services(START, all_up=True, store_ok=False)
    assert health(detector.tick(START + 2, State.NORMAL)) == []
    assert health(detector.tick(START + 3, State.NORMAL)) == [DATABASE_DOWN]


def test_store_lost_while_a_service_is_down_keeps_the_first_down_time() -> None:
    detector = Detector(TIMING, START)
    detector.services(START, all_up=False, store_ok=True)
    detector.services(START + 2, all_up=False, store_ok=False)
    assert health(detector.tick(START + 3, State.NORMAL)) == [DATABASE_DOWN]
    detector.services(START + 4, all_up=False, store_ok=True)  # store back, service not
    assert health(detector.tick(START + 4, State.NORMAL)) == [CRITICAL_DOWN]


def test_a_short_outage_is_forgiven_and_the_delay_starts_again() -> None:
    detector = Detector(TIMING, START)
    detector.services(START, all_up=False, store_ok=True)
    assert health(detector.tick(START + 2, State.NORMAL)) == []
    detector.services(START + 2.5, all_up=True, store_ok=True)
    assert health(detector.tick(START + 2.5, State.NORMAL)) == [SERVICES_UP]
    detector.services(START + 3, all_up=False, store_ok=True)
    assert health(detector.tick(START + 5.9, State.NORMAL)) == []
    assert health(detector.tick(START + 6, State.NORMAL)) == [CRITICAL_DOWN]


def test_services_back_up_report_up_again() -> None:
    detector = Detector(TIMING, START)
    detector.services(START, all_up=False, store_ok=True)
    assert health(detector.tick(START + 10, State.FAILED_OVER_CS_DOWN)) == [CRITICAL_DOWN]
    detector.services(START + 11, all_up=True, store_ok=True)
    for second in range(11, 15):
        assert health(detector.tick(START + second, State.FAILED_OVER_CS_DOWN)) == [SERVICES_UP]


# --- automatic fallback ------------------------------------------------------------------


def test_automatic_fallback_due_after_the_delay_in_failed_over() -> None:
    detector = Detector(AUTO, START)
    assert fallback(detector.tick(START, State.FAILED_OVER)) == []
    assert fallback(detector.tick(START + AUTO.auto_fallback_delay - 0.5, State.FAILED_OVER)) == []
    assert fallback(detector.tick(START + AUTO.auto_fallback_delay, State.FAILED_OVER)) == [
        FALLBACK_DUE
    ]
    # once per period in Failed Over
    for second in range(1, 30):
        assert (
            fallback(detector.tick(START + AUTO.auto_fallback_delay + second, State.FAILED_OVER))
            == []
        )


def test_automatic_fallback_delay_counts_from_entering_failed_over() -> None:
    detector = Detector(AUTO, START)
    for second in range(50):
        assert fallback(detector.tick(START + second, State.FAILED_OVER_CS_DOWN)) == []
    entered = START + 50
    assert fallback(detector.tick(entered, State.FAILED_OVER)) == []
    assert fallback(detector.tick(entered + 9, State.FAILED_OVER)) == []
    assert fallback(detector.tick(entered + 10, State.FAILED_OVER)) == [FALLBACK_DUE]


def test_automatic_fallback_period_restarts_after_leaving_failed_over() -> None:
    detector = Detector(AUTO, START)
    detector.tick(START, State.FAILED_OVER)
    assert fallback(detector.tick(START + 10, State.FAILED_OVER)) == [FALLBACK_DUE]
    detector.tick(START + 11, State.TAKING_BACK)  # the fallback failed or was interrupted
    assert fallback(detector.tick(START + 12, State.FAILED_OVER)) == []
    assert fallback(detector.tick(START + 21, State.FAILED_OVER)) == []
    assert fallback(detector.tick(START + 22, State.FAILED_OVER)) == [FALLBACK_DUE]


def test_automatic_fallback_interrupted_by_a_service_failure_starts_over() -> None:
    detector = Detector(AUTO, START)
    detector.tick(START, State.FAILED_OVER)
    detector.tick(START + 8, State.FAILED_OVER_CS_DOWN)
    assert fallback(detector.tick(START + 9, State.FAILED_OVER)) == []
    assert fallback(detector.tick(START + 18, State.FAILED_OVER)) == []
    assert fallback(detector.tick(START + 19, State.FAILED_OVER)) == [FALLBACK_DUE]


def test_no_automatic_fallback_when_disabled() -> None:
    detector = Detector(TIMING, START)
    for second in range(0, 200, 5):
        assert fallback(detector.tick(START + second, State.FAILED_OVER)) == []


def test_no_automatic_fallback_outside_failed_over() -> None:
    others = [state for state in State if state is not State.FAILED_OVER]
    for state in others:
        detector = Detector(AUTO, START)
        for second in range(0, 100, 5):
            assert fallback(detector.tick(START + second, state)) == [], state


def test_default_timing_is_the_spec_s() -> None:
    timing = Timing()
    assert (
        timing.heartbeat_interval,
        timing.heartbeat_timeout,
        timing.init_heartbeat_timeout,
        timing.critical_service_delay,
        timing.auto_fallback,
        timing.auto_fallback_delay,
    ) == (15.0, 60.0, 120.0, 90.0, False, 1800.0)
