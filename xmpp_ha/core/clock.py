"""Time as an injected value.

Pure cores never read the clock: they take `now` as an argument. Adapters read a
`Clock`; tests use `ManualClock` and advance it by hand.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Monotonic seconds."""
        ...


class MonotonicClock:
    def now(self) -> float:
        return time.monotonic()


class ManualClock:
    def __init__(self, start: float = 0.0) -> None:
        self._now = start

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> float:
        if seconds < 0:
            raise ValueError("time never runs backwards")
        self._now += seconds
        return self._now
