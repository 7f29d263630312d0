"""A switch in front of a node's store access: the administrator's "stop the store".

While the gate is closed every store call of this node raises `StoreUnavailable`,
exactly as if the database could not be reached, so the Database Failure path
is exercised for real. Other nodes are not affected.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

from xmpp_ha.store.repository import StoreUnavailable

T = TypeVar("T")


class StoreGate:
    def __init__(self) -> None:
        self.open = True

    def wrap(self, target: T) -> T:
        """A view of `target` whose coroutine methods check the gate first."""
        return cast(T, _Gated(target, self))


class _Gated:
    def __init__(self, target: object, gate: StoreGate) -> None:
        self._target = target
        self._gate = gate

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._target, name)
        if name == "close" or not callable(attribute):
            return attribute
        gate = self._gate
        method = cast(Callable[..., Any], attribute)

        def checked(*args: Any, **kwargs: Any) -> Any:
            if not gate.open:
                return _refuse()
            return method(*args, **kwargs)

        return checked


def _refuse() -> Awaitable[Any]:
    async def refused() -> Any:
        raise StoreUnavailable("store service stopped on this node by the administrator")

    return refused()
