"""`xmpp-ha loadtest`: a pair, Locust users with dual connections, a failover and a fallback.

    xmpp-ha loadtest --users 1000 --scenario kill --out lt-1000-kill

1. A fresh pair in OUT/pair (free ports; heartbeat 1 s, timeout 3 s, so that a
   dead node is seen within seconds) with accounts user0..userN-1.
2. Locust, headless, on `loadtests/locustfile.py`: N users ramp up (`--spawn-rate`
   per second, logins retried with back-off), each with an active session on the
   node serving it and a standby on the other, chatting (message + receipt);
   several Locust processes above 2,500 users (see `default_processes`).
3. Once every user has both sessions, and `--steady` seconds later, n1 fails:
   kill (SIGKILL), freeze (SIGSTOP, SIGCONT once every user of n1 switched) or
   manual (`POST /nodes/n1/failover` on the admin API).
4. Fallback: n1 runs again (restarted after a kill), its users open standby
   sessions on it, and `POST /nodes/n1/fallback` moves them home.
5. Users stop sending; what is on its way arrives (`--drain`); Locust and the
   pair stop. OUT/summary.json, OUT/report.html (downtime histogram, round
   trips per second across the failover) and CSV files are written.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loadtests.accounts import ACCOUNTS_FILE, write_accounts

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
DESCRIPTORS_PER_PROCESS = 18_000  # of the 20,000 allowed, room for files and the master link
USERS_PER_PROCESS = 2_500
PAIR_PARAMS = {"heartbeat_interval": 1, "heartbeat_timeout": 3,
               "initialization_heartbeat_timeout": 5, "critical_service_down_delay": 2}  # fmt: skip
FAILED = "n1"


def default_processes(users: int) -> int:
    """Locust processes for `users`: enough descriptors (2 per user, 20,000 per process),
    and one per USERS_PER_PROCESS up to the cores, since one gevent process is saturated by
    a switch of about that many users (5,000 kill -9 here: p99 2.2-3.7 s in one process,
    1.4-1.6 s in two)."""
    for_descriptors = -(-2 * users // DESCRIPTORS_PER_PROCESS)
    for_cpu = min(os.cpu_count() or 1, -(-users // USERS_PER_PROCESS))
    return max(1, for_descriptors, for_cpu)


class LoadTestError(RuntimeError):
    pass


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--users", type=int, default=1000, help="simulated users (1000)")
    parser.add_argument("--scenario", choices=("kill", "freeze", "manual"), required=True,
                        help="how n1 fails: SIGKILL, SIGSTOP, or manual failover (admin API)")  # fmt: skip
    parser.add_argument("--out", required=True, help="directory for the report (made fresh)")
    parser.add_argument("--processes", type=int, default=0,
                        help="Locust processes (default: 2 descriptors per user, 20,000 per "
                             "process, and one per 2,500 users up to the cores)")  # fmt: skip
    parser.add_argument("--spawn-rate", type=float, default=100.0, help="users started per s")
    parser.add_argument("--chat-interval", nargs=2, type=float, default=(5.0, 10.0),
                        metavar=("LOW", "HIGH"), help="s between two messages of a user (5 10)")  # fmt: skip
    parser.add_argument("--standby-delay", nargs=2, type=float, default=(0.5, 5.0),
                        metavar=("LOW", "HIGH"), help="nodes' client re-login limits, s (0.5 5)")  # fmt: skip
    parser.add_argument("--steady", type=float, default=10.0,
                        help="s of chat with every user ready before n1 fails (10)")  # fmt: skip
    parser.add_argument("--settle", type=float, default=10.0,
                        help="s of chat after each switch (10)")  # fmt: skip
    parser.add_argument("--drain", type=float, default=5.0,
                        help="s without a new arrival before counting losses (5)")  # fmt: skip
    parser.add_argument("--no-fallback", action="store_true", help="leave the pair failed over")
    parser.add_argument("--password", default="password")


def main(args: argparse.Namespace) -> int:
    try:
        summary = LoadTest(args).run()
    except LoadTestError as exc:
        print(f"xmpp-ha loadtest: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary["headline"], indent=2))
    print(f"report: {Path(args.out) / 'report.html'}")
    return 0


class LoadTest:
    def __init__(self, args: argparse.Namespace) -> None:
        from xmpp_ha.runtime.pair import Pair, default_layout, free_ports

        self.args = args
        self.out = Path(args.out).resolve()
        if self.out.exists() and any(self.out.iterdir()):
            raise LoadTestError(f"{self.out} is not empty: give a new directory")
        c2s, admin, service = free_ports()
        self.layout = default_layout(self.out / "pair", c2s_port=c2s, admin_port=admin,
                                     service_port=service)  # fmt: skip
        self.pair = Pair(self.layout)
        self.locust: subprocess.Popen[bytes] | None = None
        self.marks: list[dict[str, Any]] = []  # what was done when (wall time)
        self.processes = args.processes or default_processes(args.users)

    def say(self, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)

    def mark(self, what: str) -> None:
        self.marks.append({"what": what, "time": time.time()})
        self.say(what)

    def run(self) -> dict[str, Any]:
        from xmpp_ha.runtime.pair import prepare_sync

        args = self.args
        self.out.mkdir(parents=True, exist_ok=True)
        self.say(f"preparing a pair with {args.users} accounts in {self.layout.directory}")
        prepare_sync(self.layout, users=args.users, password=args.password, params=PAIR_PARAMS)
        try:
            self.pair.start()
            self.wait_for(lambda: self.states() == {"n1": "Normal", "n2": "Normal"},
                          60, "both nodes Normal")  # fmt: skip
            write_accounts(Path(self.layout.directory), self.out / ACCOUNTS_FILE,
                           tuple(args.standby_delay))  # fmt: skip
            served = json.loads((self.out / ACCOUNTS_FILE).read_text())["served"]
            moved = sum(1 for node in served.values() if node == FAILED)
            self.start_locust()
            self.mark(f"{args.users} users starting ({self.processes} Locust process(es))")
            ramp = 60 + 2 * args.users / min(args.spawn_rate, 200)
            self.wait_for(lambda: self.progress()["ready"] >= args.users, ramp,
                          "every user logged in with a standby session")  # fmt: skip
            self.mark("every user has both sessions")
            time.sleep(args.steady)
            self.fail_n1()
            self.wait_for(lambda: self.progress()["switches"] >= moved, 60,
                          f"the {moved} users of n1 switched")  # fmt: skip
            self.mark(f"the {moved} users of n1 switched")
            if args.scenario == "freeze":
                os.kill(self.node_pid(FAILED), signal.SIGCONT)
                self.mark("n1 thawed (SIGCONT)")
            time.sleep(args.settle)
            if not args.no_fallback:
                self.fall_back(moved)
                time.sleep(args.settle)
            self.drain()
        finally:
            self.stop()
        from loadtests import report

        summary = report.write(self.out, marks=self.marks, meta=self.meta(moved))
        return summary

    # --- the pair --------------------------------------------------------------------------

    def admin(self, node: str) -> Any:
        from xmpp_ha.admin.client import AdminClient

        layout = self.layout.node(node)
        token = Path(self.layout.token_file).read_text().strip()
        return AdminClient(layout.host, layout.admin_port, token=token, timeout=5)

    def states(self) -> dict[str, str]:
        from xmpp_ha.admin.client import AdminClientError

        states = {}
        for node in self.layout.nodes:
            try:
                states[node.name] = self.admin(node.name).get("/status")["node"]["state"]
            except AdminClientError:
                states[node.name] = "unreachable"
        return states

    def node_pid(self, name: str) -> int:
        return int((Path(self.layout.directory) / name / "pid").read_text())

    def fail_n1(self) -> None:
        from xmpp_ha.admin.client import AdminClient

        scenario = self.args.scenario
        if scenario == "manual":
            self.mark("n1: manual failover (admin API)")
            self.admin(FAILED).post(AdminClient.path("nodes", FAILED, "failover"))
        else:
            self.mark(f"n1: {'SIGKILL' if scenario == 'kill' else 'SIGSTOP'}")
            os.kill(self.node_pid(FAILED), signal.SIGKILL if scenario == "kill" else signal.SIGSTOP)

    def fall_back(self, moved: int) -> None:
        from xmpp_ha.admin.client import AdminClient, AdminClientError

        if self.args.scenario == "kill":
            self.pair.start_node(FAILED)
            self.pair.wait_ready(FAILED)
            self.mark("n1 restarted")

        def fallback_allowed() -> bool:
            try:
                status = self.admin(FAILED).get("/status")["node"]
            except AdminClientError:
                return False
            return "fallback" in status.get("allowed_actions", [])

        self.wait_for(fallback_allowed, 60, "n1 ready for a fallback")
        self.wait_for(lambda: self.progress()["ready"] >= self.args.users, 60,
                      "every user with a standby session again")  # fmt: skip
        before = self.progress()["switches"]
        self.mark("n1: fallback (admin API)")
        self.admin(FAILED).post(AdminClient.path("nodes", FAILED, "fallback"))
        self.wait_for(lambda: self.progress()["switches"] >= before + moved, 60,
                      f"the {moved} users of n1 back home")  # fmt: skip
        self.mark(f"the {moved} users of n1 back home")

    # --- Locust ----------------------------------------------------------------------------

    def start_locust(self) -> None:
        args = self.args
        command = [
            sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
            "-u", str(args.users), "-r", str(args.spawn_rate), "--run-time", "3h",
            "--stop-timeout", "5", "--csv", str(self.out / "locust"),
            "--html", str(self.out / "locust.html"), "--loglevel", "WARNING", "--only-summary",
            "--pair-dir", self.layout.directory, "--out-dir", str(self.out),
            "--chat-interval", " ".join(map(str, args.chat_interval)),
            "--standby-delay", " ".join(map(str, args.standby_delay)),
            "--account-password", args.password,
        ]  # fmt: skip
        if self.processes > 1:
            from xmpp_ha.runtime.pair import free_ports

            port = free_ports(("127.0.0.1",))[0]
            command += ["--processes", str(self.processes), "--master-bind-host", "127.0.0.1",
                        "--master-bind-port", str(port), "--master-host", "127.0.0.1",
                        "--master-port", str(port)]  # fmt: skip
        log = (self.out / "locust.log").open("ab")
        self.locust = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                       cwd=self.out, start_new_session=True)  # fmt: skip

    def progress(self) -> dict[str, float]:
        """The Locust processes' progress files, summed."""
        total: dict[str, float] = {"users": 0, "ready": 0, "switches": 0, "sent": 0,
                                   "received": 0, "processes": 0}  # fmt: skip
        for path in (self.out / "parts").glob("*.progress.json"):
            try:
                part = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            total["processes"] += 1
            for key in ("users", "ready", "switches", "sent", "received"):
                total[key] += part.get(key, 0)
        return total

    def drain(self) -> None:
        (self.out / "drain").touch()
        self.mark("users stop sending")
        last, quiet_since = -1.0, time.monotonic()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            progress = self.progress()
            if progress["received"] != last:
                last, quiet_since = progress["received"], time.monotonic()
            elif progress["received"] >= progress["sent"] or \
                    time.monotonic() - quiet_since > self.args.drain:  # fmt: skip
                break
            time.sleep(0.5)
        (self.out / "finish").touch()
        processes = self.progress()["processes"]
        self.wait_for(lambda: len(list((self.out / "parts").glob("[0-9]*[0-9].json"))) >= processes,
                      30, "every Locust process's measurements")  # fmt: skip

    def wait_for(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.locust is not None and self.locust.poll() is not None:
                raise LoadTestError(f"Locust exited ({self.locust.returncode}) waiting for {what}: "
                                    f"see {self.out / 'locust.log'}")  # fmt: skip
            if time.monotonic() > deadline:
                raise LoadTestError(f"no {what} within {timeout:.0f} s (progress: "
                                    f"{self.progress()}; logs in {self.out})")  # fmt: skip
            time.sleep(0.2)

    def stop(self) -> None:
        if self.locust is not None and self.locust.poll() is None:
            self.locust.send_signal(signal.SIGTERM)
            try:
                self.locust.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.locust.pid, signal.SIGKILL)
                self.locust.wait()
        if self.args.scenario == "freeze":
            try:
                os.kill(self.node_pid(FAILED), signal.SIGCONT)
            except (OSError, ValueError):
                pass
        self.pair.stop()

    def meta(self, moved: int) -> dict[str, Any]:
        args = self.args
        return {
            "scenario": args.scenario, "users": args.users, "users_of_n1": moved,
            "processes": self.processes, "chat_interval_s": list(args.chat_interval),
            "standby_delay_s": list(args.standby_delay), "fallback": not args.no_fallback,
            "machine": {"nproc": os.cpu_count(), "loadavg": os.getloadavg(),
                        "date": time.strftime("%Y-%m-%d %H:%M:%S %z")},
        }  # fmt: skip
