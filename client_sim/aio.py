"""An asyncio driver for `client_sim.xmpp.ClientStream`: moves bytes and events, decides nothing.

The transport is `xmpp_ha.net.tls.StreamConnection` (TLS over memory BIOs, one
read buffer per process), so ten thousand idle sessions in one process cost
little more than OpenSSL's own state. Share one `ssl.SSLContext` between all
clients of a process: each new context costs tens of milliseconds of CPU.

    context = client_context(ca_file)
    alice = await login("127.0.0.1", 5222, "alice@localhost", "pw", ssl_context=context)
    alice.send_message("bob@localhost", "hi")
    async for message in bob.messages(): ...
    await alice.close()
"""

from __future__ import annotations

import asyncio
import secrets
import ssl
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Callable

from client_sim.xmpp import (
    AuthenticationFailed,
    BindFailed,
    ClientEvent,
    ClientStream,
    IqReceived,
    Mechanism,
    MessageReceived,
    PresenceReceived,
    ProtocolViolation,
    ResumeState,
    SaltedPasswordCache,
    SessionStarted,
    StreamEnded,
    StreamErrorReceived,
    TLSRequested,
)
from xmpp_ha.net.tls import StreamConnection

__all__ = ["AioClient", "LoginError", "login"]


class LoginError(Exception):
    """The login did not reach a started session; `condition` says why."""

    def __init__(self, condition: str, text: str = "") -> None:
        super().__init__(f"{condition}: {text}" if text else condition)
        self.condition = condition
        self.text = text


def login_error_of(event: ClientEvent) -> LoginError | None:
    """Why the stream failed, when `event` says it did (for drivers to report)."""
    if isinstance(event, AuthenticationFailed | BindFailed):
        return LoginError(event.condition, getattr(event, "text", ""))
    if isinstance(event, StreamErrorReceived):
        return LoginError(event.condition, event.text)
    if isinstance(event, ProtocolViolation):
        return LoginError(event.condition.value, event.text)
    return None


def new_nonce() -> str:
    return secrets.token_urlsafe(18)


class AioClient:
    """One client connection; the `tls.StreamHandler` of its `StreamConnection`."""

    __slots__ = (
        "stream",
        "on_message",
        "on_presence",
        "on_event",
        "_context",
        "_server_hostname",
        "_conn",
        "_started",
        "_closed",
        "_reason",
        "_iqs",
        "_queue",
    )

    def __init__(
        self,
        stream: ClientStream,
        *,
        ssl_context: ssl.SSLContext,
        server_hostname: str,
        on_message: Callable[[MessageReceived], None] | None = None,
    ) -> None:
        loop = asyncio.get_running_loop()
        self.stream = stream
        self.on_message = on_message
        self.on_presence: Callable[[PresenceReceived], None] | None = None
        self.on_event: Callable[[ClientEvent], None] | None = None  # every other event
        self._context = ssl_context
        self._server_hostname = server_hostname
        self._conn: StreamConnection | None = None
        self._started: asyncio.Future[SessionStarted] = loop.create_future()
        self._closed: asyncio.Future[None] = loop.create_future()
        self._reason: LoginError | None = None  # why the stream ended, when it failed
        self._iqs: dict[str, asyncio.Future[ET.Element]] = {}
        self._queue: asyncio.Queue[MessageReceived | None] | None = None

    # --- the API ------------------------------------------------------------

    @property
    def jid(self) -> str:
        return self.stream.jid

    @property
    def closed(self) -> bool:
        return self._closed.done()

    @property
    def close_reason(self) -> LoginError | None:
        return self._reason

    def send_message(self, to: str, body: str, *, id: str | None = None, type: str = "chat") -> str:
        stanza_id = self.stream.send_message(to, body, id=id, type=type)
        self._flush()
        return stanza_id

    def send_presence(self, *, to: str | None = None, type: str | None = None) -> None:
        self.stream.send_presence(to=to, type=type)
        self._flush()

    def send_iq(
        self, type: str, payload: ET.Element | None = None, *, to: str | None = None
    ) -> asyncio.Future[ET.Element]:
        """Send an iq get/set; the future gets the result or error iq."""
        iq_id = self.stream.send_iq(type, payload, to=to)
        future: asyncio.Future[ET.Element] = asyncio.get_running_loop().create_future()
        self._iqs[iq_id] = future
        self._flush()
        return future

    def send_stanza(self, stanza: ET.Element) -> None:
        self.stream.send_stanza(stanza)
        self._flush()

    async def messages(self) -> AsyncIterator[MessageReceived]:
        """Received messages until the stream ends (alternative to `on_message`)."""
        if self._queue is None:
            self._queue = asyncio.Queue()
            if self.closed:
                self._queue.put_nowait(None)
        while (message := await self._queue.get()) is not None:
            yield message

    def resume_state(self) -> ResumeState | None:
        return self.stream.resume_state()

    async def close(self, timeout: float = 5.0) -> None:
        """End the stream cleanly and wait (up to `timeout`) for the server to close."""
        if self._conn is None or self.closed:
            return
        self.stream.close()
        self._flush()
        try:
            await asyncio.wait_for(asyncio.shield(self._closed), timeout)
        except TimeoutError:
            self._conn.close()

    def abort(self) -> None:
        """Drop the TCP connection without a word (a crash, for XEP-0198 resumption)."""
        if self._conn is not None:
            self._conn.abort()

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)

    async def wait_started(self) -> SessionStarted:
        return await asyncio.shield(self._started)

    # --- tls.StreamHandler --------------------------------------------------

    def connection_made(self, conn: StreamConnection) -> None:
        self._conn = conn
        self.stream.start()
        self._flush()

    def data_received(self, data: bytes) -> None:
        self._handle(self.stream.receive_data(data))

    def tls_established(self) -> None:
        self.stream.tls_established()
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None and self._reason is None:
            condition = "tls-failure" if isinstance(exc, ssl.SSLError) else "connection-lost"
            self._reason = LoginError(condition, str(exc))
            self._reason.__cause__ = exc
        self._handle(self.stream.connection_lost())

    # --- events -------------------------------------------------------------

    def _flush(self) -> None:
        data = self.stream.data_to_send()
        if data and self._conn is not None:
            self._conn.write(data)

    def _handle(self, events: list[ClientEvent]) -> None:
        for event in events:
            if isinstance(event, MessageReceived):
                if self.on_message is not None:
                    self.on_message(event)
                if self._queue is not None:
                    self._queue.put_nowait(event)
            elif isinstance(event, PresenceReceived):
                if self.on_presence is not None:
                    self.on_presence(event)
            elif isinstance(event, IqReceived):
                answer = event.type in ("result", "error")
                future = self._iqs.pop(event.id, None) if answer else None
                if future is not None:
                    if not future.done():
                        future.set_result(event.element)
                elif self.on_event is not None:
                    self.on_event(event)
            else:
                self._on_control(event)
        self._flush()

    def _on_control(self, event: ClientEvent) -> None:
        if isinstance(event, TLSRequested):
            assert self._conn is not None
            self._flush()
            self._conn.start_tls(
                self._context, server_side=False, server_hostname=self._server_hostname
            )
        elif isinstance(event, SessionStarted):
            if not self._started.done():
                self._started.set_result(event)
        elif (failure := login_error_of(event)) is not None:
            self._reason = failure
        elif isinstance(event, StreamEnded):
            self._ended()
        if self.on_event is not None:
            self.on_event(event)

    def _ended(self) -> None:
        self._flush()
        if self._conn is not None:
            self._conn.close()
        reason = self._reason or LoginError("stream-closed", "the stream ended")
        if not self._started.done():
            self._started.set_exception(reason)
            self._started.exception()  # retrieved: nobody may be waiting any more
        for future in self._iqs.values():
            if not future.done():
                future.set_exception(reason)
                future.exception()
        self._iqs.clear()
        if self._queue is not None:
            self._queue.put_nowait(None)
        if not self._closed.done():
            self._closed.set_result(None)


async def login(
    host: str,
    port: int,
    jid: str,
    password: str,
    *,
    ssl_context: ssl.SSLContext,
    mechanism: Mechanism = "SCRAM-SHA-1",
    resource: str | None = None,
    sm: bool = False,
    resume: ResumeState | None = None,
    presence: bool = True,
    server_hostname: str | None = None,
    timeout: float = 30.0,
    on_message: Callable[[MessageReceived], None] | None = None,
    on_event: Callable[[ClientEvent], None] | None = None,
    key_cache: SaltedPasswordCache | None = None,
    standby: bool = False,
    resumable: bool = True,
) -> AioClient:
    """Connect, STARTTLS, authenticate, bind (or resume), and send initial presence.

    With `presence`, returns once the server has echoed our own presence back,
    so the login is complete on the server too. `on_event` sees the login's
    events too (a stream error's see-other-host address, for one). `standby`
    binds an inactive standby session (dual connections; no presence is sent,
    and `wait_started()` says whether the server confirmed it). With `sm`,
    `resumable` asks for XEP-0198 resumption (never for a standby). Raises
    `LoginError` (or `TimeoutError`, `OSError`) and leaves no connection open
    on failure.
    """
    stream = ClientStream(
        jid=jid,
        password=password,
        nonce=new_nonce,
        mechanism=mechanism,
        resource=resource,
        stream_management=sm,
        resumable=resumable and not standby,  # a standby session is the way back itself
        resume=resume,
        key_cache=key_cache,
        standby=standby,
    )
    client = AioClient(
        stream,
        ssl_context=ssl_context,
        server_hostname=server_hostname or stream.domain,
        on_message=on_message,
    )
    client.on_event = on_event
    presence = presence and not standby
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            await loop.create_connection(lambda: StreamConnection(lambda: client), host, port)
            session = await client.wait_started()
            if presence and not session.resumed:
                echoed: asyncio.Future[None] = loop.create_future()

                def on_presence(event: PresenceReceived) -> None:
                    if event.sender == client.jid and not echoed.done():
                        echoed.set_result(None)

                client.on_presence = on_presence
                client.send_presence()
                await asyncio.wait((echoed, client._closed), return_when=asyncio.FIRST_COMPLETED)
                client.on_presence = None
                if not echoed.done():
                    raise client.close_reason or LoginError("stream-closed")
    except BaseException:
        client.abort()
        raise
    return client
