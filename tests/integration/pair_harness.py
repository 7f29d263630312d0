"""A real redundancy pair per test: two node processes, one store, slixmpp clients.

`running_pair(store_url, directory)` prepares and starts a pair as `xmpp-ha up`
does (n1 on 127.0.0.1, n2 on 127.0.0.2, the same free ports on both), with
small SRM timings, on the store the test was given (SQLite, or a fresh
PostgreSQL database: the `store_url` fixture of conftest.py). `HAPair`
then drives it the way an administrator and the operating system would:

- the admin API (`status`, `call`, `wait_states`), blocking calls moved to
  a thread so that clients keep running;
- the node processes (`kill`, `freeze`, `thaw`, `terminate`, `restart`);
- the store (`assignments`, `served_by`, `homes`, `offline_count`, `wait_offline_count`,
  `roster`);
- the node logs (`log`, `transitions`: every SRM state change is logged as
  "SRM n1: <state>/<reason> -> <state>/<reason> on <EVENT>", which is how a
  test sees transition states that last a few milliseconds).

`PairClient` is a slixmpp client that knows both nodes. It follows the RFC
6120 `<see-other-host/>` stream error itself: slixmpp 1.x handles that error
by reconnecting to the address given to `connect()` (its `custom_address`
wins over the redirect), i.e. to the node that refused it. After losing its
session it logs in again by itself (`auto_relogin`), trying the node it was
redirected to first, then both nodes in turn, as a client without dual
connections does, at once by default (`relogin_delay`): it may come back while
its users are still being moved, which the nodes must handle (a node in a
transition refuses or redirects the login).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import re
import signal
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import slixmpp
from slixmpp import JID, Message, Presence
from slixmpp.xmlstream import StanzaBase

from tests.integration.clients import Inbox, Match
from tests.integration.conftest import add_users
from xmpp_ha.admin.client import AdminAPIError, AdminClient, AdminClientError
from xmpp_ha.ha.model import Reason, State
from xmpp_ha.runtime.pair import Pair, PairLayout, default_layout, free_ports, prepare
from xmpp_ha.store.cluster import Assignment, ClusterStore
from xmpp_ha.store.sql import SQLStore

PASSWORD = "pair-secret"
DOMAIN = "localhost"
NODES = ("n1", "n2")
USERS = 8
WAIT = 5.0  # seconds to wait for what should happen at once

# Small SRM timings (SPEC §4): the lease fences a node after timeout - interval
# (2 s) without a renewal, which leaves room for a slow SQLite write.
FAST_PARAMS: dict[str, Any] = {
    "heartbeat_interval": 0.5,
    "heartbeat_timeout": 2.5,
    "initialization_heartbeat_timeout": 4.0,
    "critical_service_down_delay": 1.0,
}

StateSpec = tuple[State, Reason | None]
Expected = StateSpec | Iterable[StateSpec] | None

_TRANSITION = re.compile(r"SRM (\w+): (.+?)/(.+?) -> (.+?)/(.+?) on (\w+)$", re.MULTILINE)


# --- the pair ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Transition:
    node: str
    before: tuple[str, str]
    after: tuple[str, str]
    event: str


class HAPair:
    """A started pair and what a test does to it."""

    def __init__(self, layout: PairLayout, processes: Pair, users: list[str]) -> None:
        self.layout = layout
        self.processes = processes
        self.users = users
        self.directory = Path(layout.directory)
        self.store_url = layout.store_url
        self.token = Path(layout.token_file).read_text().strip()
        self.context = ssl.create_default_context(cafile=layout.ca_file)
        self.clients: list[PairClient] = []
        self.frozen: set[str] = set()

    # --- addresses -----------------------------------------------------------

    def host(self, node: str) -> str:
        return self.layout.node(node).host

    @property
    def c2s_port(self) -> int:
        return self.layout.nodes[0].c2s_port

    @property
    def admin_port(self) -> int:
        return self.layout.nodes[0].admin_port

    @property
    def service_port(self) -> int:
        return self.layout.nodes[0].service_port

    def c2s_addresses(self) -> dict[str, tuple[str, int]]:
        return {node.name: (node.host, node.c2s_port) for node in self.layout.nodes}

    @staticmethod
    def other(node: str) -> str:
        return "n2" if node == "n1" else "n1"

    # --- admin API -----------------------------------------------------------

    def admin(self, node: str, token: str | None = "", timeout: float = 3.0) -> AdminClient:
        """An admin client for `node`; token "" means the pair's token, None none."""
        layout = self.layout.node(node)
        return AdminClient(layout.host, layout.admin_port, self.token if token == "" else token,
                           timeout=timeout)  # fmt: skip

    async def call(
        self, node: str, method: str, path: str, body: Any = None, *, token: str | None = ""
    ) -> tuple[int, Any]:
        """(HTTP status, decoded body or error message) of one admin request."""
        client = self.admin(node, token)
        try:
            result = await asyncio.to_thread(client.request, method, path, body)
        except AdminAPIError as exc:
            return exc.status, exc.message
        return 200, result

    async def act(self, node: str, method: str, path: str, body: Any = None) -> Any:
        """An admin request that must succeed."""
        status, result = await self.call(node, method, path, body)
        assert 200 <= status < 300, f"{method} {path} on {node}: {status} {result}"
        return result

    async def failover(self, node: str) -> None:
        await self.act(node, "POST", AdminClient.path("nodes", node, "failover"))

    async def fallback(self, node: str) -> None:
        await self.act(node, "POST", AdminClient.path("nodes", node, "fallback"))

    async def service(self, node: str, service: str, action: str) -> None:
        await self.act(node, "POST", AdminClient.path("nodes", node, "services", service, action))

    async def status(self, node: str) -> dict[str, Any] | None:
        """`GET /status` of `node`, or None when it does not answer."""
        try:
            result: dict[str, Any] = await asyncio.to_thread(self.admin(node, None).get, "/status")
        except AdminClientError:
            return None
        return result

    async def node_status(self, node: str) -> dict[str, Any]:
        status = await self.status(node)
        assert status is not None, f"{node} does not answer /status\n{self.log_tail(node)}"
        result: dict[str, Any] = status["node"]
        return result

    async def state(self, node: str) -> tuple[str, str] | None:
        status = await self.status(node)
        if status is None:
            return None
        return status["node"]["state"], status["node"]["reason"]

    async def counters(self, node: str) -> dict[str, int]:
        counters: dict[str, int] = (await self.node_status(node))["counters"]
        return counters

    async def wait_states(
        self, expected: Mapping[str, Expected], timeout: float = 15.0
    ) -> dict[str, tuple[str, str] | None]:
        """Wait until every node named is in one of its expected (state, reason)
        pairs (reason None: any); returns what each node reported last."""
        wanted = {node: _specs(spec) for node, spec in expected.items() if spec is not None}
        deadline = time.monotonic() + timeout
        seen: dict[str, tuple[str, str] | None] = {}
        while True:
            for node in wanted:
                seen[node] = await self.state(node)
            if all(_matches(seen[node], specs) for node, specs in wanted.items()):
                return seen
            if time.monotonic() > deadline:
                lines = [
                    f"  {node}: saw {seen[node]}, wanted one of "
                    f"{[(s.value, r.value if r else '*') for s, r in specs]}"
                    for node, specs in wanted.items()
                ]
                raise AssertionError(
                    f"states not reached within {timeout:g} s:\n" + "\n".join(lines)
                    + "".join(f"\n--- {node}.log ---\n{self.log_tail(node)}" for node in NODES)
                )  # fmt: skip
            await asyncio.sleep(0.1)

    async def wait_peer_sees(self, observer: str, node: str, timeout: float = WAIT) -> None:
        """Wait until `observer` heard a heartbeat of `node` as it is now: the peer
        state in `observer`'s status is `node`'s own. After a restart of `node` in
        another state, this says the new incarnation was heard."""
        deadline = time.monotonic() + timeout
        while True:
            seen, own = await self.status(observer), await self.state(node)
            if seen is not None and seen["peer"] is not None and own is not None:
                if (seen["peer"]["state"], seen["peer"]["reason"]) == own:
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"{observer} did not hear {node} ({own}) in {timeout:g} s")
            await asyncio.sleep(0.05)

    async def wait_counter(
        self, node: str, counter: str, value: int, timeout: float = WAIT
    ) -> None:
        deadline = time.monotonic() + timeout
        while True:
            status = await self.status(node)
            current = status["node"]["counters"][counter] if status else None
            if current == value:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{node} {counter} = {current}, wanted {value}")
            await asyncio.sleep(0.1)

    # --- the processes ---------------------------------------------------------

    def process(self, node: str) -> subprocess.Popen[bytes]:
        return self.processes.processes[node]

    def running(self, node: str) -> bool:
        process = self.processes.processes.get(node)
        return process is not None and process.poll() is None

    def kill(self, node: str) -> None:
        """kill -9: no goodbye to anyone."""
        process = self.process(node)
        process.send_signal(signal.SIGKILL)
        process.wait(10)

    def freeze(self, node: str) -> None:
        self.process(node).send_signal(signal.SIGSTOP)
        self.frozen.add(node)

    def thaw(self, node: str) -> None:
        self.process(node).send_signal(signal.SIGCONT)
        self.frozen.discard(node)

    async def terminate(self, node: str, timeout: float = 15.0) -> int:
        """A graceful stop (SIGTERM), waited for; returns the exit code."""
        process = self.process(node)
        process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while process.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"{node} did not stop within {timeout:g} s after SIGTERM")
            await asyncio.sleep(0.05)
        return process.returncode

    async def restart(self, node: str, timeout: float = 30.0) -> None:
        """Start a stopped node again (the same config and store); returns once it is ready."""
        assert not self.running(node), f"{node} is still running"
        self.processes.start_node(node)
        ready = self.directory / node / "ready"
        deadline = time.monotonic() + timeout
        while not (ready.exists() and ready.read_text().strip()):
            if self.process(node).poll() is not None:
                raise AssertionError(f"{node} exited at start:\n{self.log_tail(node)}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{node} not ready in {timeout:g} s:\n{self.log_tail(node)}")
            await asyncio.sleep(0.05)

    # --- logs ------------------------------------------------------------------------

    def log(self, node: str) -> str:
        path = self.directory / f"{node}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def log_tail(self, node: str, lines: int = 40) -> str:
        return "\n".join(self.log(node).splitlines()[-lines:])

    def transitions(self, node: str) -> list[Transition]:
        """Every SRM state change the node logged, in order (restarts included)."""
        return [
            Transition(match[1], (match[2], match[3]), (match[4], match[5]), match[6])
            for match in _TRANSITION.finditer(self.log(node))
            if match[1] == node
        ]

    def entered(self, node: str) -> list[tuple[str, str]]:
        return [t.after for t in self.transitions(node)]

    def log_time(self, node: str, pattern: str) -> float:
        """The time stamp (seconds since the epoch) of the first log line matching `pattern`."""
        compiled = re.compile(pattern)
        for line in self.log(node).splitlines():
            if compiled.search(line):
                stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
                return stamp.timestamp()
        raise AssertionError(f"no line matching {pattern!r} in {node}.log:\n{self.log_tail(node)}")

    async def wait_log(self, node: str, pattern: str, timeout: float = WAIT) -> str:
        """Wait for a log line matching `pattern` (a regex); returns the line."""
        compiled = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            for line in self.log(node).splitlines():
                if compiled.search(line):
                    return line
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no line matching {pattern!r} in {node}.log within {timeout:g} s:\n"
                    f"{self.log_tail(node)}"
                )
            await asyncio.sleep(0.1)

    # --- the store ---------------------------------------------------------------------

    async def assignments(self) -> dict[str, Assignment]:
        cluster = await ClusterStore.open(self.store_url)
        try:
            return await cluster.all_assignments()
        finally:
            await cluster.close()

    async def served_by(self) -> dict[str, set[str]]:
        """node -> users whose current node it is (users of this pair only)."""
        served: dict[str, set[str]] = {node: set() for node in NODES}
        for name, assignment in (await self.assignments()).items():
            if name in self.users and assignment.current_node is not None:
                served.setdefault(assignment.current_node, set()).add(name)
        return served

    async def homes(self) -> dict[str, str]:
        """user -> home node."""
        return {
            name: assignment.home_node or ""
            for name, assignment in (await self.assignments()).items()
        }

    async def users_homed_on(self, node: str) -> list[str]:
        homes = await self.homes()
        return sorted((u for u in self.users if homes.get(u) == node), key=_user_order)

    async def wait_served(self, expected: Mapping[str, set[str]], timeout: float = WAIT) -> None:
        """Wait until the store says exactly these users are served by these nodes."""
        deadline = time.monotonic() + timeout
        while True:
            served = await self.served_by()
            if all(served.get(node, set()) == users for node, users in expected.items()):
                return
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"store assignments {served}, wanted {dict(expected)}"
                    + "".join(f"\n--- {node}.log ---\n{self.log_tail(node)}" for node in NODES)
                )
            await asyncio.sleep(0.1)

    async def offline_count(self, user: str) -> int:
        store = await SQLStore.open(self.store_url)
        try:
            return await store.count_offline(user)
        finally:
            await store.close()

    async def wait_offline_count(self, user: str, expected: int, timeout: float = WAIT) -> None:
        """Until the store holds `expected` offline messages for `user`: a message is on
        its way once its sender's next stanza is answered, stored a moment later."""
        deadline = time.monotonic() + timeout
        while (count := await self.offline_count(user)) != expected:
            if time.monotonic() > deadline:
                raise AssertionError(f"{user} has {count} offline messages, not {expected}")
            await asyncio.sleep(0.05)

    async def roster(self, user: str) -> dict[str, str]:
        """The stored roster: contact -> subscription."""
        store = await SQLStore.open(self.store_url)
        try:
            return {item.contact: str(item.subscription) for item in await store.get_roster(user)}
        finally:
            await store.close()

    # --- clients -----------------------------------------------------------------------

    def client(
        self, user: str, resource: str = "ha", *, auto_relogin: bool = True,
        relogin_delay: float = 0.0,
    ) -> PairClient:  # fmt: skip
        client = PairClient(f"{user}@{DOMAIN}/{resource}", PASSWORD, self.context,
                            self.c2s_addresses(), auto_relogin=auto_relogin,
                            relogin_delay=relogin_delay)  # fmt: skip
        self.clients.append(client)
        return client

    async def login(
        self, user: str, node: str | None = None, *, resource: str = "ha", **options: Any
    ) -> PairClient:
        """A client of `user` with a session (on `node`, else on the user's current node)."""
        client = self.client(user, resource, **options)
        if node is None:
            node = (await self.assignments())[user].current_node or "n1"
        await client.login(node)
        return client

    async def close_clients(self) -> None:
        await asyncio.gather(*(client.close() for client in self.clients),
                             return_exceptions=True)  # fmt: skip


def _specs(spec: StateSpec | Iterable[StateSpec]) -> list[StateSpec]:
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], State):
        return [spec]
    return list(spec)


def _matches(seen: tuple[str, str] | None, specs: list[StateSpec]) -> bool:
    if seen is None:
        return False
    return any(
        seen[0] == state.value and (reason is None or seen[1] == reason.value)
        for state, reason in specs
    )


def _user_order(name: str) -> int:
    digits = name.lstrip("abcdefghijklmnopqrstuvwxyz")
    return int(digits) if digits.isdigit() else 0


@contextlib.asynccontextmanager
async def running_pair(
    store_url: str,
    directory: Path,
    *,
    users: int = USERS,
    params: Mapping[str, Any] | None = None,
    extra: dict[str, dict[str, Any]] | None = None,
    start_nodes: Iterable[str] = NODES,
) -> AsyncIterator[HAPair]:
    """Prepare and start a pair; with both nodes started, both are Normal/Normal
    before the test runs. `start_nodes` leaves the others for `HAPair.restart`."""
    start_nodes = list(start_nodes)
    merged = {**FAST_PARAMS, **(params or {})}
    settings = {"c2s": {"auth_fail_delay": 0.05}, **(extra or {})}
    started: HAPair | None = None
    names = [f"user{i}" for i in range(users)]
    # in-process: prepare() would derive the credentials in a spawned process pool (~2 s)
    await add_users(store_url, names, PASSWORD)
    for attempt in range(3):  # a port taken between the check and the bind: new ports
        c2s, admin, service = free_ports()
        layout = default_layout(directory, c2s_port=c2s, admin_port=admin, service_port=service)
        layout = dataclasses.replace(layout, store_url=store_url)
        await prepare(layout, users=users, password=PASSWORD, params=merged, extra=settings)
        processes = Pair(layout)
        try:
            for node in start_nodes:
                processes.start_node(node)
            for node in start_nodes:
                await asyncio.to_thread(processes.wait_ready, node)
        except RuntimeError:
            await asyncio.to_thread(processes.stop)
            logs = "\n".join(
                path.read_text(errors="replace")[-3000:]
                for path in (directory / f"{n}.log" for n in NODES)
                if path.exists()
            )
            if attempt == 2 or "address already in use" not in logs.lower():
                raise AssertionError(f"the pair did not start:\n{logs}") from None
            continue
        started = HAPair(layout, processes, names)
        break
    assert started is not None
    try:
        if len(start_nodes) == len(NODES):
            normal = (State.NORMAL, Reason.NORMAL)
            await started.wait_states({"n1": normal, "n2": normal}, timeout=15)
        yield started
    finally:
        await started.close_clients()
        for node in list(started.frozen):
            started.thaw(node)
        await asyncio.to_thread(processes.stop)


# --- clients --------------------------------------------------------------------------


class LoginError(AssertionError):
    """A client did not get a session where and when it should have."""


@dataclasses.dataclass
class Attempt:
    node: str
    outcome: str  # session, redirected, refused, timeout, disconnected, auth-failed
    detail: str = ""


class PairClient(slixmpp.ClientXMPP):
    """A slixmpp client of one user that knows both nodes of the pair."""

    def __init__(
        self,
        jid: str,
        password: str,
        context: ssl.SSLContext,
        nodes: dict[str, tuple[str, int]],
        *,
        auto_relogin: bool = True,
        relogin_delay: float = 0.0,
    ) -> None:
        super().__init__(jid, password)
        self.enable_direct_tls = False
        self.ssl_context = context
        self.register_plugin("xep_0199")
        self.nodes = nodes
        self.auto_relogin = auto_relogin
        self.relogin_delay = relogin_delay
        # we follow see-other-host ourselves (see the module docstring)
        self.max_redirects = -1
        self.roster.auto_authorize = None  # type: ignore[assignment]
        self.roster.auto_subscribe = False
        self.node: str | None = None  # where the current session runs
        self.attempts: list[Attempt] = []
        self.sessions: list[str] = []  # node of every session started, in order
        self.redirect: str | None = None  # node named by the last see-other-host
        self.roster_items: dict[str, str] = {}  # contact -> subscription, at the last login
        self.inbox = Inbox(self)  # every element received, until a test takes it
        self._attempting = False
        self._closing = False
        self._relogin_task: asyncio.Task[None] | None = None
        self._session_changed = asyncio.Event()
        self.add_event_handler("stream_error", self._on_stream_error)
        self.add_event_handler("disconnected", self._on_disconnected)

    # --- what arrives ------------------------------------------------------------

    def take(self, match: Match) -> StanzaBase | None:
        return self.inbox.take(match)

    def take_all(self, match: Match) -> list[StanzaBase]:
        return self.inbox.take_all(match)

    async def next(self, match: Match, timeout: float = WAIT, what: str = "") -> StanzaBase:
        return await self.inbox.next(match, timeout, f"{self.boundjid.bare}: {what or 'a stanza'}")

    # --- sessions --------------------------------------------------------------------

    def _node_of(self, other_host: str) -> str | None:
        host, _, port = other_host.rpartition(":")
        for name, address in self.nodes.items():
            if address == (host.strip("[]"), int(port or 0)):
                return name
        return None

    def _on_stream_error(self, error: StanzaBase) -> None:
        if error["condition"] == "see-other-host":
            self.redirect = self._node_of(str(error["see_other_host"]))

    def _on_disconnected(self, _event: Any) -> None:
        if self._attempting:
            return
        if self.node is not None:
            self.node = None
            self._session_changed.set()
        if self.auto_relogin and not self._closing and self._relogin_task is None:
            self._relogin_task = asyncio.ensure_future(self._relogin())

    async def _relogin(self) -> None:
        try:
            await asyncio.sleep(self.relogin_delay)
            await self.login(None, timeout=60)
        except Exception:  # the test waiting for the session reports it
            pass
        finally:
            self._relogin_task = None

    async def _attempt(self, node: str, timeout: float) -> Attempt:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[tuple[str, str]] = loop.create_future()

        def finish(outcome: str, detail: object = "") -> None:
            if not done.done():
                done.set_result((outcome, str(detail or "")))

        handlers: dict[str, Callable[[Any], None]] = {
            "session_start": lambda _e: finish("session"),
            "connection_failed": lambda e: finish("refused", e),
            "failed_all_auth": lambda _e: finish("auth-failed"),
            "disconnected": lambda e: finish("disconnected", e),
        }
        for event, handler in handlers.items():
            self.add_event_handler(event, handler)
        self.redirect = None
        host, port = self.nodes[node]
        self.connect(host, port)
        try:
            outcome, detail = await asyncio.wait_for(asyncio.shield(done), timeout)
        except TimeoutError:
            outcome, detail = "timeout", f"no session within {timeout:g} s"
        finally:
            for event, handler in handlers.items():
                self.del_event_handler(event, handler)
        if outcome != "session":
            self.cancel_connection_attempt()
            await self.drop()
            if self.redirect is not None:
                outcome, detail = "redirected", self.redirect
        return Attempt(node, outcome, detail)

    async def drop(self) -> None:
        """Abort the connection with no goodbye, as a network failure would."""
        if self.transport is None:
            return
        gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def on_gone(_event: Any) -> None:
            if not gone.done():
                gone.set_result(None)

        self.add_event_handler("disconnected", on_gone, disposable=True)
        self.abort()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(gone, 2)

    async def login(
        self, node: str | None, timeout: float = 20.0, attempt_timeout: float = 3.0
    ) -> str:
        """Log in, starting with `node` (None: where we were redirected, else either),
        following redirects; fetch the roster and send presence. Returns the node."""
        order = list(self.nodes)
        candidate = node or self.redirect or (self.sessions[-1] if self.sessions else order[0])
        deadline = time.monotonic() + timeout
        self._attempting = True
        try:
            while True:
                attempt = await self._attempt(candidate, attempt_timeout)
                self.attempts.append(attempt)
                if attempt.outcome == "session":
                    break
                if attempt.outcome == "auth-failed":
                    raise LoginError(f"{self.boundjid.bare}: authentication failed on {candidate}")
                if time.monotonic() > deadline:
                    tried = ", ".join(f"{a.node}:{a.outcome}" for a in self.attempts[-8:])
                    raise LoginError(f"{self.boundjid.bare}: no session in {timeout:g} s ({tried})")
                if attempt.outcome == "redirected" and self.redirect in self.nodes:
                    candidate = self.redirect
                else:
                    candidate = order[(order.index(candidate) + 1) % len(order)]
                    await asyncio.sleep(0.2)
        finally:
            self._attempting = False
        await self._began_session(candidate)
        return candidate

    async def try_login(self, node: str, timeout: float = 3.0) -> Attempt:
        """One login attempt on `node`, redirects not followed."""
        self._attempting = True
        try:
            attempt = await self._attempt(node, timeout)
        finally:
            self._attempting = False
        self.attempts.append(attempt)
        if attempt.outcome == "session":
            await self._began_session(node)
        return attempt

    async def _began_session(self, node: str) -> None:
        self.node = node
        self.sessions.append(node)
        self._session_changed.set()
        roster = await self.get_roster(timeout=WAIT)
        assert roster is not None
        self.roster_items = {
            str(jid): str(item["subscription"]) for jid, item in roster["roster"]["items"].items()
        }
        self.send_presence()

    async def wait_session(self, node: str, *, after: int = 0, timeout: float = 20.0) -> None:
        """Wait for a session on `node` that is at least the (after+1)-th of this client."""
        deadline = time.monotonic() + timeout
        while not (self.node == node and len(self.sessions) > after):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                tried = ", ".join(f"{a.node}:{a.outcome}" for a in self.attempts[-8:])
                raise LoginError(
                    f"{self.boundjid.bare}: no new session on {node} within {timeout:g} s "
                    f"(now on {self.node}, sessions {self.sessions}, attempts {tried})"
                )
            self._session_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._session_changed.wait(), min(remaining, 0.5))

    async def wait_offline(self, timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        while self.node is not None:
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.boundjid.bare}: still connected to {self.node}")
            await asyncio.sleep(0.05)

    async def ping_server(self) -> None:
        """Returns once the server handled everything this client sent before."""
        await self.plugin["xep_0199"].send_ping(JID(DOMAIN), timeout=WAIT)

    def chat(self, to: str, body: str) -> None:
        self.send_message(mto=JID(_bare(to)), mbody=body, mtype="chat")

    async def close(self) -> None:
        self._closing = True
        self.auto_relogin = False
        if self._relogin_task is not None:
            self._relogin_task.cancel()
            await asyncio.gather(self._relogin_task, return_exceptions=True)
        self.cancel_connection_attempt()
        if self.transport is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.disconnect(wait=0.5), 2)
        self.abort()


def _bare(user: str) -> str:
    return user if "@" in user else f"{user}@{DOMAIN}"


# --- matchers ---------------------------------------------------------------------------


def is_message(body: str, sender: str | None = None) -> Match:
    def match(stanza: StanzaBase) -> bool:
        return (
            isinstance(stanza, Message)
            and stanza["type"] != "error"
            and stanza["body"] == body
            and (sender is None or JID(str(stanza["from"])).bare == _bare(sender))
        )

    return match


def is_presence(ptype: str, sender: str) -> Match:
    """`ptype` as slixmpp names it: available, unavailable, subscribe, subscribed, ..."""

    def match(stanza: StanzaBase) -> bool:
        return (
            isinstance(stanza, Presence)
            and stanza["type"] == ptype
            and JID(str(stanza["from"])).bare == _bare(sender)
        )

    return match


def is_delayed(stanza: StanzaBase) -> bool:
    return stanza.xml.find("{urn:xmpp:delay}delay") is not None


async def subscribe(subscriber: PairClient, contact: PairClient) -> None:
    """`subscriber` asks for `contact`'s presence and gets it approved (RFC 6121 §3.1)."""
    contact_bare, subscriber_bare = contact.boundjid.bare, subscriber.boundjid.bare
    subscriber.send_presence(pto=contact_bare, ptype="subscribe")
    await contact.next(is_presence("subscribe", subscriber_bare), what="subscribe")
    contact.send_presence(pto=subscriber_bare, ptype="subscribed")
    await subscriber.next(is_presence("subscribed", contact_bare), what="subscribed")
