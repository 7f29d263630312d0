"""The admin RPC API of a group member: status, metrics, the web page, and the
administrator's actions (failover, fallback, recovery, services, parameters,
groups, users). Every route that changes state needs the admin token.

Actions aimed at the peer node are forwarded over the (mutually
authenticated) peer link and answered 202; the CLI sends them to the node
itself, so that a refusal comes back as a clear 409 with the reason.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from xmpp_ha.admin.http import HTTPError, Request, Response, Router
from xmpp_ha.admin.metrics import node_metrics, render
from xmpp_ha.admin.page import page_response
from xmpp_ha.ha.groups import AssignmentMode, GroupError, ParamError
from xmpp_ha.ha.srm import ActionNotAllowed, Event
from xmpp_ha.runtime.services import UnknownService
from xmpp_ha.store.repository import StoreUnavailable, UserExists

if TYPE_CHECKING:
    from xmpp_ha.runtime.member import GroupMember

log = logging.getLogger("xmpp_ha.admin")

_ACTIONS = {
    "failover": Event.ADMIN_FAILOVER,
    "fallback": Event.ADMIN_FALLBACK,
    "recover": Event.ADMIN_RECOVER,
    "recovery": Event.ADMIN_RECOVER,  # the model's name, as in allowed_actions
}


def counters(member: GroupMember) -> dict[str, int]:
    """SPEC §10, live."""
    manager = member.node.manager
    assert manager is not None
    redundancy = member.redundancy
    peer = redundancy.peer.name if redundancy is not None and redundancy.peer else None
    active_users = 0
    client_sessions = 0
    from_peer = 0
    inactive_client = manager.standby_sessions
    for record in manager.users.values():
        active = sum(1 for s in record.sessions.values() if s.hibernated_until is None)
        client_sessions += active
        if active:
            active_users += 1
            if (
                peer is not None
                and redundancy is not None
                and redundancy.home_of(record.username) == peer
            ):
                from_peer += 1
    composed = sum(1 for s in manager.resumable.values() if s.hibernated_until is not None)
    return {
        "ActiveJsmSessions": active_users,
        "InactiveJsmSessions": from_peer,
        "JsmSessionsComposed": composed,
        "JsmSessionsClient": client_sessions,
        "JsmSessionsClientInactive": inactive_client,
    }


def node_status(member: GroupMember) -> dict[str, Any]:
    node = member.node
    assert node.c2s is not None and member.services is not None and member.redundancy is not None
    config = node.config
    status: dict[str, Any] = {
        "name": config.node.name,
        "host": config.ha.advertise_host,
        "c2s_port": node.c2s.port,
        "standby_door": node.c2s.door_open,  # Idle: only standby sessions may log in
        "admin_port": member.admin.port if member.admin is not None else 0,
        "service_port": member.link.port if member.link is not None else 0,
        "peer": member.redundancy.peer.name if member.redundancy.peer else None,
        "services": member.services.health(),
        "counters": counters(member),
    }
    status.update(member.redundancy.state_view())
    return status


async def _group_view(member: GroupMember) -> dict[str, Any] | None:
    if not member.group_name or member.cluster is None:
        return None
    try:
        group = await member.cluster.get_group(member.group_name)
    except StoreUnavailable:
        return {"name": member.group_name, "error": "store unavailable"}
    if group is None:
        return None
    return {
        "name": group.name,
        "description": group.description,
        "ha_enabled": group.ha_enabled,
        "mode": member.mode.value,
        "nodes": list(group.nodes),
    }


async def run_local_action(member: GroupMember, message: dict[str, Any]) -> None:
    """An action the peer forwarded to this node."""
    try:
        await _act(member, str(message.get("action")), message)
    except (ActionNotAllowed, UnknownService, ValueError) as exc:
        log.warning("forwarded admin action refused: %s", exc)


async def _act(member: GroupMember, action: str, body: dict[str, Any]) -> None:
    assert member.services is not None
    if action in _ACTIONS:
        member.admin_event(_ACTIONS[action])
    elif action in ("service-stop", "service-start"):
        service = member.services[str(body.get("service"))]
        await (service.stop() if action == "service-stop" else service.start())
    else:
        raise ValueError(f"unknown action {action!r}")


def build_router(member: GroupMember) -> Router:
    router = Router()
    node_name = member.config.node.name

    async def page(request: Request) -> Response:
        return page_response()

    async def status(request: Request) -> Response:
        assert member.redundancy is not None
        return Response.json({
            "node": node_status(member),
            "peer": member.redundancy.peer_status,
            "group": await _group_view(member),
        })  # fmt: skip

    async def metrics(request: Request) -> Response:
        status = {"node": node_status(member)}
        return Response.text(render(node_metrics(status)),
                             content_type="text/plain; version=0.0.4; charset=utf-8")  # fmt: skip

    async def check(request: Request) -> Response:
        assert member.cluster is not None and member.services is not None
        return Response.json({
            "node": node_name,
            "store_status": await member.cluster.status_value(),
            "services": member.services.health(),
            "critical_services_running": member.services.critical_up(),
        })  # fmt: skip

    async def node_action(request: Request) -> Response:
        target = request.params["node"]
        action = request.params["action"]
        body = request.json() if request.body else {}
        if "service" in request.params:
            body = {"service": request.params["service"]}
            action = f"service-{action}"
        return await _dispatch(member, target, action, body)

    async def recover(request: Request) -> Response:
        return await _dispatch(member, node_name, "recover", {})

    async def get_params(request: Request) -> Response:
        assert member.cluster is not None
        params = await member.cluster.get_params()
        return Response.json({"cluster": params.to_mapping(), "mode": member.mode.value})

    async def put_params(request: Request) -> Response:
        assert member.cluster is not None
        changes = request.json()
        if not isinstance(changes, dict):
            raise HTTPError(400, "expected a JSON object of parameter changes")
        try:
            params = await member.cluster.set_params(changes)
        except ParamError as exc:
            raise HTTPError(400, str(exc)) from exc
        member.apply_params(params)
        if member.link is not None:
            member.link.send({"t": "params"})
        return Response.json({"cluster": params.to_mapping()})

    async def put_mode(request: Request) -> Response:
        assert member.cluster is not None
        body = request.json()
        try:
            mode = AssignmentMode.parse(str(body.get("mode")))
        except ValueError as exc:
            raise HTTPError(400, str(exc)) from exc
        await member.cluster.set_assignment_mode(mode)
        group = await member.cluster.get_group(member.group_name) if member.group_name else None
        moved = await member.cluster.apply_mode(mode, list(group.nodes)) if group else 0
        member.mode = mode
        await member.sync_once()
        return Response.json({"mode": mode.value, "reassigned": moved})

    async def add_user(request: Request) -> Response:
        body = request.json()
        username, password = str(body.get("username", "")), str(body.get("password", ""))
        if not username or not password:
            raise HTTPError(400, "username and password are required")
        await _refuse_while_failed_over(member)
        repo = member.node.store
        assert repo is not None
        try:
            await repo.add_user(username, password)
        except UserExists as exc:
            raise HTTPError(409, f"user {exc} already exists") from exc
        except ValueError as exc:
            raise HTTPError(400, str(exc)) from exc
        await member.sync_once()
        return Response.json({"username": username}, status=201)

    router.add("GET", "/", page, auth=False)
    router.add("GET", "/status", status, auth=False)
    router.add("GET", "/metrics", metrics, auth=False)
    router.add("GET", "/check", check, auth=False)
    router.add("GET", "/params", get_params, auth=False)
    router.add("PUT", "/params", put_params, auth=True)
    router.add("PUT", "/mode", put_mode, auth=True)
    router.add("POST", "/users", add_user, auth=True)
    router.add("POST", "/nodes/{node}/{action}", node_action, auth=True)
    router.add("POST", "/nodes/{node}/services/{service}/{action}", node_action, auth=True)
    router.add("POST", "/recover", recover, auth=True)
    return router


async def _refuse_while_failed_over(member: GroupMember) -> None:
    """SPEC §5: no user can be added while a node of the group is failed over."""
    if member.cluster is None or not member.group_name:
        return
    group = await member.cluster.get_group(member.group_name)
    if group is None:
        return
    record = group.record
    if record.failed_over or record.transition or record.failed_mode:
        raise HTTPError(
            409,
            f"cannot add users while node {record.failed_over or '?'} of group {group.name} is "
            "failed over (or moving users); fall back first",
        )


async def _dispatch(
    member: GroupMember, target: str, action: str, body: dict[str, Any]
) -> Response:
    if action not in (*_ACTIONS, "service-stop", "service-start"):
        raise HTTPError(404, f"unknown action {action!r}")
    node_name = member.config.node.name
    if target == node_name:
        try:
            await _act(member, action, body)
        except ActionNotAllowed as exc:
            raise HTTPError(409, str(exc)) from exc
        except UnknownService as exc:
            raise HTTPError(404, str(exc)) from exc
        except (GroupError, ValueError) as exc:
            raise HTTPError(400, str(exc)) from exc
        return Response.json({"node": node_name, "action": action, "done": True})
    redundancy = member.redundancy
    if redundancy is None or redundancy.peer is None or redundancy.peer.name != target:
        raise HTTPError(404, f"no node {target!r} in this group")
    if member.link is None or not member.link.connected:
        raise HTTPError(503, f"node {target} is unreachable over the peer link")
    member.link.send({"t": "admin", "action": action, **body})
    return Response.json({"node": target, "action": action, "forwarded": True}, status=202)
