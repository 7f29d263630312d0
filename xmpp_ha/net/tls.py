"""A stream transport that does TLS itself, so an idle TLS session stays small.

asyncio's stock TLS transport keeps a 256 KiB buffer per connection. This
protocol instead reads every socket into one buffer shared by the process (and
decrypts into a second one; one pair per thread that runs an event loop) and
runs TLS with `SSLContext.wrap_bio` over two `MemoryBIO`s, so an idle
connection holds only OpenSSL's own state and two small BIOs.

Rules and invariants:
- A connection starts in plaintext. `start_tls()` switches in-band
  (STARTTLS): what was written before the call went out in plaintext; every
  byte received after it is a TLS record.
- The shared buffers never outlive a callback: plaintext is copied out
  (`bytes`) before the handler sees it, and ciphertext left over by a pause
  is copied to `_backlog`, so the next read (or a nested call) can reuse them.
- OpenSSL's memory BIOs never give back capacity, so ciphertext enters the
  incoming BIO and plaintext is encrypted in small slices (`TLS_FEED_SIZE`,
  `TLS_WRITE_SIZE`); the records of one write still leave in one send().
- After every SSL operation the outgoing BIO is flushed (TLS 1.3 sends
  session tickets after the handshake, alerts on failure, close_notify).
- Once TLS is up, what is written in one turn of the event loop leaves
  together, in one go at the end of the turn: one send() and as few TLS
  records as the size allows, instead of one of each per stanza (a message and
  the ack request after it, a burst of deliveries). `at_turn_end()` lets the
  layer above add its last words to that (one XEP-0198 ack request for all).
  A burst of more than `_UNSENT_LIMIT` bytes leaves at once, so that
  `writable` and `drain()` see it. In a long turn (thousands of connections
  ready at once) nothing waits for its end more than `_UNSENT_WAIT`: what the
  loop's connections have written leaves before the next read, so that the
  other side works on it meanwhile.
  `close()` sends it first; `abort()` and failures drop it.
- Failures (handshake or record errors, resets) never raise into the event
  loop: the connection closes and the handler gets `connection_lost(exc)`,
  exactly once. A clean close (close_notify, or TCP EOF after the handshake)
  reports `None`.
- No timers here: handshake and idle timeouts belong to the layer above.
"""

from __future__ import annotations

import asyncio
import enum
import socket
import ssl
import threading
import time
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

__all__ = [
    "READ_BUFFER_SIZE",
    "TLS_FEED_SIZE",
    "TLS_WRITE_SIZE",
    "StreamConnection",
    "StreamHandler",
    "client_context",
    "server_context",
]

# Shared buffers (one pair per loop thread): socket reads land in one, and
# TLS decrypts into the other.
READ_BUFFER_SIZE = 64 * 1024
# Ciphertext is fed into the incoming BIO, and plaintext encrypted, in slices
# of this size: OpenSSL's memory BIOs never give capacity back, so this bounds
# what a once-busy connection keeps (about 5 KiB per BIO).
TLS_FEED_SIZE = 4 * 1024
TLS_WRITE_SIZE = 4 * 1024
# Bytes written in one turn of the loop after which they are sent without waiting
# for its end, so that the write buffer (and `writable`) sees a burst.
_UNSENT_LIMIT = 64 * 1024
# Seconds written data waits at most for the end of its turn of the loop.
_UNSENT_WAIT = 0.005

StrPath = str | Path


class StreamHandler(typing.Protocol):
    """The layer above: an XMPP stream, a peer link, a test echo handler."""

    def connection_made(self, conn: StreamConnection) -> None: ...

    def data_received(self, data: bytes) -> None:
        """Plaintext bytes; decrypted when TLS is on."""

    def connection_lost(self, exc: Exception | None) -> None: ...

    def tls_established(self) -> None:
        """The TLS handshake completed; peer certificate and version are known."""


class _Mode(enum.Enum):
    PLAIN = "plain"  # no TLS; bytes pass through untouched
    HANDSHAKING = "handshaking"  # start_tls() called, handshake not finished
    ESTABLISHED = "established"  # TLS up; application data flows
    CLOSED = "closed"  # close()/abort()/failure; nothing more is read or written


class _Shared:
    """What the connections of one thread (one event loop) share: the read buffers,
    and the connections whose writes wait for the end of the loop's turn.

    A dict keyed by thread id rather than one global: two loops in two threads
    sharing one buffer would corrupt each other's reads.
    """

    __slots__ = ("socket", "plain", "waiting", "waiting_since")

    def __init__(self) -> None:
        self.socket = memoryview(bytearray(READ_BUFFER_SIZE))  # recv_into target
        self.plain = memoryview(bytearray(READ_BUFFER_SIZE))  # SSLObject.read target
        self.waiting: list[StreamConnection] = []  # wrote in this turn, not sent yet
        self.waiting_since = 0.0  # when the first of them wrote

    def wait_for_turn_end(self, conn: StreamConnection) -> None:
        if not self.waiting:
            self.waiting_since = time.monotonic()
            asyncio.get_running_loop().call_soon(self.send_all)
        self.waiting.append(conn)

    def send_if_waited(self) -> None:
        """Between two reads of a long turn: what waited long enough leaves now."""
        if self.waiting and time.monotonic() - self.waiting_since >= _UNSENT_WAIT:
            self.send_all()

    def send_all(self) -> None:
        waiting, self.waiting = self.waiting, []
        for conn in waiting:
            conn._send_unsent()


class StreamConnection(asyncio.BufferedProtocol):
    """One TCP connection, plaintext first, optionally TLS after `start_tls()`.

    Server: `loop.create_server(lambda: StreamConnection(factory), host, port,
    backlog=4096, reuse_address=True)`. Client: `loop.create_connection(...)`,
    then `start_tls(ctx, server_side=False, server_hostname=...)`.
    """

    _shared_by_thread: ClassVar[dict[int, _Shared]] = {}

    __slots__ = (
        "_handler_factory",
        "_handler",
        "_transport",
        "_mode",
        "_ssl",
        "_incoming",
        "_outgoing",
        "_pending_writes",
        "_unsent",
        "_unsent_size",
        "_turn_end",
        "_backlog",
        "_error",
        "_write_paused",
        "_reading_paused",
        "_drain_waiters",
        "_lost",
    )

    def __init__(self, handler_factory: Callable[[], StreamHandler]) -> None:
        self._handler_factory: Callable[[], StreamHandler] | None = handler_factory
        self._handler: StreamHandler | None = None
        self._transport: asyncio.Transport | None = None
        self._mode = _Mode.PLAIN
        self._ssl: ssl.SSLObject | None = None
        self._incoming: ssl.MemoryBIO | None = None
        self._outgoing: ssl.MemoryBIO | None = None
        # Writes made between start_tls() and the end of the handshake.
        self._pending_writes: list[bytes] | None = None
        # Plaintext written in this turn of the loop, encrypted and sent at its end.
        self._unsent: list[bytes] | None = None
        self._unsent_size = 0
        self._turn_end: list[Callable[[], None]] | None = None  # called before it is sent
        # Ciphertext read but not yet fed into TLS when the handler paused.
        # Kept here, not in the BIO, so it is freed once consumed.
        self._backlog: bytes | None = None
        self._error: Exception | None = None
        self._write_paused = False
        self._reading_paused = False
        self._drain_waiters: list[asyncio.Future[None]] | None = None
        self._lost = False

    # ---------------------------------------------------------------- API

    @property
    def handler(self) -> StreamHandler | None:
        return self._handler

    @property
    def tls_active(self) -> bool:
        """True once the handshake has completed, until the connection closes."""
        return self._mode is _Mode.ESTABLISHED

    @property
    def tls_started(self) -> bool:
        """True from `start_tls()` on (handshake may still be running)."""
        return self._mode in (_Mode.HANDSHAKING, _Mode.ESTABLISHED)

    @property
    def closing(self) -> bool:
        return self._mode is _Mode.CLOSED or self._lost

    @property
    def writable(self) -> bool:
        """False while the socket's send buffer is above its high-water mark."""
        return not self._write_paused and not self.closing

    @property
    def peername(self) -> Any:
        return self.get_extra_info("peername")

    @property
    def sockname(self) -> Any:
        return self.get_extra_info("sockname")

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """The transport's extra info ("socket", "sockname", ...)."""
        if self._transport is None:
            return default
        return self._transport.get_extra_info(name, default)

    @property
    def tls_version(self) -> str | None:
        if self._mode is not _Mode.ESTABLISHED or self._ssl is None:
            return None
        return self._ssl.version()

    @property
    def peer_certificate(self) -> dict[str, Any] | None:
        """The peer's verified certificate as `SSLSocket.getpeercert()` gives it."""
        if self._mode is not _Mode.ESTABLISHED or self._ssl is None:
            return None
        cert = self._ssl.getpeercert()
        return dict(cert) if cert else None

    @property
    def peer_certificate_der(self) -> bytes | None:
        if self._mode is not _Mode.ESTABLISHED or self._ssl is None:
            return None
        return self._ssl.getpeercert(binary_form=True)

    def write(self, data: bytes) -> None:
        """Send `data`, encrypted when TLS is on. Ignored once closing."""
        if not data or self._transport is None or self.closing:
            return
        if self._mode is _Mode.PLAIN:
            self._transport.write(data)
        elif self._mode is _Mode.HANDSHAKING:
            if self._pending_writes is None:
                self._pending_writes = []
            self._pending_writes.append(bytes(data))
        else:
            unsent = self._unsent_list()
            unsent.append(bytes(data))
            self._unsent_size += len(data)
            if self._unsent_size >= _UNSENT_LIMIT:  # a burst: the write buffer must see it
                self._send_unsent()

    def at_turn_end(self, callback: Callable[[], None]) -> None:
        """Call `callback` at the end of this turn of the event loop, just before what
        was written in it is sent (what it writes leaves with the rest)."""
        if self._mode is not _Mode.ESTABLISHED:
            asyncio.get_running_loop().call_soon(callback)
            return
        self._unsent_list()
        if self._turn_end is None:
            self._turn_end = []
        self._turn_end.append(callback)

    def _unsent_list(self) -> list[bytes]:
        if self._unsent is None:
            self._unsent = []
            self._unsent_size = 0
            self._shared().wait_for_turn_end(self)
        return self._unsent

    def start_tls(
        self,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
        initial_data: bytes = b"",
    ) -> None:
        """Switch to TLS now.

        `initial_data`: bytes the handler already received past the end of
        the STARTTLS exchange (a pipelined ClientHello, or a ServerHello that
        came with `<proceed/>`); they are fed into TLS first.
        """
        if self._transport is None:
            raise RuntimeError("start_tls() before connection_made()")
        if self._mode is not _Mode.PLAIN:
            raise RuntimeError(f"start_tls() in mode {self._mode.value}")
        incoming = ssl.MemoryBIO()
        outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(
            incoming, outgoing, server_side=server_side, server_hostname=server_hostname
        )
        self._incoming = incoming
        self._outgoing = outgoing
        self._mode = _Mode.HANDSHAKING
        self._tls_input(memoryview(initial_data) if initial_data else None)

    def close(self) -> None:
        """Send close_notify if TLS is up, flush what is buffered, then close."""
        if self._transport is None or self.closing:
            return
        self._send_unsent()
        if self._mode is _Mode.ESTABLISHED and self._ssl is not None:
            try:
                self._ssl.unwrap()
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                pass  # close_notify is written; we do not wait for the peer's
            except OSError:
                pass  # the session is already broken; just close the socket
            self._flush()
        self._enter_closed()
        self._transport.close()

    def abort(self) -> None:
        """Close at once, dropping whatever is buffered."""
        if self._transport is None or self._lost:
            return
        self._enter_closed()
        self._transport.abort()

    async def drain(self) -> None:
        """Wait until the transport accepts writes again."""
        if self._lost:
            raise ConnectionResetError("connection lost") from self._error
        if not self._write_paused:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._drain_waiters is None:
            self._drain_waiters = []
        self._drain_waiters.append(waiter)
        await waiter

    def pause_reading(self) -> None:
        self._reading_paused = True
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if not self._reading_paused:
            return
        self._reading_paused = False
        if self._transport is None or self.closing:
            return
        self._transport.resume_reading()
        if self._mode is _Mode.ESTABLISHED:
            # Records may wait in the BIO from before the pause. Deferred so the
            # caller is not re-entered from inside resume_reading().
            asyncio.get_running_loop().call_soon(self._tls_input, None)

    # ----------------------------------------------- asyncio.BufferedProtocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass  # the peer may already be gone; the first read will say so
        factory, self._handler_factory = self._handler_factory, None
        assert factory is not None
        try:
            self._handler = factory()
            self._handler.connection_made(self)
        except BaseException:
            transport.abort()
            raise

    def get_buffer(self, sizehint: int) -> memoryview:
        shared = self._shared()
        shared.send_if_waited()
        return shared.socket

    def buffer_updated(self, nbytes: int) -> None:
        if self._handler is None:
            return
        data = self._shared().socket[:nbytes]
        if self._mode is _Mode.PLAIN:
            self._handler.data_received(bytes(data))
        elif self._mode is not _Mode.CLOSED:
            self._tls_input(data)

    def eof_received(self) -> bool | None:
        self._shared().send_if_waited()
        if self._incoming is not None and self._mode is not _Mode.CLOSED:
            backlog, self._backlog = self._backlog, None
            if backlog:
                self._incoming.write(backlog)
            self._incoming.write_eof()
            self._tls_input(None)
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._mode = _Mode.CLOSED
        self._drop_tls()
        error = self._error if self._error is not None else exc
        waiters, self._drain_waiters = self._drain_waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_exception(ConnectionResetError("connection lost"))
        handler, self._handler = self._handler, None
        if handler is not None:
            handler.connection_lost(error)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiters, self._drain_waiters = self._drain_waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    # ------------------------------------------------------------- TLS work

    @classmethod
    def _shared(cls) -> _Shared:
        thread_id = threading.get_ident()
        shared = cls._shared_by_thread.get(thread_id)
        if shared is None:
            shared = cls._shared_by_thread[thread_id] = _Shared()
        return shared

    def _tls_input(self, data: memoryview | None) -> None:
        """Feed ciphertext into TLS, advance the handshake, deliver plaintext.

        `data` None: nothing new (start_tls without data, EOF, resume). The
        plaintext of one call is delivered in as few `data_received` calls as
        the shared buffer allows.
        """
        if self._backlog is not None:
            backlog, self._backlog = self._backlog, None
            data = memoryview(backlog if data is None else backlog + data)
        plain = self._shared().plain
        size = len(plain)
        filled = 0
        position = 0
        total = 0 if data is None else len(data)
        peer_closed = False
        error: Exception | None = None
        while True:
            ssl_object, incoming = self._ssl, self._incoming
            if ssl_object is None or incoming is None:
                return  # closed meanwhile; what was decrypted is dropped
            if data is not None and position < total:
                if self._reading_paused and self._mode is _Mode.ESTABLISHED:
                    # The shared buffer is reused by the next read: keep a copy.
                    self._backlog = bytes(data[position:])
                    position = total
                else:
                    incoming.write(data[position : position + TLS_FEED_SIZE])
                    position += TLS_FEED_SIZE
            if self._mode is _Mode.HANDSHAKING:
                try:
                    ssl_object.do_handshake()
                except ssl.SSLWantReadError:
                    self._flush()
                    if position < total:
                        continue
                    return
                except OSError as exc:
                    self._fail(exc)
                    return
                self._mode = _Mode.ESTABLISHED
                self._flush()  # Finished, and TLS 1.3 session tickets on the server
                pending, self._pending_writes = self._pending_writes, None
                for chunk in pending or ():
                    self._encrypt(chunk)
                if self._handler is not None:
                    self._handler.tls_established()
                continue  # re-check: the handler may have closed or paused
            while self._mode is _Mode.ESTABLISHED and not self._reading_paused:
                try:
                    # With a buffer, read() returns a count (typeshed says bytes).
                    count = typing.cast(int, ssl_object.read(size - filled, plain[filled:]))
                except ssl.SSLWantReadError:
                    break
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    # close_notify, or TCP EOF without it: XMPP has its own end marker.
                    peer_closed = True
                    break
                except OSError as exc:
                    error = exc
                    break
                if count == 0:
                    peer_closed = True
                    break
                filled += count
                if filled == size:
                    self._flush()
                    self._deliver(plain, filled)
                    filled = 0
            self._flush()  # post-handshake messages (key updates)
            if peer_closed or error is not None or position >= total:
                break
        if filled:
            self._deliver(plain, filled)
        if error is not None:
            self._fail(error)
        elif peer_closed:
            self.close()

    def _deliver(self, buffer: memoryview, count: int) -> None:
        if self._handler is not None and self._mode is _Mode.ESTABLISHED:
            # Copied before the call: a nested call may reuse the shared buffer.
            self._handler.data_received(bytes(buffer[:count]))

    def _send_unsent(self) -> None:
        callbacks, self._turn_end = self._turn_end, None
        for callback in callbacks or ():
            callback()
        unsent, self._unsent = self._unsent, None
        if unsent and self._mode is _Mode.ESTABLISHED:
            self._encrypt(unsent[0] if len(unsent) == 1 else b"".join(unsent))

    def _encrypt(self, data: bytes) -> None:
        ssl_object, outgoing, transport = self._ssl, self._outgoing, self._transport
        if ssl_object is None or outgoing is None or transport is None:
            return
        view = memoryview(data)
        records: list[bytes] = []
        # Small slices keep the outgoing BIO small (it never shrinks); the
        # records are joined so a large write is still one send().
        for start in range(0, len(view), TLS_WRITE_SIZE):
            try:
                ssl_object.write(view[start : start + TLS_WRITE_SIZE])
            except OSError as exc:
                self._fail(exc)
                return
            records.append(outgoing.read())
        transport.write(records[0] if len(records) == 1 else b"".join(records))

    def _flush(self) -> None:
        outgoing = self._outgoing
        if outgoing is not None and outgoing.pending and self._transport is not None:
            self._transport.write(outgoing.read())

    def _fail(self, exc: Exception) -> None:
        if self._error is None:
            self._error = exc
        self._flush()  # the alert, if OpenSSL wrote one
        if self._transport is not None and not self._lost:
            self._enter_closed()
            self._transport.close()

    def _enter_closed(self) -> None:
        self._mode = _Mode.CLOSED
        self._drop_tls()

    def _drop_tls(self) -> None:
        self._ssl = None
        self._incoming = None
        self._outgoing = None
        self._pending_writes = None
        self._unsent = None
        self._turn_end = None
        self._backlog = None


def server_context(
    cert_file: StrPath,
    key_file: StrPath,
    *,
    ca_file: StrPath | None = None,
    require_client_cert: bool = False,
) -> ssl.SSLContext:
    """A server context, TLS 1.2 minimum.

    With `ca_file`, client certificates signed by that CA are requested and
    verified (optional unless `require_client_cert`).
    """
    if require_client_cert and ca_file is None:
        raise ValueError("require_client_cert needs ca_file to verify client certificates")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_RENEGOTIATION  # client-initiated renegotiation burns our CPU
    context.load_cert_chain(cert_file, key_file)
    if ca_file is not None:
        context.load_verify_locations(cafile=ca_file)
        context.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    return context


def client_context(
    ca_file: StrPath | None,
    *,
    cert_file: StrPath | None = None,
    key_file: StrPath | None = None,
    verify: bool = True,
) -> ssl.SSLContext:
    """A client context, TLS 1.2 minimum.

    `verify`: check the server's chain (against `ca_file`, or the system
    store when it is None) and its host name. `cert_file`/`key_file`: our
    certificate for mutual TLS. Build one per process and share it: each new
    context costs tens of milliseconds of CPU.
    """
    if key_file is not None and cert_file is None:
        raise ValueError("key_file given without cert_file")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_RENEGOTIATION
    if verify:
        if ca_file is not None:
            context.load_verify_locations(cafile=ca_file)
        else:
            context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if cert_file is not None:
        context.load_cert_chain(cert_file, key_file)
    return context
