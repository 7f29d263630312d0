"""The composition root of one node: store, session manager, listeners, timers.

Everything that reads the clock, opens sockets or touches files for a node is
wired here, so the layers below stay free of it. `Node.run()` serves until
SIGINT/SIGTERM and then shuts down in order: stop accepting, end sessions
(unacknowledged messages go to offline storage), close the store.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import secrets
import signal
from pathlib import Path
from typing import TYPE_CHECKING

from xmpp_ha.config import NodeConfig, ensure_default_certs
from xmpp_ha.core.clock import MonotonicClock
from xmpp_ha.core.memory import tune_garbage_collector
from xmpp_ha.im.hooks import Hooks
from xmpp_ha.im.manager import Limits, SessionManager
from xmpp_ha.net.c2s import C2SServer
from xmpp_ha.net.tls import server_context
from xmpp_ha.store.gate import StoreGate
from xmpp_ha.store.sql import SQLStore

if TYPE_CHECKING:
    from xmpp_ha.runtime.member import GroupMember

log = logging.getLogger(__name__)

SWEEP_INTERVAL_MAX = 5.0  # seconds between timer sweeps over all connections
TRIM_INTERVAL = 60.0  # seconds between returns of freed heap to the OS


def _token(length: int) -> str:
    return secrets.token_urlsafe(length)[:length]


def limits_of(config: NodeConfig) -> Limits:
    c2s = config.c2s
    return Limits(
        handshake_timeout=c2s.handshake_timeout,
        idle_timeout=c2s.idle_timeout,
        ping_timeout=c2s.ping_timeout,
        max_stanza_bytes=c2s.max_stanza_bytes,
        sm_resume_timeout=c2s.sm_resume_timeout,
        auth_fail_delay=c2s.auth_fail_delay,
        auth_fail_delay_max=c2s.auth_fail_delay_max,
        offline_messages_per_user=config.limits.offline_messages_per_user,
        max_resources_per_user=config.limits.max_resources_per_user,
    )


def prepare_embedded(config: NodeConfig) -> None:
    """Create the data directory and the certificates the embedded default uses."""
    config.node.data_dir.mkdir(parents=True, exist_ok=True)
    ensure_default_certs(config)


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to trim


class Node:
    def __init__(self, config: NodeConfig, *, hooks: Hooks | None = None) -> None:
        self.config = config
        self.hooks = hooks or Hooks()
        self.clock = MonotonicClock()
        self.store: SQLStore | None = None
        self.manager: SessionManager | None = None
        self.c2s: C2SServer | None = None
        self.gate = StoreGate()  # the administrator's switch for this node's store access
        self.member: GroupMember | None = None
        self._timers: list[asyncio.Task[None]] = []
        self._stopped = asyncio.Event()

    async def start(self, *, create_schema: bool = False) -> None:
        config = self.config
        self.store = await SQLStore.open(config.store.url, create=create_schema)
        context = server_context(str(config.tls.cert_file), str(config.tls.key_file))
        self.manager = SessionManager(
            domain=config.node.domain,
            repo=self.gate.wrap(self.store),
            clock=self.clock,
            new_token=_token,
            limits=limits_of(config),
            hooks=self.hooks,
        )
        self.c2s = C2SServer(
            self.manager,
            context,
            host=config.c2s.host,
            port=config.c2s.port,
            max_connections=config.c2s.max_connections,
        )
        await self.c2s.start()
        if config.ha.enabled:
            from xmpp_ha.runtime.member import GroupMember

            self.member = GroupMember(self)
            await self.member.start()
        self._timers = [
            asyncio.create_task(self._sweep_forever()),
            asyncio.create_task(self._trim_forever()),
        ]
        log.info(
            "node %s serving %s on port %d", config.node.name, config.node.domain, self.c2s.port
        )

    async def _sweep_forever(self) -> None:
        assert self.manager is not None
        limits = self.manager.limits
        timeouts = [limits.handshake_timeout, limits.idle_timeout, limits.ping_timeout]
        if limits.sm_resume_timeout > 0:
            timeouts.append(limits.sm_resume_timeout)
        interval = min(SWEEP_INTERVAL_MAX, max(0.05, min(timeouts) / 4))
        while True:
            await asyncio.sleep(interval)
            try:
                self.manager.sweep(self.clock.now())
            except Exception:  # a bug in one session's timers must not stop the sweeps
                log.exception("timer sweep failed")

    async def _trim_forever(self) -> None:
        while True:
            await asyncio.sleep(TRIM_INTERVAL)
            _malloc_trim()

    async def stop(self) -> None:
        for timer in self._timers:
            timer.cancel()
        # users go first (their unacknowledged messages to the store, their presence over
        # the peer link); only then does the peer hear that we stop, and take over at once
        if self.c2s is not None:
            await self.c2s.stop()
        if self.manager is not None:
            await self.manager.shutdown()
        if self.member is not None:
            await self.member.stop()
        if self.store is not None:
            await self.store.close()
        self._stopped.set()

    async def run(self, *, ready_file: Path | None = None) -> None:
        """Serve until SIGINT or SIGTERM."""
        await self.start(create_schema=self.config.store.create_schema)
        tune_garbage_collector()  # thousands of sessions: no full collections mid-failover
        pid_file = self.config.node.data_dir / "pid"  # for tools that signal the node
        pid_file.parent.mkdir(parents=True, exist_ok=True)
        pid_file.write_text(f"{os.getpid()}\n")
        if ready_file is not None:
            assert self.c2s is not None
            ready_file.write_text(f"{self.c2s.port}\n")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        log.info("node %s stopping", self.config.node.name)
        await self.stop()
