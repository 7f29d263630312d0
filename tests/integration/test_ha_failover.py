"""A healthy pair, manual failover and fallback, on real node processes (SPEC §6, §8 rows 1-4).

Every test starts its own pair (SQLite, and PostgreSQL when configured) and
checks at the end who serves whom (store assignments, node counters) and
that nothing stored was lost (rosters, offline messages).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.integration.pair_harness import (
    HAPair,
    PairClient,
    is_delayed,
    is_message,
    is_presence,
    running_pair,
    subscribe,
)
from xmpp_ha.ha.model import Reason, State

NORMAL = (State.NORMAL, Reason.NORMAL)


@pytest.fixture
async def pair(store_url: str, tmp_path: Path) -> AsyncIterator[HAPair]:
    async with running_pair(store_url, tmp_path / "pair") as started:
        yield started


async def chat_both_ways(a: PairClient, b: PairClient, tag: str) -> None:
    a.chat(b.boundjid.bare, f"{tag}: a->b")
    await b.next(is_message(f"{tag}: a->b", a.boundjid.bare), what=f"{tag} a->b")
    b.chat(a.boundjid.bare, f"{tag}: b->a")
    await a.next(is_message(f"{tag}: b->a", b.boundjid.bare), what=f"{tag} b->a")


async def test_normal_pair_splits_users_and_routes_between_nodes(pair: HAPair) -> None:
    homes = await pair.homes()
    on_n1 = await pair.users_homed_on("n1")
    on_n2 = await pair.users_homed_on("n2")
    assert len(on_n1) == len(on_n2) == len(pair.users) // 2, homes
    assert await pair.served_by() == {"n1": set(on_n1), "n2": set(on_n2)}

    alice_name, bob_name = on_n1[0], on_n2[0]
    alice = await pair.login(alice_name)
    bob = await pair.login(bob_name)
    assert (alice.node, bob.node) == ("n1", "n2")

    # presence across the peer link once subscribed, both ways
    await subscribe(alice, bob)
    await alice.next(is_presence("available", bob_name), what="bob's presence after subscribed")
    await subscribe(bob, alice)
    await bob.next(is_presence("available", alice_name), what="alice's presence")
    bob.send_presence(pstatus="busy on n2")
    await alice.next(
        lambda s: is_presence("available", bob_name)(s) and s["status"] == "busy on n2",
        what="bob's new status",
    )
    await chat_both_ways(alice, bob, "cross-node")

    # a login on the node that does not serve the user is redirected (see-other-host)
    bob2 = pair.client(bob_name, "second")
    assert await bob2.login("n1") == "n2"
    assert [a.outcome for a in bob2.attempts] == ["redirected", "session"]

    await pair.wait_counter("n1", "ActiveJsmSessions", 1)
    await pair.wait_counter("n2", "ActiveJsmSessions", 1)
    await pair.wait_counter("n2", "JsmSessionsClient", 2)
    assert await pair.roster(alice_name) == {f"{bob_name}@localhost": "both"}
    assert await pair.roster(bob_name) == {f"{alice_name}@localhost": "both"}
    assert await pair.served_by() == {"n1": set(on_n1), "n2": set(on_n2)}


async def test_manual_failover_and_fallback(pair: HAPair) -> None:
    on_n1 = await pair.users_homed_on("n1")
    on_n2 = await pair.users_homed_on("n2")
    alice_name, carol_name, bob_name = on_n1[0], on_n1[1], on_n2[0]
    alice = await pair.login(alice_name)
    bob = await pair.login(bob_name)
    await subscribe(alice, bob)
    await subscribe(bob, alice)
    await alice.next(is_presence("available", bob_name), what="bob's presence")

    # refused while Normal on the wrong node: fallback is not offered
    status, message = await pair.call("n1", "POST", "/nodes/n1/fallback")
    assert status == 409 and "fallback is not allowed" in message, (status, message)

    await pair.failover("n1")
    await pair.wait_states(
        {"n1": (State.IDLE, Reason.ADMIN), "n2": (State.BACKUP_MODE, Reason.ADMIN)}
    )
    assert ("Failing Over", "On Admin Request") in pair.entered("n1")
    assert ("Taking Over", "On Admin Request") in pair.entered("n2")
    await pair.wait_served({"n1": set(), "n2": set(pair.users)})

    # alice was disconnected and logged in again on n2, where she chats with bob
    await alice.wait_session("n2", after=1)
    await chat_both_ways(alice, bob, "after failover")
    # a login on n1 meanwhile ends on n2: n1's listener is stopped (Idle) or it redirects
    carol = pair.client(carol_name)
    assert await carol.login("n1") == "n2"
    assert carol.attempts[0].node == "n1"
    assert carol.attempts[0].outcome in ("refused", "redirected"), carol.attempts

    n1 = await pair.node_status("n1")
    assert n1["allowed_actions"] == ["fallback"]
    assert not n1["services"]["router"] and not n1["services"]["client listener"]
    await pair.wait_counter("n2", "ActiveJsmSessions", 3)
    await pair.wait_counter("n2", "InactiveJsmSessions", 2)  # alice and carol, homed on n1

    # failover refused while Idle (and on the backup), with a clear 409
    status, message = await pair.call("n1", "POST", "/nodes/n1/failover")
    assert status == 409, (status, message)
    assert message == "failover is not allowed while the node is 'Idle' (allowed: fallback)"
    status, message = await pair.call("n2", "POST", "/nodes/n2/failover")
    assert status == 409 and "Running in Backup Mode" in message, (status, message)

    # a message to carol while she is away waits offline
    carol_bare = carol.boundjid.bare
    await carol.close()
    await carol.wait_offline()
    bob.chat(carol_bare, "while carol is away")
    await pair.wait_offline_count(carol_name, 1)

    await pair.fallback("n1")
    await pair.wait_states({"n1": NORMAL, "n2": NORMAL})
    assert ("Taking Back", "On Admin Request") in pair.entered("n1")
    assert ("Falling Back", "On Admin Request") in pair.entered("n2")
    await pair.wait_served({"n1": set(on_n1), "n2": set(on_n2)})

    # alice is moved back to n1 (re-login), roster intact, still chatting with bob
    await alice.wait_session("n1", after=2)
    assert alice.roster_items == {bob.boundjid.bare: "both"}
    await alice.next(is_presence("available", bob_name), what="bob's presence on n1")
    await chat_both_ways(alice, bob, "after fallback")
    carol = await pair.login(carol_name)
    assert carol.node == "n1"
    delivered = await carol.next(is_message("while carol is away", bob_name), what="offline")
    assert is_delayed(delivered)
    assert await pair.offline_count(carol_name) == 0

    await pair.wait_counter("n1", "ActiveJsmSessions", 2)
    await pair.wait_counter("n2", "ActiveJsmSessions", 1)
    await pair.wait_counter("n2", "InactiveJsmSessions", 0)
    assert await pair.roster(alice_name) == {f"{bob_name}@localhost": "both"}
    assert await pair.roster(bob_name) == {f"{alice_name}@localhost": "both"}


async def test_failover_of_the_second_node_moves_its_users_to_the_first(pair: HAPair) -> None:
    on_n1 = await pair.users_homed_on("n1")
    on_n2 = await pair.users_homed_on("n2")
    dave = await pair.login(on_n2[0])
    await pair.failover("n2")
    await pair.wait_states(
        {"n1": (State.BACKUP_MODE, Reason.ADMIN), "n2": (State.IDLE, Reason.ADMIN)}
    )
    await pair.wait_served({"n1": set(pair.users), "n2": set()})
    await dave.wait_session("n1", after=1)
    await pair.fallback("n2")
    await pair.wait_states({"n1": NORMAL, "n2": NORMAL})
    await pair.wait_served({"n1": set(on_n1), "n2": set(on_n2)})
    await dave.wait_session("n2", after=2)


async def test_restarts_during_manual_failover_keep_it(pair: HAPair) -> None:
    """SPEC §8 rows 5 and 6: node 1 restarted while Idle, then both restarted."""
    on_n1 = await pair.users_homed_on("n1")
    on_n2 = await pair.users_homed_on("n2")
    await pair.failover("n1")
    idle, backup = (State.IDLE, Reason.ADMIN), (State.BACKUP_MODE, Reason.ADMIN)
    await pair.wait_states({"n1": idle, "n2": backup})

    pair.kill("n1")
    await pair.restart("n1")
    await pair.wait_states({"n1": (State.IDLE, Reason.INITIALIZATION), "n2": backup})  # row 5
    n1 = await pair.node_status("n1")
    assert n1["allowed_actions"] == ["fallback"]
    assert not n1["services"]["client listener"] and not n1["services"]["router"]
    await pair.wait_served({"n1": set(), "n2": set(pair.users)})

    assert await pair.terminate("n2") == 0
    assert await pair.terminate("n1") == 0
    await pair.restart("n1")
    await pair.restart("n2")
    await pair.wait_states(
        {
            "n1": (State.IDLE, Reason.INITIALIZATION),
            "n2": (State.BACKUP_MODE, Reason.INITIALIZATION),
        }
    )  # row 6
    await pair.wait_served({"n1": set(), "n2": set(pair.users)})
    alice = await pair.login(on_n1[0], node="n1")
    assert alice.node == "n2"

    await pair.wait_peer_sees("n2", "n1")  # restarted: see test_fallback_at_once_after_a_restart
    await pair.fallback("n1")
    await pair.wait_states({"n1": NORMAL, "n2": NORMAL})
    await pair.wait_served({"n1": set(on_n1), "n2": set(on_n2)})
    await alice.wait_session("n1", after=1)


@pytest.mark.parametrize("stopped_while", ["idle", "normal"])
async def test_fallback_at_once_after_a_restart(
    store_url: str, tmp_path: Path, stopped_while: str
) -> None:
    """n1 is stopped (SIGTERM) while Idle or Normal and started again while n2 does not
    answer for a moment; the fallback is asked for before either heard the other, so
    n1's take-back request is the first n2 hears of the new n1. n1 takes back its
    own users from the live n2, and only those."""
    # heartbeats 5 s apart: n2 may be frozen for 2-3 s without consequence
    slow = {"heartbeat_interval": 5.0, "heartbeat_timeout": 12.0,
            "initialization_heartbeat_timeout": 15.0}  # fmt: skip
    async with running_pair(store_url, tmp_path / "pair", params=slow) as pair:
        on_n1 = await pair.users_homed_on("n1")
        on_n2 = await pair.users_homed_on("n2")
        if stopped_while == "idle":
            await pair.failover("n1")
            await pair.wait_states(
                {"n1": (State.IDLE, Reason.ADMIN), "n2": (State.BACKUP_MODE, Reason.ADMIN)}
            )
            ready = (State.IDLE, Reason.INITIALIZATION)
        else:
            ready = (State.FAILED_OVER, Reason.INITIALIZATION)
        assert await pair.terminate("n1") == 0
        await pair.wait_states({"n2": (State.BACKUP_MODE, None)})
        pair.freeze("n2")  # n1's peer link cannot come up: no heartbeat either way
        try:
            await pair.restart("n1")
            await pair.wait_states({"n1": ready}, timeout=3)
            status = await pair.node_status("n1")
            assert not status["peer_connected"]
            await pair.fallback("n1")
        finally:
            pair.thaw("n2")
        await pair.wait_states({"n1": NORMAL, "n2": NORMAL}, timeout=6)
        await pair.wait_served({"n1": set(on_n1), "n2": set(on_n2)})
