"""aioxmpp as an independent client against a real node process.

aioxmpp does its own STARTTLS (aioopenssl/pyOpenSSL), SCRAM (aiosasl),
roster, presence, disco, ping and XEP-0198 stream management, so these tests
check the server against a second implementation besides slixmpp. The
server certificate is verified against the cluster CA the harness generated;
one test makes sure a client that does not trust that CA is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiosasl  # type: ignore[import-untyped]
import aioxmpp
import aioxmpp.connector
import aioxmpp.disco
import aioxmpp.dispatcher
import aioxmpp.errors
import aioxmpp.ping
import aioxmpp.roster
import aioxmpp.security_layer
import OpenSSL.SSL
import pytest

from tests.integration.conftest import DOMAIN, PASSWORD
from xmpp_ha.store.sql import SQLStore

CLIENT_LOGGER = "aioxmpp-test"  # each client logs under CLIENT_LOGGER.<user>.<resource>
STEP_TIMEOUT = 10.0  # seconds for one expected event
SERVER = aioxmpp.JID.fromstr(DOMAIN)


def _trusting(ca_file: Path | None) -> Callable[[], OpenSSL.SSL.Context]:
    """An ssl_context_factory: aioxmpp's defaults plus trust in the test CA."""

    def factory() -> OpenSSL.SSL.Context:
        context: OpenSSL.SSL.Context = aioxmpp.security_layer.default_ssl_context()
        if ca_file is not None:
            context.load_verify_locations(str(ca_file))
        return context

    return factory


class RecordingSASLProvider(aioxmpp.security_layer.PasswordSASLProvider):  # type: ignore[misc]
    """The stock password provider, remembering which mechanism it ran."""

    def __init__(self, password: str) -> None:
        async def provide(_jid: aioxmpp.JID, attempt: int) -> str | None:
            return password if attempt == 0 else None

        super().__init__(provide)
        self.used: list[tuple[str, Any]] = []

    async def _execute(self, intf: Any, mechanism: Any, token: Any) -> bool:
        self.used.append((type(mechanism).__name__, token))
        return bool(await super()._execute(intf, mechanism, token))


def make_client(
    node: Any,
    name: str,
    *,
    resource: str = "aio",
    password: str = PASSWORD,
    ca_file: Path | None | bool = True,
    sasl: RecordingSASLProvider | None = None,
) -> aioxmpp.Client:
    trusted = node.ca_file if ca_file is True else (ca_file or None)
    layer = aioxmpp.make_security_layer(password, ssl_context_factory=_trusting(trusted))
    if sasl is not None:
        layer = layer._replace(sasl_providers=(sasl,))
    return aioxmpp.Client(
        aioxmpp.JID.fromstr(f"{name}@{DOMAIN}/{resource}"),
        layer,
        override_peer=[(node.host, node.port, aioxmpp.connector.STARTTLSConnector())],
        max_initial_attempts=1,
        logger=logging.getLogger(f"{CLIENT_LOGGER}.{name}.{resource}"),
    )


@contextlib.asynccontextmanager
async def online(client: aioxmpp.Client, *, available: bool = True) -> AsyncIterator[Any]:
    """Connected (and available, by default) for the duration of the block."""
    presence = aioxmpp.PresenceState(available=available)
    async with asyncio.timeout(STEP_TIMEOUT):
        context = client.connected(presence=presence)
        stream = await context.__aenter__()
    try:
        yield stream
    finally:
        await context.__aexit__(None, None, None)


def message_queue(client: aioxmpp.Client) -> asyncio.Queue[aioxmpp.Message]:
    """Every chat/normal message the client receives, in order."""
    queue: asyncio.Queue[aioxmpp.Message] = asyncio.Queue()
    dispatcher = client.summon(aioxmpp.dispatcher.SimpleMessageDispatcher)
    for kind in (aioxmpp.MessageType.CHAT, aioxmpp.MessageType.NORMAL):
        dispatcher.register_callback(kind, None, queue.put_nowait)
    return queue


def chat(to: str, body: str) -> aioxmpp.Message:
    message = aioxmpp.Message(type_=aioxmpp.MessageType.CHAT, to=aioxmpp.JID.fromstr(to))
    message.body[None] = body
    return message


async def offline_count(store_url: str, username: str) -> int:
    store = await SQLStore.open(store_url)
    try:
        return await store.count_offline(username)
    finally:
        await store.close()


async def wait_until(predicate: Callable[[], bool], timeout: float = STEP_TIMEOUT) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


async def test_login_with_scram_over_verified_tls(node_factory: Any) -> None:
    node = await node_factory(users=["alice"])
    sasl = RecordingSASLProvider(PASSWORD)
    client = make_client(node, "alice", sasl=sasl)
    async with online(client, available=False):
        assert client.established
        assert client.local_jid == aioxmpp.JID.fromstr(f"alice@{DOMAIN}/aio")
    assert [name for name, _token in sasl.used] == ["SCRAM"]
    mechanism = sasl.used[0][1][0]
    assert mechanism.startswith("SCRAM-SHA-")


async def test_untrusted_certificate_is_refused(node_factory: Any) -> None:
    node = await node_factory(users=["alice"])
    client = make_client(node, "alice", ca_file=False)
    with pytest.raises(Exception) as refused:
        async with online(client, available=False):
            pass
    # aioopenssl lets pyOpenSSL's error through; when the handshake fails at
    # once it also trips over its own waiter (InvalidStateError) with the
    # verification error as the context. Either way: no trust, no stream.
    chain: list[BaseException] = []
    error: BaseException | None = refused.value
    while error is not None and len(chain) < 10:
        chain.append(error)
        error = error.__cause__ or error.__context__
    assert any("certificate verify failed" in str(error) for error in chain), chain
    assert not client.established
    assert node.alive()


async def test_wrong_password_is_refused(node_factory: Any) -> None:
    node = await node_factory(users=["alice"])
    client = make_client(node, "alice", password="not-the-password")
    with pytest.raises((aiosasl.AuthenticationFailure, aiosasl.SASLFailure)):
        async with online(client, available=False):
            pass
    assert node.alive()


async def test_roster_get_returns_stored_items(node_factory: Any) -> None:
    node = await node_factory(users=["alice", "bob"])
    bob_jid = aioxmpp.JID.fromstr(f"bob@{DOMAIN}")
    writer = make_client(node, "alice", resource="writer")
    roster = writer.summon(aioxmpp.RosterClient)
    async with online(writer, available=False):
        await roster.set_entry(bob_jid, name="Bobby", add_to_groups={"Friends"})
        await wait_until(lambda: bob_jid in roster.items)

    reader = make_client(node, "alice", resource="reader")
    fresh = reader.summon(aioxmpp.RosterClient)
    received = asyncio.Event()
    fresh.on_initial_roster_received.connect(lambda: received.set())
    async with online(reader, available=False):
        await asyncio.wait_for(received.wait(), STEP_TIMEOUT)
        item = fresh.items[bob_jid]
        assert item.name == "Bobby"
        assert item.groups == {"Friends"}
        assert item.subscription == "none"


async def test_subscription_presence_and_chat(node_factory: Any) -> None:
    node = await node_factory(users=["alice", "bob"])
    alice_jid = aioxmpp.JID.fromstr(f"alice@{DOMAIN}")
    bob_jid = aioxmpp.JID.fromstr(f"bob@{DOMAIN}")
    alice = make_client(node, "alice")
    bob = make_client(node, "bob")
    alice_roster = alice.summon(aioxmpp.RosterClient)
    bob_roster = bob.summon(aioxmpp.RosterClient)
    alice_presence = alice.summon(aioxmpp.PresenceClient)
    bob_inbox = message_queue(bob)
    alice_inbox = message_queue(alice)

    def bob_on_subscribe(stanza: aioxmpp.Presence) -> None:
        bob_roster.approve(stanza.from_.bare())
        bob_roster.subscribe(stanza.from_.bare())

    def alice_on_subscribe(stanza: aioxmpp.Presence) -> None:
        alice_roster.approve(stanza.from_.bare())

    bob_roster.on_subscribe.connect(bob_on_subscribe)
    alice_roster.on_subscribe.connect(alice_on_subscribe)
    bob_seen = asyncio.Event()

    def on_available(full_jid: aioxmpp.JID, _stanza: aioxmpp.Presence) -> None:
        if full_jid.bare() == bob_jid:
            bob_seen.set()

    alice_presence.on_available.connect(on_available)

    async with online(alice), online(bob):
        alice_roster.subscribe(bob_jid)
        await wait_until(
            lambda: (
                bob_jid in alice_roster.items
                and alice_roster.items[bob_jid].subscription == "both"
                and alice_jid in bob_roster.items
                and bob_roster.items[alice_jid].subscription == "both"
            )
        )
        await asyncio.wait_for(bob_seen.wait(), STEP_TIMEOUT)
        assert alice_presence.get_most_available_stanza(bob_jid) is not None

        await alice.send(chat(f"bob@{DOMAIN}", "hello bob"))
        received = await asyncio.wait_for(bob_inbox.get(), STEP_TIMEOUT)
        assert received.body.any() == "hello bob"
        assert received.from_ == aioxmpp.JID.fromstr(f"alice@{DOMAIN}/aio")

        await bob.send(chat(str(received.from_), "hello alice"))
        reply = await asyncio.wait_for(alice_inbox.get(), STEP_TIMEOUT)
        assert reply.body.any() == "hello alice"
        assert reply.from_.bare() == bob_jid


async def test_message_to_offline_user_is_delivered_at_login(node_factory: Any) -> None:
    node = await node_factory(users=["alice", "bob"])
    alice = make_client(node, "alice")
    async with online(alice):
        await alice.send(chat(f"bob@{DOMAIN}", "while you were away"))
        await alice.send(chat(f"bob@{DOMAIN}", "second one"))
        await asyncio.sleep(0.3)  # let the node write them to offline storage

    bob = make_client(node, "bob")
    inbox = message_queue(bob)
    async with online(bob):
        first = await asyncio.wait_for(inbox.get(), STEP_TIMEOUT)
        second = await asyncio.wait_for(inbox.get(), STEP_TIMEOUT)
    assert [first.body.any(), second.body.any()] == ["while you were away", "second one"]
    assert first.from_.bare() == aioxmpp.JID.fromstr(f"alice@{DOMAIN}")
    assert inbox.empty()


async def test_ping_server(node_factory: Any) -> None:
    node = await node_factory(users=["alice"])
    client = make_client(node, "alice")
    async with online(client, available=False):
        await asyncio.wait_for(aioxmpp.ping.ping(client, SERVER), STEP_TIMEOUT)


async def test_disco_info_of_server(node_factory: Any) -> None:
    node = await node_factory(users=["alice"])
    client = make_client(node, "alice")
    disco = client.summon(aioxmpp.DiscoClient)
    async with online(client, available=False):
        info = await asyncio.wait_for(disco.query_info(SERVER), STEP_TIMEOUT)
    identities = {(identity.category, identity.type_) for identity in info.identities}
    assert ("server", "im") in identities
    for feature in (
        "http://jabber.org/protocol/disco#info",
        "urn:xmpp:ping",
        "jabber:iq:roster",
        "urn:xmpp:sm:3",
    ):
        assert feature in info.features


async def test_stream_management_burst_of_200_messages_in_order(
    node_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=CLIENT_LOGGER)
    node = await node_factory(users=["alice", "bob"])
    alice = make_client(node, "alice")
    bob = make_client(node, "bob")
    inbox = message_queue(bob)
    failures: list[BaseException] = []
    for client in (alice, bob):
        client.on_failure.connect(failures.append)
    count = 200
    async with online(alice), online(bob):
        assert alice.stream.sm_enabled and bob.stream.sm_enabled
        for number in range(count):
            alice.enqueue(chat(f"bob@{DOMAIN}/aio", f"burst {number}"))
        bodies: list[str] = []
        async with asyncio.timeout(STEP_TIMEOUT * 2):
            while len(bodies) < count:
                bodies.append((await inbox.get()).body.any())
        assert bodies == [f"burst {number}" for number in range(count)]
        # every stanza alice sent is acknowledged by the server
        await wait_until(lambda: not alice.stream.sm_unacked_list)
        assert alice.stream.sm_outbound_base >= count
        # bob counted every stanza the server sent him (presence included)
        assert bob.stream.sm_inbound_ctr >= count
        # both streams stay usable after the burst
        await asyncio.wait_for(aioxmpp.ping.ping(alice, SERVER), STEP_TIMEOUT)
        await asyncio.wait_for(aioxmpp.ping.ping(bob, SERVER), STEP_TIMEOUT)
        assert alice.established and bob.established
    assert failures == []

    def sm_log(user: str, text: str) -> int:
        prefix = f"{CLIENT_LOGGER}.{user}."
        return sum(
            1
            for record in caplog.records
            if record.name.startswith(prefix) and record.getMessage().startswith(text)
        )

    # the server asked bob for acks as the burst went by (one request per round trip,
    # not one at the end only), and bob answered them
    assert sm_log("bob", "received SM request") >= 2
    assert sm_log("bob", "sending SM ack") == sm_log("bob", "received SM request")
    # the server answered alice's requests
    assert sm_log("alice", "received SM ack") >= 1
    assert sm_log("alice", "received SM ack, but SM not enabled") == 0
    # bob acknowledged everything, so closing his stream stored nothing offline
    await asyncio.sleep(0.3)
    assert await offline_count(node.store_url, "bob") == 0
    assert "Traceback" not in node.log()
