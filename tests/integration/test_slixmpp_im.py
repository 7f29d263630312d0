"""Instant messaging end to end: real slixmpp clients over real TLS against a node process.

Each test starts its own node (SQLite, and PostgreSQL when configured) and
asserts exact outcomes. Nothing waits by sleeping: a test waits for the
stanza it expects, with a timeout. To show that something did *not* arrive,
a test first makes the server finish with everything before it: a client's
stanzas are handled in order, so the answer to a ping (`round_trip`) means
every earlier stanza of that client has been routed, and a marker message
sent after a stanza to the same recipient arrives after it.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from slixmpp import JID, Iq, Message, Presence
from slixmpp.exceptions import IqError
from slixmpp.xmlstream import StanzaBase

from tests.integration.clients import (
    WAIT,
    Client,
    ClientPool,
    Match,
    RawClient,
    delay_of,
    has_status,
    is_chat,
    is_error_reply,
    is_message,
    is_presence,
    is_roster_push,
    presence_from,
    push_item,
    roster_of,
    round_trip,
    send_chat,
    set_roster_item,
    subscribe,
    wait_for,
)
from tests.integration.conftest import DOMAIN, PASSWORD, RunningNode

USERS = ["alice", "bob", "carol"]
PLUGINS = ("xep_0030", "xep_0199")
CARBONS_NS = "urn:xmpp:carbons:2"
FORWARD_NS = "urn:xmpp:forward:0"


def bare(name: str) -> str:
    return f"{name}@{DOMAIN}"


# --- the test bed --------------------------------------------------------------------


class Testbed:
    """One node (restartable on the same store) and the clients of one test."""

    __test__ = False  # not a test class, whatever its name

    def __init__(self, node_factory: Callable[..., Any]) -> None:
        self._node_factory = node_factory
        self._node: RunningNode | None = None
        self._pool: ClientPool | None = None

    @property
    def node(self) -> RunningNode:
        assert self._node is not None, "start_node() first"
        return self._node

    @property
    def pool(self) -> ClientPool:
        assert self._pool is not None, "start_node() first"
        return self._pool

    async def start_node(
        self, *, name: str = "n1", users: list[str] | None = None, **sections: dict[str, Any]
    ) -> RunningNode:
        """Start a node; called again, a new node process on the same store.

        A restart takes a new `name`: node_factory keeps one directory per
        name, and the ready file of the old process would still be there.
        """
        self._node = await self._node_factory(
            name=name, users=USERS if users is None else users, **sections
        )
        if self._pool is None:
            self._pool = ClientPool(self._node.ca_file, domain=DOMAIN, password=PASSWORD)
        return self._node

    async def login(
        self, jid: str, *, extra_plugins: tuple[str, ...] = (), **options: Any
    ) -> Client:
        return await self.pool.login(self.node, jid, plugins=PLUGINS + extra_plugins, **options)

    def make(self, jid: str, *, extra_plugins: tuple[str, ...] = (), **options: Any) -> Client:
        return self.pool.make(jid, plugins=PLUGINS + extra_plugins, **options)

    async def start(self, client: Client) -> Client:
        return await self.pool.start(client, self.node)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close_all()


@pytest.fixture
async def bed(node_factory: Callable[..., Any]) -> AsyncIterator[Testbed]:
    testbed = Testbed(node_factory)
    yield testbed
    await testbed.close()


# --- matchers and small steps ----------------------------------------------------------


def is_carbon(direction: str, body: str) -> Match:
    def match(stanza: StanzaBase) -> bool:
        inner = forwarded(stanza, direction) if isinstance(stanza, Message) else None
        return inner is not None and inner.findtext("{jabber:client}body") == body

    return match


def is_server_ping(stanza: StanzaBase) -> bool:
    return (
        isinstance(stanza, Iq)
        and stanza["type"] == "get"
        and stanza.xml.find("{urn:xmpp:ping}ping") is not None
        and str(stanza["from"]) in ("", DOMAIN)
    )


def forwarded(stanza: StanzaBase, direction: str) -> ET.Element | None:
    path = f"{{{CARBONS_NS}}}{direction}/{{{FORWARD_NS}}}forwarded/{{jabber:client}}message"
    return stanza.xml.find(path)


def parse_stamp(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


# --- SASL ---------------------------------------------------------------------------


def sasl_replies(client: Client) -> list[str]:
    """The names of the SASL answers the client got; challenges keep their salt and count.

    A SCRAM server-first message is "r=<nonce>,s=<salt>,i=<iterations>": the
    nonce is fresh each time, the salt and count belong to the account.
    """
    replies = []
    for stanza in client.inbox.take_all(lambda s: s.name in ("challenge", "success", "failure")):
        if stanza.name == "challenge":
            text = base64.b64decode(stanza.xml.text or "").decode()
            fields = dict(part.partition("=")[::2] for part in text.split(","))
            replies.append(f"challenge s={fields['s']} i={fields['i']}")
        else:
            replies.append(stanza.name)
    return replies


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-1", "PLAIN"])
async def test_login_with_each_sasl_mechanism(bed: Testbed, mechanism: str) -> None:
    await bed.start_node()
    client = await bed.login("alice/desk", sasl_mech=mechanism, presence=False)
    chosen = client.plugin["feature_mechanisms"].mech
    assert chosen is not None and chosen.name == mechanism
    # SCRAM: server-first challenge, then success carrying the server signature,
    # which slixmpp verified (a wrong one aborts the login).
    replies = sasl_replies(client)
    if mechanism.startswith("SCRAM"):
        assert [reply.split()[0] for reply in replies] == ["challenge", "success"]
    else:
        assert replies == ["success"]
    assert str(client.boundjid) == "alice@localhost/desk"


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-1", "PLAIN"])
async def test_wrong_password_and_unknown_user_fail_identically(
    bed: Testbed, mechanism: str
) -> None:
    await bed.start_node()
    outcomes = []
    attempts = [("alice/desk", "wrong-pw"), ("mallory/desk", PASSWORD), ("mallory/desk", "x")]
    for jid, password in attempts:
        client = bed.pool.make(jid, password=password, sasl_mech=mechanism)
        failed = client.expect("failed_auth")
        gave_up = client.expect("failed_all_auth")
        started = client.expect("session_start")
        client.connect(bed.node.host, bed.node.port)
        failure = await wait_for(failed, f"{jid}: failed_auth")
        await wait_for(gave_up, f"{jid}: failed_all_auth")
        assert not started.done()
        outcomes.append((failure["condition"], sasl_replies(client)))
    assert [condition for condition, _ in outcomes] == ["not-authorized"] * 3
    if not mechanism.startswith("SCRAM"):
        assert [replies for _, replies in outcomes] == [["failure"]] * 3
        return
    real, unknown, unknown_again = (replies for _, replies in outcomes)
    assert [reply.split()[0] for reply in real] == ["challenge", "failure"]
    assert [reply.split()[0] for reply in unknown] == ["challenge", "failure"]
    # the unknown account looks like a real one: same iteration count, and a
    # salt that stays the same from one attempt to the next
    assert real[0].split()[2] == unknown[0].split()[2]
    assert unknown == unknown_again


# --- resource binding -----------------------------------------------------------------


async def test_bind_client_chosen_and_server_generated_resources(bed: Testbed) -> None:
    await bed.start_node()
    chosen = await bed.login("alice/desk")
    generated = [await bed.login("alice"), await bed.login("alice")]
    assert str(chosen.boundjid) == "alice@localhost/desk"
    resources = {client.boundjid.resource for client in generated}
    assert all(client.boundjid.bare == "alice@localhost" for client in generated)
    assert len(resources) == 2 and "" not in resources and "desk" not in resources
    # each bound resource is a live session of its own
    bob = await bed.login("bob/desk")
    for client in [chosen, *generated]:
        send_chat(bob, str(client.boundjid), f"to {client.boundjid.resource}")
        await client.inbox.next(
            is_message(f"to {client.boundjid.resource}", sender="bob@localhost/desk")
        )


async def test_second_login_with_same_full_jid_replaces_first_with_conflict(bed: Testbed) -> None:
    await bed.start_node()
    first = await bed.login("alice/desk")
    bob = await bed.login("bob/desk")
    await subscribe(bob, first)
    await bob.inbox.next(is_presence("available", "alice@localhost/desk"), what="first online")
    stream_error = first.expect("stream_error")
    first_gone = first.expect("disconnected")
    second = await bed.login("alice/desk", presence=False)
    error = await wait_for(stream_error, "stream error on the first session")
    assert error["condition"] == "conflict"
    await wait_for(first_gone, "first session disconnected")
    assert second.connected and str(second.boundjid) == "alice@localhost/desk"
    send_chat(bob, "alice@localhost/desk", "who is there?")
    await second.inbox.next(is_message("who is there?", sender="bob@localhost/desk"))

    # bob saw the first session go, then sees the second come: in that order
    second.send_presence(pstatus="second")
    from_desk = presence_from("alice@localhost/desk")
    assert (await bob.inbox.next(from_desk, what="presence"))["type"] == "unavailable"
    assert (await bob.inbox.next(from_desk, what="presence"))["status"] == "second"
    await round_trip(second)
    await round_trip(bob)
    assert bob.inbox.take(from_desk) is None


# --- roster -------------------------------------------------------------------------


async def test_roster_set_and_remove_are_pushed_to_every_interested_resource(
    bed: Testbed,
) -> None:
    await bed.start_node()
    desk = await bed.login("alice/desk", roster=True)
    phone = await bed.login("alice/phone", roster=True)
    watch = await bed.login("alice/watch")  # never asked for the roster: gets no pushes
    assert await roster_of(desk) == {}

    await set_roster_item(desk, bare("carol"), name="Carol", groups=("Friends",))
    for client in (desk, phone):
        push = await client.inbox.next(is_roster_push(bare("carol")), what="roster push")
        assert push_item(push) == {
            "name": "Carol",
            "subscription": "none",
            "ask": "",
            "groups": ["Friends"],
        }
    assert await roster_of(phone) == {bare("carol"): ("none", False)}

    await set_roster_item(desk, bare("carol"), name="Caroline", groups=("Work", "Friends"))
    for client in (desk, phone):
        push = await client.inbox.next(is_roster_push(bare("carol")), what="roster push")
        assert push_item(push)["name"] == "Caroline"
        assert sorted(push_item(push)["groups"]) == ["Friends", "Work"]

    await set_roster_item(phone, bare("carol"), remove=True)
    for client in (desk, phone):
        push = await client.inbox.next(is_roster_push(bare("carol")), what="removal push")
        assert push_item(push)["subscription"] == "remove"
    assert await roster_of(desk) == {}
    assert await roster_of(phone) == {}

    # RFC 6121 §2.5.3: removing what is not there is item-not-found
    with pytest.raises(IqError) as caught:
        await set_roster_item(desk, bare("carol"), remove=True)
    assert caught.value.iq["error"]["condition"] == "item-not-found"
    await round_trip(watch)
    assert watch.inbox.take(is_roster_push(bare("carol"))) is None


# --- presence subscriptions (RFC 6121 §3) -------------------------------------------------


async def test_subscription_handshake_one_way_then_mutual(bed: Testbed) -> None:
    await bed.start_node()
    alice = await bed.login("alice/desk", roster=True)
    bob = await bed.login("bob/desk", roster=True)

    alice.send_presence(pto=bare("bob"), ptype="subscribe")
    push = await alice.inbox.next(is_roster_push(bare("bob")), what="pending-out push")
    assert (push_item(push)["subscription"], push_item(push)["ask"]) == ("none", "subscribe")
    request = await bob.inbox.next(is_presence("subscribe", bare("alice")), what="request")
    assert str(request["to"]) == bare("bob")
    assert await roster_of(bob) == {}  # a pending-in request is not a roster item

    bob.send_presence(pto=bare("alice"), ptype="subscribed")
    push = await bob.inbox.next(is_roster_push(bare("alice")), what="bob's push")
    assert push_item(push)["subscription"] == "from"
    push = await alice.inbox.next(is_roster_push(bare("bob")), what="alice's push")
    assert (push_item(push)["subscription"], push_item(push)["ask"]) == ("to", "")
    await alice.inbox.next(is_presence("subscribed", bare("bob")), what="subscribed")
    # §3.1.5: the contact's server sends the contact's current presence to the user
    await alice.inbox.next(is_presence("available", "bob@localhost/desk"), what="bob's presence")
    assert await roster_of(alice) == {bare("bob"): ("to", False)}
    assert await roster_of(bob) == {bare("alice"): ("from", False)}

    bob.send_presence(pto=bare("alice"), ptype="subscribe")
    await alice.inbox.next(is_presence("subscribe", bare("bob")), what="bob's request")
    alice.send_presence(pto=bare("bob"), ptype="subscribed")
    await bob.inbox.next(is_presence("subscribed", bare("alice")), what="subscribed")
    await bob.inbox.next(is_presence("available", "alice@localhost/desk"), what="alice's presence")
    assert await roster_of(alice) == {bare("bob"): ("both", False)}
    assert await roster_of(bob) == {bare("alice"): ("both", False)}

    # §3.1.3: asking again for what one has is answered by bob's server, not
    # bob; its auto-reply changes nothing for alice, so she hears nothing (A.3.2)
    alice.send_presence(pto=bare("bob"), ptype="subscribe")
    await round_trip(alice)
    await round_trip(bob)
    assert bob.inbox.take(is_presence("subscribe", bare("alice"))) is None
    assert await roster_of(alice) == {bare("bob"): ("both", False)}


async def test_approval_while_the_subscriber_is_offline(bed: Testbed) -> None:
    await bed.start_node()
    alice = await bed.login("alice/desk", roster=True)
    bob = await bed.login("bob/desk", roster=True)
    alice.send_presence(pto=bare("bob"), ptype="subscribe")
    await bob.inbox.next(is_presence("subscribe", bare("alice")), what="request")
    alice.disconnect()
    await wait_for(alice.disconnected, "alice gone")
    bob.send_presence(pto=bare("alice"), ptype="subscribed")
    await bob.inbox.next(is_roster_push(bare("alice")), what="bob's push")
    await round_trip(bob)

    alice = await bed.login("alice/desk", roster=True)
    await alice.inbox.next(is_presence("available", "bob@localhost/desk"), what="probe answer")
    assert await roster_of(alice) == {bare("bob"): ("to", False)}
    assert await roster_of(bob) == {bare("alice"): ("from", False)}


async def test_presence_reaches_subscriber_and_unavailable_follows_disconnects(
    bed: Testbed,
) -> None:
    await bed.start_node()
    alice = await bed.login("alice/desk")
    bob_desk = await bed.login("bob/desk")
    await subscribe(alice, bob_desk)
    bob_phone = await bed.login("bob/phone")
    await alice.inbox.next(is_presence("available", "bob@localhost/phone"), what="initial")

    bob_desk.send_presence(pshow="away", pstatus="lunch")
    update = await alice.inbox.next(is_presence("away", "bob@localhost/desk"), what="away")
    assert update["status"] == "lunch"

    bob_desk.disconnect()  # a clean close
    await alice.inbox.next(is_presence("unavailable", "bob@localhost/desk"), what="clean close")
    bob_phone.drop_connection()  # the connection just dies
    await alice.inbox.next(is_presence("unavailable", "bob@localhost/phone"), what="dropped")


async def test_initial_presence_probes_the_contacts_one_is_subscribed_to(
    bed: Testbed,
) -> None:
    await bed.start_node()
    alice = await bed.login("alice/desk")
    bob = await bed.login("bob/desk")
    carol = await bed.login("carol/desk")
    await subscribe(alice, bob)
    bob.send_presence(pshow="dnd", pstatus="busy")
    carol.send_presence(pstatus="carol here")  # alice has no subscription to carol
    await alice.inbox.next(has_status("busy", "bob@localhost/desk"), what="bob busy")
    await round_trip(carol)

    laptop = await bed.login("alice/laptop")  # bob's presence comes without bob doing anything
    current = await laptop.inbox.next(is_presence("dnd", "bob@localhost/desk"), what="probe")
    assert current["status"] == "busy"
    assert str(current["to"]) == "alice@localhost/laptop"
    # alice/desk sees her new resource; carol's presence is none of alice's business
    await alice.inbox.next(is_presence("available", "alice@localhost/laptop"), what="own")
    await round_trip(laptop)
    assert (
        laptop.inbox.take(lambda s: isinstance(s, Presence) and "carol" in str(s["from"])) is None
    )


async def test_subscription_request_to_offline_user_is_delivered_at_next_login(
    bed: Testbed,
) -> None:
    await bed.start_node()
    alice = await bed.login("alice/desk", roster=True)
    alice.send_presence(pto=bare("bob"), ptype="subscribe")
    await alice.inbox.next(is_roster_push(bare("bob")), what="pending-out push")
    await round_trip(alice)

    bob = await bed.login("bob/desk", roster=True)
    request = await bob.inbox.next(is_presence("subscribe", bare("alice")), what="stored request")
    assert str(request["to"]) == bare("bob")
    assert await roster_of(bob) == {}

    # still pending: it comes again at the next login, until answered
    bob.disconnect()
    await wait_for(bob.disconnected, "bob gone")
    bob = await bed.login("bob/desk", roster=True)
    await bob.inbox.next(is_presence("subscribe", bare("alice")), what="request again")
    bob.send_presence(pto=bare("alice"), ptype="subscribed")
    await alice.inbox.next(is_presence("subscribed", bare("bob")), what="approval")
    assert await roster_of(alice) == {bare("bob"): ("to", False)}
    assert await roster_of(bob) == {bare("alice"): ("from", False)}

    # answered: not delivered any more
    bob.disconnect()
    await wait_for(bob.disconnected, "bob gone")
    bob = await bed.login("bob/desk", roster=True)
    await round_trip(bob)
    assert bob.inbox.take(is_presence("subscribe", bare("alice"))) is None


async def test_unsubscribe_and_unsubscribed_update_both_rosters(bed: Testbed) -> None:
    await bed.start_node()
    alice = await bed.login("alice/desk", roster=True)
    bob = await bed.login("bob/desk", roster=True)
    await subscribe(alice, bob)
    await subscribe(bob, alice)
    assert await roster_of(alice) == {bare("bob"): ("both", False)}

    # alice stops seeing bob
    alice.send_presence(pto=bare("bob"), ptype="unsubscribe")
    await bob.inbox.next(is_presence("unsubscribe", bare("alice")), what="unsubscribe")
    push = await alice.inbox.next(is_roster_push(bare("bob")))
    assert push_item(push)["subscription"] == "from"
    push = await bob.inbox.next(is_roster_push(bare("alice")))
    assert push_item(push)["subscription"] == "to"
    assert await roster_of(alice) == {bare("bob"): ("from", False)}
    assert await roster_of(bob) == {bare("alice"): ("to", False)}

    # alice stops bob seeing her: he is told, and she goes unavailable for him
    alice.send_presence(pto=bare("bob"), ptype="unsubscribed")
    await bob.inbox.next(is_presence("unsubscribed", bare("alice")), what="unsubscribed")
    await bob.inbox.next(is_presence("unavailable", "alice@localhost/desk"), what="unavailable")
    push = await alice.inbox.next(is_roster_push(bare("bob")))
    assert push_item(push)["subscription"] == "none"
    push = await bob.inbox.next(is_roster_push(bare("alice")))
    assert push_item(push)["subscription"] == "none"
    assert await roster_of(alice) == {bare("bob"): ("none", False)}
    assert await roster_of(bob) == {bare("alice"): ("none", False)}

    # and presence no longer flows either way
    alice.send_presence(pstatus="after")
    bob.send_presence(pstatus="after")
    await round_trip(alice)
    await round_trip(bob)
    send_chat(alice, "bob@localhost/desk", "marker")
    send_chat(bob, "alice@localhost/desk", "marker")
    await bob.inbox.next(is_message("marker"))
    await alice.inbox.next(is_message("marker"))
    assert bob.inbox.take(has_status("after", "alice@localhost/desk")) is None
    assert alice.inbox.take(has_status("after", "bob@localhost/desk")) is None


async def test_subscriptions_and_pending_requests_survive_a_restart(bed: Testbed) -> None:
    node = await bed.start_node()
    alice = await bed.login("alice/desk", roster=True)
    bob = await bed.login("bob/desk", roster=True)
    await subscribe(alice, bob)
    alice.disconnect()
    await wait_for(alice.disconnected, "alice gone")
    bob.send_presence(pto=bare("alice"), ptype="subscribe")  # alice is offline
    await bob.inbox.next(is_roster_push(bare("alice")), what="pending-out push")
    await round_trip(bob)
    await bed.pool.close_all()
    assert node.terminate() == 0

    await bed.start_node(name="n2", users=[])  # a new process on the same store
    alice = await bed.login("alice/desk", roster=True)
    assert await roster_of(alice) == {bare("bob"): ("to", False)}
    await alice.inbox.next(is_presence("subscribe", bare("bob")), what="stored request")
    bob = await bed.login("bob/desk", roster=True)
    assert await roster_of(bob) == {bare("alice"): ("from", True)}
    # alice subscribed to bob before the restart: his presence reaches her
    await alice.inbox.next(is_presence("available", "bob@localhost/desk"), what="bob online")

    alice.send_presence(pto=bare("bob"), ptype="subscribed")
    await bob.inbox.next(is_presence("subscribed", bare("alice")), what="approval")
    await round_trip(alice)
    assert await roster_of(alice) == {bare("bob"): ("both", False)}
    assert await roster_of(bob) == {bare("alice"): ("both", False)}


# --- directed presence (RFC 6121 §4.6) ---------------------------------------------------


async def test_directed_presence_to_non_subscriber_and_unavailable_on_disconnect(
    bed: Testbed,
) -> None:
    await bed.start_node()
    alice = await bed.login("alice/desk")
    bob = await bed.login("bob/desk")
    carol = await bed.login("carol/desk")
    alice.send_presence(pto="bob@localhost/desk", pstatus="just for you")
    directed = await bob.inbox.next(is_presence("available", "alice@localhost/desk"))
    assert directed["status"] == "just for you"

    alice.drop_connection()
    await bob.inbox.next(is_presence("unavailable", "alice@localhost/desk"), what="unavailable")
    # carol never got alice's presence, so she is not told that it went
    send_chat(bob, "carol@localhost/desk", "marker")
    await carol.inbox.next(is_message("marker"))
    assert carol.inbox.take(lambda s: isinstance(s, Presence) and "alice" in str(s["from"])) is None


async def test_directed_presence_is_withdrawn_by_broadcast_unavailable(bed: Testbed) -> None:
    await bed.start_node()
    alice = await bed.login("alice/desk")
    bob = await bed.login("bob/desk")
    alice.send_presence(pto=bare("bob"), pstatus="hello")
    await bob.inbox.next(has_status("hello", "alice@localhost/desk"), what="directed")
    alice.send_presence(ptype="unavailable", pstatus="bye")
    gone = await bob.inbox.next(is_presence("unavailable", "alice@localhost/desk"), what="bye")
    assert gone["status"] == "bye"
    # withdrawn once: the disconnect that follows sends nothing more
    alice.disconnect()
    await wait_for(alice.disconnected, "alice gone")
    carol = await bed.login("carol/desk")
    send_chat(carol, "bob@localhost/desk", "marker")
    await bob.inbox.next(is_message("marker"))
    assert bob.inbox.take(is_presence("unavailable", "alice@localhost/desk")) is None


# --- messages (RFC 6121 §8.5) -----------------------------------------------------------


async def test_chat_both_ways(bed: Testbed) -> None:
    await bed.start_node()
    alice = await bed.login("alice/desk")
    bob = await bed.login("bob/desk")
    send_chat(alice, bare("bob"), "hello bob")
    received = await bob.inbox.next(is_message("hello bob"))
    assert (str(received["from"]), str(received["to"]), received["type"]) == (
        "alice@localhost/desk",
        bare("bob"),
        "chat",
    )
    send_chat(bob, "alice@localhost/desk", "hello alice")
    received = await alice.inbox.next(is_message("hello alice"))
    assert (str(received["from"]), str(received["to"]), received["type"]) == (
        "bob@localhost/desk",
        "alice@localhost/desk",
        "chat",
    )


async def test_bare_jid_message_goes_to_the_highest_priority(bed: Testbed) -> None:
    await bed.start_node()
    high = await bed.login("alice/high", priority=5)
    low = await bed.login("alice/low", priority=1)
    bob = await bed.login("bob/desk")
    send_chat(bob, bare("alice"), "for the best")
    send_chat(bob, "alice@localhost/low", "marker")
    await high.inbox.next(is_message("for the best", sender="bob@localhost/desk"))
    await low.inbox.next(is_message("marker"))
    assert low.inbox.take(is_message("for the best")) is None


async def test_bare_jid_message_goes_to_all_of_equal_priority(bed: Testbed) -> None:
    await bed.start_node()
    desk = await bed.login("alice/desk", priority=3)
    phone = await bed.login("alice/phone", priority=3)
    away = await bed.login("alice/away", priority=1)
    bob = await bed.login("bob/desk")
    send_chat(bob, bare("alice"), "for both")
    send_chat(bob, "alice@localhost/away", "marker")
    await desk.inbox.next(is_message("for both"))
    await phone.inbox.next(is_message("for both"))
    await away.inbox.next(is_message("marker"))
    assert away.inbox.take(is_message("for both")) is None


async def test_message_to_unknown_resource_is_treated_as_bare(bed: Testbed) -> None:
    await bed.start_node()
    high = await bed.login("alice/high", priority=2)
    low = await bed.login("alice/low", priority=0)
    bob = await bed.login("bob/desk")
    send_chat(bob, "alice@localhost/gone", "to a ghost")
    send_chat(bob, "alice@localhost/low", "marker")
    received = await high.inbox.next(is_message("to a ghost", sender="bob@localhost/desk"))
    assert str(received["to"]) in ("alice@localhost/gone", bare("alice"), "alice@localhost/high")
    await low.inbox.next(is_message("marker"))
    assert low.inbox.take(is_message("to a ghost")) is None
    assert bob.inbox.take(lambda s: isinstance(s, Message) and s["type"] == "error") is None


async def test_negative_priority_resource_gets_no_bare_jid_messages(bed: Testbed) -> None:
    await bed.start_node()
    hidden = await bed.login("alice/bot", priority=-1)
    visible = await bed.login("alice/desk", priority=0)
    bob = await bed.login("bob/desk")
    send_chat(bob, bare("alice"), "not for bots")
    send_chat(bob, "alice@localhost/bot", "direct to the bot")
    await visible.inbox.next(is_message("not for bots"))
    await hidden.inbox.next(is_message("direct to the bot"))  # full JID still works
    assert hidden.inbox.take(is_message("not for bots")) is None

    # with only the negative-priority resource left, bare-JID messages are stored
    visible.disconnect()
    await hidden.inbox.next(is_presence("unavailable", "alice@localhost/desk"), what="desk gone")
    send_chat(bob, bare("alice"), "kept for later")
    await round_trip(bob)
    send_chat(bob, "alice@localhost/bot", "marker")
    await hidden.inbox.next(is_message("marker"))
    assert hidden.inbox.take(is_message("kept for later")) is None
    later = await bed.login("alice/later")
    stored = await later.inbox.next(is_message("kept for later", sender="bob@localhost/desk"))
    assert delay_of(stored) is not None


async def test_offline_message_is_delivered_with_delay_on_initial_presence(bed: Testbed) -> None:
    await bed.start_node()
    alice = await bed.login("alice/desk")
    sent_at = datetime.now(UTC)
    send_chat(alice, bare("bob"), "while you were out")
    await round_trip(alice)  # stored by now
    assert alice.inbox.take(lambda s: isinstance(s, Message)) is None  # no error came back

    bob = await bed.login("bob/desk", presence=False)
    send_chat(alice, bare("bob"), "while you were not available")
    await round_trip(alice)
    await round_trip(bob)
    assert bob.inbox.take(is_chat) is None  # connected is not available: nothing yet
    bob.send_presence()
    stored = await bob.inbox.next(is_message("while you were out", sender="alice@localhost/desk"))
    later = await bob.inbox.next(is_message("while you were not available"))
    assert delay_of(later) is not None
    assert stored["type"] == "chat"
    delay = delay_of(stored)
    assert delay is not None and delay.get("from") == DOMAIN
    stamp = parse_stamp(delay.get("stamp", ""))
    assert sent_at - timedelta(seconds=2) <= stamp <= datetime.now(UTC)
    # delivered once: a second login finds nothing stored
    await round_trip(bob)
    bob.disconnect()
    await wait_for(bob.disconnected, "bob gone")
    bob = await bed.login("bob/desk")
    await round_trip(bob)
    assert bob.inbox.take(is_chat) is None


async def test_offline_storage_full_answers_service_unavailable(bed: Testbed) -> None:
    await bed.start_node(limits={"offline_messages_per_user": 2})
    alice = await bed.login("alice/desk")
    ids = [send_chat(alice, bare("bob"), body) for body in ("one", "two", "three")]
    error = await alice.inbox.next(is_error_reply(ids[2]), what="error for the third message")
    assert (error["error"]["condition"], error["error"]["type"]) == (
        "service-unavailable",
        "cancel",
    )
    assert str(error["from"]) == bare("bob")
    await round_trip(alice)
    assert alice.inbox.take(lambda s: isinstance(s, Message)) is None  # none for one, two

    bob = await bed.login("bob/desk")
    stored = [await bob.inbox.next(is_chat), await bob.inbox.next(is_chat)]
    assert [message["body"] for message in stored] == ["one", "two"]  # oldest first
    await round_trip(bob)
    assert bob.inbox.take(is_chat) is None


# --- carbons (XEP-0280) -------------------------------------------------------------------


async def test_carbons_copy_received_and_sent_chats_but_not_private_ones(bed: Testbed) -> None:
    await bed.start_node()
    desk = await bed.login("alice/desk", extra_plugins=("xep_0280",))
    phone = await bed.login("alice/phone", extra_plugins=("xep_0280",))
    for client in (desk, phone):
        await client.plugin["xep_0280"].enable(timeout=WAIT)
    bob = await bed.login("bob/desk")

    send_chat(bob, "alice@localhost/desk", "incoming")
    await desk.inbox.next(is_message("incoming"))
    carbon = await phone.inbox.next(is_carbon("received", "incoming"), what="received carbon")
    assert (str(carbon["from"]), str(carbon["to"])) == (bare("alice"), "alice@localhost/phone")
    inner = forwarded(carbon, "received")
    assert inner is not None
    assert (inner.get("from"), inner.get("to")) == ("bob@localhost/desk", "alice@localhost/desk")
    assert desk.inbox.take(is_carbon("received", "incoming")) is None

    send_chat(desk, bare("bob"), "outgoing")
    await bob.inbox.next(is_message("outgoing"))
    carbon = await phone.inbox.next(is_carbon("sent", "outgoing"), what="sent carbon")
    assert (str(carbon["from"]), str(carbon["to"])) == (bare("alice"), "alice@localhost/phone")
    inner = forwarded(carbon, "sent")
    assert inner is not None
    assert (inner.get("from"), inner.get("to")) == ("alice@localhost/desk", bare("bob"))

    # to the bare JID with equal priorities both resources get it: nothing to copy
    send_chat(bob, bare("alice"), "to both")
    await desk.inbox.next(is_message("to both"))
    await phone.inbox.next(is_message("to both"))

    send_chat(bob, "alice@localhost/desk", "private in", private=True)
    send_chat(desk, bare("bob"), "private out", private=True)
    await desk.inbox.next(is_message("private in"))
    await bob.inbox.next(is_message("private out"))
    send_chat(desk, bare("bob"), "marker")
    await phone.inbox.next(is_carbon("sent", "marker"), what="marker carbon")
    assert phone.inbox.take(lambda s: forwarded(s, "received") is not None) is None
    assert phone.inbox.take(lambda s: forwarded(s, "sent") is not None) is None


# --- ping (XEP-0199) ----------------------------------------------------------------------


async def test_client_pings_server(bed: Testbed) -> None:
    await bed.start_node()
    alice = await bed.login("alice/desk")
    reply = await alice.plugin["xep_0199"].send_ping(JID(DOMAIN), timeout=WAIT)
    assert (reply["type"], str(reply["from"])) == ("result", DOMAIN)


async def test_server_pings_idle_client_that_answers_and_stays(bed: Testbed) -> None:
    await bed.start_node(c2s={"idle_timeout": 1.0, "ping_timeout": 1.0})
    alice = await bed.login("alice/desk")
    gone = alice.expect("disconnected")
    await alice.inbox.next(is_server_ping, timeout=4, what="first server ping")
    # a second ping comes only if the first was answered and the idle clock restarted
    await alice.inbox.next(is_server_ping, timeout=4, what="second server ping")
    assert not gone.done() and alice.connected
    await round_trip(alice)


async def test_silent_client_is_disconnected_after_idle_and_ping_timeouts(bed: Testbed) -> None:
    idle_timeout = ping_timeout = 1.0
    node = await bed.start_node(c2s={"idle_timeout": idle_timeout, "ping_timeout": ping_timeout})
    bob = await bed.login("bob/desk")
    await subscribe(bob, await bed.login("alice/other"))  # bob will see alice's resources go
    raw = await RawClient.login(
        node,
        bed.pool.context,
        username="alice",
        password=PASSWORD,
        domain=DOMAIN,
        resource="silent",
    )
    raw.send(b"<presence/>")
    await bob.inbox.next(is_presence("available", "alice@localhost/silent"), what="raw online")
    loop = asyncio.get_running_loop()
    quiet_since = loop.time()
    try:
        received = await raw.read_to_end(timeout=idle_timeout + ping_timeout + 4)
    finally:
        raw.close()
    elapsed = loop.time() - quiet_since
    assert b"urn:xmpp:ping" in received  # closed only after an unanswered ping
    assert elapsed >= idle_timeout + ping_timeout - 0.2
    await bob.inbox.next(is_presence("unavailable", "alice@localhost/silent"), what="raw gone")


# --- service discovery (XEP-0030) and server IQs ----------------------------------------


async def test_disco_info_and_items_of_the_server(bed: Testbed) -> None:
    await bed.start_node()
    alice = await bed.login("alice/desk")
    info = await alice.plugin["xep_0030"].get_info(jid=JID(DOMAIN), timeout=WAIT)
    assert str(info["from"]) == DOMAIN
    features = set(info["disco_info"]["features"])
    assert {
        "http://jabber.org/protocol/disco#info",
        "http://jabber.org/protocol/disco#items",
        "urn:xmpp:ping",
        "urn:xmpp:carbons:2",
    } <= features
    assert ("server", "im") in {(i[0], i[1]) for i in info["disco_info"]["identities"]}
    items = await alice.plugin["xep_0030"].get_items(jid=JID(DOMAIN), timeout=WAIT)
    assert (items["type"], str(items["from"])) == ("result", DOMAIN)
    assert items["disco_items"]["items"] == set()


async def test_unknown_iq_namespace_to_server_is_service_unavailable(bed: Testbed) -> None:
    await bed.start_node()
    alice = await bed.login("alice/desk")
    for iq_type in ("get", "set"):
        iq = alice.make_iq(ito=DOMAIN, itype=iq_type)
        iq.xml.append(ET.Element("{urn:example:nothing-here}query"))
        with pytest.raises(IqError) as caught:
            await alice.request(iq)
        error = caught.value.iq
        assert (error["error"]["condition"], error["error"]["type"]) == (
            "service-unavailable",
            "cancel",
        )
        assert str(error["from"]) == DOMAIN
    assert alice.connected  # a stanza error never ends the stream
    await round_trip(alice)


async def test_disco_info_to_another_users_bare_jid_is_answered_by_the_server(
    bed: Testbed,
) -> None:
    await bed.start_node()
    alice = await bed.login("alice/desk")
    bob = await bed.login("bob/desk")
    info = await alice.plugin["xep_0030"].get_info(jid=JID(bare("bob")), timeout=WAIT)
    assert (info["type"], str(info["from"])) == ("result", bare("bob"))
    assert ("account", "registered") in {(i[0], i[1]) for i in info["disco_info"]["identities"]}
    await round_trip(bob)
    assert bob.inbox.take(lambda s: isinstance(s, Iq) and s["type"] == "get") is None


async def test_disco_info_to_an_offline_users_bare_jid_is_answered_by_the_server(
    bed: Testbed,
) -> None:
    await bed.start_node()
    alice = await bed.login("alice/desk")
    info = await alice.plugin["xep_0030"].get_info(jid=JID(bare("bob")), timeout=WAIT)
    assert (info["type"], str(info["from"])) == ("result", bare("bob"))
    assert ("account", "registered") in {(i[0], i[1]) for i in info["disco_info"]["identities"]}


# --- stream management (XEP-0198) -----------------------------------------------------------


async def sm_login(bed: Testbed, jid: str) -> Client:
    client = bed.make(jid, extra_plugins=("xep_0198",))
    enabled = client.expect("sm_enabled")
    await bed.start(client)
    answer = await wait_for(enabled, "<enabled/>")
    assert answer["resume"] in (True, "true") and answer["id"]
    client.send_presence()
    return client


async def test_stream_resumption_delivers_what_arrived_while_disconnected(bed: Testbed) -> None:
    await bed.start_node(c2s={"sm_resume_timeout": 30.0})
    alice = await sm_login(bed, "alice/phone")
    bob = await bed.login("bob/desk")
    await subscribe(bob, alice)

    # sent just before the connection dies: the server's h on resumption tells
    # slixmpp whether to send it again, so that it arrives exactly once
    send_chat(alice, "bob@localhost/desk", "last words")
    gone = alice.expect("disconnected")
    alice.drop_connection()  # no </stream:stream>: the session waits for resumption
    await wait_for(gone, "alice's connection gone")
    send_chat(bob, "alice@localhost/phone", "one")
    send_chat(bob, bare("alice"), "two")
    await round_trip(bob)

    resumed = alice.expect("session_resumed")
    started_again = alice.expect("session_start")
    alice.connect(bed.node.host, bed.node.port)
    await wait_for(resumed, "session_resumed")
    assert str(alice.boundjid) == "alice@localhost/phone"
    await alice.inbox.next(is_message("one", sender="bob@localhost/desk"))
    await alice.inbox.next(is_message("two", sender="bob@localhost/desk"))
    send_chat(bob, "alice@localhost/phone", "three")
    await alice.inbox.next(is_message("three"))
    assert not started_again.done()  # the same session, not a new one

    # again: what was handled before is not re-sent, what came meanwhile is
    gone = alice.expect("disconnected")
    alice.drop_connection()
    await wait_for(gone, "alice's connection gone again")
    send_chat(bob, "alice@localhost/phone", "four")
    await round_trip(bob)
    resumed = alice.expect("session_resumed")
    alice.connect(bed.node.host, bed.node.port)
    await wait_for(resumed, "second session_resumed")
    await alice.inbox.next(is_message("four"))
    await round_trip(alice)
    assert alice.inbox.take_all(lambda s: isinstance(s, Message)) == []
    assert not started_again.done()

    send_chat(alice, "bob@localhost/desk", "back")
    await bob.inbox.next(is_message("back", sender="alice@localhost/phone"))
    await bob.inbox.next(is_message("last words", sender="alice@localhost/phone"))
    await round_trip(bob)
    assert bob.inbox.take(is_message("last words")) is None
    assert bob.inbox.take(is_presence("unavailable", "alice@localhost/phone")) is None


async def test_unresumed_session_expires_and_unacked_messages_go_offline(bed: Testbed) -> None:
    resume_timeout = 1.0
    # the handshake timeout also sets how often the node looks at its timers
    await bed.start_node(c2s={"sm_resume_timeout": resume_timeout, "handshake_timeout": 2.0})
    alice = await sm_login(bed, "alice/phone")
    bob = await bed.login("bob/desk")
    await subscribe(bob, alice)
    send_chat(bob, "alice@localhost/phone", "seen before")
    await alice.inbox.next(is_message("seen before"))
    alice.plugin["xep_0198"].send_ack()  # type: ignore[no-untyped-call]
    await round_trip(alice)  # the server has the ack

    gone = alice.expect("disconnected")
    alice.drop_connection()
    await wait_for(gone, "alice's connection gone")
    send_chat(bob, "alice@localhost/phone", "never acked")
    await round_trip(bob)
    # only when the resumption window closes does alice go offline for bob
    await bob.inbox.next(
        is_presence("unavailable", "alice@localhost/phone"),
        timeout=resume_timeout + 4,
        what="alice expired",
    )

    laptop = await bed.login("alice/laptop")
    stored = await laptop.inbox.next(is_message("never acked", sender="bob@localhost/desk"))
    assert delay_of(stored) is not None
    await round_trip(laptop)
    assert laptop.inbox.take(is_message("never acked")) is None  # exactly once
    assert laptop.inbox.take(is_message("seen before")) is None  # acked: not again
    assert bob.inbox.take(lambda s: isinstance(s, Message) and s["type"] == "error") is None


async def test_clean_close_ends_a_resumable_session_at_once(bed: Testbed) -> None:
    await bed.start_node(c2s={"sm_resume_timeout": 30.0})
    alice = await sm_login(bed, "alice/phone")
    bob = await bed.login("bob/desk")
    await subscribe(bob, alice)
    alice.disconnect()  # </stream:stream>: XEP-0198 §7, the session ends now
    await bob.inbox.next(is_presence("unavailable", "alice@localhost/phone"), what="unavailable")


async def test_resumption_while_the_old_connection_still_looks_alive(bed: Testbed) -> None:
    await bed.start_node(c2s={"sm_resume_timeout": 30.0})
    old = await sm_login(bed, "alice/phone")
    bob = await bed.login("bob/desk")
    await subscribe(bob, old)
    send_chat(bob, "alice@localhost/phone", "one")
    await old.inbox.next(is_message("one"))

    # the client moved networks: a new connection resumes before the server
    # has noticed that the old one is dead
    new = bed.make("alice/phone", extra_plugins=("xep_0198",))
    old_sm, new_sm = old.plugin["xep_0198"], new.plugin["xep_0198"]
    new_sm.sm_id, new_sm.handled = old_sm.sm_id, old_sm.handled
    new_sm.seq, new_sm.last_ack = old_sm.seq, old_sm.last_ack
    new_sm.unacked_queue = collections.deque(old_sm.unacked_queue)
    old_gone = old.expect("disconnected")
    resumed = new.expect("session_resumed")
    new.connect(bed.node.host, bed.node.port)
    await wait_for(resumed, "session_resumed on the new connection")
    await wait_for(old_gone, "the old connection closed by the server")

    send_chat(bob, "alice@localhost/phone", "two")
    await new.inbox.next(is_message("two", sender="bob@localhost/desk"))
    send_chat(new, "bob@localhost/desk", "still here")
    await bob.inbox.next(is_message("still here", sender="alice@localhost/phone"))
    assert bob.inbox.take(is_presence("unavailable", "alice@localhost/phone")) is None
    assert new.inbox.take(is_message("one")) is None  # handled before: not sent again


async def test_new_login_replaces_a_hibernated_session_and_its_messages_move_on(
    bed: Testbed,
) -> None:
    await bed.start_node(c2s={"sm_resume_timeout": 30.0})
    hibernated = await sm_login(bed, "alice/phone")
    desk = await bed.login("alice/desk")
    bob = await bed.login("bob/desk")
    await subscribe(bob, hibernated)
    await bob.inbox.next(is_presence("available", "alice@localhost/phone"), what="phone online")
    gone = hibernated.expect("disconnected")
    hibernated.drop_connection()
    await wait_for(gone, "alice's connection gone")
    send_chat(bob, "alice@localhost/phone", "kept for the phone")
    await round_trip(bob)

    # a fresh login with the same full JID (no resumption) ends the hibernated
    # session at bind time: its unacknowledged message is routed again to where it
    # was addressed, the new session of that full JID (RFC 6121 §8.5.3.1: a connected
    # resource matches), not to the desk
    phone = await bed.login("alice/phone", presence=False)
    moved = await phone.inbox.next(is_message("kept for the phone", sender="bob@localhost/desk"))
    assert str(moved["to"]) == "alice@localhost/phone"
    phone.send_presence(pstatus="fresh")
    from_phone = presence_from("alice@localhost/phone")
    assert (await bob.inbox.next(from_phone, what="presence"))["type"] == "unavailable"
    assert (await bob.inbox.next(from_phone, what="presence"))["status"] == "fresh"
    await round_trip(phone)
    await round_trip(desk)
    await round_trip(bob)
    assert phone.inbox.take(is_message("kept for the phone")) is None  # exactly once
    assert desk.inbox.take(is_message("kept for the phone")) is None  # and not copied
    assert bob.inbox.take(from_phone) is None
