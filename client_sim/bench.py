"""`python -m client_sim bench`: dual-connected users against a pair from `xmpp-ha up`.

    xmpp-ha up --users 1000 &            # the pair, in .xmpp-ha-pair
    python -m client_sim bench --users 1000 --scenario kill

Every account user0..user{N-1} logs in on the node that serves it, with a
standby session on the other node (the nodes' client re-login limits are set to
`--standby-delay` first, so that standby sessions open within seconds). Users
served by the second node send chat messages to those of the first all along.
After `--steady` seconds the first node fails:
- kill:   SIGKILL (its pid from DIR/n1/pid);
- freeze: SIGSTOP, then SIGCONT once every user switched (or the deadline);
- manual: `POST /nodes/n1/failover` on its admin API.
The pair is left failed over: restart or fall back before the next run.

Downtime per user of the failed node: from losing its active session (or the
server's activation push) to the first message round trip on the new one.
Messages: lost = sent - distinct received after `--drain` s without a new one;
duplicated = copies the clients dropped (same sender and id). Prints one JSON
object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import signal
import ssl
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from client_sim.aio_dual import AioDualClient
from client_sim.xmpp import MessageReceived, SaltedPasswordCache
from xmpp_ha.admin.client import AdminClient
from xmpp_ha.core.memory import tune_garbage_collector
from xmpp_ha.runtime.pair import PairLayout
from xmpp_ha.store.cluster import ClusterStore


def stats(values: Sequence[float], digits: int = 4) -> dict[str, float] | None:
    """Nearest-rank percentiles (min, p50, p99, max), in seconds, and how many."""
    if not values:
        return None
    ordered = sorted(values)

    def rank(fraction: float) -> float:
        return round(ordered[max(0, math.ceil(fraction * len(ordered)) - 1)], digits)

    return {"min": round(ordered[0], digits), "p50": rank(0.5), "p99": rank(0.99),
            "max": round(ordered[-1], digits), "n": len(ordered)}  # fmt: skip


async def serving_nodes(
    layout: PairLayout, standby_delay: tuple[float, float]
) -> dict[str, str | None]:
    """Set both nodes' client re-login limits to `standby_delay` (s), so that standby
    sessions open within seconds; returns the node serving each account (None: none)."""
    cluster = await ClusterStore.open(layout.store_url)
    try:
        for node in layout.nodes:
            await cluster.set_relogin_limits(node.name, *standby_delay)
        assignments = await cluster.all_assignments()
    finally:
        await cluster.close()
    return {user: assignment.current_node for user, assignment in assignments.items()}


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.layout = PairLayout.load(Path(args.dir))
        self.nodes = {n.name: (n.host, n.c2s_port) for n in self.layout.nodes}
        self.failed, self.other = self.layout.nodes[0].name, self.layout.nodes[1].name
        self.sent: set[str] = set()
        self.received: set[str] = set()
        self.last_arrival = time.monotonic()
        self.rng = random.Random(args.seed)

    def on_message(self, event: MessageReceived) -> None:
        if event.id.startswith("b-"):
            self.received.add(event.id)
            self.last_arrival = time.monotonic()

    async def prepare(self) -> dict[str, str]:
        """Standby delays in seconds, and where each user is served now."""
        served = await serving_nodes(self.layout, tuple(self.args.standby_delay))
        users = [f"user{i}" for i in range(self.args.users)]
        return {u: served[u] or self.failed for u in users if u in served}

    async def chat(self, sender: AioDualClient, to: str, stop: asyncio.Event) -> None:
        low, high = self.args.interval
        count = 0
        while not stop.is_set():
            await asyncio.sleep(self.rng.uniform(low, high))
            count += 1
            message_id = f"b-{sender.jid.partition('@')[0]}-{count}"
            self.sent.add(message_id)
            sender.send_message(to, "bench", id=message_id)

    def inject(self) -> None:
        if self.args.scenario == "manual":
            token = Path(self.layout.token_file).read_text().strip()
            node = self.layout.node(self.failed)
            admin = AdminClient(node.host, node.admin_port, token=token)
            admin.post(AdminClient.path("nodes", self.failed, "failover"))
            return
        pid = int((Path(self.layout.directory) / self.failed / "pid").read_text())
        os.kill(pid, signal.SIGKILL if self.args.scenario == "kill" else signal.SIGSTOP)

    async def run(self, step: Step | None = None) -> dict[str, Any]:
        """The whole run in this process; `step` (a worker of a multi-process run) is told
        when the clients are ready and when they switched, and returns when to go on."""
        args = self.args
        served = await self.prepare()
        context = ssl.create_default_context(cafile=self.layout.ca_file)
        cache = SaltedPasswordCache()
        receivers_all = sorted((u for u in served if served[u] == self.failed), key=_index)
        senders_all = sorted((u for u in served if served[u] != self.failed), key=_index)
        shard, shards = args.shard, args.processes if args.shard is not None else 1
        mine = set(receivers_all[shard or 0 :: shards]) | set(senders_all[shard or 0 :: shards])
        clients = {
            user: AioDualClient(
                f"{user}@{self.layout.domain}",
                args.password,
                self.nodes,
                home=node,
                ssl_context=context,
                key_cache=cache,
                on_message=self.on_message,
            )  # fmt: skip
            for user, node in served.items()
            if user in mine
        }
        gate = asyncio.Semaphore(args.concurrency)

        async def start(client: AioDualClient) -> None:
            async with gate:
                await client.start()

        started = time.monotonic()
        await asyncio.gather(*(start(c) for c in clients.values()))
        deadline = time.monotonic() + 120
        while not all(c.core.standby is not None for c in clients.values()):
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        ready_s = time.monotonic() - started
        receivers = [clients[u] for u in receivers_all if u in clients]
        senders = [clients[u] for u in senders_all if u in clients]
        stop = asyncio.Event()
        chats = [asyncio.create_task(self.chat(s, r.jid, stop))
                 for s, r in zip(senders, receivers, strict=False)]  # fmt: skip
        if step is None:
            await asyncio.sleep(args.steady)
            await asyncio.to_thread(self.inject)
        else:
            await step("READY")  # the parent injects the failure once every worker is ready
        failed_at = time.monotonic()
        while time.monotonic() - failed_at < args.deadline:
            if all(len(r.core.downtimes) > 0 for r in receivers):
                break
            await asyncio.sleep(0.05)
        switched_s = time.monotonic() - failed_at
        if step is None:
            if args.scenario == "freeze":
                self.thaw()
        else:
            await step("SWITCHED")
        await asyncio.sleep(args.tail)
        stop.set()
        await asyncio.gather(*chats)
        while time.monotonic() - self.last_arrival < args.drain and self.sent - self.received:
            await asyncio.sleep(0.1)
        first = [r.core.downtimes[0] for r in receivers if r.core.downtimes]
        raw = {
            "users": len(clients),
            "users_failed_over": len(receivers),
            "standbys_ready": sum(
                1
                for c in clients.values()
                if c.core.standby or c.core.switching or c.core.downtimes
            ),  # fmt: skip
            "login_and_standby_s": round(ready_s, 2),
            "downtimes": [d.seconds for d in first if d.seconds is not None],
            "until_active": [d.activated - d.started for d in first if d.activated is not None],
            "switched": len(first),
            "pushed": sum(1 for d in first if d.pushed),
            "all_switched_within_s": round(switched_s, 3),
            "sent": len(self.sent),
            "received": len(self.received & self.sent),
            "duplicated": sum(c.core.duplicates for c in clients.values()),
        }
        await asyncio.gather(*(c.close() for c in clients.values()), return_exceptions=True)
        return raw

    def thaw(self) -> None:
        pid = int((Path(self.layout.directory) / self.failed / "pid").read_text())
        os.kill(pid, signal.SIGCONT)


Step = Callable[[str], Awaitable[None]]


def _index(user: str) -> int:
    digits = user.lstrip("abcdefghijklmnopqrstuvwxyz")
    return int(digits) if digits.isdigit() else 0


def summary(args: argparse.Namespace, parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One JSON object from the raw figures of one or more processes."""

    def total(key: str) -> int:
        return sum(int(part[key]) for part in parts)

    sent, received = total("sent"), total("received")
    return {
        "benchmark": "failover_with_dual_connections",
        "scenario": args.scenario,
        "processes": len(parts),
        "users": total("users"),
        "users_failed_over": total("users_failed_over"),
        "standbys_ready": total("standbys_ready"),
        "login_and_standby_s": max(part["login_and_standby_s"] for part in parts),
        "downtime_s": stats([d for part in parts for d in part["downtimes"]]),
        "until_active_s": stats([d for part in parts for d in part["until_active"]]),
        "switched": total("switched"),
        "pushed": total("pushed"),
        "all_switched_within_s": max(part["all_switched_within_s"] for part in parts),
        "messages": {
            "sent": sent,
            "received": received,
            "lost": sent - received,
            "duplicated": total("duplicated"),
        },  # fmt: skip
        "chat_interval_s": list(args.interval),
        "machine": {
            "nproc": os.cpu_count(),
            "loadavg": Path("/proc/loadavg").read_text().split()[:3],
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        },  # fmt: skip
    }


async def run_workers(args: argparse.Namespace) -> list[dict[str, Any]]:
    """`--processes N`: N worker processes share the users (the load generator's own CPU
    must not be what is measured); this one injects the failure once all are ready."""
    argv = sys.argv[1:]
    workers = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "client_sim",
            *argv,
            "--shard",
            str(shard),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        for shard in range(args.processes)
    ]

    async def all_say(word: str) -> None:
        for worker in workers:
            assert worker.stdout is not None
            line = (await worker.stdout.readline()).decode().strip()
            if line != word:
                raise RuntimeError(f"a bench worker said {line!r}, not {word}")

    def all_go() -> None:
        for worker in workers:
            assert worker.stdin is not None
            worker.stdin.write(b"GO\n")

    bench = Bench(args)
    try:
        await all_say("READY")
        await asyncio.sleep(args.steady)
        await asyncio.to_thread(bench.inject)
        all_go()
        await all_say("SWITCHED")
        if args.scenario == "freeze":
            bench.thaw()
        all_go()
        parts = []
        for worker in workers:
            assert worker.stdout is not None
            parts.append(json.loads(await worker.stdout.read()))
            await worker.wait()
        return parts
    finally:
        for worker in workers:
            if worker.returncode is None:
                worker.kill()


async def worker_step(word: str) -> None:
    """A worker tells the parent where it is (stdout) and waits for its go (stdin)."""
    print(word, flush=True)
    line = await asyncio.to_thread(sys.stdin.readline)
    if line.strip() != "GO":
        raise RuntimeError(f"bench worker: expected GO, got {line!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", default=".xmpp-ha-pair", help="the pair's directory")
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--password", default="password")
    parser.add_argument("--scenario", choices=("kill", "freeze", "manual"), required=True)
    parser.add_argument("--standby-delay", type=float, nargs=2, default=(0.5, 5.0),
                        metavar=("LOW", "HIGH"), help="nodes' client re-login limits, s")  # fmt: skip
    parser.add_argument("--interval", type=float, nargs=2, default=(0.2, 0.5),
                        metavar=("LOW", "HIGH"), help="s between two messages of a sender")  # fmt: skip
    parser.add_argument("--steady", type=float, default=3.0)
    parser.add_argument("--deadline", type=float, default=60.0)
    parser.add_argument("--tail", type=float, default=3.0)
    parser.add_argument("--drain", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="client processes sharing the users (2 cores: the nodes' too)",
    )
    parser.add_argument("--shard", type=int, default=None, help=argparse.SUPPRESS)  # a worker


def main(args: argparse.Namespace) -> int:
    tune_garbage_collector()  # thousands of connections, as in a node
    if args.shard is not None:  # a worker of a multi-process run: raw figures to the parent
        print(json.dumps(asyncio.run(Bench(args).run(worker_step))), flush=True)
        return 0
    if args.processes > 1:
        parts = asyncio.run(run_workers(args))
    else:
        parts = [asyncio.run(Bench(args).run())]
    print(json.dumps(summary(args, parts), indent=2))
    return 0
