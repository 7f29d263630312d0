"""The node's critical services (SPEC §3): real components with a health check each,
stoppable and startable by the administrator so that every failure path is real.

| service          | what stopping it does                                          |
|------------------|----------------------------------------------------------------|
| client listener  | the c2s port stops accepting connections                        |
| session manager  | client sessions end (system-shutdown), new binds are refused    |
| router           | stanzas between entities bounce with service-unavailable        |
| presence engine  | presence stanzas bounce with service-unavailable                |
| authentication   | SASL answers temporary-auth-failure                             |
| sync agent       | users are no longer assigned to nodes                           |
| store            | this node's store access fails (Database Failure)               |

The authentication service counts as critical only when the SRM parameter
'monitor authentication service' is on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from xmpp_ha.core.errors import StreamCondition
from xmpp_ha.im.manager import SessionManager
from xmpp_ha.net.c2s import C2SServer

log = logging.getLogger(__name__)

CLIENT_LISTENER = "client listener"
SESSION_MANAGER = "session manager"
ROUTER = "router"
PRESENCE_ENGINE = "presence engine"
AUTHENTICATION = "authentication"
SYNC_AGENT = "sync agent"
STORE = "store"
SERVICE_NAMES = (
    CLIENT_LISTENER, SESSION_MANAGER, ROUTER, PRESENCE_ENGINE, AUTHENTICATION, SYNC_AGENT, STORE
)  # fmt: skip


@dataclass
class Service:
    name: str
    stop_action: Callable[[], Awaitable[None]]
    start_action: Callable[[], Awaitable[None]]
    healthy: Callable[[], bool]
    wanted: bool = True  # False once the administrator (or the SRM) stopped it

    async def stop(self) -> None:
        self.wanted = False
        await self.stop_action()

    async def start(self) -> None:
        self.wanted = True
        await self.start_action()


class UnknownService(KeyError):
    def __str__(self) -> str:
        return f"no critical service named {self.args[0]!r} (known: {', '.join(SERVICE_NAMES)})"


class Services:
    def __init__(
        self,
        manager: SessionManager,
        c2s: C2SServer,
        *,
        sync_agent: Service,
        store: Service,
    ) -> None:
        switches = manager.switches

        def switch(attribute: str, on_stop: Callable[[], Awaitable[None]] | None = None) -> Service:
            async def stop() -> None:
                setattr(switches, attribute, False)
                if on_stop is not None:
                    await on_stop()

            async def start() -> None:
                setattr(switches, attribute, True)

            return Service(attribute.replace("_", " "), stop, start,
                           lambda: bool(getattr(switches, attribute)))  # fmt: skip

        async def end_sessions() -> None:
            """Sessions end completely (presence withdrawn, messages handed on) before the
            next service stops: the router is still there for their last broadcasts."""
            manager.close_sessions(StreamCondition.SYSTEM_SHUTDOWN, "session manager stopped")
            for _ in range(100):  # until every connection is gone (at most 2 s)
                if not manager.connections:
                    break
                await asyncio.sleep(0.02)
            await manager.settle()

        listener = Service(CLIENT_LISTENER, c2s.stop, c2s.start, lambda: c2s.listening)
        self.by_name: dict[str, Service] = {
            service.name: service
            for service in (
                listener,
                switch("session_manager", end_sessions),
                switch("router"),
                switch("presence_engine"),
                switch("authentication"),
                sync_agent,
                store,
            )
        }
        self.monitor_authentication = False

    def __getitem__(self, name: str) -> Service:
        try:
            return self.by_name[name]
        except KeyError:
            raise UnknownService(name) from None

    def health(self) -> dict[str, bool]:
        return {name: service.healthy() for name, service in self.by_name.items()}

    def critical_up(self) -> bool:
        """Every critical service runs (the store is judged apart, as Database Failure)."""
        for name, service in self.by_name.items():
            if name == STORE or (name == AUTHENTICATION and not self.monitor_authentication):
                continue
            if not service.healthy():
                return False
        return True

    async def stop_all(self) -> None:
        """Manual failover: everything but the store, which the SRM itself needs."""
        for name, service in self.by_name.items():
            if name != STORE and service.healthy():
                await service.stop()

    async def start_all(self) -> bool:
        for service in self.by_name.values():
            if not service.healthy():
                try:
                    await service.start()
                except Exception:
                    log.exception("starting %s failed", service.name)
        return all(self.health().values())
