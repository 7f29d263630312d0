"""The pair's administration and its defences, on real node processes: forged peers on
the service port, the admin token, SRM parameters, adding users while failed over,
/metrics, and the CLI driving the same API.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.integration.pair_harness import (
    PASSWORD,
    HAPair,
    is_message,
    running_pair,
)
from xmpp_ha.certs import init_certs
from xmpp_ha.ha.model import Reason, State

NORMAL = (State.NORMAL, Reason.NORMAL)
BOTH_NORMAL = {"n1": NORMAL, "n2": NORMAL}


@pytest.fixture
async def pair(store_url: str, tmp_path: Path) -> AsyncIterator[HAPair]:
    async with running_pair(store_url, tmp_path / "pair") as started:
        yield started


# --- forged peers ---------------------------------------------------------------------


async def try_peer_link(pair: HAPair, node: str, context: ssl.SSLContext, hello_as: str) -> bytes:
    """Connect to `node`'s service port as a would-be peer, say hello, and return
    whatever the node sent back before closing (b"" when nothing)."""
    reader, writer = await asyncio.open_connection(
        pair.host(node), pair.service_port, ssl=context, server_hostname=node
    )
    received = b""
    try:
        hello = {"t": "hello", "node": hello_as, "version": "0.1.0"}
        writer.write(json.dumps(hello).encode() + b"\n")
        await writer.drain()
        async with asyncio.timeout(5):
            while chunk := await reader.read(4096):
                received += chunk
    except (ssl.SSLError, ConnectionError):
        pass  # the node tore the connection down: what we expect
    finally:
        writer.close()
    return received


def attacker_context(cert_dir: Path, name: str, *, ca_file: Path | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca_file is None:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context.load_verify_locations(str(ca_file))
    context.load_cert_chain(str(cert_dir / f"{name}.pem"), str(cert_dir / f"{name}-key.pem"))
    return context


async def test_forged_peers_are_refused_and_logged(pair: HAPair, tmp_path: Path) -> None:
    # a certificate naming the right peer (n2), but from another CA
    other_ca = tmp_path / "other-ca"
    init_certs(other_ca, node_names=["n2"], hosts=["127.0.0.2"])
    received = await try_peer_link(pair, "n1", attacker_context(other_ca, "n2"), "n2")
    assert b"hello" not in received, received
    await pair.wait_log("n1", r"peer link: refused accepted connection .*127\.0\.0\.1")

    # a certificate from the cluster CA, for a node that is not n1's peer
    pair_certs = pair.directory / "certs"
    init_certs(pair_certs, node_names=["n3"])
    context = attacker_context(pair_certs, "n3", ca_file=pair_certs / "ca.pem")
    received = await try_peer_link(pair, "n1", context, "n2")
    assert b"hello" not in received, received
    await pair.wait_log("n1", r"peer link: refused accepted connection .*does not name 'n2'")

    # no client certificate at all
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(str(pair_certs / "ca.pem"))
    received = await try_peer_link(pair, "n2", context, "n1")
    assert b"hello" not in received, received
    await pair.wait_log("n2", r"peer link: refused accepted connection")

    # the real link was never replaced: the pair is as it was
    await pair.wait_states(BOTH_NORMAL)
    for node in ("n1", "n2"):
        assert (await pair.node_status(node))["peer_connected"] is True
        assert "replaces" not in pair.log(node)
    alice = await pair.login((await pair.users_homed_on("n1"))[0])
    bob = await pair.login((await pair.users_homed_on("n2"))[0])
    alice.chat(bob.boundjid.bare, "the link still routes")
    await bob.next(is_message("the link still routes"), what="routed chat")


# --- the admin token ------------------------------------------------------------------


async def test_state_changes_need_the_admin_token(pair: HAPair) -> None:
    changes = [
        ("POST", "/nodes/n1/failover", None),
        ("POST", "/nodes/n1/services/router/stop", None),
        ("POST", "/recover", None),
        ("PUT", "/params", {"heartbeat_timeout": 10}),
        ("POST", "/users", {"username": "mallory", "password": "pw"}),
    ]
    for method, path, body in changes:
        status, message = await pair.call("n1", method, path, body, token=None)
        assert status == 401, (method, path, status, message)
        assert "admin token" in message, message
        status, message = await pair.call("n1", method, path, body, token="not-the-token")
        assert status == 401 and message == "invalid admin token", (method, path, status, message)
    # read-only status is open on loopback
    status, document = await pair.call("n1", "GET", "/status", token=None)
    assert status == 200 and document["node"]["state"] == "Normal"
    await asyncio.sleep(1.5)  # longer than the critical service down delay
    await pair.wait_states(BOTH_NORMAL)
    assert all((await pair.node_status("n1"))["services"].values())
    params = (await pair.act("n1", "GET", "/params"))["cluster"]
    assert params["heartbeat_timeout"] == 2.5
    assert "mallory" not in await pair.assignments()


# --- parameters --------------------------------------------------------------------------


async def test_parameters_are_validated_and_applied_on_both_nodes(pair: HAPair) -> None:
    bad = {
        json.dumps({"heartbeat_interval": 5}): "heartbeat_interval (5 s) must be shorter than",
        json.dumps({"heartbeat_timeout": 10}): "must not exceed initialization_heartbeat_timeout",
        json.dumps({"critical_service_down_delay": -1}): "critical_service_down_delay",
        json.dumps({"no_such_parameter": 1}): "no_such_parameter",
        json.dumps({"enable_automatic_fallback": "perhaps"}): "enable_automatic_fallback",
        json.dumps({"service_port": 70000}): "service_port must be a port number",
    }
    for body, expected in bad.items():
        status, message = await pair.call("n1", "PUT", "/params", json.loads(body))
        assert status == 400, (body, status, message)
        assert expected in message, (body, message)
    status, message = await pair.call("n1", "PUT", "/params", [1, 2])
    assert status == 400 and "JSON object" in message, message
    # nothing of the above was applied
    params = (await pair.act("n2", "GET", "/params"))["cluster"]
    assert params["heartbeat_interval"] == 0.5 and params["critical_service_down_delay"] == 1.0

    result = await pair.act(
        "n1", "PUT", "/params", {"critical_service_down_delay": 3, "automatic_fallback_delay": 600}
    )
    assert result["cluster"]["critical_service_down_delay"] == 3.0
    for node in ("n1", "n2"):
        params = await pair.act(node, "GET", "/params")
        assert params["cluster"]["critical_service_down_delay"] == 3.0
        assert params["cluster"]["automatic_fallback_delay"] == 600.0
        assert params["mode"] == "balanced"
    shown = (await asyncio.to_thread(run_cli, pair, "params", "show")).stdout
    assert "critical_service_down_delay = 3.0" in shown.splitlines(), shown

    # the new delay is in force on the peer too: n2 fails over 3 s after its router stops
    await asyncio.sleep(1.0)  # n2 reloads the parameters when n1 tells it
    stopped_at = time.monotonic()
    await pair.service("n2", "router", "stop")
    cs_down = Reason.CRITICAL_SERVICE_DOWN
    await pair.wait_states(
        {"n1": (State.BACKUP_MODE, cs_down), "n2": (State.FAILED_OVER_CS_DOWN, cs_down)}
    )
    elapsed = time.monotonic() - stopped_at
    assert 3.0 - 0.3 <= elapsed < 6, f"failed over {elapsed:.1f} s after the router stopped"


# --- users ---------------------------------------------------------------------------------


async def test_adding_a_user_is_refused_while_failed_over(pair: HAPair) -> None:
    await pair.failover("n1")
    await pair.wait_states(
        {"n1": (State.IDLE, Reason.ADMIN), "n2": (State.BACKUP_MODE, Reason.ADMIN)}
    )
    newcomer = {"username": "newcomer", "password": PASSWORD}
    for node in ("n1", "n2"):
        status, message = await pair.call(node, "POST", "/users", newcomer)
        assert status == 409, (node, status, message)
        assert "failed over" in message and "fall back first" in message, message
    assert "newcomer" not in await pair.assignments()

    await pair.fallback("n1")
    await pair.wait_states(BOTH_NORMAL)
    status, result = await pair.call("n2", "POST", "/users", newcomer)
    assert status == 200 and result == {"username": "newcomer"}, (status, result)
    assignment = (await pair.assignments())["newcomer"]
    assert assignment.home_node in ("n1", "n2")
    assert assignment.current_node == assignment.home_node
    status, message = await pair.call("n1", "POST", "/users", newcomer)
    assert status == 409 and "already exists" in message, (status, message)

    pair.users.append("newcomer")
    client = await pair.login("newcomer", node=pair.other(assignment.home_node))
    assert client.node == assignment.home_node  # redirected to its home node
    homes = await pair.homes()
    counts = [sum(1 for u in pair.users if homes[u] == node) for node in ("n1", "n2")]
    assert abs(counts[0] - counts[1]) <= 1, homes


# --- metrics -------------------------------------------------------------------------------


def sample(metrics: str, name: str, **labels: str) -> float:
    for line in metrics.splitlines():
        match = re.fullmatch(r"(\w+)(?:\{(.*)\})? (\S+)", line)
        if match is None or match[1] != name:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match[2] or ""))
        if all(found.get(key) == value for key, value in labels.items()):
            return float(match[3])
    raise AssertionError(f"no sample {name}{labels} in:\n{metrics}")


async def test_metrics_carry_the_counters_and_the_state(pair: HAPair) -> None:
    alice = await pair.login((await pair.users_homed_on("n1"))[0])
    await pair.login((await pair.users_homed_on("n2"))[0])
    await pair.wait_counter("n1", "ActiveJsmSessions", 1)
    metrics = await pair.act("n1", "GET", "/metrics")
    assert isinstance(metrics, str)
    assert "# TYPE xmpp_ha_active_jsm_sessions gauge" in metrics
    assert sample(metrics, "xmpp_ha_active_jsm_sessions", node="n1") == 1
    assert sample(metrics, "xmpp_ha_jsm_sessions_client", node="n1") == 1
    assert sample(metrics, "xmpp_ha_inactive_jsm_sessions", node="n1") == 0
    assert sample(metrics, "xmpp_ha_jsm_sessions_client_inactive", node="n1") == 0
    assert sample(metrics, "xmpp_ha_jsm_sessions_composed", node="n1") == 0
    assert sample(metrics, "xmpp_ha_node_state", node="n1", state="Normal") == 1
    assert sample(metrics, "xmpp_ha_node_state", node="n1", state="Idle") == 0

    await pair.failover("n1")
    await pair.wait_states({"n2": (State.BACKUP_MODE, Reason.ADMIN)})
    await alice.wait_session("n2", after=1)
    await pair.wait_counter("n2", "ActiveJsmSessions", 2)
    n1 = await pair.act("n1", "GET", "/metrics")
    n2 = await pair.act("n2", "GET", "/metrics")
    assert sample(n1, "xmpp_ha_node_state", node="n1", state="Idle") == 1
    assert sample(n1, "xmpp_ha_active_jsm_sessions", node="n1") == 0
    assert sample(n2, "xmpp_ha_node_state", node="n2", state="Running in Backup Mode") == 1
    assert sample(n2, "xmpp_ha_active_jsm_sessions", node="n2") == 2
    assert sample(n2, "xmpp_ha_inactive_jsm_sessions", node="n2") == 1


# --- the CLI ---------------------------------------------------------------------------------


def run_cli(pair: HAPair, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "xmpp_ha.cli", *args, "--dir", str(pair.directory)],
        capture_output=True, text=True, timeout=30, check=check,
    )  # fmt: skip


async def test_cli_status_failover_and_fallback(pair: HAPair) -> None:
    status = json.loads((await asyncio.to_thread(run_cli, pair, "status", "--json")).stdout)
    nodes = {node["name"]: node for node in status["nodes"]}
    assert {n: (nodes[n]["state"], nodes[n]["reason"]) for n in nodes} == {
        "n1": ("Normal", "Normal"),
        "n2": ("Normal", "Normal"),
    }
    assert nodes["n1"]["allowed_actions"] == ["failover"]
    assert set(nodes["n1"]["counters"]) == {
        "ActiveJsmSessions", "InactiveJsmSessions", "JsmSessionsComposed",
        "JsmSessionsClient", "JsmSessionsClientInactive",
    }  # fmt: skip
    assert status["group"]["ha_enabled"] is True and status["group"]["mode"] == "balanced"

    await asyncio.to_thread(run_cli, pair, "failover", "n1")
    await pair.wait_states(
        {"n1": (State.IDLE, Reason.ADMIN), "n2": (State.BACKUP_MODE, Reason.ADMIN)}
    )
    refused = await asyncio.to_thread(run_cli, pair, "failover", "n1", check=False)
    assert refused.returncode != 0
    assert "409" in refused.stderr and "not allowed while the node is 'Idle'" in refused.stderr
    table = (await asyncio.to_thread(run_cli, pair, "status")).stdout
    assert "Idle / On Admin Request" in table and "Running in Backup Mode" in table

    await asyncio.to_thread(run_cli, pair, "fallback", "n1")
    await pair.wait_states(BOTH_NORMAL)


# --- user assignment mode ----------------------------------------------------------------


async def test_assignment_mode_is_validated_and_rebalances_the_store(pair: HAPair) -> None:
    status, message = await pair.call("n1", "PUT", "/mode", {"mode": "round-robin"})
    assert status == 400, (status, message)
    assert (
        message
        == "unknown user assignment mode 'round-robin' (known: balanced, active-standby, none)"
    )
    status, message = await pair.call("n1", "PUT", "/mode", {"mode": "none"}, token=None)
    assert status == 401, (status, message)

    result = await pair.act("n1", "PUT", "/mode", {"mode": "active-standby"})
    assert result == {"mode": "active-standby", "reassigned": len(pair.users) // 2}
    assert set((await pair.homes()).values()) == {"n1"}
    await pair.wait_served({"n1": set(pair.users), "n2": set()})
    deadline = time.monotonic() + 4  # n2's sync agent reads the mode every 2 s
    while (await pair.act("n2", "GET", "/params"))["mode"] != "active-standby":
        assert time.monotonic() < deadline, "n2 does not show the new mode"
        await asyncio.sleep(0.2)

    result = await pair.act("n2", "PUT", "/mode", {"mode": "balanced"})
    assert result["reassigned"] == len(pair.users) // 2
    homes = await pair.homes()
    assert sorted(homes[u] for u in pair.users).count("n1") == len(pair.users) // 2
    on_n1 = {u for u in pair.users if homes[u] == "n1"}
    await pair.wait_served({"n1": on_n1, "n2": set(pair.users) - on_n1})


async def test_mode_change_moves_live_sessions_and_never_serves_a_user_twice(
    pair: HAPair,
) -> None:
    dave_name = (await pair.users_homed_on("n2"))[0]
    dave = await pair.login(dave_name)
    assert dave.node == "n2"
    await pair.act("n1", "PUT", "/mode", {"mode": "active-standby"})
    await pair.wait_served({"n1": set(pair.users), "n2": set()})
    await pair.act("n1", "POST", "/users", {"username": "zed", "password": PASSWORD})
    await asyncio.sleep(1.0)  # every node has reloaded the assignments by now
    second = pair.client(dave_name, "second", auto_relogin=False)
    await second.login("n1")
    await second.ping_server()
    active = [(await pair.counters(node))["ActiveJsmSessions"] for node in ("n1", "n2")]
    assert active == [1, 0], f"dave active on n1 and n2: {active}"
    await dave.wait_session("n1", after=1, timeout=6)
