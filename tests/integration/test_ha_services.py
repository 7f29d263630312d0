"""Critical services stopped by the administrator, for real (SPEC §3, §8 rows 10-15, 22-23):
automatic failover after the critical service down delay, Database Failure, auto-recovery
of a failing backup, both nodes failed then recovered, automatic fallback.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.integration.pair_harness import (
    FAST_PARAMS,
    HAPair,
    is_message,
    running_pair,
    subscribe,
)
from xmpp_ha.ha.model import Reason, State

NORMAL = (State.NORMAL, Reason.NORMAL)
DELAY = FAST_PARAMS["critical_service_down_delay"]
CS_DOWN = Reason.CRITICAL_SERVICE_DOWN


@pytest.fixture
async def pair(store_url: str, tmp_path: Path) -> AsyncIterator[HAPair]:
    async with running_pair(store_url, tmp_path / "pair") as started:
        yield started


async def fail_over_by_router(pair: HAPair, node: str = "n1") -> None:
    """Stop the router on `node`, wait for the automatic failover (row 12), start it
    again: `node` ends Failed Over (row 11), its peer Running in Backup Mode."""
    peer = pair.other(node)
    stopped_at = time.monotonic()
    await pair.service(node, "router", "stop")
    await pair.wait_states(
        {node: (State.FAILED_OVER_CS_DOWN, CS_DOWN), peer: (State.BACKUP_MODE, CS_DOWN)}
    )
    elapsed = time.monotonic() - stopped_at
    assert elapsed >= DELAY - 0.3, f"failed over {elapsed:.2f} s after the stop, before the delay"
    await pair.wait_served({node: set(), peer: set(pair.users)})
    await pair.service(node, "router", "start")
    await pair.wait_states({node: (State.FAILED_OVER, CS_DOWN), peer: (State.BACKUP_MODE, CS_DOWN)})


async def test_router_stopped_fails_the_node_over_after_the_delay(pair: HAPair) -> None:
    on_n1 = await pair.users_homed_on("n1")
    on_n2 = await pair.users_homed_on("n2")
    alice = await pair.login(on_n1[0])
    bob = await pair.login(on_n2[0])
    await subscribe(alice, bob)

    await pair.service("n1", "router", "stop")
    await pair.wait_states(
        {"n1": (State.FAILED_OVER_CS_DOWN, CS_DOWN), "n2": (State.BACKUP_MODE, CS_DOWN)}
    )
    n1 = await pair.node_status("n1")
    assert n1["services"]["router"] is False
    # no fallback before the service runs again (SPEC §8 row 12)
    assert n1["allowed_actions"] == []
    assert n1["recommended_action"].startswith("Start the stopped critical service")
    status, message = await pair.call("n1", "POST", "/nodes/n1/fallback")
    assert status == 409 and "Critical Services Not Running" in message, (status, message)
    await pair.wait_served({"n1": set(), "n2": set(pair.users)})
    # alice was told to go to n2, and chats from there
    await alice.wait_session("n2", after=1)
    alice.chat(bob.boundjid.bare, "from n2 while n1's router is down")
    await bob.next(is_message("from n2 while n1's router is down"), what="chat")
    await pair.wait_counter("n1", "ActiveJsmSessions", 0)
    await pair.wait_counter("n2", "ActiveJsmSessions", 2)

    await pair.service("n1", "router", "start")
    await pair.wait_states({"n1": (State.FAILED_OVER, CS_DOWN), "n2": (State.BACKUP_MODE, CS_DOWN)})
    await pair.fallback("n1")
    await pair.wait_states({"n1": NORMAL, "n2": NORMAL})
    await pair.wait_served({"n1": set(on_n1), "n2": set(on_n2)})
    await alice.wait_session("n1", after=2)
    assert alice.roster_items == {bob.boundjid.bare: "to"}
    assert await pair.roster(on_n2[0]) == {alice.boundjid.bare: "from"}


async def test_session_manager_stopped_fails_the_node_over(pair: HAPair) -> None:
    on_n2 = await pair.users_homed_on("n2")
    dave = await pair.login(on_n2[0])
    await pair.service("n2", "session manager", "stop")
    await pair.wait_states(
        {"n1": (State.BACKUP_MODE, CS_DOWN), "n2": (State.FAILED_OVER_CS_DOWN, CS_DOWN)}
    )
    await pair.wait_served({"n1": set(pair.users), "n2": set()})
    await dave.wait_session("n1", after=1)
    await pair.service("n2", "session manager", "start")
    await pair.wait_states({"n2": (State.FAILED_OVER, CS_DOWN)})
    await pair.fallback("n2")
    await pair.wait_states({"n1": NORMAL, "n2": NORMAL})
    await pair.wait_served({"n2": set(on_n2)})
    await dave.wait_session("n2", after=2)


async def test_store_stopped_is_a_database_failure(pair: HAPair) -> None:
    on_n1 = await pair.users_homed_on("n1")
    on_n2 = await pair.users_homed_on("n2")
    alice = await pair.login(on_n1[0])
    bob = await pair.login(on_n2[0])
    await subscribe(bob, alice)

    await pair.service("n1", "store", "stop")
    db = Reason.DATABASE_FAILURE
    await pair.wait_states(
        {"n1": (State.FAILED_OVER_CS_DOWN, db), "n2": (State.BACKUP_MODE, db)}, timeout=20
    )
    await pair.wait_served({"n1": set(), "n2": set(pair.users)})
    await alice.wait_session("n2", after=1)
    assert (await pair.node_status("n1"))["services"]["store"] is False

    await pair.service("n1", "store", "start")
    await pair.wait_states({"n1": (State.FAILED_OVER, None)}, timeout=20)
    await pair.wait_peer_sees("n2", "n1")  # restarted: see test_fallback_at_once_after_a_restart
    await pair.fallback("n1")
    await pair.wait_states({"n1": NORMAL, "n2": NORMAL})
    await pair.wait_served({"n1": set(on_n1), "n2": set(on_n2)})
    await alice.wait_session("n1", after=2)
    assert alice.roster_items == {bob.boundjid.bare: "from"}


async def test_backup_losing_a_service_hands_everyone_to_its_recovered_peer(
    pair: HAPair,
) -> None:
    on_n2 = await pair.users_homed_on("n2")
    dave = await pair.login(on_n2[0])
    await fail_over_by_router(pair, "n1")  # n1 Failed Over (able to serve), n2 backup

    await pair.service("n2", "router", "stop")
    auto = Reason.AUTO_RECOVER_CS_DOWN
    await pair.wait_states(
        {"n1": (State.BACKUP_MODE, auto), "n2": (State.FAILED_OVER_CS_DOWN, auto)}
    )
    assert ("Backup Activated", auto.value) in pair.entered("n2")
    assert ("Failing Over Affected Services", auto.value) in pair.entered("n1")
    await pair.wait_served({"n1": set(pair.users), "n2": set()})
    await dave.wait_session("n1", after=1)
    await pair.wait_counter("n1", "ActiveJsmSessions", 1)

    await pair.service("n2", "router", "start")
    await pair.wait_states({"n2": (State.FAILED_OVER, None)})
    await pair.fallback("n2")
    await pair.wait_states({"n1": NORMAL, "n2": NORMAL})
    await pair.wait_served({"n2": set(on_n2)})
    await dave.wait_session("n2", after=2)


async def fail_the_backup_while_the_peer_is_idle(pair: HAPair) -> None:
    """Manual failover of n1 (Idle: it cannot serve), then n2's router stops (row 15)."""
    await pair.failover("n1")
    await pair.wait_states(
        {"n1": (State.IDLE, Reason.ADMIN), "n2": (State.BACKUP_MODE, Reason.ADMIN)}
    )
    await pair.service("n2", "router", "stop")
    await pair.wait_states({"n2": (State.FAILED_MODE, CS_DOWN)})


async def recover_and_check_everyone_is_served(pair: HAPair, node: str) -> None:
    on_n1 = await pair.users_homed_on("n1")
    on_n2 = await pair.users_homed_on("n2")
    await pair.act(node, "POST", "/recover")
    await pair.wait_states({"n1": NORMAL, "n2": NORMAL}, timeout=8)
    await pair.wait_served({"n1": set(on_n1), "n2": set(on_n2)})
    for name in ("n1", "n2"):
        assert all((await pair.node_status(name))["services"].values())
    alice = await pair.login(on_n1[0], node="n2")  # redirected home
    bob = await pair.login(on_n2[0], node="n1")
    assert (alice.node, bob.node) == ("n1", "n2")
    alice.chat(bob.boundjid.bare, "after recovery")
    await bob.next(is_message("after recovery"), what="chat after recovery")


async def test_backup_losing_a_service_while_the_peer_is_idle_fails_both(pair: HAPair) -> None:
    await fail_the_backup_while_the_peer_is_idle(pair)
    failed = (State.FAILED_MODE, CS_DOWN)
    await pair.wait_states({"n1": failed, "n2": failed}, timeout=6)
    for node in ("n1", "n2"):
        assert (await pair.node_status(node))["allowed_actions"] == ["recovery"]
    status, message = await pair.call("n1", "POST", "/nodes/n1/fallback")
    assert status == 409 and "Running in Failed Mode" in message, (status, message)
    await recover_and_check_everyone_is_served(pair, "n1")


async def test_recovery_on_the_failed_backup_serves_everyone_again(pair: HAPair) -> None:
    await fail_the_backup_while_the_peer_is_idle(pair)
    await recover_and_check_everyone_is_served(pair, "n2")


async def test_automatic_fallback_after_the_delay(store_url: str, tmp_path: Path) -> None:
    params = {"enable_automatic_fallback": True, "automatic_fallback_delay": 2.0}
    async with running_pair(store_url, tmp_path / "pair", params=params) as pair:
        on_n1 = await pair.users_homed_on("n1")
        on_n2 = await pair.users_homed_on("n2")
        alice = await pair.login(on_n1[0])
        await fail_over_by_router(pair, "n1")
        healthy_at = time.monotonic()
        await alice.wait_session("n2", after=1)

        await pair.wait_states({"n1": NORMAL, "n2": NORMAL}, timeout=15)
        elapsed = time.monotonic() - healthy_at
        assert elapsed >= 2.0 - 0.5, f"fell back after {elapsed:.1f} s, before the delay"
        auto = Reason.AUTO_FALLBACK.value
        assert ("Taking Back", auto) in pair.entered("n1")
        assert ("Falling Back", auto) in pair.entered("n2")
        await pair.wait_served({"n1": set(on_n1), "n2": set(on_n2)})
        await alice.wait_session("n1", after=2)
        await pair.wait_counter("n1", "ActiveJsmSessions", 1)


async def test_a_login_during_a_failover_is_not_kept_by_the_losing_node(
    store_url: str, tmp_path: Path
) -> None:
    # a longer heartbeat timeout, so that n2 may be frozen for a moment without consequence
    params = {"heartbeat_timeout": 4.0, "initialization_heartbeat_timeout": 5.0}
    async with running_pair(store_url, tmp_path / "pair", params=params) as pair:
        alice_name = (await pair.users_homed_on("n1"))[0]
        await pair.service("n1", "router", "stop")
        pair.freeze("n2")  # a slow taker: the move waits, n1 is Failing Over meanwhile
        try:
            await pair.wait_states({"n1": (State.FAILING_OVER, CS_DOWN)}, timeout=3)
            alice = pair.client(alice_name)
            alice.auto_relogin = False
            attempt = await alice.try_login("n1", timeout=1.5)
        finally:
            pair.thaw("n2")
        await pair.wait_states(
            {"n1": (State.FAILED_OVER_CS_DOWN, CS_DOWN), "n2": (State.BACKUP_MODE, CS_DOWN)}
        )
        await pair.wait_served({"n1": set(), "n2": set(pair.users)})
        alice.auto_relogin = True
        if attempt.outcome != "session":
            await alice.login(None)
        await alice.wait_session("n2", timeout=6)
        await pair.wait_counter("n1", "ActiveJsmSessions", 0)
