"""Turns of SQLite writers within a process: arrival order, urgent writers first,
and a writer cancelled while waiting (or just as its turn came) never blocks the rest."""

from __future__ import annotations

import asyncio

from xmpp_ha.store.turns import WriteTurns


async def test_waiting_writers_go_in_order_with_urgent_ones_first() -> None:
    turns = WriteTurns()
    order: list[str] = []
    release = asyncio.Event()

    async def writer(name: str, urgent: bool = False) -> None:
        async with turns.turn(urgent=urgent):
            order.append(name)
            if name == "first":
                await release.wait()

    tasks = [asyncio.ensure_future(writer("first"))]
    await asyncio.sleep(0)
    for name, urgent in (("a", False), ("b", False), ("lease", True), ("c", False)):
        tasks.append(asyncio.ensure_future(writer(name, urgent)))
    await asyncio.sleep(0)
    assert turns.waiting == 4
    release.set()
    await asyncio.gather(*tasks)
    assert order == ["first", "lease", "a", "b", "c"]
    assert turns.waiting == 0


async def test_a_cancelled_waiter_leaves_the_queue() -> None:
    turns = WriteTurns()
    order: list[str] = []
    release = asyncio.Event()

    async def writer(name: str) -> None:
        async with turns.turn():
            order.append(name)
            if name == "first":
                await release.wait()

    first = asyncio.ensure_future(writer("first"))
    await asyncio.sleep(0)
    gone, last = asyncio.ensure_future(writer("gone")), asyncio.ensure_future(writer("last"))
    await asyncio.sleep(0)
    gone.cancel()
    await asyncio.sleep(0)
    release.set()
    await asyncio.gather(first, last)
    assert order == ["first", "last"]


async def test_a_waiter_cancelled_as_its_turn_came_passes_it_on() -> None:
    turns = WriteTurns()
    order: list[str] = []

    async def writer(name: str) -> None:
        async with turns.turn():
            order.append(name)

    held = turns.turn()
    await held.__aenter__()
    unlucky, last = asyncio.ensure_future(writer("unlucky")), asyncio.ensure_future(writer("last"))
    await asyncio.sleep(0)
    await held.__aexit__(None, None, None)  # hands the turn to "unlucky", not yet running
    unlucky.cancel()
    await asyncio.gather(unlucky, last, return_exceptions=True)
    assert order == ["last"]
    async with turns.turn():  # free again
        pass
