"""A node as a member of its presence redundancy group: the composition of the
cluster store, the critical services, the SRM (`redundancy`), the peer link,
the sync agent and the admin API, and their hooks into the session manager.

Started by `Node` when `[ha] enabled = true`.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import xml.etree.ElementTree as ET
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xmpp_ha.admin.http import AdminServer
from xmpp_ha.ha.groups import AssignmentMode, SRMParams
from xmpp_ha.ha.model import Reason
from xmpp_ha.ha.srm import Event, Trigger
from xmpp_ha.im.hooks import LoginRefusal
from xmpp_ha.net.peer import PeerLink
from xmpp_ha.net.tls import client_context, server_context
from xmpp_ha.protocol.stanzas import StanzaHeader
from xmpp_ha.runtime.dual import DualConnections
from xmpp_ha.runtime.lease import LeaseKeeper
from xmpp_ha.runtime.redundancy import PeerInfo, Redundancy, stanza_payload
from xmpp_ha.runtime.services import STORE, SYNC_AGENT, Service, Services
from xmpp_ha.store.cluster import ClusterStore, Group
from xmpp_ha.store.repository import StoreUnavailable

if TYPE_CHECKING:
    from xmpp_ha.runtime.node import Node

log = logging.getLogger("xmpp_ha.member")

SYNC_AGENT_PERIOD = 2.0  # seconds between passes assigning new users to nodes


def software_version() -> str:
    try:
        return version("xmpp-ha")
    except PackageNotFoundError:
        return "0"


def read_or_create_token(path: Path) -> str:
    if path.exists():
        token = path.read_text().strip()
        if token:
            return token
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    path.touch(mode=0o600)
    path.write_text(token + "\n")
    return token


class StoreProbe:
    """The store service's health: the gate is open and the store answered lately."""

    def __init__(self, node: Node, cluster: ClusterStore) -> None:
        self.node = node
        self.cluster = cluster
        self.reachable = True

    async def probe(self) -> None:
        self.reachable = self.node.gate.open and await self.cluster.status_value(timeout=5) == 2

    def healthy(self) -> bool:
        return self.node.gate.open and self.reachable


class GroupMember:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.config = node.config
        self.cluster: ClusterStore | None = None
        self.redundancy: Redundancy | None = None
        self.link: PeerLink | None = None
        self.admin: AdminServer | None = None
        self.services: Services | None = None
        self.group_name = ""
        self.mode = AssignmentMode.BALANCED
        self._tasks: list[asyncio.Task[None]] = []
        self._sync_task: asyncio.Task[None] | None = None
        self._group_key: tuple[object, ...] | None = None
        self._stored_for: set[str] = set()  # users to tell the peer about (offline stored)
        self.dual = DualConnections(self)

    async def start(self) -> None:
        node, config = self.node, self.config
        assert node.manager is not None and node.c2s is not None
        raw_cluster = await ClusterStore.open(config.store.url, create=config.store.create_schema)
        self._raw_cluster = raw_cluster
        cluster = node.gate.wrap(raw_cluster)
        self.cluster = cluster
        probe = StoreProbe(node, cluster)
        self.probe = probe
        self.services = Services(
            node.manager,
            node.c2s,
            sync_agent=Service(SYNC_AGENT, self._stop_sync_agent, self._start_sync_agent,
                               lambda: self._sync_task is not None and not self._sync_task.done()),
            store=Service(STORE, self._close_gate, self._open_gate, probe.healthy),
        )  # fmt: skip
        self.params = await cluster.get_params()
        self.services.monitor_authentication = self.params.monitor_authentication_service
        self.mode = await cluster.get_assignment_mode()
        self._server_context = server_context(
            str(config.tls.cert_file), str(config.tls.key_file), ca_file=str(config.tls.ca_file),
            require_client_cert=True,
        )  # fmt: skip
        self._client_context = client_context(
            str(config.tls.ca_file), cert_file=str(config.tls.cert_file),
            key_file=str(config.tls.key_file),
        )  # fmt: skip
        from xmpp_ha.runtime.admin_api import build_router

        token = read_or_create_token(config.admin_token_file)
        self.admin = AdminServer(build_router(self), host=config.ha.admin_host,
                                 port=config.ha.admin_port, token=token)  # fmt: skip
        await self.admin.start()
        await self._join_group(await cluster.group_of_node(config.node.name))
        hooks = node.hooks
        hooks.may_serve = lambda: self.redundancy is None or self.redundancy.may_serve()
        hooks.login_guard = self._login_guard
        hooks.route_remote = self._route_remote
        hooks.served_elsewhere = self._served_elsewhere
        hooks.offline_stored.append(self._offline_stored)
        self.dual.install(hooks)
        await self._start_sync_agent()
        self._tasks.append(asyncio.create_task(self._heartbeat_loop()))
        self._tasks.append(asyncio.create_task(self._probe_loop()))

    async def _join_group(self, group: Group | None) -> None:
        """Build the peer link and the SRM for the group this node belongs to (or none)."""
        node, config, cluster = self.node, self.config, self.cluster
        assert node.manager is not None and node.c2s is not None and cluster is not None
        assert self.services is not None and self.admin is not None
        self._group_key = _group_key(group)
        peer_name = group.peer(config.node.name) if group is not None else None
        peer_info = await cluster.get_node(peer_name) if peer_name else None
        self.group_name = group.name if group is not None else ""
        self.link = PeerLink(
            node=config.node.name,
            peer=peer_name or "",
            version=software_version(),
            listen_host=config.ha.advertise_host,
            listen_port=config.ha.service_port,
            peer_host=peer_info.host if peer_info else "",
            peer_port=peer_info.service_port if peer_info else 0,
            server_context=self._server_context,
            client_context=self._client_context,
            handler=self,
            idle_timeout=self.params.heartbeat_timeout,  # heartbeats keep a live link busy
        )
        await self.link.start()
        await cluster.register_node(
            config.node.name, config.ha.advertise_host, node.c2s.port, self.admin.port,
            self.link.port, software_version(),
        )  # fmt: skip
        peer = None
        if peer_info is not None:
            peer = PeerInfo(peer_info.name, peer_info.host, peer_info.c2s_port,
                            peer_info.service_port, peer_info.admin_port)  # fmt: skip
        link = self.link
        self.redundancy = Redundancy(
            node_name=config.node.name, group=self.group_name, peer=peer, cluster=cluster,
            manager=node.manager, services=self.services, clock=node.clock, params=self.params,
            send_peer=link.send, peer_connected=lambda: link.connected,
            lease=LeaseKeeper(config.store.url, config.node.name, peer.name if peer else None,
                              gate=node.gate, clock=node.clock),
        )  # fmt: skip
        self.redundancy.on_arrival = self.dual.users_arrived
        self.redundancy.standby_door = self.dual.set_door
        await self.redundancy.start(ha_enabled=group is not None and group.ha_enabled)
        log.info("member of group %r (peer %s)", self.group_name or None, peer_name)

    async def _leave_group(self) -> None:
        if self.redundancy is not None:
            await self.redundancy.stop()
            self.redundancy = None
        if self.link is not None:
            await self.link.stop()
            self.link = None

    async def _login_guard(self, username: str) -> LoginRefusal | None:
        return await self.redundancy.login_guard(username) if self.redundancy else None

    async def stop(self) -> None:
        if self.link is not None and self.link.connected:
            self.link.send({"t": "stopping"})  # the peer takes over at once: Peer Reboot
        for task in [*self._tasks, *([self._sync_task] if self._sync_task else [])]:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._leave_group()
        if self.admin is not None:
            await self.admin.stop()
        if self.cluster is not None:
            await self._raw_cluster.close()

    # --- peer link handler ------------------------------------------------------

    def on_connected(self, peer_version: str) -> None:
        log.info("peer link up (peer version %s)", peer_version)
        if peer_version != software_version():
            log.error("peer runs version %s, this node %s: both must run the same version",
                      peer_version, software_version())  # fmt: skip

    def on_disconnected(self) -> None:
        log.warning("peer link down")
        self.dual.peer_link_lost()

    def on_message(self, message: dict[str, Any]) -> None:
        if message.get("t") == "admin":
            self._peer_admin(message)
            return
        if message.get("t") == "params":
            asyncio.get_running_loop().create_task(self.reload_params())
            return
        if message.get("t") == "offline":
            self._flush_stored(message.get("users"))
            return
        if message.get("t") == "dual":
            self.dual.on_peer_message(message)
            return
        if self.redundancy is not None:
            self.redundancy.on_peer_message(message)

    async def on_routed(self, payload: dict[str, Any]) -> None:
        """A stanza from the peer for a user it believes is here: deliver or store, never bounce back."""
        assert self.node.manager is not None
        stanza = ET.fromstring(str(payload["xml"]))
        header = StanzaHeader.of(stanza)
        pending = self.node.manager.deliver_here(stanza, header)
        if pending is not None:
            await pending

    async def reload_params(self) -> None:
        assert self.cluster is not None
        try:
            self.apply_params(await self.cluster.get_params())
        except StoreUnavailable as exc:
            log.warning("cannot reload parameters: %s", exc)

    def apply_params(self, params: SRMParams) -> None:
        self.params = params
        if self.redundancy is not None:
            self.redundancy.apply_params(params)

    def _peer_admin(self, message: dict[str, Any]) -> None:
        from xmpp_ha.runtime.admin_api import run_local_action

        asyncio.get_running_loop().create_task(run_local_action(self, message))

    # --- offline messages stored on one node for a user the other serves -------------

    def _offline_stored(self, username: str) -> None:
        """Tell the peer (once per loop iteration, all names at once) whom we stored
        offline messages for: a user it serves may have read its store just before."""
        if self.link is None or not self.link.connected:
            return
        if not self._stored_for:
            asyncio.get_running_loop().call_soon(self._send_stored)
        self._stored_for.add(username)

    def _send_stored(self) -> None:
        users, self._stored_for = sorted(self._stored_for), set()
        if self.link is not None:
            self.link.send_if_connected({"t": "offline", "users": users})

    def _flush_stored(self, users: object) -> None:
        manager = self.node.manager
        if manager is None or not isinstance(users, list):
            return
        for username in users:
            if isinstance(username, str) and username in manager.users:
                manager.spawn(manager.messages.flush_stored(username))

    # --- hooks ----------------------------------------------------------------------

    def _served_elsewhere(self, username: str) -> bool:
        redundancy = self.redundancy
        return redundancy is not None and redundancy.user_on_peer(username)

    async def _route_remote(self, username: str, stanza: ET.Element) -> bool:
        redundancy, link = self.redundancy, self.link
        if redundancy is None or link is None or not redundancy.user_on_peer(username):
            return False
        if not link.connected:
            return False  # stored offline here, in the shared store: not lost
        return await link.route(stanza_payload(username, stanza))

    # --- loops -------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        from xmpp_ha.runtime.admin_api import node_status

        while True:
            if self.link is not None and self.redundancy is not None:
                self.link.send_if_connected(self.redundancy.heartbeat_message(node_status(self)))
            await asyncio.sleep(self.params.heartbeat_interval)

    async def _probe_loop(self) -> None:
        while True:
            await self.probe.probe()
            await asyncio.sleep(1.0)

    async def _start_sync_agent(self) -> None:
        if self._sync_task is None or self._sync_task.done():
            self._sync_task = asyncio.create_task(self._sync_agent())

    async def _stop_sync_agent(self) -> None:
        if self._sync_task is not None:
            self._sync_task.cancel()
            await asyncio.gather(self._sync_task, return_exceptions=True)

    async def _sync_agent(self) -> None:
        """Assign users without a home node, per the cluster's assignment mode (SPEC §5)."""
        while True:
            try:
                await self.sync_once()
            except StoreUnavailable as exc:
                log.debug("sync agent: %s", exc)
            await asyncio.sleep(SYNC_AGENT_PERIOD)

    async def sync_once(self) -> int:
        assert self.cluster is not None
        group = await self.cluster.group_of_node(self.config.node.name)
        if _group_key(group) != self._group_key:
            log.info("group membership or HA switch changed: rejoining")
            await self._leave_group()
            await self._join_group(group)
        if group is None:
            return 0
        self.mode = await self.cluster.get_assignment_mode()
        assigned = await self.cluster.assign_unassigned(self.mode, list(group.nodes))
        if self.redundancy is not None:
            await self.redundancy.reload_assignments()  # also ends sessions that moved away
        if assigned and self.link is not None:
            self.link.send({"t": "reload"})
        return assigned

    async def _close_gate(self) -> None:
        self.node.gate.open = False

    async def _open_gate(self) -> None:
        self.node.gate.open = True

    def admin_event(self, event: Event) -> None:
        assert self.redundancy is not None
        self.redundancy.admin(event)

    def feed(self, event: Event, reason: Reason = Reason.ADMIN) -> None:
        assert self.redundancy is not None
        self.redundancy.feed(Trigger(event, reason))


def _group_key(group: Group | None) -> tuple[object, ...] | None:
    """What, when it changes, makes a node rebuild its peer link and SRM."""
    return None if group is None else (group.name, tuple(group.nodes), group.ha_enabled)
