"""The client-to-server listener: moves bytes between sockets and sessions.

No protocol decisions here. Each accepted TCP connection gets a
`StreamConnection` (TLS done in-process, see `tls`) and a `ClientSession`.
Past `max_connections` a new connection is answered with a
`<resource-constraint/>` stream error and closed, so the process never runs
into its open-file limit while the sessions it holds keep working.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable

from xmpp_ha.core.errors import StreamCondition
from xmpp_ha.im.manager import SessionManager
from xmpp_ha.im.session import ClientSession
from xmpp_ha.net.tls import StreamConnection
from xmpp_ha.protocol.xml import STREAM_CLOSE, stream_error, stream_header

log = logging.getLogger(__name__)

LISTEN_BACKLOG = 4096  # login storms overflow a backlog of 128


class _Transport:
    """`im.session.Transport` over one `StreamConnection`."""

    __slots__ = ("_conn", "_context", "peer_address")

    def __init__(self, conn: StreamConnection, context: ssl.SSLContext) -> None:
        self._conn = conn
        self._context = context
        peer = conn.peername
        self.peer_address = str(peer[0]) if isinstance(peer, tuple) else str(peer)

    def write(self, data: bytes) -> None:
        self._conn.write(data)

    def at_turn_end(self, callback: Callable[[], None]) -> None:
        self._conn.at_turn_end(callback)

    def start_tls(self) -> None:
        self._conn.start_tls(self._context, server_side=True)

    def close(self) -> None:
        self._conn.close()

    def pause_reading(self) -> None:
        self._conn.pause_reading()

    def resume_reading(self) -> None:
        self._conn.resume_reading()


class _Handler:
    """`tls.StreamHandler` for one client connection."""

    __slots__ = ("_server", "_session")

    def __init__(self, server: C2SServer) -> None:
        self._server = server
        self._session: ClientSession | None = None

    def connection_made(self, conn: StreamConnection) -> None:
        server = self._server
        if server.connection_count >= server.max_connections:
            server.refused += 1
            header = stream_header(stream_id="refused", from_domain=server.manager.domain, to=None)
            error = stream_error(StreamCondition.RESOURCE_CONSTRAINT, "server is full, try later")
            conn.write(header + error + STREAM_CLOSE)
            conn.close()
            return
        server.connection_count += 1
        self._session = ClientSession(
            server.manager, _Transport(conn, server.tls_context), standby_only=server.standby_only
        )

    def data_received(self, data: bytes) -> None:
        if self._session is not None:
            self._session.data_received(data)

    def tls_established(self) -> None:
        if self._session is not None:
            self._session.tls_established()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._session is not None:
            self._server.connection_count -= 1
            self._session.connection_lost()
            self._session = None


class C2SServer:
    def __init__(
        self,
        manager: SessionManager,
        tls_context: ssl.SSLContext,
        *,
        host: str,
        port: int,
        max_connections: int,
    ) -> None:
        self.manager = manager
        self.tls_context = tls_context
        self.host = host
        self.requested_port = port
        self.max_connections = max_connections
        self.connection_count = 0
        self.refused = 0
        self._server: asyncio.Server | None = None
        # the standby door (dual connections): listening while the client listener service
        # is stopped, for inactive standby sessions only
        self.standby_only = False
        self._bound_port = 0  # kept across stop/start, so a restarted listener is found again

    @property
    def port(self) -> int:
        return self._bound_port or self.requested_port

    @property
    def listening(self) -> bool:
        """Accepting clients (the client listener service); not while only the door is open."""
        return self._open() and not self.standby_only

    @property
    def door_open(self) -> bool:
        return self._open() and self.standby_only

    def _open(self) -> bool:
        return self._server is not None and self._server.is_serving()

    async def start(self) -> None:
        if self.door_open:
            await self.stop()  # the standby sessions it let in stay
        await self._listen()

    async def open_door(self) -> None:
        """Listen for standby sessions only (the services are stopped); no-op if listening."""
        if self._open():
            return
        self.standby_only = True
        try:
            await self._listen()
        except BaseException:
            self.standby_only = False
            raise

    async def _listen(self) -> None:
        loop = asyncio.get_running_loop()
        if self._open():
            return
        self._server = await loop.create_server(
            lambda: StreamConnection(lambda: _Handler(self)),
            self.host,
            self.port,
            backlog=LISTEN_BACKLOG,
            reuse_address=True,
        )
        self._bound_port = int(self._server.sockets[0].getsockname()[1])
        kind = "standby sessions only" if self.standby_only else "clients"
        log.info("c2s listening on %s:%d for %s", self.host, self.port, kind)

    async def stop(self) -> None:
        """Stop accepting; sessions already open are the session manager's to close."""
        if self._server is not None:
            self._server.close()
            self._server = None
        self.standby_only = False
