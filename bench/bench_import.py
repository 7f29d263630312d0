"""Import 10,000 accounts into a fresh store and print the elapsed time as JSON.

Run from the repository root:  PYTHONPATH=. python bench/bench_import.py [--users N] [--url URL]
Without --url the store is a new SQLite file in a temporary directory. The
figure is dominated by PBKDF2 (SCRAM-SHA-1 and SCRAM-SHA-256, 4096 rounds
each), spread over os.cpu_count() worker processes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path

from xmpp_ha.store.sql import SQLStore, normalize_url


async def bench(url: str, users: int) -> dict[str, object]:
    accounts = [(f"user{index:06d}", f"password-{index}") for index in range(users)]
    store = await SQLStore.open(url, create=True)
    try:
        started = time.perf_counter()
        added = await store.import_users(accounts)
        elapsed = time.perf_counter() - started
        assert added == users, f"added {added} of {users}"
    finally:
        await store.close()
    return {
        "benchmark": "import_users",
        "store": normalize_url(url).partition(":")[0],
        "users": users,
        "seconds": round(elapsed, 3),
        "ms_per_user": round(elapsed * 1000 / users, 3),
        "cpu_count": os.cpu_count(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--url", help="store URL (default: a new temporary SQLite file)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        url = args.url or str(Path(directory) / "bench.db")
        print(json.dumps(asyncio.run(bench(url, args.users))))


if __name__ == "__main__":  # required: the worker processes are spawned
    main()
