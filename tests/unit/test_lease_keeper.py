"""The lease keeper (runtime/lease.py) against a real store: it renews from its own
thread while the node's loop is busy, stops when that loop stops turning, waits for
the node to fence itself after a stale lease, and obeys the store gate.

Decisions are read from an injected clock (advanced by hand here); only the waits
between renewals are real, and every wait below is for an outcome, with a generous
limit, never for a duration that must hold.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import pytest

from xmpp_ha.core.clock import ManualClock
from xmpp_ha.runtime.lease import LeaseKeeper, LeaseTiming
from xmpp_ha.store.cluster import ClusterStore
from xmpp_ha.store.gate import StoreGate

TIMING = LeaseTiming(interval=0.02, stale_after=10.0, stall_limit=5.0)
LIMIT = 10.0  # s of real time an expected outcome may take


@pytest.fixture
async def store(url: str) -> AsyncIterator[ClusterStore]:
    opened = await ClusterStore.open(url, create=True)
    yield opened
    await opened.close()


@pytest.fixture
async def keeper(url: str, store: ClusterStore) -> AsyncIterator[LeaseKeeper]:
    await store.renew_lease("n2")  # the peer's lease exists
    lease = LeaseKeeper(url, "n1", "n2", gate=StoreGate(), clock=ManualClock(100.0))
    lease.timing = lambda: TIMING
    lease.start()
    yield lease
    await lease.stop()


async def counter(store: ClusterStore) -> int:
    return await store.read_lease("n1") or 0


async def until(condition: Callable[[], object]) -> None:
    deadline = time.monotonic() + LIMIT
    while not condition():
        assert time.monotonic() < deadline, "not within the limit"
        await asyncio.sleep(0.01)


async def renewed_since(store: ClusterStore, before: int, times: int = 2) -> None:
    deadline = time.monotonic() + LIMIT
    while await counter(store) < before + times:
        assert time.monotonic() < deadline, "the lease was not renewed"
        await asyncio.sleep(0.01)


async def not_renewed(store: ClusterStore, keeper: LeaseKeeper) -> None:
    """Several renewal intervals pass (seen as the keeper's peer reads stopping too)
    and our counter stays."""
    before = await counter(store)
    await asyncio.sleep(TIMING.interval * 10)
    assert await counter(store) == before


async def test_renews_and_reads_the_peer_while_the_loop_is_blocked(
    store: ClusterStore, keeper: LeaseKeeper
) -> None:
    await until(lambda: keeper.peer_counter == 1)
    before = await counter(store)
    time.sleep(TIMING.interval * 15)  # the node's loop busy: no turn at all
    after = await counter(store)
    assert after >= before + 2
    assert not keeper.stale()


async def test_stops_renewing_when_the_loop_stops_turning(
    store: ClusterStore, keeper: LeaseKeeper
) -> None:
    await renewed_since(store, 0)
    assert isinstance(keeper.clock, ManualClock)
    keeper.clock.advance(TIMING.stall_limit + 1)  # no loop_turned() for that long
    await asyncio.sleep(TIMING.interval * 3)  # a renewal under way may end
    await not_renewed(store, keeper)
    keeper.loop_turned()
    await renewed_since(store, await counter(store))


async def test_a_stale_lease_is_renewed_only_once_the_node_fenced(
    store: ClusterStore, keeper: LeaseKeeper
) -> None:
    await renewed_since(store, 0)
    assert isinstance(keeper.clock, ManualClock)
    keeper.clock.advance(TIMING.stale_after + 1)  # a frozen process resumed
    keeper.loop_turned()
    assert keeper.stale()
    await asyncio.sleep(TIMING.interval * 3)
    await not_renewed(store, keeper)
    assert keeper.stale()
    keeper.stale_handled()  # the node fenced itself
    await until(lambda: not keeper.stale())
    await renewed_since(store, await counter(store))


async def test_the_store_gate_stops_renewals(url: str, store: ClusterStore) -> None:
    gate = StoreGate()
    keeper = LeaseKeeper(url, "n1", None, gate=gate, clock=ManualClock(0.0))
    keeper.timing = lambda: TIMING
    keeper.start()
    try:
        await renewed_since(store, 0)
        gate.open = False
        await asyncio.sleep(TIMING.interval * 3)
        await not_renewed(store, keeper)
        gate.open = True
        await renewed_since(store, await counter(store))
    finally:
        await keeper.stop()
