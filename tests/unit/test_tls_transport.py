"""StreamConnection over real sockets on 127.0.0.1, with throwaway certificates.

The test server speaks a tiny line protocol: it echoes everything, and on the
line b"STARTTLS\\n" it answers b"GO\\n" and switches to TLS, feeding whatever
followed the line into TLS. Independent peers: blocking stdlib `ssl` sockets
in threads, and a hand-driven `SSLObject` that pipelines its ClientHello.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from xmpp_ha.certs import init_certs
from xmpp_ha.net.tls import (
    StreamConnection,
    StreamHandler,
    client_context,
    server_context,
)

STARTTLS = b"STARTTLS\n"
GO = b"GO\n"


@dataclass(frozen=True)
class Certs:
    ca: Path
    server: tuple[Path, Path]
    client: tuple[Path, Path]
    foreign_ca: Path
    foreign_client: tuple[Path, Path]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    main = init_certs(tmp_path_factory.mktemp("certs"), node_names=["server", "client"])
    other = init_certs(tmp_path_factory.mktemp("foreign"), node_names=["client"])
    return Certs(
        ca=main.ca_file,
        server=(main.nodes["server"].cert_file, main.nodes["server"].key_file),
        client=(main.nodes["client"].cert_file, main.nodes["client"].key_file),
        foreign_ca=other.ca_file,
        foreign_client=(other.nodes["client"].cert_file, other.nodes["client"].key_file),
    )


@pytest.fixture(scope="module")
def server_ctx(certs: Certs) -> ssl.SSLContext:
    return server_context(*certs.server)


@pytest.fixture(scope="module")
def client_ctx(certs: Certs) -> ssl.SSLContext:
    return client_context(certs.ca)


@pytest.fixture(autouse=True)
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """Nothing may raise into the event loop."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    yield errors
    await asyncio.sleep(0.01)  # let pending connection_lost callbacks run
    assert errors == []


class Peer:
    """A handler that records everything; subclasses add behaviour."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.conn: StreamConnection | None = None
        self.received = bytearray()
        self.tls_up: asyncio.Future[None] = loop.create_future()
        self.lost: asyncio.Future[Exception | None] = loop.create_future()
        self._changed = asyncio.Event()

    def connection_made(self, conn: StreamConnection) -> None:
        self.conn = conn

    def data_received(self, data: bytes) -> None:
        self.received += data
        self._changed.set()

    def connection_lost(self, exc: Exception | None) -> None:
        assert not self.lost.done(), "connection_lost twice"
        self.lost.set_result(exc)
        self._changed.set()

    def tls_established(self) -> None:
        assert not self.tls_up.done(), "tls_established twice"
        self.tls_up.set_result(None)

    async def wait_for(self, count: int, timeout: float = 10.0) -> bytes:
        async with asyncio.timeout(timeout):
            while len(self.received) < count:
                if self.lost.done():
                    raise AssertionError(f"lost after {len(self.received)} bytes: {self.lost}")
                self._changed.clear()
                await self._changed.wait()
        return bytes(self.received)

    @property
    def c(self) -> StreamConnection:
        assert self.conn is not None
        return self.conn


class EchoServer(Peer):
    """Echoes, switches to TLS on STARTTLS, and respects backpressure."""

    def __init__(self, context: ssl.SSLContext) -> None:
        super().__init__()
        self.context = context
        self.plain = bytearray()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        conn = self.c
        if not conn.tls_started:
            self.plain += data
            head, marker, rest = bytes(self.plain).partition(STARTTLS)
            if not marker:
                self._echo(data)
                return
            # Echo only what belongs before the switch (the part of `data` in head).
            already = len(self.plain) - len(data)
            self._echo(head[already:])
            conn.write(GO)
            conn.start_tls(self.context, server_side=True, initial_data=rest)
            return
        self._echo(data)

    def _echo(self, data: bytes) -> None:
        if not data:
            return
        conn = self.c
        conn.write(data)
        if not conn.writable:
            conn.pause_reading()
            asyncio.get_running_loop().create_task(self._resume_after_drain())

    async def _resume_after_drain(self) -> None:
        try:
            await self.c.drain()
        except ConnectionError:
            return
        self.c.resume_reading()


class StartTlsClient(Peer):
    """Sends STARTTLS, waits for GO, then starts TLS from inside data_received."""

    def __init__(self, context: ssl.SSLContext, hostname: str = "localhost") -> None:
        super().__init__()
        self.context = context
        self.hostname = hostname
        self.plain = bytearray()

    def connection_made(self, conn: StreamConnection) -> None:
        super().connection_made(conn)
        conn.write(STARTTLS)

    def data_received(self, data: bytes) -> None:
        conn = self.c
        if conn.tls_started:
            super().data_received(data)
            return
        self.plain += data
        head, marker, rest = bytes(self.plain).partition(GO)
        if marker:
            conn.start_tls(
                self.context, server_side=False, server_hostname=self.hostname, initial_data=rest
            )


@dataclass
class Server:
    port: int
    handlers: list[EchoServer] = field(default_factory=list)
    server: asyncio.Server | None = None

    async def next_handler(self, index: int = 0, timeout: float = 5.0) -> EchoServer:
        async with asyncio.timeout(timeout):
            while len(self.handlers) <= index:
                await asyncio.sleep(0.001)
        return self.handlers[index]


@pytest.fixture
async def start_server() -> AsyncIterator[Callable[[ssl.SSLContext], Any]]:
    servers: list[asyncio.Server] = []

    async def start(
        context: ssl.SSLContext, handler_class: type[EchoServer] = EchoServer
    ) -> Server:
        loop = asyncio.get_running_loop()
        record = Server(port=0)

        def factory() -> StreamHandler:
            handler = handler_class(context)
            record.handlers.append(handler)
            return handler

        server = await loop.create_server(
            lambda: StreamConnection(factory),
            "127.0.0.1",
            0,
            backlog=4096,
            reuse_address=True,
        )
        servers.append(server)
        record.server = server
        record.port = server.sockets[0].getsockname()[1]
        return record

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def connect(port: int, handler: Peer) -> StreamConnection:
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_connection(
        lambda: StreamConnection(lambda: handler), "127.0.0.1", port
    )
    return protocol


# ------------------------------------------------------------------ plaintext


async def test_plaintext_echo(start_server: Any, server_ctx: ssl.SSLContext) -> None:
    server = await start_server(server_ctx)
    client = Peer()
    conn = await connect(server.port, client)
    assert not conn.tls_active and conn.tls_version is None and conn.peer_certificate is None
    conn.write(b"hello ")
    conn.write(b"world\n")
    assert await client.wait_for(12) == b"hello world\n"
    handler = await server.next_handler()
    assert handler.c.peername == conn.sockname
    sock = handler.c.get_extra_info("socket")
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    conn.close()
    assert await client.lost is None
    assert await handler.lost is None


# ------------------------------------------------------------------ STARTTLS


async def test_starttls_echo_and_close_notify(
    start_server: Any, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    server = await start_server(server_ctx)
    client = StartTlsClient(client_ctx)
    conn = await connect(server.port, client)
    await asyncio.wait_for(client.tls_up, 5)
    handler = await server.next_handler()
    await asyncio.wait_for(handler.tls_up, 5)
    assert conn.tls_active and handler.c.tls_active
    assert conn.tls_version == "TLSv1.3" == handler.c.tls_version
    assert conn.peer_certificate is not None  # the client verified the server
    assert handler.c.peer_certificate is None  # no client certificate asked for
    conn.write(b"secret\n")
    assert await client.wait_for(7) == b"secret\n"
    # The server saw the plaintext STARTTLS and the decrypted payload, nothing else.
    assert bytes(handler.received) == STARTTLS + b"secret\n"
    conn.close()
    assert await asyncio.wait_for(handler.lost, 5) is None  # close_notify, not a reset
    assert await asyncio.wait_for(client.lost, 5) is None
    assert conn.tls_version is None and conn._ssl is None and conn._incoming is None


async def test_tls12_echo_and_close_notify(
    start_server: Any, certs: Certs, server_ctx: ssl.SSLContext
) -> None:
    context = client_context(certs.ca)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    server = await start_server(server_ctx)
    client = StartTlsClient(context)
    conn = await connect(server.port, client)
    await asyncio.wait_for(client.tls_up, 5)
    assert conn.tls_version == "TLSv1.2"
    payload = os.urandom(100_000)
    conn.write(payload)
    assert await client.wait_for(len(payload)) == payload
    handler = await server.next_handler()
    handler.c.close()  # the server closes this time
    assert await asyncio.wait_for(client.lost, 5) is None
    assert await asyncio.wait_for(handler.lost, 5) is None


async def test_writes_before_start_tls_are_plaintext_and_during_handshake_are_queued(
    start_server: Any, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    class EagerClient(StartTlsClient):
        def connection_made(self, conn: StreamConnection) -> None:
            self.conn = conn
            conn.write(b"plain before\n")
            super().connection_made(conn)

        def data_received(self, data: bytes) -> None:
            was_plain = not self.c.tls_started
            super().data_received(data)
            if was_plain and self.c.tls_started:
                self.c.write(b"queued during handshake\n")

    server = await start_server(server_ctx)
    client = EagerClient(client_ctx)
    conn = await connect(server.port, client)
    expected = b"queued during handshake\n"
    assert await client.wait_for(len(expected)) == expected
    handler = await server.next_handler()
    assert bytes(handler.plain) == b"plain before\n" + STARTTLS
    assert bytes(client.plain) == b"plain before\n" + GO
    assert bytes(handler.received).endswith(expected)
    conn.close()
    await client.lost


async def _tls_pair(
    start_server: Any, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> tuple[StartTlsClient, StreamConnection, list[bytes]]:
    """A client and the server's connection to it, TLS up on both; the list records
    each write the server's connection hands to its socket transport."""
    server = await start_server(server_ctx)
    client = StartTlsClient(client_ctx)
    await connect(server.port, client)
    await asyncio.wait_for(client.tls_up, 5)
    handler = await server.next_handler()
    await asyncio.wait_for(handler.tls_up, 5)
    conn = handler.c
    sent: list[bytes] = []
    transport = conn._transport
    assert transport is not None
    write = transport.write

    def recording(data: bytes | bytearray | memoryview) -> None:
        sent.append(bytes(data))
        write(data)

    transport.write = recording  # type: ignore[method-assign]
    return client, conn, sent


async def test_writes_of_one_turn_leave_together_with_the_turn_end_words(
    start_server: Any, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    client, conn, sent = await _tls_pair(start_server, server_ctx, client_ctx)
    conn.write(b"<message/>")
    conn.at_turn_end(lambda: conn.write(b"<r/>"))
    conn.write(b"<presence/>")
    assert sent == []  # nothing leaves before the turn ends
    expected = b"<message/><presence/><r/>"
    assert await client.wait_for(len(expected)) == expected
    assert len(sent) == 1  # one send, one record
    # A burst larger than the limit leaves without waiting for the turn's end.
    burst = os.urandom(200_000)
    conn.write(burst)
    assert len(sent) == 2
    assert await client.wait_for(len(expected) + len(burst)) == expected + burst


async def test_in_a_long_turn_writes_leave_before_the_next_read(
    start_server: Any, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    """Two connections readable in one turn: what the first one's handler wrote has
    left (the handler took longer than the wait allows) before the second is read."""
    pairs = [await _tls_pair(start_server, server_ctx, client_ctx) for _ in range(2)]
    seen_sent: list[int] = []  # on entry to each handler: how many sends the other made
    for index, (_, conn, _) in enumerate(pairs):
        handler = conn._handler
        assert isinstance(handler, EchoServer)
        other_sent = pairs[1 - index][2]

        def slow_echo(
            data: bytes, handler: EchoServer = handler, other: list[bytes] = other_sent
        ) -> None:
            seen_sent.append(len(other))
            EchoServer.data_received(handler, data)
            time.sleep(0.02)  # a long turn: thousands of connections' work

        handler.data_received = slow_echo  # type: ignore[method-assign]
    for client, _, _ in pairs:  # both leave in one send turn: readable in one turn there
        client.c.write(b"ping")
    for client, _, _ in pairs:
        assert await client.wait_for(4) == b"ping"
    assert sorted(seen_sent) == [0, 1]  # the second read found the first echo sent


async def test_close_sends_what_the_turn_wrote_and_abort_drops_it(
    start_server: Any, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    client, conn, _ = await _tls_pair(start_server, server_ctx, client_ctx)
    conn.write(b"last words")
    conn.close()
    assert await client.wait_for(10) == b"last words"
    assert await asyncio.wait_for(client.lost, 5) is None  # close_notify after them

    client, conn, sent = await _tls_pair(start_server, server_ctx, client_ctx)
    conn.write(b"never")
    conn.at_turn_end(lambda: conn.write(b"seen"))
    conn.abort()
    await asyncio.wait_for(client.lost, 5)
    assert sent == [] and bytes(client.received) == b""


async def _pump_handshake(
    tls: ssl.SSLObject,
    incoming: ssl.MemoryBIO,
    outgoing: ssl.MemoryBIO,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> None:
    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            pass
        if outgoing.pending:
            writer.write(outgoing.read())
        chunk = await reader.read(65536)
        if not chunk:
            raise ConnectionError("EOF during handshake")
        incoming.write(chunk)
    if outgoing.pending:
        writer.write(outgoing.read())


async def test_starttls_with_pipelined_client_hello_and_data(
    start_server: Any, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    """Plaintext, STARTTLS and the ClientHello arrive in one TCP segment."""
    server = await start_server(server_ctx)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client_ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    client_hello = outgoing.read()
    writer.write(b"before\n" + STARTTLS + client_hello)
    assert await reader.readexactly(len(b"before\n" + GO)) == b"before\n" + GO
    await _pump_handshake(tls, incoming, outgoing, reader, writer)
    # Two records in one TCP write: the server must read until SSLWantReadError.
    tls.write(b"one\n")
    tls.write(b"two\n")
    writer.write(outgoing.read())
    echoed = b""
    while echoed != b"one\ntwo\n":
        chunk = await asyncio.wait_for(reader.read(65536), 5)
        assert chunk, "server closed"
        incoming.write(chunk)
        try:
            echoed += tls.read(65536)
        except ssl.SSLWantReadError:
            pass
    handler = await server.next_handler()
    assert handler.c.tls_active
    writer.close()
    assert await asyncio.wait_for(handler.lost, 5) is None  # TCP EOF after handshake


async def test_large_payloads_both_ways(
    start_server: Any, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    server = await start_server(server_ctx)
    client = StartTlsClient(client_ctx)
    conn = await connect(server.port, client)
    await asyncio.wait_for(client.tls_up, 5)
    payload = os.urandom(1024 * 1024)
    conn.write(payload)  # the server echoes: 1 MiB each way, with backpressure
    assert await client.wait_for(len(payload), timeout=30) == payload
    handler = await server.next_handler()
    assert bytes(handler.received[len(STARTTLS) :]) == payload
    conn.close()
    await client.lost


async def test_backpressure_drain_and_pause_reading(
    start_server: Any, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    server = await start_server(server_ctx)
    client = StartTlsClient(client_ctx)
    conn = await connect(server.port, client)
    await asyncio.wait_for(client.tls_up, 5)
    handler = await server.next_handler()
    await asyncio.wait_for(handler.tls_up, 5)
    conn.pause_reading()  # the client stops reading: the server's buffers fill up
    chunk = b"x" * 65536
    sent = 0
    while handler.c.writable and sent < 64 * 1024 * 1024:
        handler.c.write(chunk)
        sent += len(chunk)
        await asyncio.sleep(0)
    assert not handler.c.writable
    drain = asyncio.create_task(handler.c.drain())
    await asyncio.sleep(0.05)
    assert not drain.done()
    received_while_paused = len(client.received)
    conn.resume_reading()
    await asyncio.wait_for(drain, 10)
    assert len(client.received) > received_while_paused
    assert await client.wait_for(sent, timeout=30) == b"x" * sent
    conn.close()
    await client.lost


async def test_pause_reading_holds_decrypted_records(
    start_server: Any, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    class PausingClient(StartTlsClient):
        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.c.tls_active:
                self.c.pause_reading()  # after every delivery

    server = await start_server(server_ctx)
    client = PausingClient(client_ctx)
    conn = await connect(server.port, client)
    await asyncio.wait_for(client.tls_up, 5)
    handler = await server.next_handler()
    await asyncio.wait_for(handler.tls_up, 5)
    for index in range(50):
        handler.c.write(b"%03d" % index)  # 50 records, in several TCP reads
        await asyncio.sleep(0.001)
    expected = b"".join(b"%03d" % index for index in range(50))
    await client.wait_for(1)
    deliveries = 1
    while len(client.received) < len(expected):
        before = len(client.received)
        await asyncio.sleep(0.02)
        assert len(client.received) == before, "data delivered while paused"
        conn.resume_reading()
        await client.wait_for(before + 1)
        deliveries += 1
    assert bytes(client.received) == expected
    assert deliveries > 1
    conn.close()
    await client.lost


async def test_records_read_before_a_pause_are_delivered_on_resume(
    start_server: Any, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    class PauseOnTls(EchoServer):
        def tls_established(self) -> None:
            super().tls_established()
            self.c.pause_reading()

    class EagerClient(StartTlsClient):
        def data_received(self, data: bytes) -> None:
            was_plain = not self.c.tls_started
            super().data_received(data)
            if was_plain and self.c.tls_started:
                self.c.write(b"right behind the Finished message\n" * 2000)

    server = await start_server(server_ctx, PauseOnTls)
    client = EagerClient(client_ctx)
    conn = await connect(server.port, client)
    handler = await server.next_handler()
    await asyncio.wait_for(handler.tls_up, 5)
    await asyncio.sleep(0.05)
    assert bytes(handler.received) == STARTTLS
    assert handler.c._incoming is not None
    # The records read with the Finished message wait in the BIO and the backlog.
    assert handler.c._incoming.pending > 0 and handler.c._backlog
    handler.c.resume_reading()
    expected = b"right behind the Finished message\n" * 2000
    assert await client.wait_for(len(expected)) == expected
    conn.close()
    await client.lost


async def test_many_concurrent_connections(
    start_server: Any, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    server = await start_server(server_ctx)

    async def one(index: int) -> None:
        client = StartTlsClient(client_ctx)
        conn = await connect(server.port, client)
        await asyncio.wait_for(client.tls_up, 30)
        message = b"client %d\n" % index
        conn.write(message)
        assert await client.wait_for(len(message), timeout=30) == message
        conn.close()
        assert await client.lost is None

    await asyncio.gather(*(one(index) for index in range(200)))
    assert len(server.handlers) == 200
    results = await asyncio.gather(*(handler.lost for handler in server.handlers))
    assert results == [None] * 200
    # One shared read buffer for all of them (one per event-loop thread).
    assert threading.get_ident() in StreamConnection._shared_by_thread
    buffers = {id(handler.c._shared().socket.obj) for handler in server.handlers}
    assert len(buffers) == 1


# -------------------------------------------------------- independent peers


def _stdlib_client(
    port: int,
    context: ssl.SSLContext,
    payload: bytes,
    *,
    close_notify: bool = True,
) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(STARTTLS)
        assert raw.recv(len(GO)) == GO
        tls = context.wrap_socket(raw, server_hostname="localhost", suppress_ragged_eofs=False)
        tls.sendall(payload)
        received = b""
        while len(received) < len(payload):
            chunk = tls.recv(65536)
            assert chunk
            received += chunk
        if close_notify:
            tls.unwrap()
        else:
            tls.close()
        return received


async def test_stdlib_ssl_client(
    start_server: Any, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    server = await start_server(server_ctx)
    payload = os.urandom(200_000)
    echoed = await asyncio.to_thread(_stdlib_client, server.port, client_ctx, payload)
    assert echoed == payload
    handler = await server.next_handler()
    assert await asyncio.wait_for(handler.lost, 5) is None


def _stdlib_client_waiting_for_server_close(port: int, context: ssl.SSLContext) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(STARTTLS)
        assert raw.recv(len(GO)) == GO
        tls = context.wrap_socket(raw, server_hostname="localhost", suppress_ragged_eofs=False)
        tls.sendall(b"bye\n")
        assert tls.recv(4) == b"bye\n"
        try:
            data = tls.recv(100)
        except ssl.SSLEOFError:
            return "tcp eof"
        return "close_notify" if data == b"" else f"data {data!r}"


async def test_server_close_sends_close_notify(
    start_server: Any, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    server = await start_server(server_ctx)
    task = asyncio.create_task(
        asyncio.to_thread(_stdlib_client_waiting_for_server_close, server.port, client_ctx)
    )
    handler = await server.next_handler()
    await handler.wait_for(len(STARTTLS) + 4)
    handler.c.close()
    assert await asyncio.wait_for(task, 10) == "close_notify"
    assert await handler.lost is None


class _StdlibTlsServer:
    """A blocking stdlib server: STARTTLS line protocol, one echo, in a thread."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.peer_cert: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            raw, _ = self.listener.accept()
            with raw:
                raw.settimeout(10)
                assert raw.recv(len(STARTTLS)) == STARTTLS
                raw.sendall(GO)
                with self.context.wrap_socket(raw, server_side=True) as tls:
                    self.peer_cert = tls.getpeercert() or None
                    data = tls.recv(65536)
                    tls.sendall(data)
                    tls.unwrap()
        except BaseException as exc:  # reported to the test
            self.error = exc
        finally:
            self.listener.close()

    def join(self) -> None:
        self.thread.join(10)


async def test_client_side_against_stdlib_server(
    certs: Certs, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    peer = _StdlibTlsServer(server_ctx)
    client = StartTlsClient(client_ctx)
    conn = await connect(peer.port, client)
    await asyncio.wait_for(client.tls_up, 5)
    conn.write(b"ping\n")
    assert await client.wait_for(5) == b"ping\n"
    assert await asyncio.wait_for(client.lost, 5) is None  # the server's close_notify
    await asyncio.to_thread(peer.join)
    assert peer.error is None


async def test_client_rejects_wrong_hostname(
    start_server: Any, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    server = await start_server(server_ctx)
    client = StartTlsClient(client_ctx, hostname="not-the-server.example")
    await connect(server.port, client)
    exc = await asyncio.wait_for(client.lost, 5)
    assert isinstance(exc, ssl.SSLCertVerificationError)
    assert not client.tls_up.done()
    handler = await server.next_handler()
    assert isinstance(await asyncio.wait_for(handler.lost, 5), ssl.SSLError)


# ----------------------------------------------------------------- failures


def _linger_reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


@pytest.mark.parametrize("reset", [True, False], ids=["rst", "fin"])
async def test_client_disconnects_during_handshake(
    start_server: Any, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, reset: bool
) -> None:
    server = await start_server(server_ctx)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client_ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    writer.write(STARTTLS + outgoing.read())
    assert await reader.readexactly(len(GO)) == GO
    await reader.read(100)  # the ServerHello flight: the server is mid-handshake
    handler = await server.next_handler()
    if reset:
        _linger_reset(writer.get_extra_info("socket"))
    writer.close()
    exc = await asyncio.wait_for(handler.lost, 5)
    assert exc is not None
    assert not handler.tls_up.done()
    # The server still serves.
    await _echo_still_works(server.port)


async def test_client_disconnects_before_finishing_client_hello(
    start_server: Any, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    server = await start_server(server_ctx)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client_ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    _, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(STARTTLS + hello[:40])
    handler = await server.next_handler()
    await handler.wait_for(len(STARTTLS))
    writer.close()
    exc = await asyncio.wait_for(handler.lost, 5)
    assert exc is not None
    assert not handler.tls_up.done()


async def test_garbage_instead_of_client_hello(
    start_server: Any, server_ctx: ssl.SSLContext
) -> None:
    server = await start_server(server_ctx)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(STARTTLS)
    assert await reader.readexactly(len(GO)) == GO
    writer.write(b"GET / HTTP/1.1\r\nHost: example\r\n\r\n" + os.urandom(300))
    handler = await server.next_handler()
    exc = await asyncio.wait_for(handler.lost, 5)
    assert isinstance(exc, ssl.SSLError)
    assert not handler.tls_up.done()
    # The server closed the socket (possibly after an alert).
    rest = await asyncio.wait_for(reader.read(), 5)
    assert len(rest) < 100
    writer.close()


async def _echo_still_works(port: int) -> None:
    client = Peer()
    conn = await connect(port, client)
    conn.write(b"still alive\n")
    assert await client.wait_for(12) == b"still alive\n"
    conn.close()
    await client.lost


# -------------------------------------------------------------- mutual TLS


@pytest.fixture(scope="module")
def mtls_server_ctx(certs: Certs) -> ssl.SSLContext:
    return server_context(*certs.server, ca_file=certs.ca, require_client_cert=True)


async def test_mutual_tls_accepts_ca_signed_client(
    start_server: Any, certs: Certs, mtls_server_ctx: ssl.SSLContext
) -> None:
    server = await start_server(mtls_server_ctx)
    ctx = client_context(certs.ca, cert_file=certs.client[0], key_file=certs.client[1])
    client = StartTlsClient(ctx, hostname="server")  # the node name is a SAN too
    conn = await connect(server.port, client)
    await asyncio.wait_for(client.tls_up, 5)
    handler = await server.next_handler()
    await asyncio.wait_for(handler.tls_up, 5)
    peer = handler.c.peer_certificate
    assert peer is not None
    assert dict(item[0] for item in peer["subject"])["commonName"] == "client"
    assert handler.c.peer_certificate_der is not None
    conn.write(b"mutual\n")
    assert await client.wait_for(7) == b"mutual\n"
    conn.close()
    assert await client.lost is None


@pytest.mark.parametrize("which", ["no-cert", "foreign-ca"])
async def test_mutual_tls_refuses_client_without_valid_cert(
    start_server: Any, certs: Certs, mtls_server_ctx: ssl.SSLContext, which: str
) -> None:
    server = await start_server(mtls_server_ctx)
    if which == "no-cert":
        ctx = client_context(certs.ca)
    else:
        ctx = client_context(
            certs.ca, cert_file=certs.foreign_client[0], key_file=certs.foreign_client[1]
        )
    client = StartTlsClient(ctx)
    conn = await connect(server.port, client)
    handler = await server.next_handler()
    server_exc = await asyncio.wait_for(handler.lost, 5)
    assert isinstance(server_exc, ssl.SSLError)
    assert not handler.tls_up.done()
    # TLS 1.3: the client may finish its side before it reads the server's alert.
    client_exc = await asyncio.wait_for(client.lost, 5)
    assert isinstance(client_exc, ssl.SSLError)
    assert client.received == bytearray()
    assert not conn.tls_active


async def test_mutual_tls_between_two_stream_connections_against_stdlib(
    certs: Certs, mtls_server_ctx: ssl.SSLContext
) -> None:
    """Our client side with a client cert, a stdlib server requiring one."""
    peer = _StdlibTlsServer(mtls_server_ctx)
    ctx = client_context(certs.ca, cert_file=certs.client[0], key_file=certs.client[1])
    client = StartTlsClient(ctx, hostname="127.0.0.1")  # IP SAN
    conn = await connect(peer.port, client)
    await asyncio.wait_for(client.tls_up, 5)
    conn.write(b"peer link\n")
    assert await client.wait_for(10) == b"peer link\n"
    await asyncio.wait_for(client.lost, 5)
    await asyncio.to_thread(peer.join)
    assert peer.error is None
    assert peer.peer_cert is not None


# --------------------------------------------------------------- contexts


def test_contexts(certs: Certs) -> None:
    server = server_context(*certs.server)
    assert server.minimum_version == ssl.TLSVersion.TLSv1_2
    assert server.verify_mode == ssl.CERT_NONE
    optional = server_context(*certs.server, ca_file=certs.ca)
    assert optional.verify_mode == ssl.CERT_OPTIONAL
    with pytest.raises(ValueError, match="require_client_cert needs ca_file"):
        server_context(*certs.server, require_client_cert=True)
    client = client_context(certs.ca)
    assert client.minimum_version == ssl.TLSVersion.TLSv1_2
    assert client.check_hostname and client.verify_mode == ssl.CERT_REQUIRED
    loose = client_context(None, verify=False)
    assert not loose.check_hostname and loose.verify_mode == ssl.CERT_NONE
    with pytest.raises(ValueError, match="key_file given without cert_file"):
        client_context(certs.ca, key_file=certs.client[1])


async def test_start_tls_misuse(
    start_server: Any, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    with pytest.raises(RuntimeError, match="before connection_made"):
        StreamConnection(Peer).start_tls(client_ctx, server_side=False)
    server = await start_server(server_ctx)
    client = StartTlsClient(client_ctx)
    conn = await connect(server.port, client)
    await asyncio.wait_for(client.tls_up, 5)
    with pytest.raises(RuntimeError, match="mode established"):
        conn.start_tls(client_ctx, server_side=False, server_hostname="localhost")
    conn.abort()
    assert isinstance(await client.lost, type(None) | Exception)
    with pytest.raises(ConnectionResetError):
        await conn.drain()
    conn.write(b"ignored after close")
