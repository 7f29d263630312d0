"""Group calls: concurrent calls share runs, results keep call order, errors reach every
caller of their batch, and a run with one call adds no wait."""

from __future__ import annotations

import asyncio

import pytest

from xmpp_ha.core.batch import Batcher


async def test_calls_waiting_together_share_a_run_and_keep_their_order() -> None:
    runs: list[list[int]] = []

    async def double(items: list[int]) -> list[int]:
        runs.append(items)
        await asyncio.sleep(0)
        return [item * 2 for item in items]

    batcher: Batcher[int, int] = Batcher(double, max_batch=3)
    assert await asyncio.gather(*(batcher(n) for n in range(7))) == [n * 2 for n in range(7)]
    assert runs == [[0, 1, 2], [3, 4, 5], [6]]  # all were waiting: full batches, in order
    assert batcher.runs == 3
    assert await batcher(10) == 20  # idle again: runs at once


async def test_an_error_reaches_every_caller_of_its_batch_only() -> None:
    async def fail_on_odd(items: list[int]) -> list[int]:
        await asyncio.sleep(0)
        if any(item % 2 for item in items):
            raise ValueError("odd")
        return items

    batcher: Batcher[int, int] = Batcher(fail_on_odd)
    first = asyncio.ensure_future(batcher(0))
    await asyncio.sleep(0)  # the first run (item 0) is under way
    rest = await asyncio.gather(batcher(2), batcher(3), return_exceptions=True)
    assert await first == 0
    assert all(isinstance(result, ValueError) for result in rest)
    assert await batcher(4) == 4


async def test_a_cancelled_caller_leaves_the_others_their_results() -> None:
    async def echo(items: list[int]) -> list[int]:
        await asyncio.sleep(0.01)
        return items

    batcher: Batcher[int, int] = Batcher(echo)
    calls = [asyncio.ensure_future(batcher(n)) for n in range(3)]
    await asyncio.sleep(0)
    calls[1].cancel()
    assert await calls[0] == 0 and await calls[2] == 2
    with pytest.raises(asyncio.CancelledError):
        await calls[1]
