"""Group calls: calls waiting at one time share one run of a batch function.

The first call starts a run at once (no added latency when idle); calls made
while a run is in progress wait for the next one, so under load the batches
grow and one store transaction serves many callers. Results come back in call
order; an exception of a run reaches every caller of that batch. A caller that
gives up (cancelled) does not take its item out of the batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class Batcher(Generic[K, V]):
    def __init__(self, run: Callable[[list[K]], Awaitable[list[V]]], max_batch: int = 500) -> None:
        self._run = run
        self.max_batch = max_batch
        self._queued: list[tuple[K, asyncio.Future[V]]] = []
        self._runner: asyncio.Task[None] | None = None
        self.runs = 0  # batches completed (for benchmarks and tests)

    async def __call__(self, item: K) -> V:
        result: asyncio.Future[V] = asyncio.get_running_loop().create_future()
        self._queued.append((item, result))
        if self._runner is None:
            self._runner = asyncio.create_task(self._run_queued())
        return await result

    async def _run_queued(self) -> None:
        batch: list[tuple[K, asyncio.Future[V]]] = []
        try:
            while self._queued:
                batch = self._queued[: self.max_batch]
                self._queued = self._queued[self.max_batch :]
                try:
                    results = await self._run([item for item, _ in batch])
                except Exception as exc:  # every caller of the batch gets the error
                    for _, waiter in batch:
                        if not waiter.done():  # its caller may be gone (cancelled)
                            waiter.set_exception(exc)
                    batch = []
                    continue
                self.runs += 1
                for (_, waiter), value in zip(batch, results, strict=True):
                    if not waiter.done():
                        waiter.set_result(value)
                batch = []
        finally:
            self._runner = None
            for _, waiter in (*batch, *self._queued):  # cancelled (shutdown) mid-way
                waiter.cancel()
            self._queued = []
