"""Dual connections (docs/dual-connections.md) on a real pair, with a raw client speaking
the protocol over TLS: the offer, the plan, standby sessions (refused where the user is
served, inactive where accepted, counted), activation asked by the client after kill -9,
activation pushed by the server on a manual failover and on fallback, refusals."""

from __future__ import annotations

import asyncio
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.integration.pair_harness import PASSWORD, HAPair, running_pair
from tests.integration.rawclient import (
    BIND_NS,
    CLIENT_NS,
    DUAL_NS,
    SASL_NS,
    STANZAS_NS,
    RawClient,
    condition_of,
    local_name,
    tag,
)
from xmpp_ha.ha.model import Reason, State
from xmpp_ha.store.cluster import ClusterStore
from xmpp_ha.store.repository import RosterItem
from xmpp_ha.store.sql import SQLStore

STEP = 10.0


@pytest.fixture
async def pair(store_url: str, tmp_path: Path) -> AsyncIterator[HAPair]:
    async with running_pair(store_url, tmp_path / "pair") as started:
        yield started


async def connect(pair: HAPair, node: str, user: str, *, standby: bool = False) -> RawClient:
    host, port = pair.c2s_addresses()[node]
    client = await RawClient.connect(host, port)
    await client.login(pair.layout.ca_file, user, PASSWORD, "dual", standby=standby)
    return client


async def authenticated(pair: HAPair, node: str, user: str) -> RawClient:
    """TLS and SASL done, the stream restarted: the next step is the bind."""
    host, port = pair.c2s_addresses()[node]
    client = await RawClient.connect(host, port)
    await client.open_stream()
    await client.starttls(pair.layout.ca_file)
    outcome = await client.auth_plain(user, PASSWORD)
    assert outcome.tag == tag(SASL_NS, "success")
    client.features = await client.open_stream()
    return client


async def answer_to(
    client: RawClient, request_id: str, seen: list[ET.Element] | None = None
) -> ET.Element:
    """The stanza answering `request_id`; other elements read meanwhile go to `seen`."""
    while True:
        element = await client.next_element(STEP)
        if element.get("id") == request_id:
            return element
        if seen is not None:
            seen.append(element)


async def request(client: RawClient, iq_type: str, payload: str, request_id: str) -> ET.Element:
    await client.send(f"<iq type='{iq_type}' id='{request_id}'>{payload}</iq>")
    return await answer_to(client, request_id)


def error_condition(iq: ET.Element) -> str:
    assert iq.get("type") == "error", ET.tostring(iq)
    error = iq.find(tag(CLIENT_NS, "error"))
    assert error is not None
    return condition_of(error, STANZAS_NS)


PLAN = f"<plan xmlns='{DUAL_NS}'/>"
ACTIVATE = f"<activate xmlns='{DUAL_NS}'/>"


async def chat(client: RawClient, to: str, body: str, message_id: str) -> None:
    await client.send(
        f"<message to='{to}@localhost' type='chat' id='{message_id}'><body>{body}</body></message>"
    )


async def next_message(client: RawClient, body: str) -> ET.Element:
    while True:
        element = await client.next_element(STEP)
        if local_name(element) == "message" and element.findtext(tag(CLIENT_NS, "body")) == body:
            return element


async def until_door_open(pair: HAPair, node: str) -> None:
    for _ in range(int(STEP / 0.05)):
        if (await pair.node_status(node)).get("standby_door"):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{node}: no standby door within {STEP:g} s")


async def alice_with_standby(pair: HAPair) -> tuple[str, RawClient, RawClient, RawClient]:
    """A user homed on n1, available there with a standby session on n2, and a sender
    on n2: (the user, home session, standby session, sender's session)."""
    alice = (await pair.users_homed_on("n1"))[0]
    bob = (await pair.users_homed_on("n2"))[0]
    home = await connect(pair, "n1", alice)
    await home.send("<presence/>")
    standby = await connect(pair, "n2", alice, standby=True)
    sender = await connect(pair, "n2", bob)
    await pair.wait_counter("n2", "JsmSessionsClientInactive", 1)
    return alice, home, standby, sender


async def test_offer_plan_standby_refusals_and_counters(pair: HAPair) -> None:
    alice = (await pair.users_homed_on("n1"))[0]
    bob = (await pair.users_homed_on("n2"))[0]
    home = await connect(pair, "n1", alice)
    await home.send("<presence/>")
    assert home.features is not None and home.features.find(tag(DUAL_NS, "dual")) is not None
    info = await request(
        home, "get", "<query xmlns='http://jabber.org/protocol/disco#info'/>", "d1"
    )
    assert DUAL_NS in [
        f.get("var") for f in info.iter("{http://jabber.org/protocol/disco#info}feature")
    ]
    plan = (await request(home, "get", PLAN, "p1")).find(tag(DUAL_NS, "plan"))
    assert plan is not None
    assert (plan.get("node"), plan.get("host"), plan.get("port")) == (
        "n2",
        *map(str, pair.c2s_addresses()["n2"]),
    )
    assert float(plan.get("delay", "-1")) >= 0

    # a standby session where the user is served: refused, the client should bind actively
    refused = await authenticated(pair, "n1", alice)
    await refused.send(
        f"<iq type='set' id='b1'><bind xmlns='{BIND_NS}'><resource>x</resource>"
        f"<standby xmlns='{DUAL_NS}'/></bind></iq>"
    )
    assert error_condition(await answer_to(refused, "b1")) == "conflict"
    await refused.aclose()

    standby = await connect(pair, "n2", alice, standby=True)
    await pair.wait_counter("n2", "JsmSessionsClientInactive", 1)
    await pair.wait_counter("n1", "JsmSessionsClient", 1)
    assert (await pair.counters("n1"))["JsmSessionsClientInactive"] == 0

    # inactive: nothing routed to it, it may only talk to the server
    sender = await connect(pair, "n2", bob)
    await chat(sender, alice, "to the active session", "m1")
    await next_message(home, "to the active session")
    await chat(standby, bob, "from the standby", "m2")
    assert error_condition(await answer_to(standby, "m2")) == "not-allowed"
    await standby.send("<presence/>")
    refusal = await standby.next_element(STEP)
    assert local_name(refusal) == "presence" and refusal.get("type") == "error"
    pong = await request(standby, "get", "<ping xmlns='urn:xmpp:ping'/>", "ping1")
    assert pong.get("type") == "result"
    assert error_condition(await request(standby, "get", PLAN, "p2")) == "not-allowed"
    assert error_condition(await request(home, "set", ACTIVATE, "a0")) == "not-allowed"
    # the home session is alive: the standby may not take over
    assert error_condition(await request(standby, "set", ACTIVATE, "a1")) == "conflict"
    assert not [
        e for e in standby.received if local_name(e) == "message" and e.get("type") != "error"
    ]
    for client in (home, standby, sender):
        await client.aclose()


async def test_kill_9_the_client_activates_its_standby_and_misses_nothing(pair: HAPair) -> None:
    alice, home, standby, sender = await alice_with_standby(pair)

    pair.kill("n1")
    await home.wait_closed(STEP)
    await chat(sender, alice, "while switching", "k1")
    result = await request(standby, "set", ACTIVATE, "act")
    assert result.get("type") == "result", ET.tostring(result)
    assert result.find(tag(DUAL_NS, "activate")) is not None
    served = await pair.assignments()
    assert served[alice].current_node == "n2"
    await standby.send("<presence/>")  # as after a login: what waited is delivered
    await next_message(standby, "while switching")
    await chat(sender, alice, "after the switch", "k2")
    await next_message(standby, "after the switch")
    await pair.wait_counter("n2", "JsmSessionsClientInactive", 0)
    # no plan while n1 is down: it would send the client to a dead node
    down = await request(sender, "get", PLAN, "p-down")
    assert error_condition(down) == "service-unavailable"
    error = down.find(tag(CLIENT_NS, "error"))
    assert error is not None and error.get("type") == "wait"

    # n1 comes back failed over; alice's client opens a standby session on it, and the
    # fallback moves her home over it: pushed activation, no new login
    await pair.wait_states({"n2": (State.BACKUP_MODE, Reason.PEER_DOWN)})
    await pair.restart("n1")
    await pair.wait_states({"n1": (State.FAILED_OVER, None)})
    plan = (await request(standby, "get", PLAN, "p-back")).find(tag(DUAL_NS, "plan"))
    assert plan is not None and plan.get("node") == "n1"
    back = await connect(pair, "n1", alice, standby=True)
    await pair.wait_counter("n1", "JsmSessionsClientInactive", 1)
    await pair.fallback("n1")
    push = await back.expect("iq", STEP)
    assert push.get("type") == "set" and push.find(tag(DUAL_NS, "activate")) is not None
    await back.send(f"<iq type='result' id='{push.get('id')}'/>")
    assert (await standby.expect_stream_error(STEP)).condition == "see-other-host"
    await back.send("<presence/>")
    await chat(sender, alice, "after the fallback", "k3")
    await next_message(back, "after the fallback")
    for client in (back, sender):
        await client.aclose()


async def test_manual_failover_pushes_activation_and_the_idle_node_takes_standbys(
    pair: HAPair,
) -> None:
    alice, home, standby, sender = await alice_with_standby(pair)

    await pair.failover("n1")
    push = await standby.expect("iq", STEP)
    assert push.get("type") == "set" and push.find(tag(DUAL_NS, "activate")) is not None
    await standby.send(f"<iq type='result' id='{push.get('id')}'/>")
    error = await home.expect_stream_error(STEP)
    assert error.condition == "see-other-host"
    await standby.send("<presence/>")
    await chat(sender, alice, "after the failover", "f1")
    await next_message(standby, "after the failover")
    await pair.wait_states({"n2": (State.BACKUP_MODE, Reason.ADMIN)})

    # n1 is Idle, its services stopped: its standby door lets standby sessions in, and
    # only those (an active login is pointed at n2); the fallback pushes the one opened
    await pair.wait_states({"n1": (State.IDLE, Reason.ADMIN)})
    await until_door_open(pair, "n1")  # Idle is entered before the services stop
    status = await pair.node_status("n1")
    assert status["standby_door"] and not status["services"]["client listener"], status
    active = await authenticated(pair, "n1", alice)
    await active.send(f"<iq type='set' id='b1'><bind xmlns='{BIND_NS}'/></iq>")
    refusal = await active.expect_stream_error(STEP)
    assert refusal.condition == "see-other-host", refusal
    back = await connect(pair, "n1", alice, standby=True)
    await pair.wait_counter("n1", "JsmSessionsClientInactive", 1)
    await pair.fallback("n1")
    push = await back.expect("iq", STEP)
    assert push.get("type") == "set" and push.find(tag(DUAL_NS, "activate")) is not None
    await back.send(f"<iq type='result' id='{push.get('id')}'/>")
    await back.send("<presence/>")
    await chat(sender, alice, "home again", "f2")
    await next_message(back, "home again")
    assert not (await pair.node_status("n1"))["standby_door"]

    for client in (standby, sender, back):
        await client.aclose()


@pytest.mark.parametrize("inject", ["kill", "manual", "fallback"])
async def test_contacts_never_see_the_switching_user_go_offline(pair: HAPair, inject: str) -> None:
    """Alice (n1, standby on n2) and Bob (n2) see each other's presence; n1 fails and
    Alice's client switches (and, for "fallback", switches back home after a manual
    failover): Bob never gets 'unavailable' from her (a node whose session of hers
    ended after she moved asks the other node whether her resource lives on there), and
    gets her presence again once she sent it on the new session. Carol (n2, not in her
    roster) got her directed presence: her client sends it again after the switch, and
    Carol never hears 'unavailable' either (the model loses directed presence)."""
    alice = (await pair.users_homed_on("n1"))[0]
    bob, carol = (await pair.users_homed_on("n2"))[:2]
    store = await SQLStore.open(pair.store_url)
    try:
        for user, contact in ((alice, bob), (bob, alice)):
            await store.put_roster_item(user, RosterItem(f"{contact}@localhost", "", "both"))
    finally:
        await store.close()
    home = await connect(pair, "n1", alice)
    await home.send("<presence/>")
    standby = await connect(pair, "n2", alice, standby=True)
    watcher = await connect(pair, "n2", bob)
    await watcher.send("<presence/>")
    seen_before = await watcher.expect("presence", STEP)
    while seen_before.get("from") != f"{alice}@localhost/dual":  # Bob's own comes first
        seen_before = await watcher.expect("presence", STEP)
    assert not seen_before.get("type")
    stranger = await connect(pair, "n2", carol)
    await stranger.send("<presence/>")
    await home.send(f"<presence to='{carol}@localhost'/>")
    directed = await stranger.expect("presence", STEP)
    while directed.get("from") != f"{alice}@localhost/dual":
        directed = await stranger.expect("presence", STEP)
    await pair.wait_counter("n2", "JsmSessionsClientInactive", 1)

    if inject == "kill":
        pair.kill("n1")
        await home.wait_closed(STEP)
        assert (await request(standby, "set", ACTIVATE, "act")).get("type") == "result"
    else:
        await pair.failover("n1")
        push = await standby.expect("iq", STEP)
        await standby.send(f"<iq type='result' id='{push.get('id')}'/>")
        await home.expect_stream_error(STEP)
    await standby.send(f"<presence/><presence to='{carol}@localhost'/>")
    await pair.wait_states({"n2": (State.BACKUP_MODE, None)})
    if inject == "fallback":
        await pair.wait_states({"n1": (State.IDLE, None)})
        await until_door_open(pair, "n1")
        back = await connect(pair, "n1", alice, standby=True)
        await pair.wait_counter("n1", "JsmSessionsClientInactive", 1)
        await pair.fallback("n1")
        push = await back.expect("iq", STEP)
        await back.send(f"<iq type='result' id='{push.get('id')}'/>")
        await standby.expect_stream_error(STEP)
        await back.send(f"<presence/><presence to='{carol}@localhost'/>")
        standby = back
    await asyncio.sleep(3.5)  # the old node's announcement, if any, has arrived by now
    await chat(standby, bob, "after the switch", "p1")
    await next_message(watcher, "after the switch")
    await chat(standby, carol, "after the switch", "p2")
    await next_message(stranger, "after the switch")
    for contact in (watcher, stranger):
        from_alice = [
            e.get("type") or "available"
            for e in contact.received
            if local_name(e) == "presence" and (e.get("from") or "").startswith(f"{alice}@")
        ]
        assert "unavailable" not in from_alice, from_alice
        assert from_alice[-1] == "available", from_alice
    for client in (standby, watcher, stranger):
        await client.aclose()


async def test_two_resources_switch_together(pair: HAPair) -> None:
    """Alice on two devices (resources), each with a standby on n2: n1 dies, one device asks
    and both are activated by the same move (the other is pushed), messages to her full
    JIDs arrive on the right device."""
    alice = (await pair.users_homed_on("n1"))[0]
    bob = (await pair.users_homed_on("n2"))[0]
    homes, standbys = [], []
    for resource in ("desk", "phone"):
        host, port = pair.c2s_addresses()["n1"]
        home = await RawClient.connect(host, port)
        await home.login(pair.layout.ca_file, alice, PASSWORD, resource)
        await home.send("<presence/>")
        homes.append(home)
        host, port = pair.c2s_addresses()["n2"]
        standby = await RawClient.connect(host, port)
        await standby.login(pair.layout.ca_file, alice, PASSWORD, resource, standby=True)
        standbys.append(standby)
    await pair.wait_counter("n2", "JsmSessionsClientInactive", 2)
    sender = await connect(pair, "n2", bob)

    pair.kill("n1")
    for home in homes:
        await home.wait_closed(STEP)
    desk, phone = standbys
    assert (await request(desk, "set", ACTIVATE, "act")).get("type") == "result"
    push = await phone.expect("iq", STEP)  # the same move activated it: no request of its own
    assert push.get("type") == "set" and push.find(tag(DUAL_NS, "activate")) is not None
    await phone.send(f"<iq type='result' id='{push.get('id')}'/>")
    await pair.wait_counter("n2", "JsmSessionsClientInactive", 0)
    for standby in standbys:
        await standby.send("<presence/>")
    await chat(sender, f"{alice}@localhost/phone", "to the phone", "r1")
    await chat(sender, f"{alice}@localhost/desk", "to the desk", "r2")
    await next_message(phone, "to the phone")
    await next_message(desk, "to the desk")
    for client in (*standbys, sender):
        await client.aclose()


async def test_refused_with_ha_off_and_never_offered_before_tls(pair: HAPair) -> None:
    alice = (await pair.users_homed_on("n1"))[0]
    plain = await RawClient.connect(*pair.c2s_addresses()["n1"])
    features = await plain.open_stream()
    assert features.find(tag(DUAL_NS, "dual")) is None  # only STARTTLS before TLS
    await plain.aclose()

    cluster = await ClusterStore.open(pair.store_url)
    try:
        await cluster.update_group(pair.layout.group, ha_enabled=False)
    finally:
        await cluster.close()
    for node in ("n1", "n2"):  # the sync agents see the change and leave HA
        await pair.wait_states({node: (State.UNKNOWN, None)}, timeout=STEP)
    home = await connect(pair, "n1", alice)
    assert home.features is not None and home.features.find(tag(DUAL_NS, "dual")) is None
    assert error_condition(await request(home, "get", PLAN, "p1")) == "feature-not-implemented"
    refused = await authenticated(pair, "n2", alice)
    await refused.send(
        f"<iq type='set' id='b1'><bind xmlns='{BIND_NS}'><resource>x</resource>"
        f"<standby xmlns='{DUAL_NS}'/></bind></iq>"
    )
    assert error_condition(await answer_to(refused, "b1")) == "feature-not-implemented"
    for client in (home, refused):
        await client.aclose()
