"""Turns for SQLite writers of one process: first come, first served, urgent ones first.

SQLite lets one connection write at a time; the others poll with a back-off
(busy_timeout) and lose the race, again and again, to a connection that
writes back to back. A node opens the same file through two engines (the
session store and the cluster store), so under load a small, urgent write
(the lease renewal that proves the node alive) could wait seconds behind the
offline writer's batches and the node would fence itself. Within a process,
writers therefore take turns here before they BEGIN: in arrival order, except
that urgent writers go before every waiting ordinary one. Other processes
(the peer node) still meet at SQLite's own lock.

PostgreSQL needs none of this: its row locks queue fairly.
"""

from __future__ import annotations

import asyncio
import weakref
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class WriteTurns:
    def __init__(self) -> None:
        self._busy = False
        self._urgent: deque[asyncio.Future[None]] = deque()
        self._ordinary: deque[asyncio.Future[None]] = deque()

    @asynccontextmanager
    async def turn(self, *, urgent: bool = False) -> AsyncIterator[None]:
        await self._acquire(urgent)
        try:
            yield
        finally:
            self._release()

    @property
    def waiting(self) -> int:
        return len(self._urgent) + len(self._ordinary)

    async def _acquire(self, urgent: bool) -> None:
        if not self._busy and not self.waiting:
            self._busy = True
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue = self._urgent if urgent else self._ordinary
        queue.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release()  # the turn was handed to us as we were cancelled: pass it on
            elif waiter in queue:
                queue.remove(waiter)
            raise

    def _release(self) -> None:
        for queue in (self._urgent, self._ordinary):
            while queue:
                waiter = queue.popleft()
                if not waiter.done():
                    waiter.set_result(None)  # the turn passes on; _busy stays True
                    return
        self._busy = False


_BY_LOOP: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, WriteTurns]] = (
    weakref.WeakKeyDictionary()
)


def turns_for(database: str) -> WriteTurns:
    """The turns of this event loop for one database file (by its path)."""
    loop = asyncio.get_running_loop()
    per_file = _BY_LOOP.setdefault(loop, {})
    turns = per_file.get(database)
    if turns is None:
        turns = per_file[database] = WriteTurns()
    return turns
