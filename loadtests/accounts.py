"""The accounts of a load test and the node serving each: OUT/accounts.json.

    python -m loadtests.accounts PAIR_DIR OUT_FILE [LOW HIGH]

Reads the pair's layout and store (user0..userN-1 as `xmpp-ha up` made them,
which node serves each) and sets both nodes' client re-login limits to LOW-HIGH
seconds, so that standby sessions open within seconds. The Locust processes run
it as a child process when the file is missing: they are gevent processes, and
the store is reached through asyncio.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ACCOUNTS_FILE = "accounts.json"


async def describe(pair_dir: Path, standby_delay: tuple[float, float]) -> dict[str, Any]:
    from client_sim.bench import serving_nodes
    from xmpp_ha.runtime.pair import PairLayout

    layout = PairLayout.load(pair_dir)
    served = {u: node for u, node in (await serving_nodes(layout, standby_delay)).items() if node}
    users = sorted(served, key=lambda u: (len(u), u))
    return {
        "domain": layout.domain, "ca_file": str(layout.ca_file), "users": users,
        "served": served, "nodes": {n.name: [n.host, n.c2s_port] for n in layout.nodes},
    }  # fmt: skip


def write_accounts(pair_dir: Path, path: Path, standby_delay: tuple[float, float]) -> None:
    data = asyncio.run(describe(pair_dir, standby_delay))
    if not data["users"]:
        raise SystemExit(f"{pair_dir}: no account is served by a node (is the pair up?)")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(data))
    temporary.replace(path)


def load_or_write_accounts(
    pair_dir: Path, path: Path, standby_delay: tuple[float, float]
) -> dict[str, Any]:
    """The file's content; written first (by a child process, once) when missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            low, high = standby_delay
            subprocess.run([sys.executable, "-m", "loadtests.accounts", str(pair_dir), str(path),
                            str(low), str(high)], check=True)  # fmt: skip
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def main(argv: list[str]) -> int:
    pair_dir, path, *delay = argv
    low, high = (float(x) for x in delay) if delay else (0.5, 5.0)
    write_accounts(Path(pair_dir), Path(path), (low, high))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
