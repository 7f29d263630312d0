"""Real node processes for integration tests, on SQLite and (when configured) PostgreSQL.

`node_factory` starts `xmpp-ha serve --config` in a subprocess on a free port
with a fresh store and certificates, and stops it at the end of the test.
The PostgreSQL lane runs when XMPP_HA_TEST_PG_URL points at a server
(.ci/run starts one); each test gets its own database.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from xmpp_ha.certs import init_certs
from xmpp_ha.store.sql import SQLStore

PG_URL = os.environ.get("XMPP_HA_TEST_PG_URL", "")
DOMAIN = "localhost"
PASSWORD = "secret-pw"


@dataclass
class RunningNode:
    name: str
    port: int
    ca_file: Path
    store_url: str
    process: subprocess.Popen[bytes]
    log_file: Path
    config_file: Path
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def host(self) -> str:
        return "127.0.0.1"

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")

    def terminate(self, timeout: float = 15.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def alive(self) -> bool:
        return self.process.poll() is None


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> None:
    lines: list[str] = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
        lines.append("")
    path.write_text("\n".join(lines))


async def _fresh_pg_database() -> str:
    import asyncpg  # type: ignore[import-untyped]

    name = "xh_" + uuid.uuid4().hex[:12]
    dsn = PG_URL.replace("postgresql+asyncpg://", "postgresql://")
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return PG_URL.rsplit("/", 1)[0] + "/" + name


STORE_KINDS = ["sqlite"] + (["postgres"] if PG_URL else [])


@pytest.fixture(params=STORE_KINDS)
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def store_url(store_kind: str, tmp_path: Path) -> str:
    if store_kind == "postgres":
        return await _fresh_pg_database()
    return f"sqlite+aiosqlite:///{tmp_path / 'store.db'}"


async def add_users(store_url: str, names: list[str], password: str = PASSWORD) -> None:
    store = await SQLStore.open(store_url, create=True)
    try:
        for name in names:
            await store.add_user(name, password)
    finally:
        await store.close()


NodeFactory = Callable[..., "asyncio.Future[RunningNode] | Any"]


@pytest.fixture
async def node_factory(tmp_path: Path, store_url: str) -> AsyncIterator[Any]:
    """`await node_factory(users=[...], **config_overrides)` -> RunningNode."""
    started: list[RunningNode] = []
    added: set[str] = set()
    certs = init_certs(tmp_path / "certs", node_names=["n1", "n2"])

    async def start(
        *, name: str = "n1", users: list[str] | None = None, **sections: dict[str, Any]
    ) -> RunningNode:
        await add_users(store_url, [u for u in users or [] if u not in added])
        added.update(users or [])
        node_dir = tmp_path / name
        node_dir.mkdir(exist_ok=True)
        config: dict[str, dict[str, Any]] = {
            "node": {"name": name, "domain": DOMAIN, "data_dir": str(node_dir)},
            "c2s": {"host": "127.0.0.1", "port": 0, "auth_fail_delay": 0.05},
            "store": {"url": store_url},
            "tls": {
                "cert_file": str(certs.nodes[name].cert_file),
                "key_file": str(certs.nodes[name].key_file),
                "ca_file": str(certs.ca_file),
            },
        }
        for section, values in sections.items():
            config.setdefault(section, {}).update(values)
        config_file = node_dir / "node.toml"
        write_config(config_file, config)
        ready = node_dir / "ready"
        ready.unlink(missing_ok=True)  # a restarted node must not be taken for ready at once
        log_file = node_dir / "node.log"
        process = subprocess.Popen(
            [sys.executable, "-m", "xmpp_ha.cli", "serve", "--config", str(config_file),
             "--ready-file", str(ready), "--log-level", "debug"],
            stdout=log_file.open("ab"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while not (ready.exists() and ready.read_text().strip()):
            if process.poll() is not None:
                raise RuntimeError(f"node {name} exited:\n{log_file.read_text()}")
            if time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"node {name} did not start:\n{log_file.read_text()}")
            await asyncio.sleep(0.05)
        node = RunningNode(name, int(ready.read_text()), certs.ca_file, store_url, process,
                           log_file, config_file)  # fmt: skip
        started.append(node)
        return node

    yield start
    for node in started:
        if node.alive():
            node.terminate()


@pytest.fixture
def unique() -> Iterator[Callable[[str], str]]:
    counter = iter(range(1_000_000))
    yield lambda prefix: f"{prefix}{next(counter)}"
