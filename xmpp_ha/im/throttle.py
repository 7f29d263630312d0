"""Failed-login throttling, per client address.

Pure: the caller passes `now`. Each consecutive failure from one address
doubles the delay before the failure is answered (base, 2·base, 4·base …, up
to `cap`); a success or `forget_after` seconds of quiet clears the record.
The table is bounded so that a flood of addresses cannot grow it forever.
"""

from __future__ import annotations

from collections import OrderedDict


class AuthThrottle:
    def __init__(
        self, *, base: float = 1.0, cap: float = 30.0, forget_after: float = 600.0,
        max_entries: int = 50_000,
    ) -> None:  # fmt: skip
        self.base = base
        self.cap = cap
        self.forget_after = forget_after
        self.max_entries = max_entries
        self._failures: OrderedDict[str, tuple[int, float]] = OrderedDict()

    def failed(self, address: str, now: float) -> float:
        """Record a failure; return how long to wait before answering it."""
        count, last = self._failures.pop(address, (0, now))
        if now - last > self.forget_after:
            count = 0
        count += 1
        self._failures[address] = (count, now)
        while len(self._failures) > self.max_entries:
            self._failures.popitem(last=False)
        if self.base <= 0:
            return 0.0
        doublings = min(count - 1, 64)  # past the cap long before; keeps the float finite
        return min(self.cap, self.base * 2.0**doublings)

    def succeeded(self, address: str) -> None:
        self._failures.pop(address, None)

    def failures(self, address: str) -> int:
        return self._failures.get(address, (0, 0.0))[0]
