"""client_sim's dual-connection client on a real pair: users homed on n1 keep a standby on
n2, partners on n2 chat to them all along, n1 fails (kill -9, or a manual failover); each
user switches to its standby, and every message arrives exactly once."""

from __future__ import annotations

import asyncio
import itertools
import json
import ssl
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from client_sim.aio_dual import AioDualClient
from client_sim.xmpp import MessageReceived, SaltedPasswordCache
from tests.integration.pair_harness import PASSWORD, HAPair, running_pair
from xmpp_ha.ha.model import State
from xmpp_ha.store.cluster import ClusterStore

PER_NODE = 3
DEADLINE = 20.0


@pytest.fixture
async def pair(store_url: str, tmp_path: Path) -> AsyncIterator[HAPair]:
    async with running_pair(store_url, tmp_path / "pair", users=2 * PER_NODE) as started:
        cluster = await ClusterStore.open(store_url)
        try:  # standby sessions open 0.05-0.2 s after each login
            for node in ("n1", "n2"):
                await cluster.set_relogin_limits(node, 0.05, 0.2)
        finally:
            await cluster.close()
        yield started


class Traffic:
    def __init__(self) -> None:
        self.sent: set[str] = set()
        self.received: dict[str, int] = {}
        self.ids = itertools.count()

    def on_message(self, event: MessageReceived) -> None:
        self.received[event.id] = self.received.get(event.id, 0) + 1

    async def chat(self, sender: AioDualClient, to: str, stop: asyncio.Event) -> None:
        while not stop.is_set():
            message_id = f"m{next(self.ids)}"
            self.sent.add(message_id)
            sender.send_message(to, message_id, id=message_id)
            await asyncio.sleep(0.05)


async def until(condition: object, what: str, timeout: float = DEADLINE) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():  # type: ignore[operator]
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        await asyncio.sleep(0.05)


async def run_failover(pair: HAPair, inject: str) -> None:
    context = ssl.create_default_context(cafile=pair.layout.ca_file)
    cache = SaltedPasswordCache()
    nodes = pair.c2s_addresses()
    traffic = Traffic()
    homes = {node: await pair.users_homed_on(node) for node in ("n1", "n2")}

    def client(name: str, home: str, on_message: object = None) -> AioDualClient:
        return AioDualClient(f"{name}@localhost", PASSWORD, nodes, home=home,
                             ssl_context=context, key_cache=cache,
                             on_message=on_message)  # type: ignore[arg-type]  # fmt: skip

    receivers = [client(name, "n1", traffic.on_message) for name in homes["n1"]]
    senders = [client(name, "n2") for name in homes["n2"]]
    everyone = receivers + senders
    try:
        for user in everyone:
            await user.start()
        await until(lambda: all(u.core.standby is not None for u in everyone), "standbys open")
        # SPEC §9: X users homed on n1, Y on n2 -> n1 shows X active and Y inactive
        # client sessions, n2 the reverse (here X = Y = PER_NODE)
        for node in ("n1", "n2"):
            await pair.wait_counter(node, "JsmSessionsClientInactive", PER_NODE)
            await pair.wait_counter(node, "JsmSessionsClient", PER_NODE)

        stop = asyncio.Event()
        chats = [
            asyncio.create_task(traffic.chat(s, r.jid, stop))
            for s, r in zip(senders, receivers, strict=True)
        ]
        await asyncio.sleep(0.5)
        if inject == "kill":
            pair.kill("n1")
        elif inject == "freeze":
            pair.freeze("n1")
        else:
            await pair.failover("n1")
        await until(lambda: all(len(r.core.downtimes) == 1 for r in receivers), "switched")
        assert all(r.serving_node == "n2" for r in receivers)
        if inject == "freeze":
            pair.thaw("n1")
        if inject == "upgrade":  # n1 stopped and started again while Idle, then fallback
            await pair.wait_states({"n1": (State.IDLE, None)})
            await pair.terminate("n1")
            await pair.restart("n1")
            await until(lambda: all(r.core.standby == "n1" for r in receivers), "standby on n1")
            await pair.fallback("n1")
            await until(lambda: all(len(r.core.downtimes) == 2 for r in receivers), "back home")
            assert all(r.serving_node == "n1" for r in receivers)
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*chats)
        await until(lambda: traffic.sent <= set(traffic.received), "every message arrived", 10)
        assert traffic.sent == set(traffic.received)
        assert all(count == 1 for count in traffic.received.values()), "a duplicate reached the app"
        for receiver in receivers:
            downtimes = receiver.core.downtimes
            assert all(downtime.seconds is not None for downtime in downtimes)
            # kill: the client asks, or the server (seeing its peer's process end) pushes
            # first: either way one switch
            if inject in ("freeze", "manual", "upgrade"):  # the server pushed
                assert downtimes[0].pushed
    finally:
        for user in everyone:
            await user.close()


async def test_kill_9_dual_clients_switch_and_lose_nothing(pair: HAPair) -> None:
    await run_failover(pair, "kill")


async def test_manual_failover_pushes_dual_clients_and_loses_nothing(pair: HAPair) -> None:
    await run_failover(pair, "manual")


async def test_sigstop_pushes_dual_clients_and_loses_nothing(pair: HAPair) -> None:
    await run_failover(pair, "freeze")


async def test_upgrade_moves_dual_clients_there_and_back_without_a_login(pair: HAPair) -> None:
    """Manual failover, n1 restarted while Idle (its standby door open), fallback."""
    await run_failover(pair, "upgrade")


async def test_gevent_dual_clients_switch_on_kill_9_and_lose_nothing(pair: HAPair) -> None:
    """The gevent driver (what Locust runs), in its own process as under Locust."""
    nodes = pair.c2s_addresses()
    script = Path(__file__).with_name("gevent_dual_clients.py")
    receivers = ",".join(await pair.users_homed_on("n1"))
    senders = ",".join(await pair.users_homed_on("n2"))
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(script), str(pair.layout.ca_file),
        *(f"{host}:{port}" for host, port in (nodes["n1"], nodes["n2"])),
        PASSWORD, receivers, senders,
        stdout=asyncio.subprocess.PIPE, cwd=Path(__file__).parents[2],
    )  # fmt: skip
    assert process.stdout is not None
    try:
        ready = await asyncio.wait_for(process.stdout.readline(), DEADLINE)
        assert ready.strip() == b"READY", ready
        await asyncio.sleep(0.5)
        pair.kill("n1")
        line = await asyncio.wait_for(process.stdout.readline(), 60)
        report = json.loads(line)
        assert report["switched"] == PER_NODE and set(report["serving"]) == {"n2"}, report
        assert report["sent"] > 0 and report["received"] == report["sent"], report
        assert report["delivered_twice"] == 0, report
        assert await asyncio.wait_for(process.wait(), 10) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
