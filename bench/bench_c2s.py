"""Benchmark one real node process over c2s: logins, routed messages, idle TLS sessions.

Each subcommand starts `xmpp-ha serve --config` on a fresh SQLite store in a
temporary directory (accounts loaded with `xmpp-ha users import`), drives it
with `client_sim` clients from this process, and prints one JSON object. The
server's CPU time comes from /proc/PID/stat (utime+stime, all threads) and its
RSS from /proc/PID/status, read around each phase; the client's own CPU time
is reported too, to show the client is not the bottleneck.

    python bench/bench_c2s.py login                 # 2,000 SCRAM-SHA-1 logins, 50 at a time
    python bench/bench_c2s.py messages              # 100 and 1,000 sending pairs
    python bench/bench_c2s.py idle                  # 5,000 then 10,000 idle TLS sessions

Every login is the full sequence: TCP, STARTTLS (TLS 1.3), SASL, bind, and
initial presence, counted as done when the server echoes that presence.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import re
import shutil
import signal
import ssl
import subprocess
import sys
import sysconfig
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from client_sim.aio import AioClient, LoginError, login  # noqa: E402
from client_sim.xmpp import MessageReceived, SaltedPasswordCache  # noqa: E402
from xmpp_ha.certs import init_certs  # noqa: E402
from xmpp_ha.net.tls import client_context  # noqa: E402
from xmpp_ha.protocol import ns  # noqa: E402

DOMAIN = "localhost"
PASSWORD = "bench-password"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
TRIM_INTERVAL = 60.0  # xmpp_ha.runtime.node.TRIM_INTERVAL: the node's malloc_trim period
WARMUP_LOGINS = 50
TRACE_FRAMES = 12  # frames kept per tracemalloc trace in a traced node


# --- the node process -----------------------------------------------------------


@dataclass
class NodeProcess:
    process: subprocess.Popen[bytes]
    port: int
    ca_file: Path
    ready_at: float  # time.monotonic() when the node said it was ready
    log_file: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def cpu_seconds(self) -> float:
        """utime + stime of every thread of the node, from /proc/PID/stat."""
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # fields 14 and 15

    def thread_cpu_seconds(self) -> dict[int, float]:
        """utime + stime per thread (the event loop runs in the thread whose id is the pid)."""
        times: dict[int, float] = {}
        for task in os.scandir(f"/proc/{self.pid}/task"):
            try:
                stat = Path(task.path, "stat").read_text()
            except OSError:
                continue  # the thread ended
            fields = stat[stat.rindex(")") + 2 :].split()
            times[int(task.name)] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
        return times

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def open_sockets(self) -> int:
        count = 0
        for fd in os.scandir(f"/proc/{self.pid}/fd"):
            try:
                if os.readlink(fd.path).startswith("socket:"):
                    count += 1
            except OSError:
                pass
        return count

    def warnings(self, limit: int = 5) -> dict[str, int]:
        """The node's WARNING/ERROR log lines, without timestamps and session names, counted."""
        counts: dict[str, int] = {}
        for line in self.log_file.read_text(errors="replace").splitlines():
            if " WARNING " in line or " ERROR " in line:
                text = re.sub(r"^\S+ \S+ ", "", line)  # the timestamp
                text = re.sub(r"user[0-9]+@\S+", "<jid>", text)
                counts[text] = counts.get(text, 0) + 1
        return dict(sorted(counts.items(), key=lambda item: -item[1])[:limit])

    async def snapshot(self) -> Path:
        """A tracemalloc snapshot of a `traced` node (SIGUSR1; see `_traced_node`)."""
        directory = self.log_file.parent
        path = directory / f"snapshot-{len(list(directory.glob('snapshot-*.snap')))}.snap"
        self.process.send_signal(signal.SIGUSR1)
        while not path.exists():
            await asyncio.sleep(0.2)
        return path

    def next_trim_after(self, moment: float) -> float:
        """When the node's periodic malloc_trim next runs after `moment` (monotonic)."""
        periods = math.floor((moment - self.ready_at) / TRIM_INTERVAL) + 1
        return self.ready_at + periods * TRIM_INTERVAL

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _node_env() -> dict[str, str]:
    """The node under test runs this checkout's `xmpp_ha`, whatever is installed."""
    path = os.environ.get("PYTHONPATH", "")
    return {
        **os.environ,
        "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{path}" if path else str(REPO_ROOT),
    }


def _xmpp_ha() -> list[str]:
    script = Path(sys.executable).parent / "xmpp-ha"
    return [str(script)] if script.exists() else [sys.executable, "-m", "xmpp_ha.cli"]


def _toml(sections: dict[str, dict[str, Any]]) -> str:
    lines: list[str] = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {json.dumps(value)}")
        lines.append("")
    return "\n".join(lines)


@contextmanager
def running_node(workdir: Path, users: int, traced: bool = False) -> Iterator[NodeProcess]:
    """A node on a fresh store with `users` accounts; `traced` runs it under tracemalloc."""
    certs = init_certs(workdir / "certs", node_names=["n1"])
    config = workdir / "node.toml"
    config.write_text(
        _toml(
            {
                "node": {"name": "n1", "domain": DOMAIN, "data_dir": str(workdir / "data")},
                "c2s": {"host": "127.0.0.1", "port": 0},
                "store": {"url": f"sqlite+aiosqlite:///{workdir / 'store.db'}"},
                "tls": {
                    "cert_file": str(certs.nodes["n1"].cert_file),
                    "key_file": str(certs.nodes["n1"].key_file),
                    "ca_file": str(certs.ca_file),
                },
            }
        )
    )
    accounts = workdir / "accounts.csv"
    accounts.write_text("".join(f"user{index},{PASSWORD}\n" for index in range(users)))
    subprocess.run(
        [*_xmpp_ha(), "users", "import", str(accounts), "--config", str(config)],
        check=True,
        stdout=subprocess.DEVNULL,
        env=_node_env(),
    )
    ready = workdir / "ready"
    log_file = workdir / "node.log"
    command = [*_xmpp_ha(), "serve", "--config", str(config), "--ready-file", str(ready)]
    if traced:
        command = [
            sys.executable,
            "-X",
            f"tracemalloc={TRACE_FRAMES}",
            __file__,
            "_traced-node",
            "--config",
            str(config),
            "--ready-file",
            str(ready),
        ]
    with log_file.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=_node_env())
    node: NodeProcess | None = None
    try:
        deadline = time.monotonic() + 60
        while not (ready.exists() and ready.read_text().strip()):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the node did not start:\n{log_file.read_text()}")
            time.sleep(0.02)
        node = NodeProcess(
            process, int(ready.read_text()), certs.ca_file, time.monotonic(), log_file
        )
        yield node
    finally:
        if node is not None:
            node.stop()
        elif process.poll() is None:
            process.kill()


class Meter:
    """Server CPU (whole process and per thread), client CPU and wall time of one phase."""

    def __init__(self, node: NodeProcess) -> None:
        self.node = node
        self.server_cpu = self.client_cpu = self.seconds = 0.0
        self.threads: dict[str, float] = {}

    def __enter__(self) -> Meter:
        self._threads = self.node.thread_cpu_seconds()
        self._server = self.node.cpu_seconds()
        self._client = time.process_time()
        self._wall = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._wall
        self.client_cpu = time.process_time() - self._client
        self.server_cpu = self.node.cpu_seconds() - self._server
        after = self.node.thread_cpu_seconds()
        pid = self.node.pid
        loop = after.get(pid, 0.0) - self._threads.get(pid, 0.0)
        others = sum(cpu - self._threads.get(tid, 0.0) for tid, cpu in after.items() if tid != pid)
        self.threads = {"event_loop_thread_s": round(loop, 2), "other_threads_s": round(others, 2)}


@contextmanager
def profiled(node: NodeProcess, output: Path | None, native: bool = False) -> Iterator[None]:
    """Sample the node with py-spy (collapsed stacks, per thread) while the block runs.

    A profiled run is a separate run. Python frames only by default, sampled
    without stopping the node; `native` adds C frames (OpenSSL, SQLite) but
    py-spy then stops the node for every sample, which inflates syscalls.
    """
    if output is None:
        yield
        return
    mode = ["--native"] if native else ["--nonblocking"]
    spy = subprocess.Popen(
        [
            "py-spy",
            "record",
            "--pid",
            str(node.pid),
            "--rate",
            "200",
            "--format",
            "raw",
            "--threads",
            *mode,
            "--output",
            str(output),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)  # attached before the phase starts
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        spy.wait(60)


# Stacks that wait rather than compute: the event loop's epoll, an idle worker
# thread, SQLite's busy handler sleeping on a lock.
_IDLE_FRAMES = (
    "EpollSelector.select",
    "_queue_SimpleQueue_get",
    "Condition.wait",
    "clock_nanosleep",
    "sqlite3InvokeBusyHandler",
)


def _frame_name(frame: str) -> str:
    """'function (file.py:123)' -> 'function (file.py)'; '0x7f.. (libc.so.6)' -> '[libc.so.6]'."""
    name, _, where = frame.partition(" (")
    if name.startswith("0x"):
        return f"[{where.rstrip(')')}]"
    return f"{name} ({re.sub(r':[0-9]+[)]$', ')', where)}" if where else name


# Areas of the server, matched against the innermost frame that fits one (first match wins).
_AREAS = (
    (
        "store: SQLAlchemy + aiosqlite + sqlite3",
        ("sqlalchemy/", "aiosqlite/", "xmpp_ha/store/", "libsqlite3", "greenlet"),
    ),
    ("TLS: ssl.SSLObject (OpenSSL)", ("(ssl.py)", "libssl", "libcrypto")),
    (
        "socket I/O and accept",
        (
            "_SelectorSocketTransport.write",
            "_read_ready__get_buffer",
            "(socket.py)",
            "_accept_connection",
            "sock_",
        ),
    ),
    ("asyncio machinery", ("asyncio/", "selectors.py", "_asynciomodule")),
    ("XML parser/serializer", ("xmpp_ha/protocol/xml.py", "pyexpat", "ElementTree")),
    ("SCRAM/hmac", ("xmpp_ha/protocol/scram.py", "(hmac.py)", "(hashlib")),
    ("other xmpp_ha code", ("xmpp_ha/",)),
)


def _area(frames: list[str]) -> str:
    if not frames:
        return "no Python frame seen (C code between bytecodes: gc, allocator, ...)"
    for frame in reversed(frames):
        for area, markers in _AREAS:
            if any(marker in frame for marker in markers):
                return area
    return "other"


def hotspots(path: Path, top: int) -> dict[str, Any]:
    """Where a py-spy raw profile (`--threads`) spent its busy samples, per thread kind.

    A sample is idle when its stack waits for work (epoll, a queue, a lock,
    SQLite's busy handler); shares are of the busy samples of that kind of
    thread. Scale them by the thread's CPU time (`server_cpu_by_thread`) to
    get a share of the process's CPU.
    """
    kinds: dict[str, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        thread, _, rest = stack.partition(";")
        kind = re.sub(r"^thread \([0-9]+\): (Thread-[0-9]+ )?", "", thread)
        entry = kinds.setdefault(
            kind, {"busy": 0, "idle": 0, "self": {}, "inclusive": {}, "areas": {}}
        )
        if any(marker in rest for marker in _IDLE_FRAMES):
            entry["idle"] += count
            continue
        entry["busy"] += count
        frames = [_frame_name(frame) for frame in rest.split(";") if frame]
        area = _area(frames)
        entry["areas"][area] = entry["areas"].get(area, 0) + count
        if frames:
            entry["self"][frames[-1]] = entry["self"].get(frames[-1], 0) + count
        for frame in set(frames):
            entry["inclusive"][frame] = entry["inclusive"].get(frame, 0) + count

    def table(counts: dict[str, int], busy: int) -> list[str]:
        ordered = sorted(counts.items(), key=lambda item: -item[1])[:top]
        return [f"{100 * count / max(busy, 1):5.1f}%  {name}" for name, count in ordered]

    return {
        kind: {
            "busy_samples": entry["busy"],
            "idle_samples": entry["idle"],
            "areas": table(entry["areas"], entry["busy"]),
            "self": table(entry["self"], entry["busy"]),
            "inclusive": table(entry["inclusive"], entry["busy"]),
        }
        for kind, entry in sorted(kinds.items(), key=lambda item: -item[1]["busy"])
    }


# --- clients --------------------------------------------------------------------------


@dataclass
class Bench:
    node: NodeProcess
    context: ssl.SSLContext
    cache: SaltedPasswordCache

    async def login_many(
        self,
        names: list[str],
        concurrency: int,
        on_message: Callable[[str], Callable[[MessageReceived], None] | None] | None = None,
    ) -> tuple[dict[str, AioClient], list[float], list[str]]:
        """Log `names` in, `concurrency` at a time; returns clients, latencies (s), errors."""
        gate = asyncio.Semaphore(concurrency)
        clients: dict[str, AioClient] = {}
        latencies: list[float] = []
        errors: list[str] = []

        async def one(name: str) -> None:
            async with gate:
                started = time.perf_counter()
                try:
                    clients[name] = await login(
                        "127.0.0.1",
                        self.node.port,
                        f"{name}@{DOMAIN}",
                        PASSWORD,
                        ssl_context=self.context,
                        resource="bench",
                        key_cache=self.cache,
                        on_message=on_message(name) if on_message is not None else None,
                    )
                except (LoginError, OSError, TimeoutError) as exc:
                    errors.append(f"{name}: {exc!r}")
                    return
                latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(one(name) for name in names))
        return clients, latencies, errors

    async def warm_up(self) -> None:
        """One-time costs (imports, caches, first store queries) stay out of the figures."""
        clients, _, errors = await self.login_many(
            [f"user{i}" for i in range(WARMUP_LOGINS)], WARMUP_LOGINS
        )
        if errors:
            raise RuntimeError(f"warm-up logins failed: {errors[:3]}")
        await close_all(clients.values())
        await asyncio.sleep(1.0)


async def close_all(clients: Any) -> None:
    await asyncio.gather(*(client.close() for client in clients))


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def at(fraction: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] * 1000, 1)

    return {"p50": at(0.5), "p95": at(0.95), "p99": at(0.99), "max": round(ordered[-1] * 1000, 1)}


def _machine() -> dict[str, Any]:
    return {
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "openssl": ssl.OPENSSL_VERSION,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        # Other work on the machine competes for the two cores: wall-clock rates
        # (logins/s, messages/s) suffer from it, CPU time per operation much less.
        "loadavg_at_end": Path("/proc/loadavg").read_text().split()[:3],
    }


@contextmanager
def _workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="bench-c2s-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def _bench(node: NodeProcess) -> Bench:
    return Bench(node, client_context(node.ca_file), SaltedPasswordCache())


# --- login ----------------------------------------------------------------------------


async def bench_login(
    users: int, concurrency: int, profile: Path | None, native: bool = False
) -> dict[str, Any]:
    with _workdir() as workdir, running_node(workdir, users) as node:
        bench = await _bench(node)
        await bench.warm_up()
        rss_before = node.rss_kib()
        with profiled(node, profile, native), Meter(node) as meter:
            clients, latencies, errors = await bench.login_many(
                [f"user{i}" for i in range(users)], concurrency
            )
        elapsed, server_cpu, client_cpu = meter.seconds, meter.server_cpu, meter.client_cpu
        rss_after = node.rss_kib()
        done = len(clients)
        await close_all(clients.values())
        node_warnings = node.warnings()
    return {
        "benchmark": "c2s_login",
        "users": users,
        "concurrency": concurrency,
        "mechanism": "SCRAM-SHA-1",
        "logged_in": done,
        "failed": len(errors),
        "errors": errors[:5],
        "seconds": round(elapsed, 3),
        "logins_per_s": round(done / elapsed, 1),
        "server_cpu_s": round(server_cpu, 2),
        "server_cpu_ms_per_login": round(server_cpu * 1000 / max(done, 1), 3),
        "server_cpu_busy": round(server_cpu / elapsed, 2),  # 1.0 = one core saturated
        "server_cpu_by_thread": meter.threads,
        "client_cpu_ms_per_login": round(client_cpu * 1000 / max(done, 1), 3),
        "latency_ms": _percentiles(latencies),
        "server_rss_kib": {"before": rss_before, "after": rss_after},
        "node_warnings": node_warnings,
        "target_server_cpu_ms_per_login": 3.5,
        "machine": _machine(),
    }


# --- messages -------------------------------------------------------------------------


class _Pair:
    __slots__ = ("sender", "to", "sent", "received", "seen", "duplicates", "total", "last")

    def __init__(self, to: str, total: int) -> None:
        self.sender: AioClient | None = None
        self.to = to
        self.sent = 0
        self.received = 0
        self.seen: set[str] = set()
        self.duplicates = 0
        self.total = total


_PADDING = "x" * 140  # a delivered stanza of about 250 bytes


async def _message_run(
    bench: Bench,
    pairs: int,
    per_sender: int,
    window: int,
    stall_timeout: float,
    profile: Path | None,
    native: bool,
) -> dict[str, Any]:
    node = bench.node
    expected = pairs * per_sender
    state = {"received": 0, "progress_at": time.monotonic()}
    finished = asyncio.get_running_loop().create_future()
    by_receiver: dict[str, _Pair] = {}

    def send_next(pair: _Pair) -> None:
        assert pair.sender is not None
        pair.sent += 1
        pair.sender.send_message(pair.to, f"message {pair.sent} {_PADDING}", id=f"m{pair.sent}")

    def receiver(name: str) -> Callable[[MessageReceived], None] | None:
        pair = by_receiver.get(name)
        if pair is None:
            return None

        def on_message(message: MessageReceived) -> None:
            if message.id in pair.seen:
                pair.duplicates += 1
                return
            pair.seen.add(message.id)
            pair.received += 1
            state["received"] += 1
            state["progress_at"] = time.monotonic()
            if pair.sent < pair.total:
                send_next(pair)
            if state["received"] == expected and not finished.done():
                finished.set_result(None)

        return on_message

    for index in range(pairs):
        by_receiver[f"user{2 * index + 1}"] = _Pair(f"user{2 * index + 1}@{DOMAIN}", per_sender)
    names = [f"user{i}" for i in range(2 * pairs)]
    clients, _, errors = await bench.login_many(names, 50, on_message=receiver)
    if errors:
        raise RuntimeError(f"logins failed: {errors[:3]}")
    for index in range(pairs):
        by_receiver[f"user{2 * index + 1}"].sender = clients[f"user{2 * index}"]
    await asyncio.sleep(1.0)  # let the presence storm of the logins settle

    rss_before = node.rss_kib()
    with profiled(node, profile, native), Meter(node) as meter:
        for pair in by_receiver.values():
            for _ in range(min(window, pair.total)):
                send_next(pair)
        while not finished.done():
            await asyncio.wait([finished], timeout=1.0)
            if time.monotonic() - state["progress_at"] > stall_timeout:
                break  # messages were lost: their windows never refill
    elapsed, server_cpu, client_cpu = meter.seconds, meter.server_cpu, meter.client_cpu
    rss_after = node.rss_kib()
    await close_all(clients.values())
    delivered = int(state["received"])
    sent = sum(pair.sent for pair in by_receiver.values())
    return {
        "pairs": pairs,
        "messages_per_sender": per_sender,
        "window": window,
        "sent": sent,
        "delivered": delivered,
        "lost": sent - delivered,
        "duplicates": sum(pair.duplicates for pair in by_receiver.values()),
        "seconds": round(elapsed, 3),
        "messages_per_s": round(delivered / elapsed, 1),
        "server_cpu_s": round(server_cpu, 2),
        "server_cpu_us_per_message": round(server_cpu * 1e6 / max(delivered, 1), 1),
        "server_cpu_busy": round(server_cpu / elapsed, 2),
        "server_cpu_by_thread": meter.threads,
        "client_cpu_us_per_message": round(client_cpu * 1e6 / max(delivered, 1), 1),
        "server_rss_kib": {"before": rss_before, "after": rss_after},
    }


async def bench_messages(
    pair_counts: list[int],
    per_sender: int,
    window: int,
    profile: Path | None,
    native: bool = False,
) -> dict[str, Any]:
    users = 2 * max(pair_counts)
    runs = []
    with _workdir() as workdir, running_node(workdir, max(users, WARMUP_LOGINS)) as node:
        bench = await _bench(node)
        await bench.warm_up()
        for pairs in pair_counts:
            output = profile.with_suffix(f".{pairs}{profile.suffix}") if profile else None
            runs.append(await _message_run(bench, pairs, per_sender, window, 15.0, output, native))
            await asyncio.sleep(2.0)  # the closed sessions' cleanup stays out of the next run
        node_warnings = node.warnings()
    return {
        "benchmark": "c2s_messages",
        "message": "chat to the receiver's bare JID, ~250 bytes as delivered",
        "runs": runs,
        "node_warnings": node_warnings,
        "target_server_cpu_us_per_message": 120,
        "machine": _machine(),
    }


# --- idle sessions --------------------------------------------------------------------


async def _wait_for_trim(node: NodeProcess, settle: float) -> float:
    """Sleep until the node's next malloc_trim has run, at least `settle` s from now."""
    now = time.monotonic()
    trim = node.next_trim_after(now + settle)
    await asyncio.sleep(trim + 3.0 - now)
    return trim


async def _ping_all(clients: list[AioClient]) -> int:
    """Send every session an XEP-0199 ping to the server; count the answers."""
    futures = [
        client.send_iq("get", ET.Element(ns.tag(ns.PING, "ping")), to=DOMAIN)
        for client in clients
        if not client.closed
    ]
    answers = await asyncio.gather(*futures, return_exceptions=True)
    return sum(
        1 for answer in answers if isinstance(answer, ET.Element) and answer.get("type") == "result"
    )


async def bench_idle(
    steps: list[int], concurrency: int, settle: float, traced: bool = False
) -> dict[str, Any]:
    total = max(steps)
    measurements = []
    memory: dict[str, Any] = {}
    with _workdir() as workdir, running_node(workdir, total, traced) as node:
        bench = await _bench(node)
        await bench.warm_up()
        await _wait_for_trim(node, 0.0)
        base_snapshot = await node.snapshot() if traced else None
        rss_base = node.rss_kib()
        sockets_base = node.open_sockets()
        clients: dict[str, AioClient] = {}
        held = held_now = 0
        closed_reasons: dict[str, int] = {}  # sessions the server ended, by condition
        for target in steps:
            names = [f"user{i}" for i in range(held, target)]
            started = time.perf_counter()
            new, _, errors = await bench.login_many(names, concurrency)
            login_seconds = time.perf_counter() - started
            clients.update(new)
            held = target
            await asyncio.sleep(settle)
            rss_settled = node.rss_kib()
            await _wait_for_trim(node, 0.0)
            rss_trimmed = node.rss_kib()
            open_now = held_now = sum(1 for client in clients.values() if not client.closed)
            for client in clients.values():
                if client.closed:
                    reason = client.close_reason
                    key = f"{reason.condition}: {reason.text}" if reason is not None else "closed"
                    closed_reasons[key] = closed_reasons.get(key, 0) + 1
            measurements.append(
                {
                    "sessions": open_now,
                    "login_failures": len(errors),
                    "login_seconds": round(login_seconds, 1),
                    "server_rss_kib": rss_trimmed,
                    "kib_per_session_after_trim": round((rss_trimmed - rss_base) / open_now, 1),
                    "kib_per_session_before_trim": round((rss_settled - rss_base) / open_now, 1),
                    "server_sockets": node.open_sockets() - sockets_base,
                    "closed_so_far": dict(closed_reasons),
                }
            )
            closed_reasons.clear()
        if base_snapshot is not None:
            final = await node.snapshot()
            memory = _memory_by_line(base_snapshot, final, held_now, 30)
        answered = await _ping_all(list(clients.values()))
        client_rss = _own_rss_kib()
        await close_all(clients.values())
        node_warnings = node.warnings()
    if traced:  # RSS figures include tracemalloc's own traces: only the Python heap counts
        return {
            "benchmark": "c2s_idle_sessions_tracemalloc",
            "steps": measurements,
            "node_warnings": node_warnings,
            **memory,
        }
    return {
        "benchmark": "c2s_idle_sessions",
        "server_rss_kib_base": rss_base,
        "steps": measurements,
        "held_at_end": measurements[-1]["sessions"],
        "pings_answered_at_end": answered,
        "client_processes": 1,
        "client_rss_kib": client_rss,
        "node_warnings": node_warnings,
        "target_kib_per_session": 40,
        "machine": _machine(),
    }


def _own_rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _traced_node(config_file: Path, ready_file: Path) -> None:
    """`xmpp-ha serve` in this process, plus a SIGUSR1 handler that dumps a tracemalloc snapshot.

    Run with `python -X tracemalloc=N`. The node is the same code; only its RSS
    is not comparable (tracemalloc keeps a trace per allocation).
    """
    import gc
    import logging
    import tracemalloc

    from xmpp_ha.config import load_config
    from xmpp_ha.runtime.node import Node

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s n1 %(levelname)s %(name)s: %(message)s"
    )

    async def run() -> None:
        node = Node(load_config(config_file))
        dumped = 0

        def dump() -> None:
            nonlocal dumped
            gc.collect()
            partial = ready_file.parent / f"snapshot-{dumped}.part"
            tracemalloc.take_snapshot().dump(str(partial))
            partial.rename(partial.with_suffix(".snap"))
            dumped += 1

        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, dump)
        await node.run(ready_file=ready_file)

    asyncio.run(run())


def _short_path(filename: str) -> str:
    """A file name relative to the repository, site-packages or the standard library."""
    roots = (str(REPO_ROOT) + "/", "/site-packages/", sysconfig.get_paths()["stdlib"] + "/")
    for root in roots:
        if root in filename:
            return filename.rpartition(root)[2]
    return filename


def _memory_by_line(before: Path, after: Path, sessions: int, top: int) -> dict[str, Any]:
    """Python-heap growth per session between two snapshots, by the allocating line.

    The line shown is the innermost frame in xmpp_ha (the server code that
    asked), with the innermost frame of all when it is elsewhere (a library).
    """
    import tracemalloc

    old = tracemalloc.Snapshot.load(str(before))
    new = tracemalloc.Snapshot.load(str(after))
    grouped: dict[str, int] = {}
    for stat in new.compare_to(old, "traceback"):
        frames = list(reversed(stat.traceback))  # the allocating frame first
        own = next((f for f in frames if "/xmpp_ha/" in f.filename), None)
        inner = frames[0]
        where = f"{_short_path(inner.filename)}:{inner.lineno}"
        if own is not None and own is not inner:
            where = f"{_short_path(own.filename)}:{own.lineno} -> {where}"
        grouped[where] = grouped.get(where, 0) + stat.size_diff
    total = sum(grouped.values())
    ordered = sorted(grouped.items(), key=lambda item: -item[1])[:top]
    return {
        "python_heap_kib_per_session": round(total / 1024 / sessions, 2),
        "top_lines_bytes_per_session": [
            f"{size / sessions:8.0f}  {where}" for where, size in ordered
        ],
    }


# --- command line -----------------------------------------------------------------------


def _counts(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    sub = commands.add_parser("login", help="server CPU per login, logins/s")
    sub.add_argument("--users", type=int, default=2000)
    sub.add_argument("--concurrency", type=int, default=50)
    sub.add_argument("--profile", type=Path, help="py-spy raw output file (a separate run)")
    sub.add_argument("--native", action="store_true", help="profile C frames too (see profiled)")
    sub = commands.add_parser("messages", help="server CPU per routed message, messages/s")
    sub.add_argument("--pairs", type=_counts, default=[100, 1000], help="e.g. 100,1000")
    sub.add_argument("--per-sender", type=int, default=100)
    sub.add_argument("--window", type=int, default=10, help="messages in flight per sender")
    sub.add_argument("--profile", type=Path, help="py-spy raw output file (a separate run)")
    sub.add_argument("--native", action="store_true", help="profile C frames too (see profiled)")
    sub = commands.add_parser("idle", help="server RSS per idle TLS session")
    sub.add_argument("--sessions", type=_counts, default=[5000, 10000], help="e.g. 5000,10000")
    sub.add_argument("--concurrency", type=int, default=100)
    sub.add_argument("--settle", type=float, default=5.0, help="idle seconds before measuring")
    sub.add_argument(
        "--tracemalloc",
        action="store_true",
        help="run the node under tracemalloc and report Python-heap growth per session by line",
    )
    sub = commands.add_parser("_traced-node", help=argparse.SUPPRESS)
    sub.add_argument("--config", type=Path, required=True)
    sub.add_argument("--ready-file", type=Path, required=True)
    sub = commands.add_parser("hotspots", help="summarize a py-spy raw profile")
    sub.add_argument("file", type=Path)
    sub.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    if args.command == "login":
        result = asyncio.run(bench_login(args.users, args.concurrency, args.profile, args.native))
    elif args.command == "messages":
        result = asyncio.run(
            bench_messages(args.pairs, args.per_sender, args.window, args.profile, args.native)
        )
    elif args.command == "hotspots":
        result = hotspots(args.file, args.top)
    elif args.command == "_traced-node":
        _traced_node(args.config, args.ready_file)
        return
    else:
        result = asyncio.run(
            bench_idle(sorted(args.sessions), args.concurrency, args.settle, args.tracemalloc)
        )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
