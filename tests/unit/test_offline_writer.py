"""The offline writer's group commit, on a real store: concurrent writes share
transactions, keep their order per user, honour the per-user limit, and each
waiter hears the store's failure."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from xmpp_ha.im.offline import OfflineWriter
from xmpp_ha.store.repository import StoreUnavailable
from xmpp_ha.store.sql import SQLStore


async def test_concurrent_writes_share_transactions_in_order(store: SQLStore) -> None:
    await store.add_user("alice", "pw")
    await store.add_user("bob", "pw")
    writer = OfflineWriter(store, limit=1000)
    calls = [writer.store("alice" if n % 3 else "bob", f"<m{n}/>") for n in range(200)]
    assert await asyncio.gather(*calls) == [True] * 200
    assert 1 <= writer.batches <= 3  # the first alone, the rest queued behind it
    assert await store.take_offline("alice") == [f"<m{n}/>" for n in range(200) if n % 3]
    assert await store.take_offline("bob") == [f"<m{n}/>" for n in range(200) if n % 3 == 0]


async def test_full_queue_and_unknown_user_are_refused_per_message(store: SQLStore) -> None:
    await store.add_user("alice", "pw")
    writer = OfflineWriter(store, limit=2)
    kept = await asyncio.gather(
        *(writer.store(name, f"<{name}{n}/>") for n in range(3) for name in ("alice", "nobody"))
    )
    assert kept == [True, False, True, False, False, False]
    assert await store.take_offline("alice") == ["<alice0/>", "<alice1/>"]


async def test_every_waiter_hears_the_store_failure_and_the_next_batch_works(
    store: SQLStore,
) -> None:
    await store.add_user("alice", "pw")
    writer = OfflineWriter(store, limit=10)
    failing = True
    real = store.store_offline_many

    async def flaky(items: Sequence[tuple[str, str]], limit: int) -> list[bool]:
        if failing:
            raise StoreUnavailable("store down for this test")
        return await real(items, limit)

    store.store_offline_many = flaky  # type: ignore[method-assign]
    results = await asyncio.gather(
        *(writer.store("alice", f"<m{n}/>") for n in range(3)), return_exceptions=True
    )
    assert all(isinstance(result, StoreUnavailable) for result in results)
    failing = False
    assert await writer.store("alice", "<after/>")
    assert await store.take_offline("alice") == ["<after/>"]


@pytest.mark.parametrize("cancelled", [0, 1])
async def test_a_cancelled_waiter_does_not_withdraw_its_message(
    store: SQLStore, cancelled: int
) -> None:
    """A waiter that gives up (its session ended) does not take its message back, and the
    other waiters of the batch still get their answer."""
    await store.add_user("alice", "pw")
    writer = OfflineWriter(store, limit=10)
    waiters = [asyncio.ensure_future(writer.store("alice", f"<m{n}/>")) for n in range(2)]
    await asyncio.sleep(0)
    waiters[cancelled].cancel()
    assert await waiters[1 - cancelled]
    await asyncio.sleep(0.05)
    assert await store.take_offline("alice") == ["<m0/>", "<m1/>"]
