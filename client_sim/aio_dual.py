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
import itertools
import logging
import ssl
import xml.etree.ElementTree as ET
from collections.abc import Callable, Coroutine
from typing import Any

from client_sim.aio import AioClient, LoginError, login, new_nonce
from client_sim.dual import (
    Action,
    Activate,
    DualCore,
    OpenStandby,
    Probe,
    Promote,
    Relogin,
    RequestPlan,
)
from client_sim.xmpp import (
    ClientEvent,
    ClientStream,
    IqReceived,
    MessageReceived,
    SaltedPasswordCache,
)
from xmpp_ha.net.tls import StreamConnection
from xmpp_ha.protocol import ns

log = logging.getLogger(__name__)

PLAN = ns.tag(ns.DUAL, "plan")
ACTIVATE = ns.tag(ns.DUAL, "activate")
RELOGIN_DELAY = 0.2  # s before a relogin after a failed one


class AioDualClient:
    def __init__(
        self,
        jid: str,
        password: str,
        nodes: dict[str, tuple[str, int]],
        *,
        home: str,
        ssl_context: ssl.SSLContext,
        resource: str = "sim",
        on_message: Callable[[MessageReceived], None] | None = None,
        key_cache: SaltedPasswordCache | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.jid = jid
        self.password = password
        self.home = home
        self.core = DualCore(nodes=dict(nodes))
        self.context = ssl_context
        self.resource = resource
        self.on_message = on_message
        self.key_cache = key_cache
        self.timeout = timeout
        self.active: AioClient | None = None
        self.standby: AioClient | None = None
        self.sent = 0
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._probes = itertools.count(1)
        self._probe_id = ""
        self._pending: list[ET.Element] = []  # sent while no session was active
        self._closing = False

    # --- the API --------------------------------------------------------------------

    async def start(self) -> None:
        """Log in on the home node (active, presence sent); the standby follows."""
        host, port = self.core.nodes[self.home]
        client = await self._login(host, port)
        self._set_active(client, self.home)

    def send_message(self, to: str, body: str, *, id: str) -> None:
        """Send now, or as soon as a session is active again (nothing is dropped)."""
        self.sent += 1
        stanza = ET.Element(ns.tag(ns.CLIENT, "message"), {"to": to, "type": "chat", "id": id})
        ET.SubElement(stanza, ns.tag(ns.CLIENT, "body")).text = body
        if self.active is not None and not self.active.closed:
            self.active.send_stanza(stanza)
        else:
            self._pending.append(stanza)

    @property
    def serving_node(self) -> str | None:
        return self.core.active

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
        return await login(
            host, port, self.jid, self.password, ssl_context=self.context,
            resource=self.resource, sm=True, key_cache=self.key_cache, timeout=self.timeout,
            on_message=self._on_message,
        )  # fmt: skip

    async def _open_standby(self, host: str, port: int) -> AioClient:
        stream = ClientStream(
            jid=self.jid, password=self.password, nonce=new_nonce, resource=self.resource,
            stream_management=True, resumable=False, key_cache=self.key_cache, standby=True,
        )  # fmt: skip
        client = AioClient(stream, ssl_context=self.context, server_hostname=stream.domain,
                           on_message=self._on_message)  # fmt: skip
        try:
            async with asyncio.timeout(self.timeout):
                await self._loop.create_connection(
                    lambda: StreamConnection(lambda: client), host, port
                )
                started = await client.wait_started()
        except BaseException:
            client.abort()
            raise
        if not started.standby:
            client.abort()
            raise LoginError("not-standby", "the server bound an active session")
        return client

    def _set_active(self, client: AioClient, node: str) -> None:
        self.active = client
        client.on_event = lambda event: self._on_active_event(client, event)
        dual = client.stream.dual_offered
        self._run(self.core.active_started(self._loop.time(), node, dual_offered=dual))
        pending, self._pending = self._pending, []
        for stanza in pending:
            client.send_stanza(stanza)

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
            if event.element.find(ACTIVATE) is not None:
                client.send_stanza(ET.Element(ns.tag(ns.CLIENT, "iq"), {
                    "type": "result", "id": event.id, "to": event.sender,
                }))  # fmt: skip
                self._run(self.core.activated(self._loop.time(), pushed=True))
            return
        if client.closed:
            self.standby = None
            if not self._closing:
                self._run(self.core.standby_lost(self._loop.time()))

    def _on_message(self, event: MessageReceived) -> None:
        if self._probe_id and event.id == self._probe_id and event.sender == self._own_jid():
            self._probe_id = ""
            self.core.probe_returned(self._loop.time())
            return
        if self.core.message_received(event.sender, event.id) and self.on_message is not None:
            self.on_message(event)

    def _own_jid(self) -> str:
        client = self.active
        return client.jid if client is not None else ""

    # --- actions --------------------------------------------------------------------------

    def _run(self, actions: list[Action]) -> None:
        for action in actions:
            self._do(action)
        self._arm_timer()

    def _arm_timer(self) -> None:
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
        plan = answer.find(PLAN)
        now = self._loop.time()
        if answer.get("type") != "result" or plan is None:
            self._run(self.core.plan_refused(now))
            return
        try:
            node, host = plan.get("node", ""), plan.get("host", "")
            port, delay = int(plan.get("port", "")), float(plan.get("delay", ""))
        except ValueError:
            self._run(self.core.plan_refused(now))
            return
        self._run(self.core.plan(now, node, host, port, delay))

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
        now = self._loop.time()
        if client is not self.standby:
            return
        if answer.get("type") == "result":
            self._run(self.core.activated(now))
            return
        error = answer.find(ns.tag(ns.CLIENT, "error"))
        names = [child.tag.rpartition("}")[2] for child in (error if error is not None else ())]
        actions = self.core.activation_refused(now, names[0] if names else "undefined-condition")
        if self.core.standby is None:  # given up on it
            self.standby = None
            client.abort()
        self._run(actions)

    def _promote(self, action: Promote) -> None:
        old, new = self.active, self.standby
        if new is None:
            return
        self.standby = None
        resend = list(action.resend)
        if old is not None:
            old.on_event = None
            sm = old.stream.sm
            if sm is not None:
                resend.extend(sm.unacked())
            old.abort()
        self.active = new
        new.on_event = lambda event: self._on_active_event(new, event)
        new.send_presence()
        for stanza in resend:
            if stanza.tag != ns.tag(ns.CLIENT, "iq"):  # the old session's own requests
                new.send_stanza(stanza)
        pending, self._pending = self._pending, []
        for stanza in pending:
            new.send_stanza(stanza)

    def _probe(self) -> None:
        client = self.active
        if client is None or client.closed:
            return
        self._probe_id = f"probe-{next(self._probes)}"
        client.send_message(client.jid, "probe", id=self._probe_id)

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
