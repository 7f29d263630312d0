"""`xmpp-ha up|status|failover|fallback|recover|service|params|mode|group|check`.

The administrator's commands for a redundancy group. They talk to the nodes'
admin APIs (found in the pair's `cluster.json`, or given with --admin), except
`group`, which edits the shared store directly (nodes pick changes up within
seconds), and `up`, which starts a local pair.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from xmpp_ha.admin.client import AdminClient, AdminUnreachable

Handler = Callable[[argparse.Namespace], int]


class AdminCLIError(Exception):
    pass


# --- reaching the nodes ------------------------------------------------------------


def _clients(args: argparse.Namespace) -> dict[str, AdminClient]:
    """Admin clients by node name (or by HOST:PORT when given with --admin)."""
    token = _token(args)
    if args.admin:
        clients = {}
        for endpoint in args.admin:
            host, _, port = endpoint.rpartition(":")
            if not host or not port.isdigit():
                raise AdminCLIError(f"--admin {endpoint!r}: expected HOST:PORT")
            clients[endpoint] = AdminClient(host, int(port), token)
        return clients
    from xmpp_ha.runtime.pair import PairLayout

    layout = PairLayout.load(Path(args.dir))
    return {node.name: AdminClient(node.host, node.admin_port, token) for node in layout.nodes}


def _token(args: argparse.Namespace) -> str | None:
    path: Path | None = Path(args.token_file) if args.token_file else None
    if path is None and not args.admin:
        from xmpp_ha.runtime.pair import PairLayout

        path = Path(PairLayout.load(Path(args.dir)).token_file)
    if path is None:
        return None
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise AdminCLIError(f"cannot read the admin token {path}: {exc.strerror}") from exc


def _client_for(args: argparse.Namespace, node: str) -> AdminClient:
    clients = _clients(args)
    if node in clients:
        return clients[node]
    for client in clients.values():  # --admin given: ask who is who
        try:
            if client.get("/status")["node"]["name"] == node:
                return client
        except AdminUnreachable:
            continue
    raise AdminCLIError(f"no reachable node named {node!r} (known: {', '.join(clients)})")


def _any_client(args: argparse.Namespace) -> AdminClient:
    errors = []
    for client in _clients(args).values():
        try:
            client.get("/status")
            return client
        except AdminUnreachable as exc:
            errors.append(str(exc))
    raise AdminCLIError("no node is reachable: " + "; ".join(errors))


# --- commands --------------------------------------------------------------------------


def cmd_up(args: argparse.Namespace) -> int:
    from xmpp_ha.ha.groups import AssignmentMode
    from xmpp_ha.runtime.pair import default_layout, prepare_sync, run_up

    layout = default_layout(
        Path(args.dir), domain=args.domain, c2s_port=args.c2s_port, admin_port=args.admin_port,
        service_port=args.service_port,
    )  # fmt: skip
    params = dict(_parse_assignments(args.param or []))
    print(
        f"preparing {layout.directory}: certificates, store, {args.users} accounts ...", flush=True
    )
    prepare_sync(layout, users=args.users, password=args.password, params=params,
                 mode=AssignmentMode.parse(args.mode))  # fmt: skip
    return run_up(layout)


def cmd_status(args: argparse.Namespace) -> int:
    nodes: list[dict[str, Any]] = []
    group: dict[str, Any] | None = None
    for name, client in _clients(args).items():
        try:
            status = client.get("/status")
        except AdminUnreachable as exc:
            nodes.append({"name": name, "state": "unreachable", "error": str(exc)})
            continue
        nodes.append(status["node"])
        group = group or status.get("group")
    if args.json:
        print(json.dumps({"nodes": nodes, "group": group}, indent=2))
        return 0
    if group:
        ha = "on" if group.get("ha_enabled") else "off"
        print(
            f"group {group['name']}  HA {ha}  mode {group.get('mode')}  nodes {', '.join(group['nodes'])}"
        )
    for node in nodes:
        if "error" in node:
            print(f"\n{node['name']}: UNREACHABLE ({node['error']})")
            continue
        print(
            f"\n{node['name']}  {node['host']}  c2s {node['c2s_port']}  admin {node['admin_port']}"
        )
        print(f"  state:   {node['state']} / {node['reason']}")
        print(f"  next:    {node['recommended_action']}")
        print(f"  actions: {', '.join(node['allowed_actions']) or '-'}")
        down = [name for name, up in node["services"].items() if not up]
        print(f"  services: {'all running' if not down else 'DOWN: ' + ', '.join(down)}")
        print("  counters: " + "  ".join(f"{k}={v}" for k, v in node["counters"].items()))
    return 0


def _action(action: str) -> Handler:
    def run(args: argparse.Namespace) -> int:
        client = _client_for(args, args.node)
        result = client.post(AdminClient.path("nodes", args.node, action))
        print(f"{action} of {args.node}: {'done' if result.get('done') else 'forwarded'}")
        return 0

    return run


def cmd_recover(args: argparse.Namespace) -> int:
    client = _any_client(args)
    client.post("/recover")
    print("recovery started: the SRM restarts on both nodes")
    return 0


def cmd_service(args: argparse.Namespace) -> int:
    client = _client_for(args, args.node)
    client.post(AdminClient.path("nodes", args.node, "services", args.service, args.operation))
    print(f"{args.service} on {args.node}: {args.operation}")
    return 0


def _parse_assignments(items: list[str]) -> list[tuple[str, Any]]:
    pairs = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise AdminCLIError(f"{item!r}: expected name=value")
        pairs.append((key.strip(), _value(value.strip())))
    return pairs


def _value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "on", "yes"):
        return True
    if lowered in ("false", "off", "no"):
        return False
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def cmd_params(args: argparse.Namespace) -> int:
    client = _any_client(args)
    if args.params_command == "set":
        result = client.put("/params", dict(_parse_assignments(args.assignments)))
    else:
        result = client.get("/params")
    for key, value in result["cluster"].items():
        print(f"{key} = {value}")
    if "mode" in result:
        print(f"user assignment mode = {result['mode']}")
    return 0


def cmd_mode(args: argparse.Namespace) -> int:
    result = _any_client(args).put("/mode", {"mode": args.mode})
    print(f"user assignment mode {result['mode']} ({result['reassigned']} users reassigned)")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    healthy = True
    for name, client in _clients(args).items():
        try:
            result = client.get("/check")
        except AdminUnreachable as exc:
            print(f"{name}: UNREACHABLE ({exc})")
            healthy = False
            continue
        store = result["store_status"]
        down = [service for service, up in result["services"].items() if not up]
        print(f"{name}: store status {store} ({'healthy' if store == 2 else 'NOT healthy'}), "
              f"critical services {'all running' if not down else 'DOWN: ' + ', '.join(down)}")  # fmt: skip
        healthy = healthy and store == 2 and not down
    return 0 if healthy else 1


def cmd_group(args: argparse.Namespace) -> int:
    from xmpp_ha.store.cluster import ClusterStore

    url = args.store
    if not url:
        from xmpp_ha.runtime.pair import PairLayout

        url = PairLayout.load(Path(args.dir)).store_url

    async def run() -> Any:
        cluster = await ClusterStore.open(url)
        try:
            if args.group_command == "create":
                nodes = [name.strip() for name in args.nodes.split(",") if name.strip()]
                return await cluster.create_group(args.name, args.description or "", nodes,
                                                  ha_enabled=args.ha == "on")  # fmt: skip
            if args.group_command == "update":
                ha = None if args.ha is None else args.ha == "on"
                return await cluster.update_group(args.name, description=args.description,
                                                  ha_enabled=ha)  # fmt: skip
            if args.group_command == "delete":
                await cluster.delete_group(args.name)
                return None
            if args.name:
                group = await cluster.get_group(args.name)
                if group is None:
                    raise AdminCLIError(f"no group named {args.name!r}")
                return [group]
            return await cluster.list_groups()
        finally:
            await cluster.close()

    result = asyncio.run(run())
    groups = result if isinstance(result, list) else [result] if result is not None else []
    if args.group_command == "delete":
        print(f"deleted group {args.name}")
    for group in groups:
        record = group.record
        print(f"{group.name}: nodes {', '.join(group.nodes)}, HA {'on' if group.ha_enabled else 'off'}"
              f", failed over: {record.failed_over or '-'}"
              f"{', FAILED MODE' if record.failed_mode else ''}"
              f"{' — ' + group.description if group.description else ''}")  # fmt: skip
    return 0


# --- parsers -----------------------------------------------------------------------------


def _reach_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dir", default=".xmpp-ha-pair", help="the pair's directory (cluster.json)"
    )
    parser.add_argument("--admin", action="append", metavar="HOST:PORT",
                        help="a node's admin API instead of --dir (repeatable)")  # fmt: skip
    parser.add_argument("--token-file", help="admin token file (default: the pair's)")


def add_parsers(commands: Any) -> None:
    up = commands.add_parser("up", help="start a local redundancy pair (two nodes, one store)")
    up.add_argument("--dir", default=".xmpp-ha-pair", help="state directory (.xmpp-ha-pair)")
    up.add_argument("--users", type=int, default=10, help="accounts user0..userN-1 (10)")
    up.add_argument("--password", default="password", help="their password (password)")
    up.add_argument("--domain", default="localhost")
    up.add_argument("--c2s-port", type=int, default=5222)
    up.add_argument("--admin-port", type=int, default=20075)
    up.add_argument("--service-port", type=int, default=22001)
    up.add_argument("--mode", default="balanced", help="balanced | active-standby | none")
    up.add_argument("--param", action="append", metavar="NAME=VALUE",
                    help="an SRM parameter, e.g. heartbeat_timeout=3 (repeatable)")  # fmt: skip
    up.set_defaults(handler=cmd_up)

    status = commands.add_parser("status", help="node states, reasons, actions, counters")
    status.add_argument("--json", action="store_true")
    _reach_options(status)
    status.set_defaults(handler=cmd_status)

    for action in ("failover", "fallback"):
        sub = commands.add_parser(action, help=f"manual {action} of a node")
        sub.add_argument("node")
        _reach_options(sub)
        sub.set_defaults(handler=_action(action))

    recover = commands.add_parser("recover", help="recovery: restart the SRM on both nodes")
    recover.add_argument("group", nargs="?", help="the group (the pair's by default)")
    _reach_options(recover)
    recover.set_defaults(handler=cmd_recover)

    service = commands.add_parser("service", help="stop or start a critical service")
    service.add_argument("operation", choices=["stop", "start"])
    service.add_argument("node")
    service.add_argument("service", help="e.g. 'router', 'session manager', 'store'")
    _reach_options(service)
    service.set_defaults(handler=cmd_service)

    params = commands.add_parser("params", help="SRM parameters (SPEC §4)")
    params_commands = params.add_subparsers(dest="params_command", required=True)
    _reach_options(params_commands.add_parser("show", help="show the parameters"))
    set_params = params_commands.add_parser("set", help="change parameters: NAME=VALUE ...")
    set_params.add_argument("assignments", nargs="+")
    _reach_options(set_params)
    params.set_defaults(handler=cmd_params)

    mode = commands.add_parser("mode", help="user assignment mode (balanced|active-standby|none)")
    mode.add_argument("mode")
    _reach_options(mode)
    mode.set_defaults(handler=cmd_mode)

    check = commands.add_parser("check", help="store status (2 = healthy) and critical services")
    _reach_options(check)
    check.set_defaults(handler=cmd_check)

    group = commands.add_parser("group", help="presence redundancy groups (in the store)")
    group_commands = group.add_subparsers(dest="group_command", required=True)
    create = group_commands.add_parser("create", help="create a group")
    create.add_argument("name")
    create.add_argument("--nodes", required=True, help="one or two node names: n1,n2")
    create.add_argument("--description")
    create.add_argument("--ha", choices=["on", "off"], default="off")
    show = group_commands.add_parser("show", help="show groups")
    show.add_argument("name", nargs="?")
    update = group_commands.add_parser("update", help="change description or the HA switch")
    update.add_argument("name")
    update.add_argument("--description")
    update.add_argument("--ha", choices=["on", "off"])
    delete = group_commands.add_parser("delete", help="delete a group")
    delete.add_argument("name")
    for sub in (create, show, update, delete):
        sub.add_argument("--dir", default=".xmpp-ha-pair", help="the pair's directory")
        sub.add_argument("--store", help="store URL instead of the pair's")
    group.set_defaults(handler=cmd_group)
