"""Locust users with dual connections (client_sim's gevent driver) against a local pair.

Run by `xmpp-ha loadtest` (headless, with the failure on a schedule), or by hand
against a pair from `xmpp-ha up`, with the web UI:

    xmpp-ha up --users 1000 &
    locust -f loadtests/locustfile.py --pair-dir .xmpp-ha-pair --out-dir /tmp/lt \
        --web-host 127.0.0.1
    # start 1,000 users in the UI, then: kill -9 $(cat .xmpp-ha-pair/n1/pid)

Each user takes an account (user0..userN-1, in turn across processes), logs in on
the node that serves it with a standby session on the other (retrying with
back-off while a login fails: Locust ends a user whose on_start raises), and
every `--chat-interval` seconds sends its neighbour (the next account: served by
the same node or the other) a chat message asking for a XEP-0184 receipt; the
neighbour's client answers it, as desktop clients do. Reported to Locust:
- `login` (xmpp): each login, failed ones with the reason;
- `message round trip` (xmpp): a message and its receipt, ms;
- `failover downtime` (failover): one per user per switch, ms, from losing the
  active session (or the server's push) to the first round trip on the new one;
  also fired as the custom event `failover_downtime`.
Each process writes OUT/parts/PID.progress.json every half second (users, ready,
switched, messages) and, once OUT/finish exists (or the test stops), everything
it measured to OUT/parts/PID.json for `loadtests.report`. While OUT/drain exists
users send nothing new, so that what is still on its way arrives.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gevent
from locust import User, events, task
from locust.env import Environment
from locust.event import EventHook
from locust.runners import MasterRunner

from client_sim.aio import LoginError
from client_sim.dual_driver import RECEIPT, RECEIPT_REQUEST
from client_sim.gevent_dual import GeventDualClient, client_context
from client_sim.xmpp import MessageReceived, SaltedPasswordCache
from loadtests.accounts import ACCOUNTS_FILE, load_or_write_accounts

PROGRESS_EVERY = 0.5
LOGIN_BACKOFF = (0.5, 10.0)  # first and longest wait between two login attempts, s

# one per user per switch: (user, ms, pushed); also reported as a Locust request
events.failover_downtime = EventHook()


@events.init_command_line_parser.add_listener
def _arguments(parser: Any) -> None:
    group = parser.add_argument_group("xmpp-ha")
    group.add_argument("--pair-dir", default=".xmpp-ha-pair", env_var="XMPP_HA_PAIR_DIR",
                       help="the pair's directory (from `xmpp-ha up`)")  # fmt: skip
    group.add_argument("--out-dir", default="", env_var="XMPP_HA_OUT_DIR",
                       help="where each process writes what it measured (default: PAIR/loadtest)")  # fmt: skip
    group.add_argument("--chat-interval", default="5 10", env_var="XMPP_HA_CHAT_INTERVAL",
                       help="'LOW HIGH': seconds between two messages of a user")  # fmt: skip
    group.add_argument("--standby-delay", default="0.5 5", env_var="XMPP_HA_STANDBY_DELAY",
                       help="'LOW HIGH': the nodes' client re-login limits for the run, s")  # fmt: skip
    group.add_argument("--account-password", default="password", env_var="XMPP_HA_PASSWORD")


@dataclass
class Measured:
    """What this process measured; merged over processes by `loadtests.report`."""

    sent: list[str] = field(default_factory=list)
    received: list[str] = field(default_factory=list)
    round_trips: list[tuple[float, float]] = field(default_factory=list)  # (wall time, ms)
    downtimes: list[dict[str, Any]] = field(default_factory=list)
    logins: int = 0
    login_failures: int = 0

    def as_json(self, users: list[DualUser]) -> dict[str, Any]:
        return {
            "pid": os.getpid(), "sent": self.sent, "received": self.received,
            "round_trips": self.round_trips, "downtimes": self.downtimes,
            "logins": self.logins, "login_failures": self.login_failures,
            "duplicated": sum(u.client.core.duplicates for u in users if u.client is not None),
            "round_trips_open": sum(len(u.waiting) for u in users),
        }  # fmt: skip


class Run:
    """This process's side of the run: accounts, the shared TLS context, the users."""

    def __init__(self, environment: Environment) -> None:
        options = environment.parsed_options
        self.environment = environment
        self.pair_dir = Path(options.pair_dir)
        self.out = Path(options.out_dir or self.pair_dir / "loadtest")
        (self.out / "parts").mkdir(parents=True, exist_ok=True)
        low, high = (float(x) for x in str(options.standby_delay).split())
        accounts = load_or_write_accounts(self.pair_dir, self.out / ACCOUNTS_FILE, (low, high))
        self.domain: str = accounts["domain"]
        self.served: dict[str, str] = accounts["served"]
        self.names: list[str] = accounts["users"]
        self.nodes = {name: (host, port) for name, (host, port) in accounts["nodes"].items()}
        self.context = client_context(accounts["ca_file"])
        self.password = str(options.account_password)
        self.interval = tuple(float(x) for x in str(options.chat_interval).split())
        self.cache = SaltedPasswordCache()
        self.users: list[DualUser] = []
        self.measured = Measured()
        self.dumped = False

    def claim_account(self) -> int:
        """The next account in turn, over every process of the run (a locked counter)."""
        with open(self.out / "next-account", "a+") as counter:
            fcntl.flock(counter, fcntl.LOCK_EX)
            counter.seek(0)
            index = int(counter.read() or 0)
            counter.seek(0)
            counter.truncate()
            counter.write(str(index + 1))
        return index % len(self.names)

    @property
    def draining(self) -> bool:
        return (self.out / "drain").exists()

    def watch(self) -> None:
        """Report finished switches, write progress; dump everything once told to finish."""
        while True:
            for user in self.users:
                user.report_downtimes()
            self.write_progress()
            if (self.out / "finish").exists():
                self.dump()
            gevent.sleep(PROGRESS_EVERY)

    def write_progress(self) -> None:
        cores = [u.client.core for u in self.users if u.client is not None]
        progress = {
            "users": len(self.users),
            "active": sum(1 for c in cores if c.active is not None),
            "ready": sum(1 for c in cores if c.active is not None and c.standby is not None),
            "switches": sum(sum(1 for d in c.downtimes if d.ended is not None) for c in cores),
            "sent": len(self.measured.sent), "received": len(self.measured.received),
            "login_failures": self.measured.login_failures, "time": time.time(),
        }  # fmt: skip
        _write_json(self.out / "parts" / f"{os.getpid()}.progress.json", progress)

    def dump(self) -> None:
        if not self.dumped:
            self.dumped = True
            _write_json(
                self.out / "parts" / f"{os.getpid()}.json", self.measured.as_json(self.users)
            )


def _write_json(path: Path, data: dict[str, Any]) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(data))
    temporary.replace(path)


RUN: Run | None = None


@events.init.add_listener
def _init(environment: Environment, **_: Any) -> None:
    global RUN
    if not isinstance(environment.runner, MasterRunner):
        RUN = Run(environment)


@events.test_start.add_listener
def _test_start(environment: Environment, **_: Any) -> None:
    if RUN is not None:
        gevent.spawn(RUN.watch)


@events.test_stop.add_listener
def _test_stop(environment: Environment, **_: Any) -> None:
    if RUN is not None:
        for user in RUN.users:
            user.report_downtimes()
        RUN.dump()


@events.failover_downtime.add_listener
def _downtime_as_request(user: str, ms: float, pushed: bool, **_: Any) -> None:
    events.request.fire(request_type="failover", name="failover downtime", response_time=ms,
                        response_length=0, exception=None, context={"pushed": pushed})  # fmt: skip


class DualUser(User):
    """One account with an active and a standby session."""

    def wait_time(self) -> float:
        assert RUN is not None
        return random.uniform(*RUN.interval)

    def on_start(self) -> None:
        assert RUN is not None
        self.run = RUN
        self.client: GeventDualClient | None = None
        self.waiting: dict[str, float] = {}  # message id -> when sent (monotonic)
        self.count = 0
        self.reported = 0
        index = RUN.claim_account()
        self.name = RUN.names[index]
        self.partner = f"{RUN.names[(index + 1) % len(RUN.names)]}@{RUN.domain}"
        RUN.users.append(self)
        self.login()

    def login(self) -> None:
        """Log in until it works (Locust would end a user whose on_start raised)."""
        wait = LOGIN_BACKOFF[0]
        while True:
            client = GeventDualClient(
                f"{self.name}@{self.run.domain}", self.run.password, self.run.nodes,
                home=self.run.served[self.name], ssl_context=self.run.context,
                key_cache=self.run.cache, on_message=self.on_message,
            )  # fmt: skip
            self.client = client  # messages stored for the user arrive during start()
            started = time.perf_counter()
            try:
                client.start()
            except (LoginError, OSError, TimeoutError, gevent.Timeout) as exc:
                self.client = None
                client.close()
                self.run.measured.login_failures += 1
                self.fire("login", started, exc)
                gevent.sleep(wait * random.uniform(0.5, 1.0))
                wait = min(wait * 2, LOGIN_BACKOFF[1])
                continue
            self.run.measured.logins += 1
            self.fire("login", started)
            return

    def on_stop(self) -> None:
        if self.client is not None:
            self.report_downtimes()
            self.client.close()

    @task
    def chat(self) -> None:
        if self.client is None or self.run.draining:
            return
        self.count += 1
        message_id = f"m-{self.name}-{self.count}"
        self.waiting[message_id] = time.monotonic()
        self.run.measured.sent.append(message_id)
        self.client.send_message(self.partner, "load", id=message_id, receipt=True)

    def on_message(self, event: MessageReceived) -> None:
        client = self.client
        if client is None:
            return
        if event.element.find(RECEIPT_REQUEST) is not None:
            self.run.measured.received.append(event.id)
            client.send_receipt(event.sender, of=event.id)
        receipt = event.element.find(RECEIPT)
        if receipt is not None:
            sent = self.waiting.pop(receipt.get("id", ""), None)
            if sent is not None:
                ms = (time.monotonic() - sent) * 1000
                self.run.measured.round_trips.append((time.time(), ms))
                events.request.fire(request_type="xmpp", name="message round trip",
                                    response_time=ms, response_length=0, exception=None)  # fmt: skip

    def report_downtimes(self) -> None:
        """Fire `failover_downtime` for each switch that ended since the last call."""
        if self.client is None:
            return
        downtimes = self.client.core.downtimes
        while self.reported < len(downtimes) and downtimes[self.reported].seconds is not None:
            downtime = downtimes[self.reported]
            seconds = downtime.seconds or 0.0
            self.reported += 1
            wall = time.time() - (time.monotonic() - downtime.started)
            self.run.measured.downtimes.append({
                "user": self.name, "home": self.run.served[self.name], "switch": self.reported,
                "started": wall, "ms": seconds * 1000, "pushed": downtime.pushed,
            })  # fmt: skip
            events.failover_downtime.fire(user=self.name, ms=seconds * 1000, pushed=downtime.pushed)

    def fire(self, name: str, started: float, exception: BaseException | None = None) -> None:
        events.request.fire(request_type="xmpp", name=name, response_length=0,
                            response_time=(time.perf_counter() - started) * 1000,
                            exception=exception)  # fmt: skip
