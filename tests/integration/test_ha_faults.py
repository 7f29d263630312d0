"""Real failures of a node of the pair: kill -9, SIGTERM, SIGSTOP/SIGCONT (SPEC §8 rows 11,
16-18). After each, the store says who serves whom, the counters agree, and nothing
stored was lost: messages sent while a user was away wait offline and are delivered
once it logs in on the node that serves it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.integration.pair_harness import (
    FAST_PARAMS,
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
TIMEOUT = FAST_PARAMS["heartbeat_timeout"]


@pytest.fixture
async def pair(store_url: str, tmp_path: Path) -> AsyncIterator[HAPair]:
    async with running_pair(store_url, tmp_path / "pair") as started:
        yield started


async def test_kill_9_peer_down_offline_messages_restart_and_fallback(pair: HAPair) -> None:
    on_n1 = await pair.users_homed_on("n1")
    on_n2 = await pair.users_homed_on("n2")
    alice_name, bob_name = on_n1[0], on_n2[0]
    alice = await pair.login(alice_name, auto_relogin=False)
    bob = await pair.login(bob_name)
    await subscribe(bob, alice)
    await subscribe(alice, bob)
    await alice.next(is_presence("available", bob_name), what="bob's presence")
    await bob.next(is_presence("available", alice_name), what="alice's presence")

    pair.kill("n1")
    killed_at = time.monotonic()
    await alice.wait_offline()
    # alice's presence goes away for bob once n2 knows (peer link lost or takeover)
    bob.chat(alice_name, "sent right after the kill")
    await pair.wait_states({"n2": (State.BACKUP_MODE, Reason.PEER_DOWN)}, timeout=15)
    elapsed = time.monotonic() - killed_at
    assert elapsed >= TIMEOUT - 0.5, f"taken over after {elapsed:.1f} s, before the timeout"
    assert ("Taking Over", "Peer Down") in pair.entered("n2")
    await pair.wait_served({"n2": set(pair.users)})
    bob.chat(alice_name, "sent after the takeover")
    await pair.wait_offline_count(alice_name, 2)

    # alice logs in again: n1 is gone, n2 serves her and hands over what waited
    assert await alice.login(None) == "n2"
    first = await alice.next(is_message("sent right after the kill", bob_name), what="offline 1")
    second = await alice.next(is_message("sent after the takeover", bob_name), what="offline 2")
    assert is_delayed(first) and is_delayed(second)
    assert alice.roster_items == {bob.boundjid.bare: "both"}
    await alice.next(is_presence("available", bob_name), what="bob's presence on n2")
    await pair.wait_counter("n2", "ActiveJsmSessions", 2)
    await pair.wait_counter("n2", "InactiveJsmSessions", 1)

    # n1 comes back: failed over, its services up, ready for fallback (row 11)
    await pair.restart("n1")
    await pair.wait_states(
        {
            "n1": [(State.FAILED_OVER, Reason.INITIALIZATION),
                   (State.FAILED_OVER_CS_DOWN, Reason.INITIALIZATION)],
            "n2": (State.BACKUP_MODE, Reason.PEER_DOWN),
        }
    )  # fmt: skip
    await pair.wait_states({"n1": (State.FAILED_OVER, None)})
    n1 = await pair.node_status("n1")
    assert n1["allowed_actions"] == ["fallback"]
    # while failed over, n1 redirects alice to n2
    probe = pair.client(alice_name, "probe", auto_relogin=False)
    assert await probe.login("n1") == "n2"
    assert probe.attempts[0].outcome == "redirected"
    await probe.close()

    alice.auto_relogin = True
    await pair.wait_peer_sees("n2", "n1")  # restarted: see test_fallback_at_once_after_a_restart
    await pair.fallback("n1")
    await pair.wait_states({"n1": NORMAL, "n2": NORMAL})
    await pair.wait_served({"n1": set(on_n1), "n2": set(on_n2)})
    await alice.wait_session("n1", after=1)
    assert alice.roster_items == {bob.boundjid.bare: "both"}
    alice.chat(bob_name, "home again")
    await bob.next(is_message("home again", alice_name), what="chat after fallback")
    await pair.wait_counter("n1", "ActiveJsmSessions", 1)
    await pair.wait_counter("n2", "InactiveJsmSessions", 0)
    assert await pair.offline_count(alice_name) == 0
    assert await pair.roster(alice_name) == {f"{bob_name}@localhost": "both"}


async def test_peer_absent_at_start_is_peer_down_during_initialization(
    store_url: str, tmp_path: Path
) -> None:
    async with running_pair(store_url, tmp_path / "pair", start_nodes=["n2"]) as pair:
        on_n1 = await pair.users_homed_on("n1")
        on_n2 = await pair.users_homed_on("n2")
        down = Reason.PEER_DOWN_DURING_INIT
        await pair.wait_states({"n2": (State.BACKUP_MODE, down)}, timeout=15)
        waited = pair.log_time("n2", "Taking Over/Peer Down During") - pair.log_time(
            "n2", "SRM n2 starts as Initializing"
        )
        init_timeout = FAST_PARAMS["initialization_heartbeat_timeout"]
        assert init_timeout - 0.5 <= waited <= init_timeout + 2, waited
        await pair.wait_served({"n1": set(), "n2": set(pair.users)})
        alice = await pair.login(on_n1[0], node="n1")  # n1 is not there: n2 serves her
        assert alice.node == "n2"

        await pair.restart("n1")
        await pair.wait_states(
            {
                "n1": [(State.FAILED_OVER, Reason.INITIALIZATION),
                       (State.FAILED_OVER_CS_DOWN, Reason.INITIALIZATION)],
                "n2": (State.BACKUP_MODE, down),
            }
        )  # fmt: skip
        await pair.wait_states({"n1": (State.FAILED_OVER, None)})
        await pair.wait_peer_sees(
            "n2", "n1"
        )  # restarted: see test_fallback_at_once_after_a_restart
        await pair.fallback("n1")
        await pair.wait_states({"n1": NORMAL, "n2": NORMAL})
        await pair.wait_served({"n1": set(on_n1), "n2": set(on_n2)})
        await alice.wait_session("n1", after=1)


async def test_sigterm_is_peer_reboot_at_once(pair: HAPair) -> None:
    on_n1 = await pair.users_homed_on("n1")
    alice = await pair.login(on_n1[0])
    stopped_at = time.monotonic()
    assert await pair.terminate("n1") == 0
    await pair.wait_states({"n2": (State.BACKUP_MODE, Reason.PEER_REBOOT)}, timeout=TIMEOUT)
    elapsed = time.monotonic() - stopped_at
    assert elapsed < TIMEOUT - 0.5, f"Peer Reboot only after {elapsed:.1f} s"
    await pair.wait_served({"n1": set(), "n2": set(pair.users)})
    await alice.wait_session("n2", after=1)

    await pair.restart("n1")
    await pair.wait_states({"n1": (State.FAILED_OVER, None)})
    await pair.wait_peer_sees("n2", "n1")  # restarted: see test_fallback_at_once_after_a_restart
    await pair.fallback("n1")
    await pair.wait_states({"n1": NORMAL, "n2": NORMAL})
    await pair.wait_served({"n1": set(on_n1)})
    await alice.wait_session("n1", after=2)


async def freeze_and_take_over(pair: HAPair) -> tuple[PairClient, PairClient, PairClient]:
    """SIGSTOP n1 with three clients on line; returns (stale, moved, bob) once n2 holds
    every user: stale still connected to the frozen n1, moved and bob on n2."""
    on_n1 = await pair.users_homed_on("n1")
    on_n2 = await pair.users_homed_on("n2")
    stale = await pair.login(on_n1[0], auto_relogin=False)  # stays on the frozen n1
    moved = await pair.login(on_n1[1], auto_relogin=False)
    bob = await pair.login(on_n2[0])

    pair.freeze("n1")
    frozen_at = time.monotonic()
    # routed over the (silent) peer link before the takeover: never acknowledged
    bob.chat(stale.boundjid.bare, "before the takeover")
    await pair.wait_states({"n2": (State.BACKUP_MODE, Reason.PEER_DOWN)}, timeout=15)
    elapsed = time.monotonic() - frozen_at
    assert elapsed >= TIMEOUT - 0.5, f"taken over after {elapsed:.1f} s, before the timeout"
    assert ("Taking Over", "Peer Down") in pair.entered("n2")
    await pair.wait_served({"n2": set(pair.users)})
    bob.chat(stale.boundjid.bare, "after the takeover")
    await bob.ping_server()

    # a user of n1 gives up on the frozen node and logs in again: on n2
    await moved.drop()
    assert await moved.login("n1", timeout=20) == "n2"
    moved.chat(bob.boundjid.bare, "from n2")
    await bob.next(is_message("from n2", moved.boundjid.bare), what="chat from the moved user")
    await pair.wait_counter("n2", "ActiveJsmSessions", 2)
    await pair.wait_counter("n2", "InactiveJsmSessions", 1)
    return stale, moved, bob


async def test_sigstop_backup_takes_over_after_the_heartbeat_timeout(pair: HAPair) -> None:
    stale, _moved, _bob = await freeze_and_take_over(pair)
    # the messages for the user on the frozen node wait offline in the shared store
    await pair.wait_offline_count(stale.boundjid.user, 2)
    again = await pair.login(stale.boundjid.user, node="n2")
    for body in ("before the takeover", "after the takeover"):
        await again.next(is_message(body), what=body)
    await pair.wait_counter("n2", "ActiveJsmSessions", 3)


async def test_sigcont_the_woken_node_does_not_serve_the_users_it_lost(pair: HAPair) -> None:
    on_n1 = await pair.users_homed_on("n1")
    on_n2 = await pair.users_homed_on("n2")
    stale, _moved, bob = await freeze_and_take_over(pair)
    stale_name, bob_name = stale.boundjid.user, bob.boundjid.user

    # the stale client, still connected to frozen n1, says something, then n1 wakes
    stale.chat(bob_name, "from the stale session")
    pair.thaw("n1")
    await stale.wait_offline(timeout=10)  # n1 drops it
    # n1 delivered nothing to the session it no longer owned
    assert stale.take(is_message("before the takeover")) is None
    assert stale.take(is_message("after the takeover")) is None
    # ... and did not serve that session's stanza as if it still owned the user
    await bob.ping_server()
    await asyncio.sleep(0.5)
    assert bob.take(is_message("from the stale session")) is None

    await pair.wait_states(
        {
            "n1": [(State.FAILED_OVER, None), (State.FAILED_OVER_CS_DOWN, None)],
            "n2": (State.BACKUP_MODE, Reason.PEER_DOWN),
        },
        timeout=8,
    )
    await pair.wait_served({"n1": set(), "n2": set(pair.users)})

    # the stale user logs in again on n2 and gets both messages. The one routed to
    # n1 while it was frozen was never acknowledged, so n2 stored it offline; n1 may
    # have stored it too when it woke (the peer link is at-least-once): a copy then
    # carries the same id, for the client to drop.
    again = await pair.login(stale_name, "n2", resource="again")
    first = await again.next(is_message("before the takeover", bob_name), what="1st message")
    await again.next(is_message("after the takeover", bob_name), what="2nd message")
    await again.ping_server()
    for copy in again.take_all(is_message("before the takeover")):
        assert copy["id"] == first["id"]
    assert again.take(is_message("after the takeover")) is None
    await pair.wait_counter("n1", "ActiveJsmSessions", 0)
    await pair.wait_counter("n2", "ActiveJsmSessions", 3)

    await pair.wait_states({"n1": (State.FAILED_OVER, None)})
    await pair.wait_peer_sees("n2", "n1")  # restarted: see test_fallback_at_once_after_a_restart
    await pair.fallback("n1")
    await pair.wait_states({"n1": NORMAL, "n2": NORMAL})
    await pair.wait_served({"n1": set(on_n1), "n2": set(on_n2)})
    assert await pair.offline_count(stale_name) == 0


@pytest.mark.parametrize("failure", ["kill", "failover"])
async def test_contacts_see_the_failed_over_users_go_offline(pair: HAPair, failure: str) -> None:
    """A contact on the surviving node is told the failed node's user is gone (no stale
    presence), and sees it again once it logs in on the backup."""
    alice = await pair.login((await pair.users_homed_on("n1"))[0], auto_relogin=False)
    bob = await pair.login((await pair.users_homed_on("n2"))[0])
    await subscribe(bob, alice)
    await bob.next(is_presence("available", alice.boundjid.bare), what="alice's presence")
    if failure == "kill":
        pair.kill("n1")
    else:
        await pair.failover("n1")
    await pair.wait_states({"n2": (State.BACKUP_MODE, None)}, timeout=15)
    await bob.next(is_presence("unavailable", alice.boundjid.bare), timeout=3,
                   what="alice's unavailable presence")  # fmt: skip
    assert await alice.login(None) == "n2"
    await bob.next(is_presence("available", alice.boundjid.bare), what="alice back on n2")


async def test_a_session_answers_while_its_message_waits_for_a_frozen_peer(
    store_url: str, tmp_path: Path
) -> None:
    """A message routed to a silent peer waits for the link's verdict; the sender's
    session must go on reading and answering meanwhile (its keepalive included),
    and the message arrives once the peer wakes (before its timeout)."""
    slow = {"heartbeat_timeout": 30, "initialization_heartbeat_timeout": 30}
    async with running_pair(store_url, tmp_path / "pair", params=slow) as pair:
        alice_name = (await pair.users_homed_on("n1"))[0]
        alice = await pair.login(alice_name, auto_relogin=False)
        bob = await pair.login((await pair.users_homed_on("n2"))[0])
        pair.freeze("n1")
        try:
            bob.chat(alice_name, "waits for the frozen peer")
            await bob.ping_server()  # answered though the message before it is still pending
            # the link's timeout is far away: nothing has been decided about the message yet
            assert await pair.state("n2") == (State.NORMAL.value, Reason.NORMAL.value)
        finally:
            pair.thaw("n1")
        await alice.next(is_message("waits for the frozen peer", bob.boundjid.bare))
        assert await pair.offline_count(alice_name) == 0
