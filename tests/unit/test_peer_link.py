"""PeerLink over real sockets on 127.0.0.1 with throwaway cluster certificates.

Two real links talk to each other; the refusal cases use independent clients
(asyncio's stock TLS, plain TCP) speaking to a listener that expects "n1".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest

from xmpp_ha.certs import CertPaths, init_certs
from xmpp_ha.net.peer import INBOUND_HIGH, MAX_LINE, PeerLink
from xmpp_ha.net.tls import client_context, server_context

LOGGER = "xmpp_ha.peer"


@dataclass(frozen=True)
class Certs:
    main: CertPaths
    foreign: CertPaths  # another CA, with its own "n1"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    main = init_certs(tmp_path_factory.mktemp("certs"), node_names=["n1", "n2", "rogue"])
    foreign = init_certs(tmp_path_factory.mktemp("foreign"), node_names=["n1"])
    return Certs(main, foreign)


def node_server_context(paths: CertPaths, node: str) -> ssl.SSLContext:
    files = paths.nodes[node]
    return server_context(
        files.cert_file, files.key_file, ca_file=paths.ca_file, require_client_cert=True
    )


def node_client_context(paths: CertPaths, node: str, ca_file: Path | None = None) -> ssl.SSLContext:
    files = paths.nodes[node]
    return client_context(
        ca_file or paths.ca_file, cert_file=files.cert_file, key_file=files.key_file
    )


@pytest.fixture(autouse=True)
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """Nothing may raise into the event loop (a future resolved twice would)."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    yield errors
    await asyncio.sleep(0.02)
    assert errors == []


class Recorder:
    """A PeerHandler that records; `gate` holds on_routed (only the `hold` payloads when
    `gate_held_only`), `fail` payloads raise."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.messages: list[dict[str, object]] = []
        self.routed: list[dict[str, object]] = []
        self.gate: asyncio.Event | None = None
        self.gate_held_only = False
        self.entered = asyncio.Event()

    def on_connected(self, peer_version: str) -> None:
        self.events.append(f"up:{peer_version}")

    def on_disconnected(self) -> None:
        self.events.append("down")

    def on_message(self, message: dict[str, object]) -> None:
        self.messages.append(message)

    async def on_routed(self, payload: dict[str, object]) -> None:
        self.entered.set()
        if self.gate is not None and (payload.get("hold") or not self.gate_held_only):
            await self.gate.wait()
        if payload.get("fail"):
            raise RuntimeError("refused by the test handler")
        if payload.get("cancel"):
            raise asyncio.CancelledError  # e.g. it awaited something that was cancelled
        self.routed.append(payload)


class MakeLink(Protocol):
    def __call__(
        self, node: str, peer: str, handler: Recorder, *, listen_port: int = 0, peer_port: int = 1,
        **options: Any,
    ) -> PeerLink: ...  # fmt: skip


@pytest.fixture
async def make_link(certs: Certs) -> AsyncIterator[MakeLink]:
    links: list[PeerLink] = []
    contexts: dict[str, tuple[ssl.SSLContext, ssl.SSLContext]] = {}

    def make(
        node: str, peer: str, handler: Recorder, *, listen_port: int = 0, peer_port: int = 1,
        **options: Any,
    ) -> PeerLink:  # fmt: skip
        if node not in contexts:
            contexts[node] = (
                node_server_context(certs.main, node),
                node_client_context(certs.main, node),
            )
        server_ctx, client_ctx = contexts[node]
        link = PeerLink(
            node=node,
            peer=peer,
            version=f"{node}-1.0",
            listen_host="127.0.0.1",
            listen_port=listen_port,
            peer_host="127.0.0.1",
            peer_port=peer_port,
            server_context=server_ctx,
            client_context=client_ctx,
            handler=handler,
            **options,
        )
        links.append(link)
        return link

    yield make
    for link in links:
        await link.stop()


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


@dataclass
class Pair:
    n1: PeerLink
    h1: Recorder
    n2: PeerLink
    h2: Recorder


async def connected_pair(make_link: MakeLink) -> Pair:
    h1, h2 = Recorder(), Recorder()
    n2 = make_link("n2", "n1", h2)
    await n2.start()
    n1 = make_link("n1", "n2", h1, peer_port=n2.port)
    await n1.start()
    await wait_until(lambda: n1.connected and n2.connected)
    return Pair(n1, h1, n2, h2)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def warnings_of(caplog: pytest.LogCaptureFixture, level: int = logging.WARNING) -> str:
    return "\n".join(
        record.getMessage()
        for record in caplog.records
        if record.name == LOGGER and record.levelno == level
    )


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    data = b""
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        async with asyncio.timeout(5):
            while chunk := await reader.read(65536):
                data += chunk
    return data


async def close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        await writer.wait_closed()


async def raw_peer(
    port: int, context: ssl.SSLContext
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A stock asyncio TLS client claiming to be n1 toward a listener expecting n1."""
    return await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="n2")


async def authenticated_raw_peer(
    port: int, certs: Certs
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await raw_peer(port, node_client_context(certs.main, "n1"))
    hello = json.loads(await asyncio.wait_for(reader.readline(), 5))
    assert hello == {"t": "hello", "node": "n2", "version": "n2-1.0"}
    writer.write(b'{"t":"hello","node":"n1","version":"raw"}\n')
    await writer.drain()
    return reader, writer


# ------------------------------------------------------------------ messaging


async def test_links_connect_and_exchange_messages_both_ways_in_order(
    make_link: MakeLink,
) -> None:
    pair = await connected_pair(make_link)
    assert pair.n1.dialer and not pair.n2.dialer
    assert pair.n1.peer_version == "n2-1.0" and pair.n2.peer_version == "n1-1.0"
    assert pair.h1.events == ["up:n2-1.0"] and pair.h2.events == ["up:n1-1.0"]
    for index in range(1000):
        pair.n1.send({"t": "signal", "index": index, "text": "é\n\u2028"})
        pair.n2.send({"t": "hb", "index": index})
    await wait_until(lambda: len(pair.h1.messages) == 1000 and len(pair.h2.messages) == 1000)
    assert [message["index"] for message in pair.h2.messages] == list(range(1000))
    assert [message["index"] for message in pair.h1.messages] == list(range(1000))
    assert pair.h2.messages[0]["text"] == "é\n\u2028"
    assert pair.n1.refused == pair.n2.refused == 0


async def test_queued_sends_are_delivered_after_connect(make_link: MakeLink) -> None:
    port = free_port()
    h1, h2 = Recorder(), Recorder()
    n1 = make_link("n1", "n2", h1, peer_port=port)
    n1.send({"t": "queued", "index": 0})
    await n1.start()  # dials a port where nobody listens yet: backs off
    n1.send({"t": "queued", "index": 1})
    await asyncio.sleep(0.4)
    assert not n1.connected
    n2 = make_link("n2", "n1", h2, listen_port=port)
    n2.send({"t": "queued", "index": 100})
    await n2.start()
    await wait_until(lambda: n1.connected and n2.connected)
    n1.send({"t": "live", "index": 2})
    await wait_until(lambda: len(h2.messages) == 3 and len(h1.messages) == 1)
    assert [message["index"] for message in h2.messages] == [0, 1, 2]
    assert h1.messages == [{"t": "queued", "index": 100}]


async def test_heartbeats_are_dropped_while_disconnected(make_link: MakeLink) -> None:
    h1, h2 = Recorder(), Recorder()
    n2 = make_link("n2", "n1", h2)
    await n2.start()
    assert n2.send_if_connected({"t": "hb", "index": 0}) is False
    n1 = make_link("n1", "n2", h1, peer_port=n2.port)
    assert n1.send_if_connected({"t": "hb", "index": 1}) is False
    await n1.start()
    await wait_until(lambda: n1.connected and n2.connected)
    assert n1.send_if_connected({"t": "hb", "index": 2}) is True
    assert n2.send_if_connected({"t": "hb", "index": 3}) is True
    await wait_until(lambda: len(h1.messages) == 1 and len(h2.messages) == 1)
    await asyncio.sleep(0.05)
    assert h2.messages == [{"t": "hb", "index": 2}]
    assert h1.messages == [{"t": "hb", "index": 3}]


async def test_oversized_or_unencodable_sends_raise_at_once(make_link: MakeLink) -> None:
    pair = await connected_pair(make_link)
    with pytest.raises(ValueError):
        pair.n1.send({"blob": "x" * MAX_LINE})
    with pytest.raises(ValueError):
        pair.n1.route({"blob": "x" * MAX_LINE})
    with pytest.raises(TypeError):
        pair.n1.send({"set": {1, 2}})
    assert await pair.n1.route({"after": True}) is True  # the link is unharmed


# ------------------------------------------------------------------- routing


async def test_routes_are_acknowledged_in_order(make_link: MakeLink) -> None:
    pair = await connected_pair(make_link)
    futures = [pair.n1.route({"index": index}) for index in range(2000)]
    futures += [pair.n2.route({"back": index}) for index in range(10)]
    assert await asyncio.wait_for(asyncio.gather(*futures), 10) == [True] * 2010
    assert [payload["index"] for payload in pair.h2.routed] == list(range(2000))
    assert [payload["back"] for payload in pair.h1.routed] == list(range(10))


async def test_a_slow_handler_pauses_reading_without_losing_order(make_link: MakeLink) -> None:
    pair = await connected_pair(make_link)
    pair.h2.gate = asyncio.Event()
    count = INBOUND_HIGH + 2000
    futures = [pair.n1.route({"index": index}) for index in range(count)]
    await asyncio.wait_for(pair.h2.entered.wait(), 5)
    await asyncio.sleep(0.2)  # the backlog passes INBOUND_HIGH: n2 stops reading
    pair.h2.gate.set()
    assert await asyncio.wait_for(asyncio.gather(*futures), 20) == [True] * count
    assert [payload["index"] for payload in pair.h2.routed] == list(range(count))
    pair.n2.send({"t": "hb"})  # and the link still works both ways
    await wait_until(lambda: pair.h1.messages == [{"t": "hb"}])


async def test_a_slow_payload_does_not_hold_up_the_next_but_acks_stay_in_order(
    make_link: MakeLink,
) -> None:
    pair = await connected_pair(make_link)
    pair.h2.gate, pair.h2.gate_held_only = asyncio.Event(), True
    slow = pair.n1.route({"index": 0, "hold": True})
    fast = [pair.n1.route({"index": index}) for index in range(1, 4)]
    await wait_until(lambda: len(pair.h2.routed) == 3)  # handled while payload 0 waits
    await asyncio.sleep(0.1)
    assert not slow.done() and not any(future.done() for future in fast)  # acks in order
    pair.h2.gate.set()
    assert await asyncio.wait_for(asyncio.gather(slow, *fast), 5) == [True] * 4
    assert [payload["index"] for payload in pair.h2.routed] == [1, 2, 3, 0]


async def test_handler_raising_gives_a_negative_ack(
    make_link: MakeLink, caplog: pytest.LogCaptureFixture
) -> None:
    pair = await connected_pair(make_link)
    results = await asyncio.gather(
        pair.n1.route({"index": 0}),
        pair.n1.route({"index": 1, "fail": True}),
        pair.n1.route({"index": 2, "cancel": True}),
        pair.n1.route({"index": 3}),
    )
    assert list(results) == [True, False, False, True]
    assert [payload["index"] for payload in pair.h2.routed] == [0, 3]
    assert "refused by the test handler" in warnings_of(caplog)
    assert pair.n1.connected


async def test_route_while_disconnected_is_false_at_once(make_link: MakeLink) -> None:
    link = make_link("n1", "n2", Recorder(), peer_port=free_port())
    future = link.route({"index": 0})
    assert future.done() and future.result() is False


async def test_link_aborted_mid_flight_fails_pending_routes_once(
    make_link: MakeLink, caplog: pytest.LogCaptureFixture
) -> None:
    pair = await connected_pair(make_link)
    pair.h2.gate = asyncio.Event()
    futures = [pair.n1.route({"index": index}) for index in range(10)]
    await asyncio.wait_for(pair.h2.entered.wait(), 5)  # payload 0 is inside on_routed
    pair.n1.disconnect()  # aborts the TCP connection
    assert all(future.done() and future.result() is False for future in futures)
    assert not pair.n1.connected and pair.h1.events == ["up:n2-1.0", "down"]
    await wait_until(lambda: "down" in pair.h2.events)  # n2 saw the loss too
    pair.h2.gate.set()  # what reached n2 is handled there: the acks have nowhere to go
    await wait_until(lambda: pair.n1.connected and pair.n2.connected)  # n1 redials
    handled = [payload["index"] for payload in pair.h2.routed]
    assert handled and handled == list(range(len(handled)))  # in order; the rest dropped
    assert await pair.n1.route({"index": 10}) is True
    assert [future.result() for future in futures] == [False] * 10
    assert pair.h1.events == ["up:n2-1.0", "down", "up:n2-1.0"]
    assert pair.h2.events == ["up:n1-1.0", "down", "up:n1-1.0"]
    assert warnings_of(caplog, logging.ERROR) == ""  # no stray or duplicate ack


async def test_peer_stopped_mid_flight_fails_pending_routes(make_link: MakeLink) -> None:
    pair = await connected_pair(make_link)
    pair.h2.gate = asyncio.Event()
    futures = [pair.n1.route({"index": index}) for index in range(5)]
    await asyncio.wait_for(pair.h2.entered.wait(), 5)
    await pair.n2.stop()
    assert pair.h2.events == ["up:n1-1.0", "down"]
    results = await asyncio.wait_for(asyncio.gather(*futures), 5)
    assert results == [False] * 5
    assert not pair.n1.connected and pair.h1.events[-1] == "down"


async def test_reconnect_after_the_peer_restarts(make_link: MakeLink) -> None:
    pair = await connected_pair(make_link)
    port = pair.n2.port
    await pair.n2.stop()
    await wait_until(lambda: not pair.n1.connected)
    pair.n1.send({"t": "while-down"})
    assert await pair.n1.route({"lost": True}) is False
    h2 = Recorder()
    restarted = make_link("n2", "n1", h2, listen_port=port)
    await restarted.start()
    await wait_until(lambda: pair.n1.connected and restarted.connected)
    await wait_until(lambda: h2.messages == [{"t": "while-down"}])
    assert await pair.n1.route({"index": 1}) is True
    assert h2.routed == [{"index": 1}]
    assert pair.h1.events == ["up:n2-1.0", "down", "up:n2-1.0"]


async def test_a_new_authenticated_connection_replaces_the_old(
    make_link: MakeLink, certs: Certs
) -> None:
    handler = Recorder()
    n2 = make_link("n2", "n1", handler)
    await n2.start()
    first_reader, first_writer = await authenticated_raw_peer(n2.port, certs)
    await wait_until(lambda: n2.peer_version == "raw")
    second_reader, second_writer = await authenticated_raw_peer(n2.port, certs)
    await read_until_closed(first_reader)  # the first one is closed
    assert n2.connected and handler.events == ["up:raw", "down", "up:raw"]
    second_writer.write(b'{"t":"m","m":{"from":"second"}}\n')
    await wait_until(lambda: handler.messages == [{"from": "second"}])
    await close_writer(first_writer)
    await close_writer(second_writer)


# ------------------------------------------------------------------ refusals


async def test_client_certificate_from_another_ca_is_refused_and_logged(
    make_link: MakeLink, certs: Certs, caplog: pytest.LogCaptureFixture
) -> None:
    handler = Recorder()
    n2 = make_link("n2", "n1", handler)
    await n2.start()
    # Claims to be n1 and trusts our CA, but its certificate is from another CA.
    context = node_client_context(certs.foreign, "n1", ca_file=certs.main.ca_file)
    try:
        reader, writer = await raw_peer(n2.port, context)
    except (ConnectionError, ssl.SSLError):
        pass  # TLS 1.2 would fail here; TLS 1.3 fails on the first read
    else:
        assert await read_until_closed(reader) == b""
        await close_writer(writer)
    await wait_until(lambda: n2.refused == 1)
    logged = warnings_of(caplog)
    assert "refused accepted connection" in logged and "certificate verify failed" in logged
    assert not n2.connected and handler.events == []
    # The node keeps running: the real n1 still gets in.
    n1 = make_link("n1", "n2", Recorder(), peer_port=n2.port)
    await n1.start()
    await wait_until(lambda: n1.connected and n2.connected)


async def test_valid_certificate_with_the_wrong_node_name_is_refused_and_logged(
    make_link: MakeLink, certs: Certs, caplog: pytest.LogCaptureFixture
) -> None:
    handler = Recorder()
    n2 = make_link("n2", "n1", handler)
    await n2.start()
    reader, writer = await raw_peer(n2.port, node_client_context(certs.main, "rogue"))
    writer.write(b'{"t":"hello","node":"n1","version":"1"}\n')
    assert await read_until_closed(reader) == b""  # not even our hello
    await close_writer(writer)
    await wait_until(lambda: n2.refused == 1)
    assert "does not name 'n1' (DNS names: localhost, rogue)" in warnings_of(caplog)
    assert not n2.connected and handler.events == []


async def test_dialer_refuses_a_server_with_the_wrong_node_name(
    make_link: MakeLink, caplog: pytest.LogCaptureFixture
) -> None:
    # "rogue" listens where n1 expects n2: the client-side host name check refuses it.
    rogue = make_link("rogue", "n1", Recorder())
    await rogue.start()
    n1 = make_link("n1", "n2", Recorder(), peer_port=rogue.port)
    await n1.start()
    await wait_until(lambda: n1.refused >= 1)
    assert not n1.connected and not rogue.connected
    assert "refused dialed connection" in warnings_of(caplog)


async def test_hello_announcing_another_node_is_refused(
    make_link: MakeLink, certs: Certs, caplog: pytest.LogCaptureFixture
) -> None:
    n2 = make_link("n2", "n1", Recorder())
    await n2.start()
    reader, writer = await raw_peer(n2.port, node_client_context(certs.main, "n1"))
    assert json.loads(await reader.readline())["t"] == "hello"
    writer.write(b'{"t":"hello","node":"n3","version":"1"}\n')
    assert await read_until_closed(reader) == b""
    await close_writer(writer)
    await wait_until(lambda: n2.refused == 1)
    assert "hello announces node 'n3', expected 'n1'" in warnings_of(caplog)
    assert not n2.connected


async def test_plain_tcp_garbage_is_refused(
    make_link: MakeLink, caplog: pytest.LogCaptureFixture
) -> None:
    n2 = make_link("n2", "n1", Recorder())
    await n2.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", n2.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: n2\r\n\r\n")
    data = await read_until_closed(reader)
    assert b"HTTP" not in data  # at most a TLS alert
    await close_writer(writer)
    await wait_until(lambda: n2.refused == 1)
    assert "during TLS handshake" in warnings_of(caplog)
    assert not n2.connected


async def test_silent_client_is_refused_after_the_handshake_timeout(
    make_link: MakeLink, caplog: pytest.LogCaptureFixture
) -> None:
    n2 = make_link("n2", "n1", Recorder(), handshake_timeout=0.2)
    await n2.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", n2.port)
    assert await read_until_closed(reader) == b""
    await close_writer(writer)
    assert n2.refused == 1 and "no authenticated hello within 0.2 s" in warnings_of(caplog)


@pytest.mark.parametrize(
    ("data", "logged"),
    [
        (b"x" * (MAX_LINE + 1), "line longer than"),
        (b"not json\n", "undecodable line"),
        (b"[1, 2]\n", "must be a JSON object"),
        (b'{"t":"nope"}\n', "unknown frame type"),
        (b'{"t":"r","s":2,"p":{}}\n', "out of sequence"),
        (b'{"t":"a","s":1,"ok":true}\n', "does not match the oldest route"),
    ],
    ids=["too-long", "not-json", "not-object", "unknown", "sequence-gap", "stray-ack"],
)
async def test_protocol_errors_after_authentication_close_the_link(
    make_link: MakeLink,
    certs: Certs,
    caplog: pytest.LogCaptureFixture,
    data: bytes,
    logged: str,
) -> None:
    handler = Recorder()
    n2 = make_link("n2", "n1", handler)
    await n2.start()
    reader, writer = await authenticated_raw_peer(n2.port, certs)
    await wait_until(lambda: n2.connected)
    writer.write(data)
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        await writer.drain()
    await read_until_closed(reader)
    await close_writer(writer)
    await wait_until(lambda: not n2.connected)
    assert logged in warnings_of(caplog, logging.ERROR)
    assert handler.events == ["up:raw", "down"] and n2.refused == 0


async def test_idle_timeout_closes_a_silent_link(
    make_link: MakeLink, certs: Certs, caplog: pytest.LogCaptureFixture
) -> None:
    handler = Recorder()
    n2 = make_link("n2", "n1", handler, idle_timeout=0.3)
    await n2.start()
    reader, writer = await authenticated_raw_peer(n2.port, certs)
    await wait_until(lambda: n2.connected)
    for _ in range(4):  # heartbeats keep it open
        writer.write(b'{"t":"m","m":{"t":"hb"}}\n')
        await asyncio.sleep(0.1)
    assert n2.connected
    await read_until_closed(reader)
    assert not n2.connected and "silent for" in warnings_of(caplog)
    await close_writer(writer)


async def test_a_node_without_a_peer_listens_and_refuses_everyone(
    make_link: MakeLink, certs: Certs, caplog: pytest.LogCaptureFixture
) -> None:
    alone = make_link("n2", "", Recorder())
    await alone.start()
    assert not alone.dialer and alone.port != 0
    reader, writer = await raw_peer(alone.port, node_client_context(certs.main, "n1"))
    assert await read_until_closed(reader) == b""
    await close_writer(writer)
    await wait_until(lambda: alone.refused == 1)
    assert "does not name ''" in warnings_of(caplog)
    with pytest.raises(ValueError):
        make_link("n1", "n1", Recorder())
