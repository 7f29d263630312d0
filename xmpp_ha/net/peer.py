"""The peer link: one mutually authenticated TLS connection between the two SRMs.

Rules and invariants:
- TLS from the first byte, both ways, with node certificates from the cluster
  CA. A connection becomes *the* peer link only after (1) the handshake
  verified the other side's chain, (2) its certificate names the peer node as
  a DNS SAN and (3) its hello announced the peer node. Anything else is
  refused: closed, logged on "xmpp_ha.peer" with the reason and counted in
  `refused`. We send our hello only once the other side's certificate passed,
  so an unauthenticated client learns nothing about us.
- Topology: both nodes listen; the node whose name sorts first dials and
  redials with back-off (0.1 s doubling to 2 s). A newly authenticated
  connection replaces the current one. `on_connected` and `on_disconnected`
  alternate, starting with `on_connected`.
- Framing: one JSON object per line, UTF-8 (we write ASCII). A line over
  `MAX_LINE` bytes, undecodable JSON or an unknown frame closes the
  connection (the dialer redials). Frames:
    {"t":"hello","node":N,"version":V}  first, both ways
    {"t":"m","m":MESSAGE}               send() / send_if_connected()
    {"t":"r","s":SEQ,"p":PAYLOAD}       route()
    {"t":"a","s":SEQ,"ok":BOOL}         the answer to a route
  SEQ counts from 1 per connection and direction; a route out of sequence, or
  an ack that is not for the oldest outstanding route, is a protocol error.
- Routed payloads are handed to `on_routed` in order, each in its own task (at
  most ROUTED_WINDOW at once: one slow delivery, say to a client that does not
  acknowledge, does not hold up the others); acks return in arrival order, each
  once its payload and every earlier one was handled. Messages (`on_message`)
  are delivered at once, so a slow `on_routed` never delays heartbeats.
- A route future resolves exactly once: True on a positive ack; False on a
  negative ack, on link loss, on stop, or when not connected. False means
  "not confirmed": the peer may have delivered it just before the link broke
  (at-least-once), so re-routing may duplicate; never silently lose.
- Handler exceptions (other than `on_routed`'s, which mean a negative ack)
  are logged and never break the link or reach the event loop.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import json
import logging
import ssl
import typing
from typing import Any

from xmpp_ha.net.tls import StreamConnection

__all__ = [
    "BACKOFF_MAX",
    "BACKOFF_MIN",
    "INBOUND_HIGH",
    "MAX_LINE",
    "MAX_QUEUED",
    "PeerHandler",
    "PeerLink",
]

log = logging.getLogger("xmpp_ha.peer")

MAX_LINE = 4 * 1024 * 1024  # bytes per JSON line, newline excluded
MAX_QUEUED = 10_000  # send() messages kept while disconnected; the oldest go first
BACKOFF_MIN = 0.1
BACKOFF_MAX = 2.0
# Connections still in TLS or hello at once; more are refused (file descriptors
# are scarce, DESIGN §8, and only one peer ever needs to get through).
MAX_UNAUTHENTICATED = 16
# Routed payloads waiting for on_routed before we stop reading the socket.
INBOUND_HIGH = 4096
INBOUND_LOW = 1024
ROUTED_WINDOW = 1024  # routed payloads being handled at once per connection
CLOSE_GRACE = 1.0  # stop(): how long closing connections may take before abort

_T = typing.TypeVar("_T")
_encoder = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


class PeerHandler(typing.Protocol):
    """The SRM side of the link."""

    def on_connected(self, peer_version: str) -> None: ...

    def on_disconnected(self) -> None: ...

    def on_message(self, message: dict[str, object]) -> None: ...

    async def on_routed(self, payload: dict[str, object]) -> None:
        """Deliver a routed payload; raising sends a negative ack."""


class _State(enum.Enum):
    TLS = "TLS handshake"  # handshake running
    HELLO = "hello"  # peer certificate checked, our hello sent; waiting for theirs
    OPEN = "open"  # authenticated: this is the link
    CLOSED = "closed"  # refused, replaced, failed, lost or stopped


class _ProtocolError(Exception):
    """The authenticated peer broke the framing rules (a Remote error)."""


def _encode(frame: dict[str, object]) -> bytes:
    line = _encoder.encode(frame).encode("ascii")
    if len(line) > MAX_LINE:
        raise ValueError(f"peer frame of {len(line)} bytes exceeds {MAX_LINE}")
    return line + b"\n"


def _dns_names(cert: dict[str, Any] | None) -> list[str]:
    if not cert:
        return []
    return [str(value) for kind, value in cert.get("subjectAltName", ()) if kind == "DNS"]


class _Connection:
    """One TCP/TLS connection, dialed or accepted; a `StreamHandler`."""

    __slots__ = (
        "_link",
        "_dialed",
        "_stream",
        "_state",
        "_timer",
        "_partial",
        "_out",
        "_flush_scheduled",
        "_last_received",
        "_out_seq",
        "_in_seq",
        "_pending",
        "_inbound",
        "_wakeup",
        "_consumer",
        "_handling",
        "_paused",
        "version",
        "finished",
        "authenticated",
    )

    def __init__(self, link: PeerLink, *, dialed: bool) -> None:
        self._link = link
        self._dialed = dialed
        self._stream: StreamConnection | None = None
        self._state = _State.TLS
        self._timer: asyncio.TimerHandle | None = None
        self._partial = bytearray()
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._last_received = 0.0
        self._out_seq = 0
        self._in_seq = 0
        self._pending: collections.deque[tuple[int, asyncio.Future[bool]]] = collections.deque()
        self._inbound: collections.deque[tuple[int, dict[str, object]]] = collections.deque()
        self._wakeup: asyncio.Future[None] | None = None
        self._consumer: asyncio.Task[None] | None = None
        # payloads being handled, in arrival order (acks leave in that order)
        self._handling: collections.deque[tuple[int, asyncio.Task[bool]]] = collections.deque()
        self._paused = False
        self.version: str | None = None
        self.finished = asyncio.Event()  # set once the socket is gone
        self.authenticated = False  # was OPEN at some point

    def __repr__(self) -> str:
        peer = self._stream.peername if self._stream is not None else None
        return f"<peer connection {'to' if self._dialed else 'from'} {peer} {self._state.value}>"

    @property
    def is_unauthenticated(self) -> bool:
        return self._state in (_State.TLS, _State.HELLO)

    # ------------------------------------------------------------ StreamHandler

    def connection_made(self, conn: StreamConnection) -> None:
        self._stream = conn
        link = self._link
        if not self._dialed and link.unauthenticated_count() > MAX_UNAUTHENTICATED:
            self._refuse("too many unauthenticated connections", abort=True)
            return
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(link.handshake_timeout, self._handshake_timed_out)
        try:
            if self._dialed:
                conn.start_tls(link.client_context, server_side=False, server_hostname=link.peer)
            else:
                conn.start_tls(link.server_context, server_side=True)
        except (OSError, ValueError) as exc:
            self._refuse(f"cannot start TLS: {exc}", abort=True)

    def tls_established(self) -> None:
        if self._state is not _State.TLS or self._stream is None:
            return
        expected = self._link.peer
        names = _dns_names(self._stream.peer_certificate)
        if expected.lower() not in (name.lower() for name in names):
            shown = ", ".join(names) if names else "none"
            self._refuse(f"certificate does not name {expected!r} (DNS names: {shown})")
            return
        self._state = _State.HELLO
        link = self._link
        self._write(_encode({"t": "hello", "node": link.node, "version": link.version}))

    def data_received(self, data: bytes) -> None:
        if self._state is not _State.HELLO and self._state is not _State.OPEN:
            return  # TLS: cannot happen (plaintext follows tls_established); CLOSED: late
        if self._link.idle_timeout is not None:
            self._last_received = asyncio.get_running_loop().time()
        try:
            self._split(data)
        except _ProtocolError as exc:
            if self._state is _State.OPEN:
                log.error("peer link %s: %s; closing", self._link.peer, exc)
                self._end(abort=True)
            else:
                self._refuse(str(exc), abort=True)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._state is _State.OPEN:
            log.warning("peer link to %s lost: %s", self._link.peer, exc or "closed by the peer")
            if self._link.current_is(self):
                self._link.closed_by_peer = True  # EOF or reset: the peer's system closed it
            self._end(abort=True)
        elif self._state is not _State.CLOSED:
            detail = f"{type(exc).__name__}: {exc}" if exc else "closed by the other side"
            self._refuse(f"connection lost during {self._state.value}: {detail}", abort=True)
        self._stream = None
        self._link.forget(self)
        self.finished.set()

    # ----------------------------------------------------------------- framing

    def _split(self, data: bytes) -> None:
        """Cut `data` into lines; the partial line never contains a newline."""
        start = 0
        end = data.find(b"\n")
        if self._partial:
            if end < 0:
                self._partial += data
                if len(self._partial) > MAX_LINE:
                    raise _ProtocolError(f"line longer than {MAX_LINE} bytes")
                return
            self._partial += data[:end]
            line = bytes(self._partial)
            self._partial = bytearray()  # a new one: clear() could keep a 4 MiB buffer
            if len(line) > MAX_LINE:
                raise _ProtocolError(f"line longer than {MAX_LINE} bytes")
            self._frame(line)
            start = end + 1
            end = data.find(b"\n", start)
        while end >= 0:
            if self._state is _State.CLOSED:
                return
            if end - start > MAX_LINE:
                raise _ProtocolError(f"line longer than {MAX_LINE} bytes")
            self._frame(data[start:end])
            start = end + 1
            end = data.find(b"\n", start)
        if self._state is _State.CLOSED or start == len(data):
            return
        if len(data) - start > MAX_LINE:
            raise _ProtocolError(f"line longer than {MAX_LINE} bytes")
        self._partial += data[start:]

    def _frame(self, line: bytes) -> None:
        try:
            frame = json.loads(line)
        except (ValueError, RecursionError) as exc:
            raise _ProtocolError(f"undecodable line ({type(exc).__name__})") from None
        if not isinstance(frame, dict):
            raise _ProtocolError(f"a frame must be a JSON object, got {type(frame).__name__}")
        kind = frame.get("t")
        if self._state is _State.HELLO:
            self._hello(frame)
        elif kind == "m":
            message = frame.get("m")
            if not isinstance(message, dict):
                raise _ProtocolError("message frame without an object")
            self._link.deliver_message(message)
        elif kind == "r":
            self._routed(frame)
        elif kind == "a":
            self._acked(frame)
        else:
            raise _ProtocolError(f"unknown frame type {str(kind)[:40]!r}")

    def _hello(self, frame: dict[str, Any]) -> None:
        node, version = frame.get("node"), frame.get("version")
        if frame.get("t") != "hello" or not isinstance(version, str) or not isinstance(node, str):
            self._refuse("first frame is not a valid hello", abort=True)
        elif node != self._link.peer:
            self._refuse(f"hello announces node {node[:80]!r}, expected {self._link.peer!r}")
        else:
            self.version = version
            self._state = _State.OPEN
            self.authenticated = True
            self._cancel_timer()
            self._consumer = self._link.spawn(self._consume())
            if self._link.idle_timeout is not None:
                self._last_received = asyncio.get_running_loop().time()
                self._arm_idle_timer(self._link.idle_timeout)
            self._link.attach(self)

    # ------------------------------------------------------------------ routes

    def send_line(self, line: bytes) -> None:
        if self._state is _State.OPEN:
            self._write(line)

    def route(self, payload: dict[str, object]) -> asyncio.Future[bool]:
        seq = self._out_seq + 1
        line = _encode({"t": "r", "s": seq, "p": payload})  # raises before any state changes
        self._out_seq = seq
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending.append((seq, future))
        self._write(line)
        return future

    def _routed(self, frame: dict[str, Any]) -> None:
        seq, payload = frame.get("s"), frame.get("p")
        if type(seq) is not int or not isinstance(payload, dict):
            raise _ProtocolError("malformed route frame")
        if seq != self._in_seq + 1:
            raise _ProtocolError(f"route {seq} out of sequence (expected {self._in_seq + 1})")
        self._in_seq = seq
        self._inbound.append((seq, payload))
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)
        if len(self._inbound) >= INBOUND_HIGH and not self._paused and self._stream is not None:
            self._paused = True
            self._stream.pause_reading()

    def _acked(self, frame: dict[str, Any]) -> None:
        seq, ok = frame.get("s"), frame.get("ok")
        if type(seq) is not int or not isinstance(ok, bool):
            raise _ProtocolError("malformed ack frame")
        if not self._pending or self._pending[0][0] != seq:
            expected = self._pending[0][0] if self._pending else None
            raise _ProtocolError(f"ack {seq} does not match the oldest route ({expected})")
        _, future = self._pending.popleft()
        if not future.done():  # the caller may have cancelled it
            future.set_result(ok)

    async def _consume(self) -> None:
        """Hand routed payloads to the handler in order, each in its own task."""
        handler = self._link.handler
        inbound, handling = self._inbound, self._handling
        loop = asyncio.get_running_loop()
        while True:
            if not inbound:
                if self._state is not _State.OPEN:
                    return
                self._wakeup = loop.create_future()
                await self._wakeup
                self._wakeup = None
                continue
            if len(handling) >= ROUTED_WINDOW:
                await asyncio.wait([handling[0][1]])  # the oldest: its ack frees the window
                continue
            seq, payload = inbound.popleft()
            if self._paused and len(inbound) <= INBOUND_LOW and self._stream is not None:
                self._paused = False
                self._stream.resume_reading()
            task = self._link.spawn(self._handle(handler, seq, payload))
            handling.append((seq, task))
            task.add_done_callback(self._ack_handled)

    @staticmethod
    async def _handle(handler: PeerHandler, seq: int, payload: dict[str, object]) -> bool:
        try:
            await handler.on_routed(payload)
            return True
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is None or task.cancelling():
                raise  # stop() cancels us
            log.warning("routed payload %d: the handler was cancelled: %r", seq, exc)
        except Exception as exc:
            log.warning("routed payload %d refused by the handler: %r", seq, exc)
        return False

    def _ack_handled(self, _: object = None) -> None:
        """Ack the handled payloads at the head, in order (none once the link is closed)."""
        handling = self._handling
        while handling and handling[0][1].done():
            seq, task = handling.popleft()
            if self._state is _State.OPEN and not task.cancelled():
                self._write(_encode({"t": "a", "s": seq, "ok": task.result()}))

    # ------------------------------------------------------------------ output

    def _write(self, line: bytes) -> None:
        # Lines written in one loop iteration leave in one TLS write.
        self._out.append(line)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        out = self._out
        if not out:
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        if self._stream is not None and self._state is not _State.CLOSED:
            self._stream.write(data)

    # ----------------------------------------------------------------- endings

    def _refuse(self, reason: str, *, abort: bool = False) -> None:
        if self._state is _State.CLOSED:
            return
        address = self._stream.peername if self._stream is not None else None
        direction = "dialed" if self._dialed else "accepted"
        self._link.count_refused(f"peer link: refused {direction} connection {address}: {reason}")
        self._end(abort=abort)

    def close(self) -> None:
        """Flush what is written, then close (close_notify when TLS is up)."""
        self._end(abort=False)

    def abort(self) -> None:
        self._end(abort=True)

    def _end(self, *, abort: bool) -> None:
        if self._state is _State.CLOSED:
            return
        was_open = self._state is _State.OPEN
        if not abort:
            self._flush()
        self._state = _State.CLOSED
        self._out.clear()
        self._cancel_timer()
        self._inbound.clear()
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)
        pending, self._pending = self._pending, collections.deque()
        for _, future in pending:
            if not future.done():
                future.set_result(False)
        stream = self._stream
        if stream is not None:
            if abort:
                stream.abort()
            else:
                stream.close()
        if was_open:
            self._link.detach(self)

    # ------------------------------------------------------------------ timers

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _handshake_timed_out(self) -> None:
        self._timer = None
        self._refuse(f"no authenticated hello within {self._link.handshake_timeout} s", abort=True)

    def _arm_idle_timer(self, delay: float) -> None:
        self._timer = asyncio.get_running_loop().call_later(delay, self._check_idle)

    def _check_idle(self) -> None:
        self._timer = None
        timeout = self._link.idle_timeout
        if timeout is None or self._state is not _State.OPEN:
            return
        silent = asyncio.get_running_loop().time() - self._last_received
        if silent < timeout:
            self._arm_idle_timer(timeout - silent)
            return
        log.warning("peer link to %s silent for %.1f s; closing", self._link.peer, silent)
        self._end(abort=True)


class PeerLink:
    """The link between the two SRMs of a redundancy group (see the module rules).

    `peer` "" means no peer is configured: the link listens (its port can be
    registered) but never dials and refuses every connection. A PeerLink is
    started once; after `stop()`, build a new one.
    """

    def __init__(
        self,
        *,
        node: str,
        peer: str,
        version: str,
        listen_host: str,
        listen_port: int,
        peer_host: str,
        peer_port: int,
        server_context: ssl.SSLContext,
        client_context: ssl.SSLContext,
        handler: PeerHandler,
        handshake_timeout: float = 10.0,
        idle_timeout: float | None = None,
    ) -> None:
        if not node or node == peer:
            raise ValueError(f"node and peer must be two different names, got {node!r}, {peer!r}")
        if handshake_timeout <= 0 or (idle_timeout is not None and idle_timeout <= 0):
            raise ValueError("handshake_timeout and idle_timeout must be positive")
        self.node = node
        self.peer = peer
        self.version = version
        self.server_context = server_context
        self.client_context = client_context
        self.handler = handler
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout  # close an open link silent this long (None: never)
        self._listen_host = listen_host
        self._listen_port = listen_port
        self._peer_host = peer_host
        self._peer_port = peer_port
        self._dialer = bool(peer) and node < peer
        self._server: asyncio.Server | None = None
        self._dial_task: asyncio.Task[None] | None = None
        self._connections: set[_Connection] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._current: _Connection | None = None
        self._queue: collections.deque[bytes] = collections.deque()
        self._started = False
        self._stopping = False
        # the last connection ended by the peer's side (EOF or reset), not by silence or by
        # us: its process exited or closed it (dual connections take that as evidence)
        self.closed_by_peer = False
        self._refused = 0
        self._dropped = 0

    # ------------------------------------------------------------------- state

    @property
    def connected(self) -> bool:
        return self._current is not None

    @property
    def port(self) -> int:
        """The listening port (the real one when `listen_port` was 0)."""
        if self._server is not None and self._server.sockets:
            return int(self._server.sockets[0].getsockname()[1])
        return self._listen_port

    @property
    def peer_version(self) -> str | None:
        """The software version the connected peer announced; None when disconnected."""
        return self._current.version if self._current is not None else None

    @property
    def refused(self) -> int:
        """Connections refused so far (bad certificate, name or hello, garbage, timeout)."""
        return self._refused

    @property
    def dropped(self) -> int:
        """send() messages dropped because the disconnected queue was full."""
        return self._dropped

    @property
    def dialer(self) -> bool:
        return self._dialer

    # -------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        if self._started:
            raise RuntimeError("PeerLink.start() called twice")
        self._started = True
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: StreamConnection(self._accepted),
            self._listen_host,
            self._listen_port,
            reuse_address=True,
        )
        log.info(
            "peer link %s listening on %s:%d%s",
            self.node,
            self._listen_host,
            self.port,
            f"; dialing {self.peer} at {self._peer_host}:{self._peer_port}" if self._dialer else "",
        )
        if self._dialer:
            self._dial_task = loop.create_task(self._dial_forever())

    async def stop(self) -> None:
        """Flush and close every connection; pending routes resolve False."""
        if self._stopping:
            return
        self._stopping = True
        if self._dial_task is not None:
            self._dial_task.cancel()
            await asyncio.gather(self._dial_task, return_exceptions=True)
        if self._server is not None:
            self._server.close()
        connections = list(self._connections)
        for conn in connections:
            conn.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        waiting = [asyncio.ensure_future(conn.finished.wait()) for conn in connections]
        if waiting:
            _, late = await asyncio.wait(waiting, timeout=CLOSE_GRACE)
            for future in late:
                future.cancel()
            for conn in connections:
                if not conn.finished.is_set():
                    conn.abort()
        if self._server is not None:
            await self._server.wait_closed()
        log.info("peer link %s stopped", self.node)

    def disconnect(self) -> None:
        """Abort the current connection (e.g. the failure detector lost the peer)."""
        if self._current is not None:
            log.info("peer link to %s: disconnect requested", self.peer)
            self._current.abort()

    # -------------------------------------------------------------- messaging

    def send(self, message: dict[str, object]) -> None:
        """In order while connected; queued while disconnected, flushed on connect.

        Raises ValueError (too large, NaN) or TypeError (not JSON) at once.
        """
        line = _encode({"t": "m", "m": message})
        if self._current is not None:
            self._current.send_line(line)
            return
        if len(self._queue) >= MAX_QUEUED:
            self._queue.popleft()
            self._dropped += 1
            if self._dropped == 1 or self._dropped % 1000 == 0:
                log.warning("peer link queue full: %d messages dropped so far", self._dropped)
        self._queue.append(line)

    def send_if_connected(self, message: dict[str, object]) -> bool:
        """Send now, or drop (return False) when not connected: for heartbeats."""
        current = self._current
        if current is None:
            return False
        current.send_line(_encode({"t": "m", "m": message}))
        return True

    def route(self, payload: dict[str, object]) -> asyncio.Future[bool]:
        """Deliver `payload` to the peer's `on_routed`; True once acknowledged.

        False: negative ack, link loss, stop, or not connected; the payload may
        still have been delivered (see the module rules). Raises ValueError or
        TypeError when `payload` cannot be encoded.
        """
        current = self._current
        if current is None:
            future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            future.set_result(False)
            return future
        return current.route(payload)

    # ------------------------------------------------- called by _Connection

    def unauthenticated_count(self) -> int:
        return sum(1 for conn in self._connections if conn.is_unauthenticated)

    def count_refused(self, reason: str) -> None:
        self._refused += 1
        log.warning("%s", reason)

    def spawn(self, coroutine: typing.Coroutine[Any, Any, _T]) -> asyncio.Task[_T]:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def attach(self, conn: _Connection) -> None:
        if self._stopping:
            conn.close()
            return
        old = self._current
        self.closed_by_peer = False
        if old is not None:
            log.info("peer link to %s: a new authenticated connection replaces %r", self.peer, old)
            old.close()  # detaches: on_disconnected, its routes resolve False
        self._current = conn
        log.info("peer link %s <-> %s up (peer version %s)", self.node, self.peer, conn.version)
        queue, self._queue = self._queue, collections.deque()
        for line in queue:
            conn.send_line(line)
        try:
            self.handler.on_connected(conn.version or "")
        except Exception:
            log.exception("peer handler on_connected failed")

    def current_is(self, conn: _Connection) -> bool:
        return self._current is conn

    def detach(self, conn: _Connection) -> None:
        if self._current is not conn:
            return
        self._current = None
        try:
            self.handler.on_disconnected()
        except Exception:
            log.exception("peer handler on_disconnected failed")

    def forget(self, conn: _Connection) -> None:
        self._connections.discard(conn)

    def deliver_message(self, message: dict[str, object]) -> None:
        try:
            self.handler.on_message(message)
        except Exception:
            log.exception("peer handler on_message failed")

    # ---------------------------------------------------------------- private

    def _accepted(self) -> _Connection:
        conn = _Connection(self, dialed=False)
        self._connections.add(conn)
        return conn

    async def _dial(self) -> _Connection | None:
        made: list[_Connection] = []

        def factory() -> _Connection:
            conn = _Connection(self, dialed=True)
            self._connections.add(conn)
            made.append(conn)
            return conn

        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.handshake_timeout):
                await loop.create_connection(
                    lambda: StreamConnection(factory), self._peer_host, self._peer_port
                )
        except (OSError, TimeoutError) as exc:
            log.debug("peer link: dialing %s:%d failed: %r", self._peer_host, self._peer_port, exc)
        return made[0] if made else None

    async def _dial_forever(self) -> None:
        delay = BACKOFF_MIN
        while True:
            current = self._current
            if current is not None:  # an accepted connection may be the link
                await current.finished.wait()
                delay = BACKOFF_MIN
            else:
                conn = await self._dial()
                if conn is not None:
                    await conn.finished.wait()
                    if conn.authenticated:
                        delay = BACKOFF_MIN
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)
