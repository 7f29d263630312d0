"""An asyncio driver for `client_sim.dual.DualCore`: one simulated user with dual connections.

It owns the two `AioClient` connections and the timer, feeds the core what happens
and carries out the core's actions; it decides nothing itself.

    nodes = {"n1": ("127.0.0.1", 5222), "n2": ("127.0.0.2", 5222)}
    alice = AioDualClient("alice@localhost", "pw", nodes, home="n1", ssl_context=context)
    await alice.start()                 # active on n1; a standby on n2 follows the plan
    alice.send_message("bob@localhost", "hi")
    alice.core.downtimes                # one per switch, with its duration
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import xml.etree.ElementTree as ET
from collections.abc import Coroutine
from typing import Any

from client_sim.aio import AioClient, LoginError, login
from client_sim.dual import Action, Activate, OpenStandby, Probe, Promote, Relogin, RequestPlan
from client_sim.dual_driver import ACTIVATE, PLAN, DualDriver
from client_sim.xmpp import ClientEvent, IqReceived, MessageReceived

log = logging.getLogger(__name__)

RELOGIN_DELAY = 0.2  # s before a relogin after a failed one


class AioDualClient(DualDriver[AioClient, ssl.SSLContext]):
    def _setup(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # --- the API --------------------------------------------------------------------

    async def start(self) -> None:
        """Log in on the home node (active, presence sent); the standby follows."""
        host, port = self.core.nodes[self.home]
        client = await self._login(host, port)
        self._set_active(client, self.home)

    async def close(self) -> None:
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
        for task in list(self._tasks):
            task.cancel()
        for client in (self.active, self.standby):
            if client is not None:
                await client.close(timeout=2.0)

    # --- connections --------------------------------------------------------------------

    async def _login(self, host: str, port: int) -> AioClient:
        # not resumable: the standby is the way back (a session kept for resumption
        # would hold the user's messages on the node it left)
        return await login(
            host, port, self.jid, self.password, ssl_context=self.context,
            resource=self.resource, sm=True, key_cache=self.key_cache, timeout=self.timeout,
            on_message=self._message, resumable=False,
        )  # fmt: skip

    async def _open_standby(self, host: str, port: int) -> AioClient:
        client = await login(
            host, port, self.jid, self.password, ssl_context=self.context,
            resource=self.resource, sm=True, key_cache=self.key_cache, timeout=self.timeout,
            on_message=self._message, standby=True,
        )  # fmt: skip
        if not (await client.wait_started()).standby:
            client.abort()
            raise LoginError("not-standby", "the server bound an active session")
        return client

    def _set_active(self, client: AioClient, node: str) -> None:
        self.active = client
        client.on_event = lambda event: self._on_active_event(client, event)
        dual = client.stream.dual_offered
        self._run(self.core.active_started(self._loop.time(), node, dual_offered=dual))
        self._send_pending(client)

    def _on_active_event(self, client: AioClient, event: ClientEvent) -> None:
        if client is not self.active or not client.closed:
            return
        self.active = None
        if self._closing:
            return
        sm = client.stream.sm
        unacked = sm.unacked() if sm is not None else []
        self._run(self.core.active_lost(self._loop.time(), unacked))

    def _on_standby_event(self, client: AioClient, event: ClientEvent) -> None:
        if client is not self.standby:
            return
        if isinstance(event, IqReceived) and event.type == "set":
            self._pushed(client, event, self._loop.time())
            return
        if client.closed:
            self.standby = None
            if not self._closing:
                self._run(self.core.standby_lost(self._loop.time()))

    def _message(self, event: MessageReceived) -> None:
        self._on_message(event, self._loop.time())

    # --- actions --------------------------------------------------------------------------

    def _run(self, actions: list[Action]) -> None:
        for action in actions:
            self._do(action)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        due = self.core.due()
        if due is not None and not self._closing:
            self._timer = self._loop.call_at(due, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self._run(self.core.tick(self._loop.time()))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = self._loop.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _do(self, action: Action) -> None:
        if isinstance(action, RequestPlan):
            self._spawn(self._request_plan())
        elif isinstance(action, OpenStandby):
            self._spawn(self._standby_at(action))
        elif isinstance(action, Activate):
            self._spawn(self._activate())
        elif isinstance(action, Promote):
            self._promote(action)
            if self.active is not None:
                client = self.active
                client.on_event = lambda event: self._on_active_event(client, event)
        elif isinstance(action, Probe):
            self._probe()
        elif isinstance(action, Relogin):
            self._spawn(self._relogin(action))

    async def _request_plan(self) -> None:
        client = self.active
        if client is None or client.closed:
            return
        try:
            answer = await client.send_iq("get", ET.Element(PLAN))
        except LoginError:
            return  # the session ended: active_lost handles it
        self._run(self._plan_answer(answer, self._loop.time()))

    async def _standby_at(self, action: OpenStandby) -> None:
        try:
            client = await self._open_standby(action.host, action.port)
        except (LoginError, OSError, TimeoutError) as exc:
            log.debug("%s: standby on %s refused: %s", self.jid, action.node, exc)
            self._run(self.core.standby_lost(self._loop.time()))
            return
        self.standby = client
        client.on_event = lambda event: self._on_standby_event(client, event)
        if client.closed:
            self.standby = None
            self._run(self.core.standby_lost(self._loop.time()))
            return
        self._run(self.core.standby_started(self._loop.time()))

    async def _activate(self) -> None:
        client = self.standby
        if client is None:
            return
        try:
            answer = await client.send_iq("set", ET.Element(ACTIVATE))
        except LoginError:
            return  # the standby ended: its event handler tells the core
        self._run(self._activation_answer(client, answer, self._loop.time()))

    async def _relogin(self, action: Relogin) -> None:
        try:
            client = await self._login(action.host, action.port)
        except (LoginError, OSError, TimeoutError) as exc:
            log.debug("%s: relogin on %s failed: %s", self.jid, action.node, exc)
            await asyncio.sleep(RELOGIN_DELAY)
            self._run(self.core.relogin_failed(self._loop.time(), action.node))
            return
        if self.standby is not None:  # a standby there is pointless now
            self.standby.abort()
            self.standby = None
            self.core.standby = self.core.standby_opening = None
        self._set_active(client, action.node)
