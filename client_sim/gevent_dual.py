"""A gevent driver for `client_sim`'s cores: blocking sockets in greenlets (for Locust).

Under Locust an asyncio loop in a thread collapsed at 2,000 users here; gevent's
own sockets hold thousands of TLS connections in one process. Use the context of
`client_context()`, shared by all clients of the process: it must be gevent's
`SSLContext` (without monkey-patching `gevent.ssl.create_default_context` returns
the standard library's, whose sockets block the whole process).

    context = client_context(ca_file)
    alice = GeventDualClient("alice@localhost", "pw", nodes, home="n1", ssl_context=context)
    alice.start()                  # blocks this greenlet until the active session runs
    alice.send_message("bob@localhost", "hi", id="m1")

`GeventConnection` is one stream; `GeventDualClient` carries out the actions of
`client_sim.dual.DualCore` for one user, as `client_sim.aio_dual` does on asyncio.
"""

from __future__ import annotations

import logging
import socket
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gevent
import gevent.event
import gevent.socket
import gevent.ssl

from client_sim.aio import LoginError, login_error_of
from client_sim.dual import Action, Activate, OpenStandby, Probe, Promote, Relogin, RequestPlan
from client_sim.dual_driver import ACTIVATE, PLAN, DualDriver
from client_sim.xmpp import (
    ClientEvent,
    ClientStream,
    IqReceived,
    MessageReceived,
    PresenceReceived,
    SessionStarted,
    StreamEnded,
    TLSRequested,
)

log = logging.getLogger(__name__)

READ_SIZE = 65536
RELOGIN_DELAY = 0.2


def client_context(ca_file: str | Path) -> gevent.ssl.SSLContext:
    """A TLS client context whose sockets cooperate with gevent, trusting `ca_file`."""
    context = gevent.ssl.SSLContext(gevent.ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(ca_file))
    return context


class GeventConnection:
    """One `ClientStream` over a gevent socket; a reader greenlet feeds it."""

    def __init__(
        self,
        stream: ClientStream,
        *,
        ssl_context: gevent.ssl.SSLContext,
        on_event: Callable[[GeventConnection, ClientEvent], None],
    ) -> None:
        self.stream = stream
        self.context = ssl_context
        self.on_event = on_event
        self.sock: socket.socket | None = None
        self.started: gevent.event.AsyncResult = gevent.event.AsyncResult()
        self.ended = gevent.event.Event()
        self.reason: LoginError | None = None
        self._iqs: dict[str, gevent.event.AsyncResult] = {}
        self._dispatching = False  # the reader is handing out events: it writes after them

    @property
    def closed(self) -> bool:
        return bool(self.ended.is_set())

    @property
    def jid(self) -> str:
        return self.stream.jid

    def connect(self, host: str, port: int, timeout: float) -> SessionStarted:
        """Connect and log in (blocks this greenlet); raises LoginError or OSError."""
        with gevent.Timeout(timeout, TimeoutError(f"no session within {timeout:g} s")):
            self.sock = gevent.socket.create_connection((host, port))
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.stream.start()
            self._flush()
            gevent.spawn(self._read)
            started = self.started.get()
        assert isinstance(started, SessionStarted)
        return started

    def send_stanza(self, stanza: ET.Element) -> None:
        if not self.closed:
            self.stream.send_stanza(stanza)
            self._flush_unless_dispatching()

    def send_iq(self, iq_type: str, payload: ET.Element, timeout: float = 30.0) -> ET.Element:
        """Send an iq and wait for its answer (this greenlet); LoginError if the stream ends."""
        iq_id = self.stream.send_iq(iq_type, payload)
        answer = self._iqs[iq_id] = gevent.event.AsyncResult()
        self._flush()
        result = answer.get(timeout=timeout)
        assert isinstance(result, ET.Element)
        return result

    def send_presence(self) -> None:
        self.stream.send_presence()
        self._flush_unless_dispatching()

    def abort(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self._ended()

    # --- reading ---------------------------------------------------------------------

    def _read(self) -> None:
        while not self.closed and self.sock is not None:
            try:
                data = self.sock.recv(READ_SIZE)
            except (OSError, gevent.ssl.SSLError, ValueError) as exc:
                # ValueError: the socket was closed under us (abort() of a replaced session)
                if self.closed:
                    return
                self.reason = self.reason or LoginError("connection-lost", str(exc))
                data = b""
            events = self.stream.receive_data(data) if data else self.stream.connection_lost()
            self._dispatching = True
            try:
                for event in events:
                    self._dispatch(event)
            finally:
                self._dispatching = False
            self._flush()

    def _dispatch(self, event: ClientEvent) -> None:
        if isinstance(event, TLSRequested):
            self._flush()
            assert self.sock is not None
            self.sock = self.context.wrap_socket(self.sock, server_hostname=self.stream.domain)
            self.stream.tls_established()
        elif isinstance(event, SessionStarted):
            self.started.set(event)
        elif isinstance(event, IqReceived) and event.type in ("result", "error"):
            waiter = self._iqs.pop(event.id, None)
            if waiter is not None:
                waiter.set(event.element)
                return
            self.on_event(self, event)
        elif (failure := login_error_of(event)) is not None:
            self.reason = failure
        elif isinstance(event, StreamEnded):
            self._ended()
            self.on_event(self, event)
        else:
            self.on_event(self, event)

    def _flush_unless_dispatching(self) -> None:
        """Write now, unless this connection's reader is handing out events: it writes
        after the last one, so that what they answered leaves in one write (a pushed
        activation: its answer, presence, re-sent messages and the probe)."""
        if not self._dispatching:
            self._flush()

    def _flush(self) -> None:
        # send(), not sendall(): gevent's sendall asks the kernel for SO_SNDBUF on every
        # call (a tenth of a Locust process's time during a 5,000-user switch)
        while self.sock is not None and (data := self.stream.data_to_send()):
            view = memoryview(data)
            try:
                while view:
                    view = view[self.sock.send(view) :]
            except (OSError, ValueError):
                return  # the reader sees the connection end (ValueError: closed under us)

    def _ended(self) -> None:
        if self.ended.is_set():
            return
        self.ended.set()
        reason = self.reason or LoginError("stream-closed", "the stream ended")
        if not self.started.ready():
            self.started.set_exception(reason)
        for waiter in self._iqs.values():
            waiter.set_exception(reason)
        self._iqs.clear()
        if self.sock is not None:
            self.sock.close()


class GeventDualClient(DualDriver[GeventConnection, gevent.ssl.SSLContext]):
    """One simulated user with dual connections, on gevent (see `client_sim.aio_dual`)."""

    def _setup(self) -> None:
        # the core's next due time and the loop timer set for it (a timer, not a greenlet
        # per reschedule: with thousands of users that churn was a tenth of the process)
        self._timer: Any = None
        self._timer_due: float | None = None
        self._echo: tuple[GeventConnection, gevent.event.Event] | None = None  # login waits

    # --- the API ----------------------------------------------------------------------

    def start(self) -> None:
        """Log in on the home node (blocks this greenlet); the standby follows."""
        host, port = self.core.nodes[self.home]
        self._set_active(self._login(host, port), self.home)

    def close(self) -> None:
        self._closing = True
        self._cancel_timer()
        for connection in (self.active, self.standby):
            if connection is not None:
                connection.abort()

    # --- connections --------------------------------------------------------------------

    def _connection(self, *, standby: bool) -> GeventConnection:
        return GeventConnection(self._stream(standby=standby), ssl_context=self.context,
                                on_event=self._on_event)  # fmt: skip

    def _login(self, host: str, port: int) -> GeventConnection:
        """An active session with its initial presence echoed back."""
        connection = self._connection(standby=False)
        try:
            connection.connect(host, port, self.timeout)
            echoed = gevent.event.Event()
            self._echo = (connection, echoed)
            connection.send_presence()
            if not echoed.wait(self.timeout) or connection.closed:
                raise connection.reason or LoginError("stream-closed")
        except BaseException:
            connection.abort()
            raise
        return connection

    def _set_active(self, connection: GeventConnection, node: str) -> None:
        self.active = connection
        offered = connection.stream.dual_offered
        self._run(self.core.active_started(time.monotonic(), node, dual_offered=offered))
        self._send_pending(connection)

    def _on_event(self, connection: GeventConnection, event: ClientEvent) -> None:
        now = time.monotonic()
        if isinstance(event, MessageReceived):
            self._on_message(event, now)
        elif isinstance(event, PresenceReceived):
            echo = self._echo
            if echo is not None and echo[0] is connection and event.sender == connection.jid:
                echo[1].set()
        elif isinstance(event, IqReceived) and event.type == "set":
            self._pushed(connection, event, now)
        elif isinstance(event, StreamEnded) and not self._closing:
            if connection is self.active:
                self.active = None
                sm = connection.stream.sm
                self._run(self.core.active_lost(now, sm.unacked() if sm is not None else []))
            elif connection is self.standby:
                self.standby = None
                self._run(self.core.standby_lost(now))

    # --- actions --------------------------------------------------------------------------

    def _run(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, RequestPlan):
                gevent.spawn(self._request_plan)
            elif isinstance(action, OpenStandby):
                gevent.spawn(self._open_standby, action)
            elif isinstance(action, Activate):
                gevent.spawn(self._activate)
            elif isinstance(action, Promote):
                self._promote(action)
            elif isinstance(action, Probe):
                self._probe()
            elif isinstance(action, Relogin):
                gevent.spawn(self._relogin, action)
        due = None if self._closing else self.core.due()
        if due != self._timer_due:
            self._cancel_timer()
            if due is not None:
                self._timer_due = due
                self._timer = gevent.get_hub().loop.timer(max(due - time.monotonic(), 0.0))
                self._timer.start(gevent.spawn, self._tick)  # the hub must not block: spawn

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.close()
        self._timer = self._timer_due = None

    def _tick(self) -> None:
        self._timer = self._timer_due = None
        self._run(self.core.tick(time.monotonic()))

    def _request_plan(self) -> None:
        connection = self.active
        if connection is None or connection.closed:
            return
        try:
            answer = connection.send_iq("get", ET.Element(PLAN), self.timeout)
        except (LoginError, gevent.Timeout):
            return  # the session ended: active_lost handles it
        self._run(self._plan_answer(answer, time.monotonic()))

    def _open_standby(self, action: OpenStandby) -> None:
        connection = self._connection(standby=True)
        self.standby = connection  # events of a refused one end in standby_lost
        try:
            started = connection.connect(action.host, action.port, self.timeout)
            if not started.standby:
                raise LoginError("not-standby", "the server bound an active session")
        except (LoginError, OSError, TimeoutError) as exc:
            log.debug("%s: standby on %s refused: %s", self.jid, action.node, exc)
            connection.abort()
            if self.standby is connection:
                self.standby = None
                self._run(self.core.standby_lost(time.monotonic()))
            return
        self._run(self.core.standby_started(time.monotonic()))

    def _activate(self) -> None:
        connection = self.standby
        if connection is None:
            return
        try:
            answer = connection.send_iq("set", ET.Element(ACTIVATE), self.timeout)
        except (LoginError, gevent.Timeout):
            return  # the standby ended: its StreamEnded tells the core
        self._run(self._activation_answer(connection, answer, time.monotonic()))

    def _relogin(self, action: Relogin) -> None:
        try:
            connection = self._login(action.host, action.port)
        except (LoginError, OSError, TimeoutError) as exc:
            log.debug("%s: relogin on %s failed: %s", self.jid, action.node, exc)
            gevent.sleep(RELOGIN_DELAY)
            self._run(self.core.relogin_failed(time.monotonic(), action.node))
            return
        if self.standby is not None:
            self.standby.abort()
            self.standby = None
            self.core.standby = self.core.standby_opening = None
        self._set_active(connection, action.node)
