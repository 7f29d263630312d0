"""Hostile and broken input against a real node process.

Each test sends one kind of bad input with the raw client and checks the
answer the RFCs ask for (a stream error that closes only that stream, a SASL
failure, a stanza error that leaves the stream open). Then `assert_healthy`
checks that the node survived it: the process is alive, a fresh aioxmpp
client logs in and a message makes a round trip, and the store still holds
its users and a stored offline message.
"""

from __future__ import annotations

import asyncio
import os
import time
import xml.etree.ElementTree as ET
from typing import Any

import pytest

from tests.integration.conftest import DOMAIN, PASSWORD
from tests.integration.rawclient import (
    SASL_NS,
    TLS_NS,
    RawClient,
    client_hello,
    connect_tls,
    header,
    local_name,
    logged_in,
    stanza_error_condition,
    tag,
)
from tests.integration.test_aioxmpp import chat, make_client, message_queue, online
from xmpp_ha.store.sql import SQLStore

USERS = ["alice", "bob", "carol"]
KEPT_OFFLINE = (
    "<message xmlns='jabber:client' from='alice@localhost/x' to='carol@localhost' "
    "type='chat'><body>kept through the attack</body></message>"
)
STEP = 5.0  # seconds allowed for one expected answer


async def start_node(node_factory: Any, limits: dict[str, Any] | None = None, **c2s: Any) -> Any:
    """A node with three users and one offline message waiting for carol."""
    node = await node_factory(users=USERS, c2s=c2s, limits=limits or {})
    store = await SQLStore.open(node.store_url)
    try:
        assert await store.store_offline("carol", KEPT_OFFLINE, 1000)
    finally:
        await store.close()
    return node


async def assert_healthy(node: Any) -> None:
    """The node survived: alive, serving a real client, its store intact."""
    assert node.alive(), node.log()
    alice = make_client(node, "alice", resource="health")
    bob = make_client(node, "bob", resource="health")
    inbox = message_queue(bob)
    async with online(alice), online(bob):
        await alice.send(chat(f"bob@{DOMAIN}/health", "still serving"))
        received = await asyncio.wait_for(inbox.get(), STEP)
        assert received.body.any() == "still serving"
    store = await SQLStore.open(node.store_url)
    try:
        assert set(USERS) <= set(await store.list_users())
        assert await store.count_offline("carol") == 1
    finally:
        await store.close()
    assert node.alive()
    assert "Traceback" not in node.log(), node.log()


async def plain_stream(node: Any) -> RawClient:
    client = await RawClient.connect(node.host, node.port)
    await client.open_stream()
    return client


async def raw_alice(node: Any, resource: str = "raw") -> RawClient:
    return await logged_in(node.host, node.port, node.ca_file, "alice", PASSWORD, resource)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


# --- XML-level garbage ---------------------------------------------------------


@pytest.mark.parametrize(
    ("phase", "data", "condition"),
    [
        ("plaintext", b"<message><body>x</message>", "not-well-formed"),
        ("established", b"<message to='bob@localhost'><body>x</message>", "not-well-formed"),
        ("established", b"<message><body>\xff\xfe</body></message>", "not-well-formed"),
        ("established", b"<<>>", "not-well-formed"),
        ("established", b"<foo:bar/>", "bad-namespace-prefix"),
    ],
    ids=[
        "plaintext-mismatched-tag",
        "mismatched-tag",
        "invalid-utf8",
        "brackets",
        "unbound-prefix",
    ],
)
async def test_malformed_xml_is_a_stream_error(
    node_factory: Any, phase: str, data: bytes, condition: str
) -> None:
    node = await start_node(node_factory)
    client = await (plain_stream(node) if phase == "plaintext" else raw_alice(node))
    await client.send(data)
    error = await client.expect_stream_error(STEP)
    assert error.condition == condition
    await assert_healthy(node)


DOCTYPE = b"<?xml version='1.0'?><!DOCTYPE stream:stream>" + header()
ENTITY_DECLARATION = b"<?xml version='1.0'?><!DOCTYPE s [<!ENTITY x 'boom'>]>" + header()
PI_BEFORE_HEADER = b"<?xml version='1.0'?><?evil instruction?>" + header()


@pytest.mark.parametrize(
    ("before_header", "data"),
    [
        (True, DOCTYPE),
        (True, ENTITY_DECLARATION),
        (True, PI_BEFORE_HEADER),
        (False, b"<?evil instruction?>"),
        (False, b"<message><body>&custom;</body></message>"),
        (False, b"<!-- a comment -->"),
    ],
    ids=[
        "doctype",
        "entity-declaration",
        "pi-before-header",
        "pi-in-stream",
        "entity-ref",
        "comment",
    ],
)
async def test_restricted_xml(node_factory: Any, before_header: bool, data: bytes) -> None:
    node = await start_node(node_factory)
    if before_header:
        client = await RawClient.connect(node.host, node.port)
    else:
        client = await plain_stream(node)
    await client.send(data)
    error = await client.expect_stream_error(STEP)
    assert error.condition == "restricted-xml"
    await assert_healthy(node)


def billion_laughs() -> bytes:
    entities = ["<!ENTITY lol0 'lol'>"]
    for level in range(1, 10):
        entities.append(f"<!ENTITY lol{level} '{f'&lol{level - 1};' * 10}'>")
    return (
        b"<?xml version='1.0'?><!DOCTYPE stream:stream [" + "".join(entities).encode() + b"]>"
        + header() + b"<message to='bob@localhost'><body>&lol9;</body></message>"
    )  # fmt: skip


async def test_billion_laughs_is_refused_quickly_and_cheaply(node_factory: Any) -> None:
    node = await start_node(node_factory)
    before = rss_kib(node.process.pid)
    started = time.monotonic()
    client = await RawClient.connect(node.host, node.port)
    await client.send(billion_laughs())
    error = await client.expect_stream_error(STEP)
    elapsed = time.monotonic() - started
    assert error.condition == "restricted-xml"
    assert elapsed < 2.0
    # the same attack inside an open stream: the entities are never declared
    client = await plain_stream(node)
    await client.send(b"<message><body>&lol9;&lol9;&lol9;</body></message>")
    assert (await client.expect_stream_error(STEP)).condition == "restricted-xml"
    grown = rss_kib(node.process.pid) - before
    assert grown < 20 * 1024, f"node RSS grew by {grown} KiB"
    await assert_healthy(node)


@pytest.mark.parametrize("shape", ["complete", "never-ending", "huge-start-tag"])
async def test_stanza_over_the_size_limit_is_policy_violation(
    node_factory: Any, shape: str
) -> None:
    node = await start_node(node_factory, max_stanza_bytes=10_000)
    client = await raw_alice(node)
    body = "x" * 20_000
    if shape == "complete":
        data = f"<message to='bob@localhost' type='chat'><body>{body}</body></message>"
    elif shape == "never-ending":
        data = f"<message to='bob@localhost' type='chat'><body>{body}"
    else:
        data = f"<message to='bob@localhost' a='{body}"
    await client.send(data)
    error = await client.expect_stream_error(STEP)
    assert error.condition == "policy-violation"
    await assert_healthy(node)


# --- authentication and addressing ---------------------------------------------

STANZA = b"<message to='bob@localhost' type='chat'><body>let me in</body></message>"


@pytest.mark.parametrize("phase", ["plaintext", "after-tls", "authenticated-not-bound"])
async def test_stanza_before_authentication_is_not_authorized(
    node_factory: Any, phase: str
) -> None:
    node = await start_node(node_factory)
    bob = make_client(node, "bob")
    inbox = message_queue(bob)
    async with online(bob):
        if phase == "plaintext":
            client = await plain_stream(node)
        else:
            client = await connect_tls(node.host, node.port, node.ca_file)
            if phase == "authenticated-not-bound":
                outcome = await client.auth_plain("alice", PASSWORD)
                assert local_name(outcome) == "success"
                await client.open_stream()
        await client.send(STANZA)
        error = await client.expect_stream_error(STEP)
        assert error.condition == "not-authorized"
        await asyncio.sleep(0.2)
        assert inbox.empty()
    await assert_healthy(node)


@pytest.mark.parametrize(
    "claimed",
    ["carol@localhost/x", "carol@localhost", "alice@localhost/other", "@@bad@@", "localhost"],
)
async def test_forged_from_is_invalid_from(node_factory: Any, claimed: str) -> None:
    node = await start_node(node_factory)
    bob = make_client(node, "bob")
    inbox = message_queue(bob)
    async with online(bob):
        client = await raw_alice(node)
        await client.send(
            f"<message from='{claimed}' to='bob@localhost/aio' type='chat'>"
            "<body>forged</body></message>"
        )
        error = await client.expect_stream_error(STEP)
        assert error.condition == "invalid-from"
        await asyncio.sleep(0.2)
        assert inbox.empty(), "the forged message was delivered"
    await assert_healthy(node)


async def test_own_bare_or_full_jid_as_from_is_accepted(node_factory: Any) -> None:
    node = await start_node(node_factory)
    bob = make_client(node, "bob")
    inbox = message_queue(bob)
    async with online(bob):
        client = await raw_alice(node)
        for claimed in ("alice@localhost/raw", "alice@localhost"):
            await client.send(
                f"<message from='{claimed}' to='bob@localhost/aio' type='chat'>"
                f"<body>{claimed}</body></message>"
            )
            received = await asyncio.wait_for(inbox.get(), STEP)
            assert received.body.any() == claimed
            assert str(received.from_) == "alice@localhost/raw"
        await client.aclose()
    await assert_healthy(node)


def _canonical(element: ET.Element | None) -> bytes:
    assert element is not None
    return ET.tostring(element)


async def test_unknown_user_gets_the_same_answers_as_a_wrong_password(node_factory: Any) -> None:
    node = await start_node(node_factory, auth_fail_delay=0.001)

    async def plain(username: str, password: str) -> ET.Element:
        client = await connect_tls(node.host, node.port, node.ca_file)
        try:
            return await client.auth_plain(username, password)
        finally:
            await client.aclose()

    wrong = await plain("alice", "wrong-password")
    unknown = await plain("nosuchuser", "wrong-password")
    assert wrong.tag == tag(SASL_NS, "failure")
    assert [local_name(child) for child in wrong] == ["not-authorized"]
    assert _canonical(unknown) == _canonical(wrong)

    async def scram(username: str, password: str, mechanism: str) -> Any:
        client = await connect_tls(node.host, node.port, node.ca_file)
        try:
            return await client.auth_scram(username, password, mechanism)
        finally:
            await client.aclose()

    for mechanism in ("SCRAM-SHA-256", "SCRAM-SHA-1"):
        good = await scram("alice", PASSWORD, mechanism)
        assert local_name(good.outcome) == "success"  # and the server signature verified
        wrong = await scram("alice", "wrong-password", mechanism)
        unknown = await scram("nosuchuser", "wrong-password", mechanism)
        again = await scram("nosuchuser", "other-password", mechanism)
        assert wrong.server_first is not None and unknown.server_first is not None
        assert sorted(unknown.server_first) == sorted(wrong.server_first) == ["i", "r", "s"]
        assert unknown.server_first["i"] == wrong.server_first["i"]
        assert len(unknown.server_first["s"]) == len(wrong.server_first["s"])
        # a real account's salt is stable; a made-up one must be too
        assert wrong.server_first["s"] == good.server_first["s"]
        assert again.server_first["s"] == unknown.server_first["s"]
        assert local_name(wrong.outcome) == "failure"
        assert _canonical(unknown.outcome) == _canonical(wrong.outcome)
    await assert_healthy(node)


async def test_repeated_failures_get_slower_and_end_the_stream(node_factory: Any) -> None:
    base = 0.05
    node = await start_node(node_factory, auth_fail_delay=base, auth_fail_delay_max=30.0)
    client = await connect_tls(node.host, node.port, node.ca_file)
    delays = []
    for _attempt in range(5):
        started = time.monotonic()
        outcome = await client.auth_plain("alice", "wrong-password")
        delays.append(time.monotonic() - started)
        assert local_name(outcome) == "failure"
    error = await client.expect_stream_error(STEP)
    assert error.condition == "policy-violation"
    for attempt, delay in enumerate(delays):
        assert delay >= base * 2**attempt * 0.9, delays
    assert delays == sorted(delays), delays
    # the delay belongs to the address, not the stream: a new stream waits longer still
    client = await connect_tls(node.host, node.port, node.ca_file)
    started = time.monotonic()
    assert local_name(await client.auth_plain("bob", "wrong-password")) == "failure"
    assert time.monotonic() - started >= base * 2**5 * 0.9
    # a success clears the record
    assert local_name(await client.auth_plain("alice", PASSWORD)) == "success"
    await client.aclose()
    client = await connect_tls(node.host, node.port, node.ca_file)
    started = time.monotonic()
    assert local_name(await client.auth_plain("alice", "wrong-password")) == "failure"
    assert time.monotonic() - started < base * 4
    await client.aclose()
    await assert_healthy(node)


# --- timeouts and limits -----------------------------------------------------------


@pytest.mark.parametrize(
    "stage", ["silent", "header-only", "proceed-no-handshake", "after-tls", "authenticated"]
)
async def test_slow_handshake_is_closed_after_handshake_timeout(
    node_factory: Any, stage: str
) -> None:
    timeout = 1.0
    node = await start_node(node_factory, handshake_timeout=timeout)
    started = time.monotonic()
    client = await RawClient.connect(node.host, node.port)
    if stage != "silent":
        await client.open_stream()
    if stage == "proceed-no-handshake":
        await client.send(f"<starttls xmlns='{TLS_NS}'/>")
        await client.expect("proceed")
    elif stage in ("after-tls", "authenticated"):
        await client.starttls(node.ca_file)
        if stage == "authenticated":
            assert local_name(await client.auth_plain("alice", PASSWORD)) == "success"
            await client.open_stream()
    if stage == "proceed-no-handshake":
        await client.wait_closed(timeout * 5)  # what comes is TLS or nothing, not XML
    else:
        error = await client.expect_stream_error(timeout * 5)
        assert error.condition == "connection-timeout"
    elapsed = time.monotonic() - started
    assert timeout * 0.9 <= elapsed <= timeout * 4, elapsed
    await assert_healthy(node)


async def test_connections_over_the_limit_get_resource_constraint(node_factory: Any) -> None:
    limit = 20
    node = await start_node(node_factory, max_connections=limit)
    alice = make_client(node, "alice")
    bob = make_client(node, "bob")
    inbox = message_queue(bob)
    fillers: list[RawClient] = []
    async with online(alice), online(bob):
        for _ in range(limit - 2):
            fillers.append(await plain_stream(node))  # each answered: inside the limit
        for _ in range(3):
            extra = await RawClient.connect(node.host, node.port)
            error = await extra.expect_stream_error(STEP)
            assert error.condition == "resource-constraint"
        # the sessions already logged in keep working
        await alice.send(chat(f"bob@{DOMAIN}/aio", "still fine"))
        received = await asyncio.wait_for(inbox.get(), STEP)
        assert received.body.any() == "still fine"
        for filler in fillers:
            await filler.aclose()
    await asyncio.sleep(0.3)  # the node notices the closed fillers
    await assert_healthy(node)


# --- stream headers ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "condition"),
    [
        (header(to="example.org"), "host-unknown"),
        (header(to="localhost.evil"), "host-unknown"),
        (header(version=None), "unsupported-version"),
        (header(version="0.9"), "unsupported-version"),
        (
            b"<stream:stream xmlns='jabber:client' xmlns:stream='urn:wrong' to='localhost' "
            b"version='1.0'>",
            "invalid-namespace",
        ),
        (
            b"<stream:stream xmlns='urn:wrong' xmlns:stream='http://etherx.jabber.org/streams' "
            b"to='localhost' version='1.0'>",
            "invalid-namespace",
        ),
    ],
    ids=[
        "wrong-domain",
        "wrong-domain-suffix",
        "no-version",
        "version-0.9",
        "stream-ns",
        "content-ns",
    ],
)
async def test_bad_stream_header(node_factory: Any, data: bytes, condition: str) -> None:
    node = await start_node(node_factory)
    client = await RawClient.connect(node.host, node.port)
    await client.send(data)
    error = await client.expect_stream_error(STEP)
    assert error.condition == condition
    assert client.server_header is not None
    assert client.server_header.get("from") == DOMAIN
    await assert_healthy(node)


@pytest.mark.parametrize(
    "garbage",
    [
        os.urandom(4096).replace(b"\x16", b"\x00"),
        b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
        b"\x16\x03\x01\x08\x00" + b"\xee" * 2048,
        f"<auth xmlns='{SASL_NS}' mechanism='PLAIN'>AGFsaWNlAHNlY3JldC1wdw==</auth>".encode(),
    ],
    ids=["random", "http", "fake-record-header", "plaintext-after-proceed"],
)
async def test_garbage_instead_of_client_hello(node_factory: Any, garbage: bytes) -> None:
    node = await start_node(node_factory)
    client = await plain_stream(node)
    await client.send(f"<starttls xmlns='{TLS_NS}'/>")
    await client.expect("proceed")
    client.restart()
    await client.send(garbage)
    await client.wait_closed(STEP)
    assert not any(element.tag == tag(SASL_NS, "success") for element in client.received)
    await assert_healthy(node)


# --- stanza errors that keep the stream open --------------------------------------------


async def assert_stream_still_open(client: RawClient) -> None:
    await client.send("<iq type='get' id='still-open'><ping xmlns='urn:xmpp:ping'/></iq>")
    answer = await client.expect("iq", STEP)
    assert answer.get("id") == "still-open" and answer.get("type") == "result"


@pytest.mark.parametrize(
    "iq",
    [
        "<iq type='get' id='q1' to='localhost'><query xmlns='urn:example:unknown'/></iq>",
        "<iq type='set' id='q1'><thing xmlns='urn:example:unknown'/></iq>",
        "<iq type='get' id='q1' to='alice@localhost'><query xmlns='urn:example:unknown'/></iq>",
    ],
    ids=["to-server", "no-to", "to-own-account"],
)
async def test_iq_with_unknown_namespace_is_service_unavailable(node_factory: Any, iq: str) -> None:
    node = await start_node(node_factory)
    client = await raw_alice(node)
    await client.send(iq)
    answer = await client.expect("iq", STEP)
    assert answer.get("type") == "error" and answer.get("id") == "q1", ET.tostring(answer)
    assert stanza_error_condition(answer) == "service-unavailable", ET.tostring(answer)
    await assert_stream_still_open(client)
    await client.aclose()
    await assert_healthy(node)


@pytest.mark.parametrize(
    ("to", "condition"),
    [
        ("nobody@localhost", "service-unavailable"),
        ("nobody@localhost/res", "service-unavailable"),
        ("someone@remote.example", "remote-server-not-found"),
    ],
)
async def test_message_that_cannot_be_delivered_bounces(
    node_factory: Any, to: str, condition: str
) -> None:
    node = await start_node(node_factory)
    client = await raw_alice(node)
    await client.send(f"<message id='m1' to='{to}' type='chat'><body>anyone?</body></message>")
    answer = await client.expect("message", STEP)
    assert answer.get("type") == "error" and answer.get("id") == "m1", ET.tostring(answer)
    assert answer.get("from") == to
    assert answer.get("to") == "alice@localhost/raw"
    assert stanza_error_condition(answer) == condition, ET.tostring(answer)
    await assert_stream_still_open(client)
    await client.aclose()
    await assert_healthy(node)


@pytest.mark.parametrize(
    ("stanza", "condition"),
    [
        ("<iq type='get'><ping xmlns='urn:xmpp:ping'/></iq>", "bad-request"),
        (
            "<iq type='get' id='s1'><ping xmlns='urn:xmpp:ping'/><ping xmlns='urn:xmpp:ping'/></iq>",
            "bad-request",
        ),
        ("<iq type='fetch' id='s1'><ping xmlns='urn:xmpp:ping'/></iq>", "bad-request"),
        ("<message id='s1' to='a@b@c' type='chat'><body>x</body></message>", "jid-malformed"),
        (
            "<message id='s1' to='bob@localhost' type='bogus'><body>x</body></message>",
            "bad-request",
        ),
        ("<presence id='s1' type='available'/>", "bad-request"),
    ],
    ids=[
        "iq-no-id",
        "iq-two-children",
        "iq-bad-type",
        "bad-to",
        "message-bad-type",
        "presence-available",
    ],
)
async def test_malformed_stanza_is_a_stanza_error_not_a_stream_error(
    node_factory: Any, stanza: str, condition: str
) -> None:
    node = await start_node(node_factory)
    client = await raw_alice(node)
    await client.send(stanza)
    kind = stanza[1 : stanza.index(" ")]
    answer = await client.expect(kind, STEP)
    assert answer.get("type") == "error", ET.tostring(answer)
    assert stanza_error_condition(answer) == condition, ET.tostring(answer)
    await assert_stream_still_open(client)
    await client.aclose()
    await assert_healthy(node)


def _nested(depth: int) -> str:
    return "<message>" + "<x>" * depth + "</x>" * depth + "</message>"


@pytest.mark.parametrize("where", ["deep-nesting", "huge-header", "huge-stanza-before-auth"])
async def test_unbounded_structures_are_policy_violation(node_factory: Any, where: str) -> None:
    node = await start_node(node_factory, max_stanza_bytes=10_000)
    client = await RawClient.connect(node.host, node.port)
    if where == "deep-nesting":
        await client.open_stream()
        await client.send(_nested(200))
    elif where == "huge-header":
        await client.send(header()[:-1] + b" junk='" + b"j" * 50_000)
    else:
        await client.open_stream()
        await client.send(b"<message><body>" + b"y" * 50_000)
    error = await client.expect_stream_error(STEP)
    assert error.condition == "policy-violation"
    await assert_healthy(node)


async def test_starttls_command_injection_is_ignored(node_factory: Any) -> None:
    """Plaintext sent with <starttls/> must not be acted on after the switch (CVE-2011-0411)."""
    node = await start_node(node_factory)
    client = await RawClient.connect(node.host, node.port)
    await client.open_stream()
    plain = "AGFsaWNlAHNlY3JldC1wdw=="  # \0alice\0secret-pw
    await client.send(
        f"<starttls xmlns='{TLS_NS}'/><auth xmlns='{SASL_NS}' mechanism='PLAIN'>{plain}</auth>"
    )
    await client.expect("proceed")
    assert not any(local_name(element) == "success" for element in client.received)
    import ssl

    context = ssl.create_default_context(cafile=str(node.ca_file))
    await client.writer.start_tls(context, server_hostname="localhost")
    features = await client.open_stream()
    # still unauthenticated: SASL is offered, no <success/> arrived at any point
    assert features.find(tag(SASL_NS, "mechanisms")) is not None
    await asyncio.sleep(0.2)
    assert not any(local_name(element) == "success" for element in client.received)
    await client.aclose()
    await assert_healthy(node)


@pytest.mark.parametrize(
    ("sasl", "condition"),
    [
        (f"<auth xmlns='{SASL_NS}' mechanism='BOGUS'>AA==</auth>", "invalid-mechanism"),
        (f"<auth xmlns='{SASL_NS}' mechanism='PLAIN'>!!not base64!!</auth>", "incorrect-encoding"),
        (f"<auth xmlns='{SASL_NS}' mechanism='PLAIN'>AGFsaWNl</auth>", "malformed-request"),
        (f"<auth xmlns='{SASL_NS}' mechanism='SCRAM-SHA-256'>bm9wZQ==</auth>", "malformed-request"),
    ],
    ids=["unknown-mechanism", "bad-base64", "plain-without-password", "scram-garbage"],
)
async def test_sasl_misuse_fails_and_the_stream_can_still_log_in(
    node_factory: Any, sasl: str, condition: str
) -> None:
    node = await start_node(node_factory, auth_fail_delay=0.001)
    client = await connect_tls(node.host, node.port, node.ca_file)
    await client.send(sasl)
    outcome = await client.expect("failure", STEP)
    assert [local_name(child) for child in outcome] == [condition], ET.tostring(outcome)
    assert local_name(await client.auth_plain("alice", PASSWORD)) == "success"
    assert await client.bind() == "alice@localhost/raw"
    await assert_stream_still_open(client)
    await client.aclose()
    await assert_healthy(node)


async def test_bind_abuse_is_answered_and_the_stream_survives(node_factory: Any) -> None:
    node = await start_node(node_factory, limits={"max_resources_per_user": 2})
    client = await connect_tls(node.host, node.port, node.ca_file)
    assert local_name(await client.auth_plain("alice", PASSWORD)) == "success"
    await client.open_stream()
    bind_ns = "urn:ietf:params:xml:ns:xmpp-bind"
    await client.send(
        f"<iq type='set' id='b1'><bind xmlns='{bind_ns}'><resource>{'r' * 2000}</resource>"
        "</bind></iq>"
    )
    answer = await client.expect("iq", STEP)
    assert answer.get("type") == "error" and stanza_error_condition(answer) == "bad-request"
    await client.send(
        f"<iq type='set' id='b2'><bind xmlns='{bind_ns}'><resource>one</resource></bind></iq>"
    )
    assert (await client.expect("iq", STEP)).get("type") == "result"
    await client.send(
        f"<iq type='set' id='b3'><bind xmlns='{bind_ns}'><resource>two</resource></bind></iq>"
    )
    answer = await client.expect("iq", STEP)
    assert answer.get("type") == "error" and stanza_error_condition(answer) == "not-allowed"
    await assert_stream_still_open(client)
    # past max_resources_per_user a new bind is refused; existing sessions are untouched
    second = await raw_alice(node, "second")
    third = await connect_tls(node.host, node.port, node.ca_file)
    assert local_name(await third.auth_plain("alice", PASSWORD)) == "success"
    await third.open_stream()
    await third.send(
        f"<iq type='set' id='b4'><bind xmlns='{bind_ns}'><resource>third</resource></bind></iq>"
    )
    answer = await third.expect("iq", STEP)
    assert answer.get("type") == "error", ET.tostring(answer)
    assert stanza_error_condition(answer) == "resource-constraint", ET.tostring(answer)
    await assert_stream_still_open(client)
    await assert_stream_still_open(second)
    for raw in (client, second, third):
        await raw.aclose()
    await asyncio.sleep(0.2)
    await assert_healthy(node)


async def test_connection_slots_are_released_after_every_kind_of_failure(
    node_factory: Any,
) -> None:
    limit = 4
    node = await start_node(
        node_factory, max_connections=limit, handshake_timeout=1.0, auth_fail_delay=0.001
    )

    async def bad_header() -> None:
        client = await RawClient.connect(node.host, node.port)
        await client.send(header(to="example.org"))
        await client.expect_stream_error(STEP)

    async def reset_before_anything() -> None:
        (await RawClient.connect(node.host, node.port)).abort()

    async def reset_mid_handshake() -> None:
        client = await plain_stream(node)
        await client.send(f"<starttls xmlns='{TLS_NS}'/>")
        await client.expect("proceed")
        await client.send(client_hello()[:60])
        client.abort()

    async def garbage_tls() -> None:
        client = await plain_stream(node)
        await client.send(f"<starttls xmlns='{TLS_NS}'/>")
        await client.expect("proceed")
        await client.send(b"\x16\x03\x01\x00\x10" + b"\x00" * 16)
        await client.wait_closed(STEP)

    async def reset_after_login() -> None:
        client = await raw_alice(node, "dropped")
        await client.send("<enable xmlns='urn:xmpp:sm:3' resume='true'/>")
        await client.expect("enabled", STEP)
        client.abort()

    async def too_many_failures() -> None:
        client = await connect_tls(node.host, node.port, node.ca_file)
        for _ in range(5):
            await client.auth_plain("alice", "wrong")
        await client.expect_stream_error(STEP)

    async def silent_until_timeout() -> None:
        client = await RawClient.connect(node.host, node.port)
        await client.expect_stream_error(STEP)

    kinds = [
        bad_header,
        reset_before_anything,
        reset_mid_handshake,
        garbage_tls,
        reset_after_login,
        too_many_failures,
        silent_until_timeout,
    ]
    for _round in range(2):
        for kind in kinds:
            await kind()
    await asyncio.sleep(0.5)  # the node sees the resets
    clients = [await RawClient.connect(node.host, node.port) for _ in range(limit)]
    for client in clients:
        await client.send(header())
    for client in clients:
        features = await client.expect("features", STEP)  # not resource-constraint
        assert features.find(tag(TLS_NS, "starttls")) is not None
    for client in clients:
        await client.aclose()
    await asyncio.sleep(0.3)
    await assert_healthy(node)


async def wait_offline_count(store: SQLStore, user: str, expected: int) -> None:
    """Messages are stored a moment after their sender's next stanza is answered."""
    deadline = time.monotonic() + STEP * 2
    while await store.count_offline(user) < expected and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert await store.count_offline(user) == expected


async def test_flood_of_stanzas_is_processed_in_order(node_factory: Any) -> None:
    node = await start_node(node_factory)
    client = await raw_alice(node)
    count = 300
    flood = "".join(
        f"<message to='carol@localhost' type='chat' id='f{n}'><body>flood {n}</body></message>"
        for n in range(count)
    )
    await client.send(flood + "<iq type='get' id='after-flood'><ping xmlns='urn:xmpp:ping'/></iq>")
    answer = await client.expect("iq", STEP * 2)
    assert answer.get("id") == "after-flood"  # answered while the messages are stored
    store = await SQLStore.open(node.store_url)
    try:
        await wait_offline_count(store, "carol", 1 + count)
        stored = await store.take_offline("carol")
        bodies = [ET.fromstring(text).findtext("{jabber:client}body") for text in stored]
        assert bodies == ["kept through the attack"] + [f"flood {n}" for n in range(count)]
        assert await store.store_offline("carol", KEPT_OFFLINE, 1000)
    finally:
        await store.close()
    await client.aclose()
    await assert_healthy(node)


async def test_client_that_never_acks_is_cut_off_and_nothing_is_lost(node_factory: Any) -> None:
    node = await start_node(node_factory, limits={"offline_messages_per_user": 5000})
    bob = await logged_in(node.host, node.port, node.ca_file, "bob", PASSWORD, "lazy")
    await bob.send("<enable xmlns='urn:xmpp:sm:3'/>")
    await bob.expect("enabled", STEP)
    await bob.send("<presence/>")
    alice = await raw_alice(node)
    count = 1100
    await alice.send(
        "".join(
            f"<message to='bob@localhost/lazy' type='chat'><body>m{n}</body></message>"
            for n in range(count)
        )
    )
    error = await bob.expect_stream_error(STEP * 2)  # bob never answers <r/>
    assert error.condition == "policy-violation"
    delivered = [
        element.findtext("{jabber:client}body")
        for element in bob.received
        if local_name(element) == "message"
    ]
    assert delivered, "bob received nothing before being cut off"
    await assert_stream_still_open(alice)
    store = await SQLStore.open(node.store_url)
    try:  # the node stores what bob never acknowledged, and what came after
        await wait_offline_count(store, "bob", count)
        stored = await store.take_offline("bob")
    finally:
        await store.close()
    bodies = [ET.fromstring(text).findtext("{jabber:client}body") or "" for text in stored]
    assert sorted(bodies, key=lambda b: int(b[1:])) == [f"m{n}" for n in range(count)]
    await alice.aclose()
    await assert_healthy(node)


async def test_resuming_someone_elses_session_is_refused(node_factory: Any) -> None:
    node = await start_node(node_factory)
    sm_ns = "urn:xmpp:sm:3"
    alice = await raw_alice(node, "resumable")
    await alice.send(f"<enable xmlns='{sm_ns}' resume='true'/>")
    enabled = await alice.expect("enabled", STEP)
    previd = enabled.get("id")
    assert previd and enabled.get("resume") == "true"
    await alice.send("<presence/>")
    alice.abort()
    await asyncio.sleep(0.3)  # the node notices and keeps the session for resumption

    async def resume_as(username: str, token: str, handled: int = 0) -> ET.Element:
        client = await connect_tls(node.host, node.port, node.ca_file)
        assert local_name(await client.auth_plain(username, PASSWORD)) == "success"
        await client.open_stream()
        await client.send(f"<resume xmlns='{sm_ns}' previd='{token}' h='{handled}'/>")
        answer = await client.next_element(STEP)
        await client.aclose()
        return answer

    for username, token in (("bob", previd), ("alice", "no-such-session"), ("bob", "")):
        answer = await resume_as(username, token)
        assert local_name(answer) == "failed", ET.tostring(answer)
        assert [local_name(child) for child in answer] == ["item-not-found"]
    # the rightful owner still can
    answer = await resume_as("alice", previd)
    assert local_name(answer) == "resumed", ET.tostring(answer)
    await asyncio.sleep(0.2)
    await assert_healthy(node)
