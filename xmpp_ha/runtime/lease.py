"""A node's store lease, renewed from a thread of its own.

A node proves itself alive by renewing its lease in the shared store once per
heartbeat interval; its peer takes its users over only after the lease stood
still for the heartbeat timeout, and a node whose own renewal is late fences
itself (runtime/redundancy.py). Renewed on the node's event loop, the lease
hung on how busy that loop was: a SQLAlchemy transaction waits for several
turns of the loop, and during the switch of thousands of users a turn takes
long, so a node working flat out (not failed) fenced itself and dropped every
session. Here the renewal runs in a thread with its own event loop and its own
store connection: it waits for the store, never for the node's work.

Two rules keep the lease honest:
- It proves the node's loop alive, not only this thread: the node calls
  `loop_turned()` from its loop, and the keeper renews only while that was
  within `stall_limit` seconds (a loop stuck for that long lets the peer take
  over, as before).
- A renewal that comes after the lease went stale (a frozen process resumed)
  waits until the node has fenced itself (`stale_handled()`): the peer may
  own its users by now, and the node must learn that from the store first.

Everything the node reads here (`last_ok`, `peer_counter`, `peer_read_at`) is
a plain attribute written by the thread; no locks are needed for that.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from xmpp_ha.core.clock import Clock
from xmpp_ha.store.cluster import ClusterStore
from xmpp_ha.store.gate import StoreGate
from xmpp_ha.store.repository import StoreUnavailable

log = logging.getLogger(__name__)

_STOP_WAIT = 5.0  # s stop() waits for the thread


@dataclass(frozen=True, slots=True)
class LeaseTiming:
    interval: float  # s between renewals
    stale_after: float  # s after a renewal started: the lease may be seen as dead soon
    stall_limit: float  # s without a turn of the node's loop: renew no more


class LeaseKeeper:
    """`timing()` (set before `start()`) is read before every renewal: the group's
    parameters can change. `peer`: the node whose lease is read after each renewal."""

    def __init__(
        self,
        store_url: str,
        node: str,
        peer: str | None,
        *,
        gate: StoreGate,
        clock: Clock,
    ) -> None:
        self.node = node
        self.peer = peer
        self.clock = clock
        self._url = store_url
        self._gate = gate
        self.timing: Callable[[], LeaseTiming] | None = None  # set before start()
        self.last_ok = clock.now()  # when the last successful renewal started
        self.peer_counter: int | None = None
        self.peer_read_at: float | None = None  # when peer_counter was read
        self._loop_seen = clock.now()
        self._stale_handled_for: float | None = None  # last_ok the node has fenced for
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- called from the node's loop -------------------------------------------------

    def start(self) -> None:
        assert self.timing is not None
        self._thread = threading.Thread(target=self._main, name=f"lease-{self.node}", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, _STOP_WAIT)

    def loop_turned(self) -> None:
        self._loop_seen = self.clock.now()

    def stale(self) -> bool:
        """The lease may be seen as dead by the peer soon: the node must not serve."""
        return self.clock.now() - self.last_ok >= self._time().stale_after

    def stale_handled(self) -> None:
        """The node has fenced itself for the present stale lease: renewals may go on."""
        self._stale_handled_for = self.last_ok

    # --- the thread -------------------------------------------------------------------

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except Exception:  # logged: the node fences itself as the lease ages
            log.exception("lease keeper of %s stopped", self.node)

    async def _run(self) -> None:
        raw: ClusterStore | None = None
        try:
            next_at = self.clock.now()
            while not self._stop.is_set():
                timing = self._time()
                if raw is None:
                    raw = await self._open()
                if raw is not None:
                    await self._renew(self._gate.wrap(raw), timing)
                next_at = max(next_at + timing.interval, self.clock.now() + timing.interval / 10)
                await asyncio.to_thread(self._stop.wait, max(0.0, next_at - self.clock.now()))
        finally:
            if raw is not None:
                await raw.close()

    def _time(self) -> LeaseTiming:
        assert self.timing is not None
        return self.timing()

    async def _open(self) -> ClusterStore | None:
        try:
            return await ClusterStore.open(self._url, pool_size=1)
        except StoreUnavailable as exc:
            log.info("lease keeper: store not reachable: %s", exc)
            return None

    async def _renew(self, store: ClusterStore, timing: LeaseTiming) -> None:
        started = self.clock.now()
        if started - self._loop_seen > timing.stall_limit:
            log.warning("lease not renewed: the node's event loop has not turned for %.1f s",
                        started - self._loop_seen)  # fmt: skip
            return
        if started - self.last_ok >= timing.stale_after and (
            self._stale_handled_for != self.last_ok
        ):
            return  # stale: the node fences itself first (it may have lost its users)
        try:
            await store.renew_lease(self.node)
            took = self.clock.now() - started
            if took > timing.interval / 2:
                log.warning("lease renewal took %.2f s", took)
            # the peer saw the new counter no earlier than this renewal started
            self.last_ok = started
            if self.peer is not None:
                counter = await store.read_lease(self.peer)
                # read after the peer's commit: its silence counts from now, not from
                # before our own (possibly slow) renewal
                self.peer_read_at = self.clock.now()
                self.peer_counter = counter
        except StoreUnavailable as exc:
            log.info("lease renewal failed: %s", exc)
