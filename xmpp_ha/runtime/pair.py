"""`xmpp-ha up`: a local redundancy pair on one machine.

Two node processes (n1 on 127.0.0.1, n2 on 127.0.0.2: the whole 127/8 range
is loopback on Linux, so both keep the model's ports), one SQLite store,
certificates from a fresh cluster CA, one group `g1` with HA on in balanced
mode, and the accounts user0..user{N-1}. `cluster.json` in the directory
tells the CLI where the admin APIs are and where the token is.
"""

from __future__ import annotations

import asyncio
import errno
import json
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from xmpp_ha.certs import init_certs
from xmpp_ha.ha.groups import AssignmentMode
from xmpp_ha.runtime.member import read_or_create_token, software_version
from xmpp_ha.store.cluster import ClusterStore
from xmpp_ha.store.sql import SQLStore

DEFAULT_DIR = Path(".xmpp-ha-pair")
GROUP = "g1"
LAYOUT_FILE = "cluster.json"


@dataclass(frozen=True)
class NodeLayout:
    name: str
    host: str
    c2s_port: int
    admin_port: int
    service_port: int


@dataclass(frozen=True)
class PairLayout:
    directory: str
    domain: str
    store_url: str
    ca_file: str
    token_file: str
    group: str
    nodes: list[NodeLayout]

    @classmethod
    def load(cls, directory: Path) -> PairLayout:
        path = directory / LAYOUT_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{path} not found: start a pair with 'xmpp-ha up --dir {directory}' "
                "or give --admin HOST:PORT"
            ) from None
        data["nodes"] = [NodeLayout(**node) for node in data["nodes"]]
        return cls(**data)

    def save(self) -> None:
        Path(self.directory, LAYOUT_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")

    def node(self, name: str) -> NodeLayout:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(
            f"no node {name!r} in this pair (nodes: {', '.join(n.name for n in self.nodes)})"
        )


def default_layout(
    directory: Path, *, domain: str = "localhost", c2s_port: int = 5222,
    admin_port: int = 20075, service_port: int = 22001,
) -> PairLayout:  # fmt: skip
    directory = directory.resolve()
    nodes = [
        NodeLayout(name, host, c2s_port, admin_port, service_port)
        for name, host in (("n1", "127.0.0.1"), ("n2", "127.0.0.2"))
    ]
    return PairLayout(
        directory=str(directory),
        domain=domain,
        store_url=f"sqlite+aiosqlite:///{directory / 'store.db'}",
        ca_file=str(directory / "certs" / "ca.pem"),
        token_file=str(directory / "admin-token"),
        group=GROUP,
        nodes=nodes,
    )


def free_ports(
    hosts: Sequence[str] = ("127.0.0.1", "127.0.0.2"), rng: random.Random | None = None
) -> tuple[int, int, int]:
    """Three ports free on every host (c2s, admin, service), below the Linux ephemeral
    range (32768+) so that no outgoing connection takes one between check and bind."""
    rng = rng or random.Random()
    chosen: list[int] = []
    while len(chosen) < 3:
        port = rng.randrange(20000, 32000)
        if port not in chosen and all(_bindable(host, port) for host in hosts):
            chosen.append(port)
    return chosen[0], chosen[1], chosen[2]


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def node_config(layout: PairLayout, node: NodeLayout, extra: dict[str, dict[str, Any]]) -> str:
    directory = Path(layout.directory)
    sections: dict[str, dict[str, Any]] = {
        "node": {
            "name": node.name,
            "domain": layout.domain,
            "data_dir": str(directory / node.name),
        },
        "c2s": {"host": node.host, "port": node.c2s_port},
        "store": {"url": layout.store_url},
        "tls": {
            "cert_file": str(directory / "certs" / f"{node.name}.pem"),
            "key_file": str(directory / "certs" / f"{node.name}-key.pem"),
            "ca_file": layout.ca_file,
        },  # fmt: skip
        "ha": {
            "enabled": True,
            "advertise_host": node.host,
            "service_port": node.service_port,
            "admin_host": node.host,
            "admin_port": node.admin_port,
            "admin_token_file": layout.token_file,
        },  # fmt: skip
    }
    for section, values in extra.items():
        sections.setdefault(section, {}).update(values)
    lines: list[str] = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {_toml(value)}" for key, value in values.items())
        lines.append("")
    return "\n".join(lines)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


async def prepare(
    layout: PairLayout, *, users: int, password: str, params: dict[str, Any] | None = None,
    mode: AssignmentMode = AssignmentMode.BALANCED, extra: dict[str, dict[str, Any]] | None = None,
) -> None:  # fmt: skip
    """Certificates, token, store, accounts, nodes, group and configs; idempotent."""
    directory = Path(layout.directory)
    directory.mkdir(parents=True, exist_ok=True)
    hosts = ["localhost", *(node.host for node in layout.nodes), layout.domain]
    init_certs(directory / "certs", node_names=[n.name for n in layout.nodes],
               hosts=list(dict.fromkeys(hosts)))  # fmt: skip
    read_or_create_token(Path(layout.token_file))
    store = await SQLStore.open(layout.store_url, create=True)
    try:
        await store.import_users((f"user{i}", password) for i in range(users))
    finally:
        await store.close()
    cluster = await ClusterStore.open(layout.store_url, create=True)
    try:
        for node in layout.nodes:
            await cluster.register_node(node.name, node.host, node.c2s_port, node.admin_port,
                                        node.service_port, software_version())  # fmt: skip
        if await cluster.get_group(layout.group) is None:
            await cluster.create_group(layout.group, "local pair", [n.name for n in layout.nodes],
                                       ha_enabled=True)  # fmt: skip
        if params:
            await cluster.set_params(params)
        await cluster.set_assignment_mode(mode)
        await cluster.assign_unassigned(mode, [n.name for n in layout.nodes])
    finally:
        await cluster.close()
    for node in layout.nodes:
        (directory / node.name).mkdir(exist_ok=True)
        (directory / f"{node.name}.toml").write_text(node_config(layout, node, extra or {}))
    layout.save()


class Pair:
    """The two node processes."""

    def __init__(self, layout: PairLayout) -> None:
        self.layout = layout
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def start_node(self, name: str) -> subprocess.Popen[bytes]:
        directory = Path(self.layout.directory)
        ready = directory / name / "ready"
        ready.unlink(missing_ok=True)
        log = (directory / f"{name}.log").open("ab")
        process = subprocess.Popen(
            [sys.executable, "-m", "xmpp_ha.cli", "serve", "--config", str(directory / f"{name}.toml"),
             "--ready-file", str(ready)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        self.processes[name] = process
        return process

    def wait_ready(self, name: str, timeout: float = 60.0) -> None:
        ready = Path(self.layout.directory) / name / "ready"
        deadline = time.monotonic() + timeout
        while not (ready.exists() and ready.read_text().strip()):
            process = self.processes[name]
            if process.poll() is not None:
                raise RuntimeError(f"node {name} exited with {process.returncode}: see {name}.log")
            if time.monotonic() > deadline:
                raise RuntimeError(f"node {name} did not start within {timeout:.0f} s")
            time.sleep(0.05)

    def start(self) -> None:
        for node in self.layout.nodes:
            self.start_node(node.name)
        for node in self.layout.nodes:
            self.wait_ready(node.name)

    def stop(self, timeout: float = 20.0) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for process in self.processes.values():
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def run_up(layout: PairLayout) -> int:
    """Start the pair, print how to connect, stop both nodes on Ctrl-C or SIGTERM."""
    pair = Pair(layout)
    stop = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        pair.start()
    except RuntimeError as exc:
        pair.stop()
        raise RuntimeError(f"{exc} (logs in {layout.directory})") from exc
    print(f"xmpp-ha pair up in {layout.directory} (group {layout.group}, domain {layout.domain})")
    for node in layout.nodes:
        print(f"  {node.name}: c2s {node.host}:{node.c2s_port} (STARTTLS)  admin "
              f"http://{node.host}:{node.admin_port}/  peer link {node.host}:{node.service_port}")  # fmt: skip
    print(f"  CA certificate: {layout.ca_file}")
    print(f"  admin token:    {layout.token_file}")
    print(f"  try: xmpp-ha status --dir {layout.directory}")
    print("Ctrl-C stops both nodes.", flush=True)
    while not stop:
        for name, process in pair.processes.items():
            if process.poll() is not None and not stop:
                print(f"node {name} exited ({process.returncode}); see {name}.log", flush=True)
                pair.processes = {k: v for k, v in pair.processes.items() if k != name}
                break
        time.sleep(0.2)
    print("stopping both nodes", flush=True)
    pair.stop()
    return 0


def prepare_sync(layout: PairLayout, **kwargs: Any) -> None:
    asyncio.run(prepare(layout, **kwargs))
