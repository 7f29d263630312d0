"""Failover of a real local pair, clients without dual connections: downtime per user, lost messages.

A pair as `xmpp-ha up` builds it (n1 on 127.0.0.1, n2 on 127.0.0.2, one
SQLite store, small SRM timings), `--users` accounts split between the nodes
(balanced), and one client connection per user in this process. Partners
homed on n2 send chat messages to the users homed on n1 all along. Then n1
fails (`--scenario`):

- kill:   SIGKILL n1; its clients see their TCP connections close.
- freeze: SIGSTOP n1; its connections stay open, so clients notice with their
          own keepalive (an XEP-0199 ping after `--ping-idle` s without input,
          answered within `--ping-timeout` s). SIGCONT n1 once measured.
- manual: `POST /nodes/n1/failover` on n1's admin API.

A client that lost its session logs in again by itself, one connection at a
time, as a client without dual connections does: first to the other node; it
follows `<see-other-host/>` at once, except to a node that failed it in the
last `--suspect-for` s (the backup still points at the dead node until it has
taken over: the client stays and retries there); after `<system-shutdown/>`
(a node in a transition) it retries the same node; after a refused, silent
(`--login-timeout`) or lost connection it tries the other node. Every retry
but a followed redirect waits `--backoff-min`..`--backoff-max` s, doubled per
consecutive failure up to `--backoff-cap`. Every login is the full sequence
(TCP, STARTTLS, SCRAM-SHA-1, bind, initial presence echoed).

Downtime of a user homed on n1 = from the failure injection to the first
message round trip (to its own full JID) after its re-login. Messages: every
partner message id is registered when written to a live session; received =
distinct ids that arrived (offline delivery at initial presence included);
lost = sent - received once `--drain` s pass without a new arrival, split by
kind: the sender's own connection ended after sending (without XEP-0198 the
sender cannot know what the server took), still in the offline store (the
receiver never recovered, or it is online: a stuck message), or vanished.

The report also gives the server timeline from DIR/n1.log and DIR/n2.log (SRM
transitions, user moves, fencing, peer link) relative to the failure, how long
each node's store lease stood still (read from the store every 0.1 s), the
ERROR lines of both logs, and this process's event-loop lag. With errors in
the logs, the pair directory is kept.

    python bench/bench_failover.py --scenario kill [--users 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import create_async_engine

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from client_sim.aio import AioClient, LoginError, login  # noqa: E402
from client_sim.bench import stats  # noqa: E402
from client_sim.xmpp import (  # noqa: E402
    ClientEvent,
    MessageReceived,
    SaltedPasswordCache,
    StreamErrorReceived,
)
from xmpp_ha.admin.client import AdminClient, AdminClientError  # noqa: E402
from xmpp_ha.net.tls import client_context  # noqa: E402
from xmpp_ha.protocol import ns  # noqa: E402
from xmpp_ha.runtime.pair import Pair, PairLayout, default_layout, free_ports, prepare  # noqa: E402
from xmpp_ha.store.cluster import ClusterStore  # noqa: E402
from xmpp_ha.store.schema import offline_messages  # noqa: E402

DOMAIN = "localhost"
PASSWORD = "bench-password"
RESOURCE = "bench"
PARAMS: dict[str, Any] = {
    "heartbeat_interval": 1,
    "heartbeat_timeout": 3,
    "initialization_heartbeat_timeout": 5,
    "critical_service_down_delay": 2,
}
PROBE_TIMEOUT = 5.0  # a round trip not back by then: the session is not working
_LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) (\w+) (\w+) ([\w.]+): (.*)$")
_TIMELINE = re.compile(r"^SRM \w+: |^moved \d+ users|fencing|peer link (up|down)|lease renewed")


@dataclass(frozen=True)
class Options:
    scenario: str
    users: int
    deadline: float  # s after the failure: users not recovered by then never recovered
    steady: float  # s of messages before the failure
    tail: float  # s of messages after the last recovery
    drain: float  # s without a new message that end the drain
    interval: tuple[float, float]  # s between two messages of one partner
    login_timeout: float
    ping_idle: float
    ping_timeout: float
    backoff: tuple[float, float, float]  # first delay range, cap
    suspect_for: float  # s during which a redirect to a node that failed us is not followed
    receivers: int | None  # users homed on n1 that get messages (None: all)
    concurrency: int  # initial logins at a time
    seed: int
    keep: bool


# --- message accounting ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sent:
    receiver: str
    sender: SimUser
    session: int  # the sender's session number it left on
    at: float  # time.monotonic()


@dataclass
class Tally:
    sent: dict[str, Sent] = field(default_factory=dict)  # by message id
    received: set[str] = field(default_factory=set)
    duplicated: list[str] = field(default_factory=list)  # ids, once per extra copy
    bounced: int = 0
    skipped: int = 0  # sends skipped because the partner had no session

    def arrived(self, message_id: str, receiver: str) -> None:
        record = self.sent.get(message_id)
        if record is None or record.receiver != receiver:
            return
        if message_id in self.received:
            self.duplicated.append(message_id)
        else:
            self.received.add(message_id)

    def lost(self) -> dict[str, Sent]:
        return {mid: record for mid, record in self.sent.items() if mid not in self.received}


# --- one user, one connection at a time -------------------------------------------------


class SimUser:
    """A client without dual connections: one session; on loss, log in again by itself."""

    def __init__(self, bench: Bench, name: str, home: str, current: str) -> None:
        self.bench = bench
        self.name = name
        self.home = home  # node name
        self.jid = f"{name}@{DOMAIN}"
        self.node = current  # the node to try next
        self.client: AioClient | None = None
        self.served_by: str | None = None
        self.failures = 0  # consecutive failed logins
        self.other_host = ""  # from the last see-other-host
        self.suspect: tuple[str, float] | None = None  # (node, until): found dead lately
        self.trace: list[tuple[float, str]] = []  # (time.monotonic(), outcome@node) after it
        self.last_input = 0.0
        self.lost_at: float | None = None  # first loss after the failure
        self.recovered_at: float | None = None
        self.recovered_on: str | None = None
        self.outcomes: Counter[str] = Counter()
        self.sessions = 0
        self._probes: dict[str, asyncio.Future[None]] = {}

    def _note(self, outcome: str, node: str | None) -> None:
        self.outcomes[outcome] += 1
        if self.bench.failed_at is not None:
            self.trace.append((time.monotonic(), f"{outcome}@{node}"))

    @property
    def established(self) -> bool:
        client = self.client
        return client is not None and not client.closed and client.stream.established

    def on_message(self, event: MessageReceived) -> None:
        self.last_input = time.monotonic()
        message_id = event.id
        if event.type == "error":
            if message_id in self.bench.tally.sent:
                self.bench.tally.bounced += 1
        elif message_id in self._probes:
            future = self._probes.pop(message_id)
            if not future.done():
                future.set_result(None)
        else:
            self.bench.tally.arrived(message_id, self.name)

    def on_event(self, event: ClientEvent) -> None:
        if isinstance(event, StreamErrorReceived) and event.condition == "see-other-host":
            self.other_host = event.other_host

    async def run(self) -> None:
        while not self.bench.stopping:
            client = await self._log_in()
            if client is None:
                return
            await self._serve(client)

    async def _log_in(self) -> AioClient | None:
        bench = self.bench
        follow_redirect = False
        while not bench.stopping:
            if not follow_redirect:
                await asyncio.sleep(bench.backoff(self.failures))
            follow_redirect = False
            node = self.node
            self.other_host = ""
            try:
                if bench.failed_at is None:
                    async with bench.login_gate:
                        client = await self._connect(node)
                else:
                    client = await self._connect(node)
            except LoginError as exc:
                self._note(exc.condition, node)
                self.failures += 1
                if exc.condition == "see-other-host" and self.other_host:
                    target = bench.node_at(self.other_host)
                    if self._suspected(target):
                        self._note("redirect-to-suspect-ignored", node)
                    else:
                        self.node = target
                        follow_redirect = target != node
                elif exc.condition != "system-shutdown":
                    self._lost_node(node)
                continue
            except (OSError, TimeoutError) as exc:
                self._note("timeout" if isinstance(exc, TimeoutError) else "refused", node)
                self.failures += 1
                self._lost_node(node)
                continue
            self._note("served", node)
            self.failures = 0
            self.suspect = None
            self.sessions += 1
            self.client, self.served_by = client, node
            return client
        return None

    def _lost_node(self, node: str) -> None:
        """`node` failed us: try the other one, and do not follow redirects back for a while."""
        self.suspect = (node, time.monotonic() + self.bench.options.suspect_for)
        self.node = self.bench.other(node)

    def _suspected(self, node: str) -> bool:
        return (
            self.suspect is not None
            and self.suspect[0] == node
            and (time.monotonic() < self.suspect[1])
        )

    async def _connect(self, node: str) -> AioClient:
        """`client_sim.aio.login`, its events (a see-other-host address) to `on_event`."""
        bench = self.bench
        host, port = bench.c2s[node]
        return await login(
            host, port, self.jid, PASSWORD, ssl_context=bench.context, resource=RESOURCE,
            server_hostname=DOMAIN, timeout=bench.options.login_timeout,
            on_message=self.on_message, on_event=self.on_event, key_cache=bench.key_cache,
        )  # fmt: skip

    async def _serve(self, client: AioClient) -> None:
        bench = self.bench
        closed = asyncio.ensure_future(client.wait_closed())
        self.last_input = time.monotonic()
        try:
            if bench.failed_at is not None and self.home == "n1" and self.recovered_at is None:
                if not await self._round_trip(client, closed):
                    client.abort()
                    self._note("probe-timeout", self.served_by)
            while not client.closed and client.stream.established:
                idle = time.monotonic() - self.last_input
                if idle < bench.options.ping_idle:
                    await asyncio.wait((closed,), timeout=bench.options.ping_idle - idle)
                    continue
                answer = client.send_iq("get", ET.Element(ns.tag(ns.PING, "ping")), to=DOMAIN)
                done, _ = await asyncio.wait(
                    (answer, closed), timeout=bench.options.ping_timeout,
                    return_when=asyncio.FIRST_COMPLETED,
                )  # fmt: skip
                if not done:
                    self._note("keepalive-timeout", self.served_by)
                    client.abort()
                    break
                self.last_input = time.monotonic()
            await closed
        finally:
            closed.cancel()
            self.client = None
        reason = client.close_reason
        condition = reason.condition if reason is not None else "closed"
        self._note(f"lost:{condition}", self.served_by)
        if bench.failed_at is not None and self.lost_at is None:
            self.lost_at = time.monotonic()
        if condition == "see-other-host" and self.other_host:
            self.node = bench.node_at(self.other_host)
        elif condition != "system-shutdown":
            self._lost_node(self.served_by or self.node)

    async def _round_trip(self, client: AioClient, closed: asyncio.Future[None]) -> bool:
        """Our own message back through the node: the user is served again."""
        probe_id = f"probe-{self.name}-{self.sessions}"
        arrived: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._probes[probe_id] = arrived
        client.send_message(client.jid, "probe", id=probe_id)
        done, _ = await asyncio.wait((arrived, closed), timeout=PROBE_TIMEOUT,
                                     return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        self._probes.pop(probe_id, None)
        if arrived not in done:
            return False
        self.recovered_at = time.monotonic()
        self.recovered_on = self.served_by
        return True


# --- the run ------------------------------------------------------------------------


class Bench:
    def __init__(self, options: Options, layout: PairLayout, rng: random.Random) -> None:
        self.options = options
        self.layout = layout
        self.rng = rng
        self.pair = Pair(layout)
        self.c2s = {node.name: (node.host, node.c2s_port) for node in layout.nodes}
        self.context = client_context(layout.ca_file)
        self.key_cache = SaltedPasswordCache()
        self.tally = Tally()
        self.login_gate = asyncio.Semaphore(options.concurrency)
        self.stopping = False
        self.sending = True
        self.failed_at: float | None = None  # time.monotonic() of the injection
        self.failed_at_wall = 0.0
        self.users: list[SimUser] = []
        self.leases: dict[str, list[tuple[float, int | None]]] = {}  # node -> (time, counter)
        self.loop_lags: list[float] = []  # s, after the failure
        self.loadavg_at_start = _loadavg()
        self.code_at_start = _code_version()

    def node_at(self, address: str) -> str:
        host = address.rpartition(":")[0] or address
        return next((name for name, (h, _) in self.c2s.items() if h == host), "n2")

    @staticmethod
    def other(node: str) -> str:
        return "n2" if node == "n1" else "n1"

    def backoff(self, failures: int) -> float:
        low, high, cap = self.options.backoff
        return min(cap, self.rng.uniform(low, high) * 2.0 ** min(failures, 20))

    def admin(self, node: str) -> AdminClient:
        where = self.layout.node(node)
        token = Path(self.layout.token_file).read_text().strip()
        return AdminClient(where.host, where.admin_port, token, timeout=5)

    async def status(self, node: str) -> dict[str, Any] | None:
        try:
            answer: dict[str, Any] = await asyncio.to_thread(self.admin(node).get, "/status")
        except AdminClientError:
            return None
        return answer.get("node")

    async def wait_normal(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            states = [await self.status(node) for node in ("n1", "n2")]
            if all(s is not None and s["state"] == "Normal" for s in states):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the pair is not Normal after {timeout:.0f} s: {states}")
            await asyncio.sleep(0.2)

    async def send_loop(self, sender: SimUser, receiver: SimUser) -> None:
        low, high = self.options.interval
        sequence = 0
        while self.sending:
            await asyncio.sleep(self.rng.uniform(low, high))
            client = sender.client
            if not self.sending:
                break
            if client is None or not sender.established:
                self.tally.skipped += 1
                continue
            sequence += 1
            message_id = f"{sender.name}-{sequence}"
            self.tally.sent[message_id] = Sent(
                receiver.name, sender, sender.sessions, time.monotonic()
            )
            client.send_message(receiver.name + "@" + DOMAIN, f"bench {message_id}", id=message_id)

    def inject(self) -> None:
        process = self.pair.processes["n1"]
        self.failed_at_wall = time.time()
        self.failed_at = time.monotonic()
        if self.options.scenario == "kill":
            process.send_signal(signal.SIGKILL)
        elif self.options.scenario == "freeze":
            process.send_signal(signal.SIGSTOP)

    async def run(self) -> dict[str, Any]:
        options = self.options
        await self.wait_normal()
        store = await ClusterStore.open(self.layout.store_url)
        try:
            assignments = await store.all_assignments()
        finally:
            await store.close()
        self.users = [SimUser(self, name, a.home_node or "n1", a.current_node or "n1")
                      for name, a in sorted(assignments.items())]  # fmt: skip
        homed_n1 = [user for user in self.users if user.home == "n1"]
        partners = [user for user in self.users if user.home == "n2"]
        tasks = [asyncio.create_task(user.run()) for user in self.users]
        tasks.append(asyncio.create_task(self._watch_leases()))
        tasks.append(asyncio.create_task(self._watch_loop()))
        started = time.monotonic()
        while sum(user.established for user in self.users) < len(self.users):
            if time.monotonic() - started > 120:
                raise RuntimeError("the initial logins did not complete within 120 s")
            await asyncio.sleep(0.1)
        initial_login_s = time.monotonic() - started
        senders = [asyncio.create_task(self.send_loop(partners[i % len(partners)], user))
                   for i, user in enumerate(homed_n1[:options.receivers])]  # fmt: skip
        await asyncio.sleep(options.steady)
        if options.scenario == "manual":
            self.failed_at_wall, self.failed_at = time.time(), time.monotonic()
            await asyncio.to_thread(
                self.admin("n1").post, AdminClient.path("nodes", "n1", "failover")
            )
        else:
            self.inject()
        assert self.failed_at is not None
        while any(user.recovered_at is None for user in homed_n1):
            if time.monotonic() - self.failed_at > options.deadline:
                break
            await asyncio.sleep(0.05)
        measured_s = time.monotonic() - self.failed_at
        await asyncio.sleep(options.tail)
        self.sending = False
        for sender in senders:
            sender.cancel()
        await asyncio.gather(*senders, return_exceptions=True)
        await self._drain()
        woken = None
        if options.scenario == "freeze":
            self.pair.processes["n1"].send_signal(signal.SIGCONT)
            woke_at = time.monotonic()
            await asyncio.sleep(5.0)  # the woken n1 must fence, then serve nobody it lost
            after = Counter(what for user in self.users for t, what in user.trace
                            if t >= woke_at and what.startswith(("lost:", "served@")))  # fmt: skip
            woken = {"n1": await self.status("n1"), "n2": await self.status("n2"),
                     "client_events_after_wake": dict(after)}  # fmt: skip
        result = await self._report(homed_n1, partners, measured_s, initial_login_s, woken)
        self.stopping = True
        for user in self.users:
            if user.client is not None:
                user.client.abort()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return result

    async def _watch_leases(self) -> None:
        """Record when each node's store lease advances (the SRM's witness; read-only)."""
        store = await ClusterStore.open(self.layout.store_url)
        try:
            while True:
                for node in ("n1", "n2"):
                    counter = await store.read_lease(node)
                    history = self.leases.setdefault(node, [])
                    if not history or history[-1][1] != counter:
                        history.append((time.monotonic(), counter))
                await asyncio.sleep(0.1)
        finally:
            await store.close()

    async def _watch_loop(self) -> None:
        """How late this process's event loop runs timers: above ~0.1 s the clients lag."""
        while True:
            before = time.monotonic()
            await asyncio.sleep(0.05)
            lag = time.monotonic() - before - 0.05
            if self.failed_at is not None:
                self.loop_lags.append(lag)

    def _lease_gaps(self, node: str) -> dict[str, float] | None:
        """The longest time `node`'s lease stood still after the failure, and when it began."""
        assert self.failed_at is not None
        times = [t for t, _ in self.leases.get(node, [])] + [time.monotonic()]
        gaps = [(b - a, a) for a, b in zip(times, times[1:], strict=False) if b > self.failed_at]
        if not gaps:
            return None
        longest, start = max(gaps)
        return {"longest_still_s": round(longest, 2), "from_s": round(start - self.failed_at, 2)}

    async def _drain(self) -> None:
        """Wait until every sent message arrived, or none arrived for `--drain` s."""
        last_count, last_change = -1, time.monotonic()
        while len(self.tally.received) < len(self.tally.sent):
            if len(self.tally.received) != last_count:
                last_count, last_change = len(self.tally.received), time.monotonic()
            elif time.monotonic() - last_change > self.options.drain:
                return
            await asyncio.sleep(0.1)

    async def _report(
        self, homed_n1: list[SimUser], partners: list[SimUser], measured_s: float,
        initial_login_s: float, woken: dict[str, Any] | None,
    ) -> dict[str, Any]:  # fmt: skip
        assert self.failed_at is not None
        failed_at = self.failed_at
        deadline = failed_at + self.options.deadline
        recovered = [
            u for u in homed_n1 if u.recovered_at is not None and u.recovered_at <= deadline
        ]
        downtimes = [u.recovered_at - failed_at for u in recovered if u.recovered_at]
        detected = [u.lost_at - failed_at for u in homed_n1 if u.lost_at is not None]
        timeline = [entry for node in ("n1", "n2") for entry in self._timeline(node)]
        timeline.sort(key=lambda entry: float(entry[0]))
        moved_at = next((float(t) for t, node, text in timeline
                         if node == "n2" and text.startswith("moved")), None)  # fmt: skip
        after_move = [d - moved_at for d in downtimes] if moved_at is not None else []
        tally = self.tally
        lost = tally.lost()
        stored = await self._offline_stored()
        outcomes: Counter[str] = Counter()
        for user in homed_n1:
            outcomes.update(user.outcomes)
        store = await ClusterStore.open(self.layout.store_url)
        try:
            names = {user.name for user in homed_n1}
            serving = Counter(a.current_node for name, a in (await store.all_assignments()).items()
                              if name in names)  # fmt: skip
        finally:
            await store.close()
        sent = len(tally.sent)
        back = {user.name for user in recovered}
        kinds = {mid: self._loss_kind(record, mid in stored, back) for mid, record in lost.items()}
        samples = [mid for kind in sorted(set(kinds.values()))
                   for mid in [m for m, k in kinds.items() if k == kind][:2]]  # fmt: skip
        return {
            "benchmark": "failover_without_dual_connections",
            "scenario": self.options.scenario,
            "users": len(self.users),
            "users_on_n1": len(homed_n1),
            "params": PARAMS,
            "initial_login_s": round(initial_login_s, 2),
            "downtime_s": stats(downtimes, 3),
            "recovered": len(recovered),
            "never_recovered": len(homed_n1) - len(recovered),
            "deadline_s": self.options.deadline,
            "measured_for_s": round(measured_s, 3),
            "recovered_on": dict(Counter(u.recovered_on for u in recovered)),
            "disconnect_seen_s": stats(detected, 3),
            "n2_moved_users_at_s": moved_at,
            "downtime_after_move_s": stats(after_move, 3),
            "login_outcomes_n1_users": dict(sorted(outcomes.items())),
            "n1_users_served_by_after": {str(k): v for k, v in serving.items()},
            "partner_sessions_lost": sum(max(0, p.sessions - 1) for p in partners),
            "partner_outcomes": dict(
                sorted(sum((p.outcomes for p in partners), Counter()).items())
            ),
            "client_cpu_s": round(time.process_time(), 1),
            "client_loop_lag_s": stats(self.loop_lags, 3),
            "messages": {
                "sent": sent,
                "received": len(tally.received),
                "lost": len(lost),
                "lost_by_kind": dict(Counter(kinds.values())),
                "duplicated": len(tally.duplicated),
                "bounced": tally.bounced,
                "not_sent_partner_offline": tally.skipped,
                "receivers_with_losses": len({record.receiver for record in lost.values()}),
                "lost_samples": [
                    {"kind": kinds[mid], **self._lost_sample(mid, lost[mid], stored.get(mid))}
                    for mid in samples
                ],
                "duplicate_samples": [
                    self._lost_sample(mid, tally.sent[mid], stored.get(mid))
                    for mid in tally.duplicated[:3]
                ],
            },
            "lease_still": {node: self._lease_gaps(node) for node in ("n1", "n2")},
            "after_wake": woken,
            "server_timeline": [[t, node, text] for t, node, text in timeline][:40],
            "server_errors": {node: self._errors(node) for node in ("n1", "n2")},
            "options": {k: v for k, v in vars(self.options).items() if k != "keep"},
            "code_at_start": self.code_at_start,  # a commit between start and end: discard the run
            "machine": _machine(self.loadavg_at_start),
        }

    async def _offline_stored(self) -> dict[str, float | None]:
        """Message id -> when it was stored (XEP-0203 stamp, s after the failure), still stored."""
        engine = create_async_engine(self.layout.store_url)
        try:
            async with engine.connect() as connection:
                rows = (await connection.execute(select(offline_messages.c.stanza))).all()
        finally:
            await engine.dispose()
        stored: dict[str, float | None] = {}
        for (text,) in rows:
            stanza = ET.fromstring(text)
            stamp = stanza.find(ns.tag(ns.DELAY, "delay"))
            when = None
            if stamp is not None:
                moment = datetime.strptime(stamp.get("stamp", ""), "%Y-%m-%dT%H:%M:%S.%fZ")
                when = round(moment.replace(tzinfo=UTC).timestamp() - self.failed_at_wall, 3)
            stored[stanza.get("id", "")] = when
        return stored

    @staticmethod
    def _loss_kind(record: Sent, stored: bool, recovered: set[str]) -> str:
        receiver_back = record.receiver in recovered
        if stored:
            return "stuck_offline_user_online" if receiver_back else "offline_user_not_recovered"
        if record.sender.sessions != record.session or not record.sender.established:
            return "sender_connection_ended"  # without XEP-0198 the sender cannot tell
        return "vanished"

    def _lost_sample(self, message_id: str, record: Sent, stored: float | None) -> dict[str, Any]:
        assert self.failed_at is not None
        receiver = next(user for user in self.users if user.name == record.receiver)
        return {
            "id": message_id,
            "to": record.receiver,
            "sent_at_s": round(record.at - self.failed_at, 3),
            "sender_session_ended": record.sender.sessions != record.session,
            "stored_offline_at_s": stored,
            "receiver_trace_s": [
                [round(t - self.failed_at, 3), what] for t, what in receiver.trace
            ],
            "sender_trace_s": [
                [round(t - self.failed_at, 3), what] for t, what in record.sender.trace
            ],
        }

    def _log_lines(self, node: str) -> list[tuple[float, str, str, str]]:
        """(epoch seconds, level, logger, message) of every line of DIR/node.log."""
        path = Path(self.layout.directory, f"{node}.log")
        lines = []
        for line in path.read_text(errors="replace").splitlines():
            match = _LOG_LINE.match(line)
            if match:
                stamp = time.mktime(time.strptime(match[1], "%Y-%m-%d %H:%M:%S"))
                lines.append((stamp + int(match[2]) / 1000, match[4], match[5], match[6]))
            elif lines and line.strip():
                epoch, level, logger, text = lines[-1]  # a traceback continues the record
                lines[-1] = (epoch, level, logger, f"{text}\n{line}")
        return lines

    def _timeline(self, node: str) -> list[tuple[str, str, str]]:
        start = self.failed_at_wall - 0.5
        return [(f"{epoch - self.failed_at_wall:.3f}", node, text.splitlines()[0])
                for epoch, _, _, text in self._log_lines(node)
                if epoch >= start and _TIMELINE.search(text)]  # fmt: skip

    def _errors(self, node: str) -> dict[str, Any]:
        bad = [(epoch, level, logger, text) for epoch, level, logger, text in self._log_lines(node)
               if level in ("ERROR", "CRITICAL") or "Traceback" in text]  # fmt: skip
        return {"count": len(bad), "first": [
            f"{epoch - self.failed_at_wall:+.3f} {level} {logger}: {text[:600]}"
            for epoch, level, logger, text in bad[:3]]}  # fmt: skip


def _loadavg() -> list[str]:
    return Path("/proc/loadavg").read_text().split()[:3]


def _code_version() -> str:
    """The commit the nodes run, with '+dirty' when xmpp_ha/ or client_sim/ has local changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        changes = subprocess.run(
            ["git", "status", "--porcelain", "xmpp_ha", "client_sim"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if changes else "")


def _machine(loadavg_at_start: list[str]) -> dict[str, Any]:
    return {
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "openssl": ssl.OPENSSL_VERSION,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        # other work on the machine competes for the two cores with both nodes and the clients
        "loadavg_at_start": loadavg_at_start,
        "code_at_end": _code_version(),
        "loadavg_at_end": _loadavg(),
    }


async def main_async(options: Options, directory: Path) -> dict[str, Any]:
    rng = random.Random(options.seed)
    c2s_port, admin_port, service_port = free_ports()
    layout = default_layout(directory, c2s_port=c2s_port, admin_port=admin_port,
                            service_port=service_port)  # fmt: skip
    await prepare(layout, users=options.users, password=PASSWORD, params=PARAMS)
    bench = Bench(options, layout, rng)
    await asyncio.to_thread(bench.pair.start)
    try:
        return await bench.run()
    finally:
        n1 = bench.pair.processes.get("n1")
        if n1 is not None and n1.poll() is None:
            n1.send_signal(signal.SIGCONT)
        await asyncio.to_thread(bench.pair.stop)


def parse_args(argv: Sequence[str] | None = None) -> tuple[Options, Path | None]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--scenario", choices=("kill", "freeze", "manual"), required=True)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--deadline", type=float, default=60.0)
    parser.add_argument("--steady", type=float, default=3.0)
    parser.add_argument("--tail", type=float, default=3.0)
    parser.add_argument("--drain", type=float, default=5.0)
    parser.add_argument("--interval-min", type=float, default=0.2)
    parser.add_argument("--interval-max", type=float, default=0.5)
    parser.add_argument("--login-timeout", type=float, default=15.0)
    parser.add_argument("--ping-idle", type=float, default=1.0)
    parser.add_argument("--ping-timeout", type=float, default=2.0)
    parser.add_argument("--backoff-min", type=float, default=0.05)
    parser.add_argument("--backoff-max", type=float, default=0.1)
    parser.add_argument("--backoff-cap", type=float, default=2.0)
    parser.add_argument("--suspect-for", type=float, default=10.0)
    parser.add_argument("--receivers", type=int, help="n1 users that get messages (default all)")
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--dir", type=Path, help="pair directory (kept); default a temporary one")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    options = Options(
        scenario=args.scenario, users=args.users, deadline=args.deadline, steady=args.steady,
        tail=args.tail, drain=args.drain, interval=(args.interval_min, args.interval_max),
        login_timeout=args.login_timeout, ping_idle=args.ping_idle, ping_timeout=args.ping_timeout,
        backoff=(args.backoff_min, args.backoff_max, args.backoff_cap),
        suspect_for=args.suspect_for, receivers=args.receivers, concurrency=args.concurrency,
        seed=args.seed, keep=args.keep or args.dir is not None,
    )  # fmt: skip
    return options, args.dir


def main(argv: Sequence[str] | None = None) -> int:
    options, directory = parse_args(argv)
    if options.users < 2:
        raise SystemExit("--users must be at least 2")
    if directory is not None and directory.exists() and any(directory.iterdir()):
        raise SystemExit(f"{directory} is not empty: the pair must start from a fresh store")
    workdir = directory or Path(tempfile.mkdtemp(prefix="bench-failover-"))
    result: dict[str, Any] = {}
    try:
        result = asyncio.run(main_async(options, workdir))
    finally:
        errors = sum(v["count"] for v in result.get("server_errors", {}).values())
        if options.keep or errors or not result:
            print(f"pair directory kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
