"""The dual-connection decision core with an injected clock: plan, standby, switch on loss,
pushed activation, refusals, re-sent stanzas, downtime and de-duplication."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from client_sim.dual import (
    ACTIVATE_RETRY,
    BACKOFF_MIN,
    PLAN_AFTER_SWITCH,
    Activate,
    DualCore,
    OpenStandby,
    Probe,
    Promote,
    Relogin,
    RequestPlan,
)

NODES = {"n1": ("127.0.0.1", 5222), "n2": ("127.0.0.2", 5222)}


def with_standby() -> DualCore:
    core = DualCore(nodes=dict(NODES))
    assert core.active_started(0.0, "n1", dual_offered=True) == [RequestPlan()]
    assert core.plan(0.1, "n2", "127.0.0.2", 5222, delay=2.0) == []
    assert core.due() == 2.1
    assert core.tick(2.0) == []
    assert core.tick(2.1) == [OpenStandby("n2", "127.0.0.2", 5222)]
    assert core.standby_started(2.3) == []
    assert (core.active, core.standby) == ("n1", "n2")
    return core


def test_no_plan_without_the_offer() -> None:
    core = DualCore(nodes=dict(NODES))
    assert core.active_started(0.0, "n1", dual_offered=False) == []


def test_losing_the_active_session_activates_the_standby_and_resends() -> None:
    core = with_standby()
    unacked = [ET.Element("{jabber:client}message", {"id": "m1"})]
    assert core.active_lost(10.0, unacked) == [Activate()]
    actions = core.activated(10.2)
    assert actions == [Promote(unacked), Probe()]
    assert (core.active, core.standby) == ("n2", None)
    assert core.probe_returned(10.25) == []
    (downtime,) = core.downtimes
    assert downtime.seconds == 0.25 and downtime.activated == 10.2 and not downtime.pushed
    # the new plan a little later: the server is still switching the other users
    assert core.due() == 10.2 + PLAN_AFTER_SWITCH
    assert core.tick(10.2 + PLAN_AFTER_SWITCH) == [RequestPlan()]


def test_a_push_switches_without_a_loss_and_counts_from_the_push() -> None:
    core = with_standby()
    assert core.activated(5.0, pushed=True) == [Promote([]), Probe()]
    assert core.probe_returned(5.1) == []
    assert core.downtimes[0].pushed and core.downtimes[0].seconds is not None
    assert core.activated(5.05) == []  # the answer to a crossed request: counted once


def test_conflict_retries_then_relogs_in() -> None:
    core = with_standby()
    core.active_lost(1.0, [])
    assert core.activation_refused(1.1, "conflict") == []
    assert core.due() == 1.1 + ACTIVATE_RETRY
    assert core.tick(1.1 + ACTIVATE_RETRY) == [Activate()]
    assert core.activation_refused(1.3, "not-allowed") == [Relogin("n1", *NODES["n1"])]


def test_without_a_standby_a_lost_session_logs_in_on_the_other_node() -> None:
    core = DualCore(nodes=dict(NODES))
    core.active_started(0.0, "n1", dual_offered=True)
    assert core.active_lost(1.0, []) == [Relogin("n2", *NODES["n2"])]
    assert core.relogin_failed(1.5, "n2") == [Relogin("n1", *NODES["n1"])]
    assert core.active_started(2.0, "n1", dual_offered=True) == [Probe()]
    assert core.probe_returned(2.1) == []
    assert core.downtimes[0].seconds is not None
    assert core.tick(2.0 + PLAN_AFTER_SWITCH) == [RequestPlan()]


def test_a_probe_that_never_returns_still_leads_to_a_plan() -> None:
    core = with_standby()
    core.active_lost(1.0, [])
    assert core.activated(1.1) == [Promote([]), Probe()]
    assert core.due() == 1.1 + PLAN_AFTER_SWITCH
    assert core.tick(1.1 + PLAN_AFTER_SWITCH) == [RequestPlan()]
    assert core.probe_returned(5.0) == []  # asked already


def test_a_refused_standby_asks_for_a_plan_again_with_back_off() -> None:
    core = DualCore(nodes=dict(NODES))
    core.active_started(0.0, "n1", dual_offered=True)
    core.plan(0.0, "n2", "127.0.0.2", 5222, delay=0.5)
    assert core.tick(0.5) == [OpenStandby("n2", "127.0.0.2", 5222)]
    assert core.standby_lost(0.6) == []
    assert core.due() == 0.6 + BACKOFF_MIN
    assert core.tick(0.6 + BACKOFF_MIN) == [RequestPlan()]
    core.plan_refused(1.2)
    assert core.due() == 1.2 + 2 * BACKOFF_MIN


def test_a_lost_standby_asks_for_a_plan_after_the_other_users_switched() -> None:
    core = with_standby()
    assert core.standby_lost(3.0) == []  # its node failed: its users switch to ours now
    assert core.due() == 3.0 + PLAN_AFTER_SWITCH
    assert core.tick(3.0 + PLAN_AFTER_SWITCH) == [RequestPlan()]


def test_duplicates_are_dropped_and_counted() -> None:
    core = DualCore(nodes=dict(NODES))
    assert core.message_received("bob@localhost/r", "m1")
    assert not core.message_received("bob@localhost/r", "m1")
    assert core.message_received("carol@localhost/r", "m1")
    assert core.message_received("bob@localhost/r", "")  # no id: cannot tell
    assert core.duplicates == 1
