"""client_sim's sans-I/O client stream against the server's own stream machine, in memory.

`Server` below is the smallest session layer that drives `C2SStream`: SCRAM
with `ScramServer`, PLAIN, binding, XEP-0198 enable/resume and a router
between the clients. Bytes are piped between the two pure machines until
both are quiet. Scripted cases feed hand-written server XML.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from client_sim.aio import LoginError, login
from client_sim.xmpp import (
    Authenticated,
    AuthenticationFailed,
    BindFailed,
    ClientEvent,
    ClientPhase,
    ClientStream,
    IqReceived,
    MessageReceived,
    PresenceReceived,
    ProtocolViolation,
    ResumeFailed,
    ResumeState,
    SaltedPasswordCache,
    SessionStarted,
    StanzasAcknowledged,
    StreamEnded,
    StreamErrorReceived,
    TLSRequested,
)
from xmpp_ha.certs import init_certs
from xmpp_ha.core.errors import LocalProtocolError, StreamCondition
from xmpp_ha.core.jid import JID
from xmpp_ha.net.tls import StreamConnection, client_context, server_context
from xmpp_ha.protocol import ns, stream
from xmpp_ha.protocol.scram import (
    SaslFailure,
    ScramServer,
    derive_credentials,
    parse_plain,
    verify_plain,
)
from xmpp_ha.protocol.sm import StreamManagement
from xmpp_ha.protocol.stream import C2SStream
from xmpp_ha.store.repository import ScramCredentials, ScramMechanism

E = TypeVar("E")
DOMAIN = "localhost"
PASSWORD = "pencil"
SALT = b"0123456789abcdef"
CREDENTIALS: dict[ScramMechanism, ScramCredentials] = {
    mechanism: derive_credentials(PASSWORD, mechanism, SALT, 4096)
    for mechanism in ("SCRAM-SHA-1", "SCRAM-SHA-256")
}


@dataclass
class Connection:
    """One client stream wired to one server stream."""

    local_client: ClientStream | None  # None: the client is across a real socket
    server: C2SStream
    events: list[ClientEvent] = field(default_factory=list)
    received: list[ET.Element] = field(default_factory=list)  # server-side stanzas
    scram: ScramServer | None = None
    sm_requests: list[bool] = field(default_factory=list)

    @property
    def client(self) -> ClientStream:
        assert self.local_client is not None
        return self.local_client

    def of(self, kind: type[E]) -> list[E]:
        return [event for event in self.events if isinstance(event, kind)]


class Server:
    """A session layer around `C2SStream` that is just enough for a client to log in."""

    def __init__(self, *, secret: str = PASSWORD, sm_resume: bool = True) -> None:
        self.secret = secret
        self.sm_resume = sm_resume
        self.connections: list[Connection] = []
        self.by_jid: dict[str, Connection] = {}
        self.resumable: dict[str, Connection] = {}
        self._ids = 0

    def _next(self, prefix: str) -> str:
        self._ids += 1
        return f"{prefix}{self._ids}"

    def connect(self, client: ClientStream) -> Connection:
        server = C2SStream(domain=DOMAIN, new_stream_id=lambda: self._next("s"))
        connection = Connection(client, server)
        self.connections.append(connection)
        client.start()
        self.pump()
        return connection

    def pump(self) -> None:
        """Move bytes both ways until every stream is quiet."""
        moved = True
        while moved:
            moved = False
            for connection in self.connections:
                if connection.local_client is None:
                    continue
                outbound = connection.client.data_to_send()
                if outbound:
                    moved = True
                    for event in connection.server.receive_data(outbound):
                        self._on_server_event(connection, event)
                inbound = connection.server.data_to_send()
                if inbound:
                    moved = True
                    for client_event in connection.client.receive_data(inbound):
                        connection.events.append(client_event)
                        if isinstance(client_event, TLSRequested):
                            connection.client.tls_established()  # TLS is a no-op in memory

    def _on_server_event(self, connection: Connection, event: stream.StreamEvent) -> None:
        server = connection.server
        if isinstance(event, stream.TLSRequested):
            server.tls_established()
        elif isinstance(event, stream.SaslStarted):
            self._sasl_start(connection, event)
        elif isinstance(event, stream.SaslResponse):
            scram = connection.scram
            assert scram is not None
            try:
                server.sasl_success(scram.username, scram.client_final(event.data))
            except SaslFailure as failure:
                server.sasl_failure(failure.condition)
        elif isinstance(event, stream.BindRequested):
            jid = JID.make(server.username, DOMAIN, event.resource or self._next("gen"))
            server.bind_succeeded(event.iq_id, jid)
            self.by_jid[str(jid)] = connection
        elif isinstance(event, stream.SMEnableRequested):
            connection.sm_requests.append(event.resume)
            token = self._next("resume") if event.resume and self.sm_resume else ""
            server.sm_enabled(StreamManagement(), token, 300 if token else 0)
            if token:
                self.resumable[token] = connection
        elif isinstance(event, stream.ResumeRequested):
            old = self.resumable.pop(event.previd, None)
            if old is None or old.server.sm is None or old.server.jid is None:
                server.sm_failed("item-not-found")
                return
            old.server.sm.acknowledge(event.handled)
            for stanza in server.resumed(old.server.jid, old.server.sm, event.previd):
                server.send_stanza(stanza)
            self.by_jid[str(old.server.jid)] = connection
        elif isinstance(event, stream.StanzaReceived):
            connection.received.append(event.stanza)
            if event.stanza.tag == ns.tag(ns.CLIENT, "presence") and not event.stanza.get("to"):
                echo = ET.Element(event.stanza.tag, dict(event.stanza.attrib))
                echo.set("to", event.stanza.get("from", ""))
                server.send_stanza(echo)  # RFC 6121 §4.2.2: to the sender's own resource too
                return
            target = self.by_jid.get(event.stanza.get("to", ""))
            if target is not None and event.stanza.tag != ns.tag(ns.CLIENT, "iq"):
                target.server.send_stanza(event.stanza)

    def _sasl_start(self, connection: Connection, event: stream.SaslStarted) -> None:
        server = connection.server
        if event.mechanism == "PLAIN":
            _authzid, username, password = parse_plain(event.initial_response or b"")
            if password == self.secret and verify_plain(password, CREDENTIALS["SCRAM-SHA-256"]):
                server.sasl_success(username)
            else:
                server.sasl_failure("not-authorized")
            return
        mechanism: ScramMechanism = (
            "SCRAM-SHA-1" if event.mechanism == "SCRAM-SHA-1" else ("SCRAM-SHA-256")
        )
        scram = connection.scram = ScramServer(mechanism, "servernonce", domain=DOMAIN)
        scram.client_first(event.initial_response or b"")
        credentials = derive_credentials(self.secret, mechanism, SALT, 4096)
        server.sasl_challenge(scram.server_first(credentials))


def client(user: str = "alice", **options: object) -> ClientStream:
    options.setdefault("password", PASSWORD)
    return ClientStream(
        jid=f"{user}@{DOMAIN}",
        nonce=lambda: "clientnonce",
        **options,  # type: ignore[arg-type]
    )


def started(connection: Connection) -> SessionStarted:
    sessions = connection.of(SessionStarted)
    assert len(sessions) == 1, connection.events
    session = sessions[0]
    assert isinstance(session, SessionStarted)
    return session


# --- logging in -----------------------------------------------------------------


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-1", "SCRAM-SHA-256", "PLAIN"])
def test_logs_in_with_each_mechanism(mechanism: str) -> None:
    server = Server()
    connection = server.connect(client(mechanism=mechanism, resource="desk"))
    kinds = [type(event) for event in connection.events]
    assert kinds == [TLSRequested, Authenticated, SessionStarted]
    assert started(connection) == SessionStarted("alice@localhost/desk", sm_enabled=False)
    assert connection.client.phase is ClientPhase.ESTABLISHED
    assert connection.server.phase is stream.Phase.ESTABLISHED
    assert connection.server.username == "alice"


def test_server_assigns_a_resource_when_none_is_asked_for() -> None:
    connection = Server().connect(client())
    assert started(connection).jid.startswith("alice@localhost/gen")
    assert connection.client.jid == started(connection).jid


def test_wrong_password_fails_and_ends_the_stream() -> None:
    connection = Server().connect(client(password="wrong"))
    assert connection.events[-2:] == [AuthenticationFailed("not-authorized"), StreamEnded()]
    assert connection.client.closed
    assert connection.server.closed  # our </stream:stream> reached it


def test_plain_with_wrong_password_fails() -> None:
    connection = Server().connect(client(password="wrong", mechanism="PLAIN"))
    assert AuthenticationFailed("not-authorized") in connection.events


def test_a_server_that_does_not_know_the_password_is_not_trusted() -> None:
    """The server's signature proves it holds our keys; a forged success fails the login."""
    scripted = client()
    events = feed_login_until_auth(scripted)
    events += scripted.receive_data(
        f"<success xmlns='{ns.SASL}'>dj1ub3RyZWFsbHk=</success>".encode()  # v=notreally
    )
    assert AuthenticationFailed("server-not-authenticated", "wrong server signature") in events
    assert events[-1] == StreamEnded()


def test_salted_password_is_derived_once_per_salt() -> None:
    cache = SaltedPasswordCache()
    server = Server()
    for user in ("u1", "u2", "u3"):
        started(server.connect(client(user, key_cache=cache)))
    assert cache.derivations == 1
    started(server.connect(client("u4", key_cache=cache, mechanism="SCRAM-SHA-256")))
    assert cache.derivations == 2


# --- established sessions ----------------------------------------------------------


def test_messages_flow_between_two_clients_with_escaping() -> None:
    server = Server()
    alice = server.connect(client("alice", resource="a"))
    bob = server.connect(client("bob", resource="b"))
    body = "5 < 6 & 'quotes' \"too\" ]]> é\r\nline"
    message_id = alice.client.send_message("bob@localhost/b", body, id="m1")
    server.pump()
    (received,) = bob.of(MessageReceived)
    assert isinstance(received, MessageReceived)
    assert (received.sender, received.id, received.type) == ("alice@localhost/a", "m1", "chat")
    assert received.body == body
    assert message_id == "m1"
    assert alice.client.send_message("bob@localhost/b", "x") != alice.client.send_message(
        "bob@localhost/b", "y"
    )


def test_presence_and_iq_are_events() -> None:
    server = Server()
    alice = server.connect(client("alice", resource="a"))
    bob = server.connect(client("bob", resource="b"))
    alice.client.send_presence(to="bob@localhost/b")
    server.pump()
    (presence,) = bob.of(PresenceReceived)
    assert isinstance(presence, PresenceReceived)
    assert (presence.sender, presence.type) == ("alice@localhost/a", "available")
    query = ET.Element(ns.tag(ns.DISCO_INFO, "query"))
    iq_id = alice.client.send_iq("get", query, to=DOMAIN)
    server.pump()
    (sent,) = [s for s in alice.received if s.tag == ns.tag(ns.CLIENT, "iq")]
    assert (sent.get("type"), sent.get("id"), sent.get("to")) == ("get", iq_id, DOMAIN)
    assert sent[0].tag == ns.tag(ns.DISCO_INFO, "query")
    alice.server.send_stanza(ET.Element(ns.tag(ns.CLIENT, "iq"), {"type": "result", "id": iq_id}))
    server.pump()
    (answer,) = alice.of(IqReceived)
    assert isinstance(answer, IqReceived)
    assert (answer.type, answer.id) == ("result", iq_id)


def test_server_ping_is_answered_without_an_event() -> None:
    server = Server()
    alice = server.connect(client(resource="a"))
    ping = ET.Element(
        ns.tag(ns.CLIENT, "iq"),
        {"type": "get", "id": "ping-1", "to": "alice@localhost/a", "from": DOMAIN},
    )
    ET.SubElement(ping, ns.tag(ns.PING, "ping"))
    before = len(alice.events)
    alice.server.send_stanza(ping)
    server.pump()
    assert len(alice.events) == before
    (pong,) = alice.received
    assert (pong.get("type"), pong.get("id"), pong.get("to")) == ("result", "ping-1", DOMAIN)
    assert len(pong) == 0


def test_close_ends_the_stream_on_both_sides() -> None:
    server = Server()
    alice = server.connect(client())
    alice.client.close()
    server.pump()
    assert alice.client.closed and alice.server.closed
    assert alice.client.data_to_send() == b""


def test_server_closing_its_stream_ends_ours() -> None:
    server = Server()
    alice = server.connect(client())
    alice.server.close()
    server.pump()
    assert alice.events[-1] == StreamEnded()
    assert alice.client.closed


@pytest.mark.parametrize(
    ("condition", "expected"),
    [(StreamCondition.CONFLICT, "conflict"), (StreamCondition.SYSTEM_SHUTDOWN, "system-shutdown")],
)
def test_stream_errors_are_events_with_their_condition(
    condition: StreamCondition, expected: str
) -> None:
    server = Server()
    alice = server.connect(client())
    alice.server.fail(condition, "bye")
    server.pump()
    assert alice.events[-2:] == [StreamErrorReceived(expected, "bye"), StreamEnded()]


def test_wrong_domain_is_host_unknown() -> None:
    server = Server()
    connection = server.connect(
        ClientStream(jid="alice@elsewhere", password=PASSWORD, nonce=lambda: "n")
    )
    assert connection.events == [
        StreamErrorReceived("host-unknown", "this server is localhost"),
        StreamEnded(),
    ]


def test_api_is_refused_before_the_session_starts() -> None:
    stream_ = client()
    with pytest.raises(LocalProtocolError):
        stream_.send_message("bob@localhost", "too early")
    with pytest.raises(LocalProtocolError):
        stream_.tls_established()
    stream_.start()
    with pytest.raises(LocalProtocolError):
        stream_.start()
    with pytest.raises(LocalProtocolError):
        stream_.request_ack()


# --- XEP-0198 ----------------------------------------------------------------------


def test_stream_management_answers_requests_and_reports_acks() -> None:
    server = Server()
    alice = server.connect(client("alice", resource="a", stream_management=True, ack_interval=2))
    session = started(alice)
    assert session.sm_enabled and session.resume_id.startswith("resume")
    assert alice.sm_requests == [True]
    for n in range(3):
        alice.server.send_stanza(ET.Element(ns.tag(ns.CLIENT, "message"), {"id": f"s{n}"}))
    alice.server.request_ack()
    server.pump()
    assert alice.server.sm is not None and alice.server.sm.unacked() == []
    for n in range(4):
        alice.client.send_message("nobody@localhost", f"m{n}")
    server.pump()  # ack_interval=2: the client asked twice, the server answered
    acked = [s for e in alice.of(StanzasAcknowledged) for s in e.stanzas]
    assert [s.get("id") for s in acked] == ["c1", "c2", "c3", "c4"]
    assert alice.client.sm is not None and alice.client.sm.unacked() == []


def test_resumption_resends_what_the_server_never_acknowledged() -> None:
    server = Server()
    first = server.connect(client("alice", resource="a", stream_management=True, ack_interval=50))
    bob = server.connect(client("bob", resource="b"))
    first.server.send_stanza(ET.Element(ns.tag(ns.CLIENT, "message"), {"id": "in1"}))
    server.pump()
    for n in range(3):
        first.client.send_message("bob@localhost/b", f"lost {n}")
    # The connection dies before those bytes reach the server.
    first.client.data_to_send()
    assert first.client.connection_lost() == [StreamEnded()]
    state = first.client.resume_state()
    assert state is not None and state.resume_id == started(first).resume_id
    second = server.connect(client("alice", resume=state))
    session = started(second)
    assert session.resumed and session.jid == "alice@localhost/a"
    assert [e.body for e in bob.of(MessageReceived)] == ["lost 0", "lost 1", "lost 2"]
    assert second.server.sm is not None and second.server.sm.unacked() == []  # h='1' was honoured


def test_refused_resumption_binds_a_new_session() -> None:
    server = Server()
    first = server.connect(client("alice", resource="a", stream_management=True))
    first.client.send_message("bob@localhost", "never sent")
    first.client.data_to_send()
    first.client.connection_lost()
    state = first.client.resume_state()
    assert state is not None
    server.resumable.clear()  # the server forgot the session
    second = server.connect(client("alice", resource="again", resume=state))
    (failed,) = second.of(ResumeFailed)
    assert isinstance(failed, ResumeFailed)
    assert [s.findtext(ns.tag(ns.CLIENT, "body")) for s in failed.unacked] == ["never sent"]
    session = started(second)
    assert not session.resumed and session.jid == "alice@localhost/again"


# --- scripted servers --------------------------------------------------------------

HEADER = (
    "<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
    "xmlns:stream='http://etherx.jabber.org/streams' id='x' from='localhost' version='1.0'>"
)
TLS_FEATURES = (
    f"<stream:features><starttls xmlns='{ns.TLS}'><required/></starttls></stream:features>"
)
AUTH_FEATURES = (
    f"<stream:features><mechanisms xmlns='{ns.SASL}'><mechanism>PLAIN</mechanism>"
    "</mechanisms></stream:features>"
)
BIND_FEATURES = f"<stream:features><bind xmlns='{ns.BIND}'/></stream:features>"
SM_BIND_FEATURES = (
    f"<stream:features><bind xmlns='{ns.BIND}'/><sm xmlns='{ns.SM}'/></stream:features>"
)


def feed_login_until_auth(stream_: ClientStream) -> list[ClientEvent]:
    """Script a server up to (and answering) the client's SCRAM client-final."""
    stream_.start()
    events = stream_.receive_data((HEADER + TLS_FEATURES).encode())
    events += stream_.receive_data(f"<proceed xmlns='{ns.TLS}'/>".encode())
    stream_.tls_established()
    events += stream_.receive_data(
        (HEADER + AUTH_FEATURES.replace("PLAIN", "SCRAM-SHA-1")).encode()
    )
    server_first = "r=clientnonceSERVER,s=MDEyMzQ1Njc4OWFiY2RlZg==,i=4096"
    encoded = base64.b64encode(server_first.encode()).decode()
    events += stream_.receive_data(f"<challenge xmlns='{ns.SASL}'>{encoded}</challenge>".encode())
    return events


def plain_client() -> ClientStream:
    return client(mechanism="PLAIN")


def test_scripted_login_sends_the_expected_xml() -> None:
    stream_ = plain_client()
    stream_.start()
    assert b"to='localhost' version='1.0'" in stream_.data_to_send()
    stream_.receive_data((HEADER + TLS_FEATURES).encode())
    assert stream_.data_to_send() == f"<starttls xmlns='{ns.TLS}'/>".encode()
    assert stream_.receive_data(f"<proceed xmlns='{ns.TLS}'/>".encode()) == [TLSRequested()]
    stream_.tls_established()
    assert stream_.data_to_send().startswith(b"<?xml version='1.0'?><stream:stream")
    stream_.receive_data((HEADER + AUTH_FEATURES).encode())
    # base64("\0alice\0pencil")
    assert stream_.data_to_send() == (
        f"<auth xmlns='{ns.SASL}' mechanism='PLAIN'>AGFsaWNlAHBlbmNpbA==</auth>".encode()
    )
    events = stream_.receive_data(f"<success xmlns='{ns.SASL}'/>".encode())
    assert events == [Authenticated("alice", "PLAIN")]
    stream_.data_to_send()
    stream_.receive_data((HEADER + BIND_FEATURES).encode())
    assert stream_.data_to_send() == (
        f"<iq type='set' id='bind'><bind xmlns='{ns.BIND}'/></iq>".encode()
    )
    events = stream_.receive_data(
        f"<iq type='result' id='bind'><bind xmlns='{ns.BIND}'><jid>alice@localhost/r1</jid>"
        "</bind></iq>".encode()
    )
    assert events == [SessionStarted("alice@localhost/r1", sm_enabled=False)]


def scripted_until_bind() -> ClientStream:
    stream_ = plain_client()
    stream_.start()
    stream_.receive_data((HEADER + TLS_FEATURES).encode())
    stream_.receive_data(f"<proceed xmlns='{ns.TLS}'/>".encode())
    stream_.tls_established()
    stream_.receive_data((HEADER + AUTH_FEATURES).encode())
    stream_.receive_data(f"<success xmlns='{ns.SASL}'/>".encode())
    stream_.receive_data((HEADER + BIND_FEATURES).encode())
    stream_.data_to_send()
    return stream_


def test_bind_error_is_bind_failed() -> None:
    stream_ = scripted_until_bind()
    events = stream_.receive_data(
        f"<iq type='error' id='bind'><error type='cancel'><conflict xmlns='{ns.STANZAS}'/>"
        "</error></iq>".encode()
    )
    assert events == [BindFailed("conflict"), StreamEnded()]


def test_server_without_starttls_is_refused() -> None:
    stream_ = plain_client()
    stream_.start()
    stream_.data_to_send()
    events = stream_.receive_data((HEADER + AUTH_FEATURES).encode())
    assert events == [
        ProtocolViolation(StreamCondition.POLICY_VIOLATION, "the server offers no STARTTLS"),
        StreamEnded(),
    ]
    out = stream_.data_to_send()
    assert b"<policy-violation" in out and out.endswith(b"</stream:stream>")


def test_mechanism_not_offered_fails_the_login() -> None:
    stream_ = client(mechanism="SCRAM-SHA-256")
    stream_.start()
    stream_.receive_data((HEADER + TLS_FEATURES).encode())
    stream_.receive_data(f"<proceed xmlns='{ns.TLS}'/>".encode())
    stream_.tls_established()
    events = stream_.receive_data((HEADER + AUTH_FEATURES).encode())
    assert isinstance(events[0], AuthenticationFailed)
    assert events[0].condition == "invalid-mechanism"
    assert events[-1] == StreamEnded()


def test_unexpected_element_is_a_protocol_violation() -> None:
    stream_ = scripted_until_bind()
    events = stream_.receive_data(b"<message><body>before bind</body></message>")
    assert isinstance(events[0], ProtocolViolation)
    assert events[0].condition is StreamCondition.UNSUPPORTED_STANZA_TYPE
    assert stream_.receive_data(b"<more/>") == []


def test_malformed_xml_is_a_protocol_violation() -> None:
    stream_ = plain_client()
    stream_.start()
    events = stream_.receive_data((HEADER + "<a></b>").encode())
    assert isinstance(events[0], ProtocolViolation)
    assert events[0].condition is StreamCondition.NOT_WELL_FORMED


def test_scram_nonce_that_does_not_extend_ours_is_refused() -> None:
    stream_ = client()
    stream_.start()
    stream_.receive_data((HEADER + TLS_FEATURES).encode())
    stream_.receive_data(f"<proceed xmlns='{ns.TLS}'/>".encode())
    stream_.tls_established()
    stream_.receive_data((HEADER + AUTH_FEATURES.replace("PLAIN", "SCRAM-SHA-1")).encode())
    # base64("r=other,s=AAAA,i=4096")
    events = stream_.receive_data(
        f"<challenge xmlns='{ns.SASL}'>cj1vdGhlcixzPUFBQUEsaT00MDk2</challenge>".encode()
    )
    assert isinstance(events[0], AuthenticationFailed)
    assert events[0].condition == "server-not-authenticated"


# --- how the bytes are split does not matter ----------------------------------------


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=60))
def test_events_do_not_depend_on_how_the_bytes_are_split(sizes: list[int]) -> None:
    server_side = C2SStream(domain=DOMAIN, new_stream_id=lambda: "s")
    whole = client(resource="r", mechanism="PLAIN")
    pieces = client(resource="r", mechanism="PLAIN")
    whole_events: list[ClientEvent] = []
    piece_events: list[ClientEvent] = []
    whole.start()
    pieces.start()
    # Drive the server with the whole-bytes client, and replay each server burst
    # to the second client in the given slice sizes.
    while True:
        outbound = whole.data_to_send()
        pieces.data_to_send()
        if not outbound:
            break
        for server_event in server_side.receive_data(outbound):
            if isinstance(server_event, stream.TLSRequested):
                server_side.tls_established()
            elif isinstance(server_event, stream.SaslStarted):
                server_side.sasl_success("alice")
            elif isinstance(server_event, stream.BindRequested):
                server_side.bind_succeeded(server_event.iq_id, JID.make("alice", DOMAIN, "r"))
        phase_data = server_side.data_to_send()
        for event in whole.receive_data(phase_data):
            whole_events.append(event)
            if isinstance(event, TLSRequested):
                whole.tls_established()
        offset, index = 0, 0
        while offset < len(phase_data):
            size = sizes[index % len(sizes)]
            index += 1
            for event in pieces.receive_data(phase_data[offset : offset + size]):
                piece_events.append(event)
                if isinstance(event, TLSRequested):
                    pieces.tls_established()
            offset += size
    assert piece_events == whole_events
    assert whole_events[-1] == SessionStarted("alice@localhost/r", sm_enabled=False)


# --- the asyncio driver over real TLS ------------------------------------------------


class TLSServerSide:
    """`tls.StreamHandler` putting one connection of `Server` behind a real STARTTLS socket."""

    def __init__(self, server: Server, context: ssl.SSLContext, sides: list[TLSServerSide]) -> None:
        self.server = server
        self.context = context
        self.sides = sides
        self.conn: StreamConnection | None = None
        self.connection = Connection(None, C2SStream(domain=DOMAIN, new_stream_id=lambda: "s"))

    def connection_made(self, conn: StreamConnection) -> None:
        self.conn = conn
        self.sides.append(self)
        self.server.connections.append(self.connection)

    def data_received(self, data: bytes) -> None:
        for event in self.connection.server.receive_data(data):
            if isinstance(event, stream.TLSRequested):
                self.flush_all()  # <proceed/> goes out in plaintext
                assert self.conn is not None
                self.conn.start_tls(self.context, server_side=True)
            else:
                self.server._on_server_event(self.connection, event)
        self.flush_all()

    def tls_established(self) -> None:
        self.connection.server.tls_established()
        self.flush_all()

    def connection_lost(self, exc: Exception | None) -> None:
        self.sides.remove(self)

    def flush_all(self) -> None:
        for side in self.sides:
            data = side.connection.server.data_to_send()
            if data and side.conn is not None:
                side.conn.write(data)
            if side.connection.server.closed and side.conn is not None:
                side.conn.close()


@pytest.fixture
async def tls_server(tmp_path: Path) -> AsyncIterator[tuple[int, ssl.SSLContext]]:
    certs = init_certs(tmp_path / "certs", node_names=["n1"])
    server_ssl = server_context(certs.nodes["n1"].cert_file, certs.nodes["n1"].key_file)
    server, sides = Server(), []  # type: tuple[Server, list[TLSServerSide]]
    listener = await asyncio.get_running_loop().create_server(
        lambda: StreamConnection(lambda: TLSServerSide(server, server_ssl, sides)), "127.0.0.1", 0
    )
    yield listener.sockets[0].getsockname()[1], client_context(certs.ca_file)
    listener.close()


async def test_aio_clients_log_in_and_chat_over_starttls(
    tls_server: tuple[int, ssl.SSLContext],
) -> None:
    port, context = tls_server
    alice = await login(
        "127.0.0.1", port, "alice@localhost", PASSWORD, ssl_context=context, resource="a"
    )
    bob = await login(
        "127.0.0.1",
        port,
        "bob@localhost",
        PASSWORD,
        ssl_context=context,
        resource="b",
        mechanism="SCRAM-SHA-256",
        sm=True,
    )
    assert (alice.jid, bob.jid) == ("alice@localhost/a", "bob@localhost/b")
    assert bob.resume_state() is not None
    alice.send_message("bob@localhost/b", "hi <bob> & co")
    async with asyncio.timeout(10):
        async for message in bob.messages():
            assert (message.body, message.sender) == ("hi <bob> & co", "alice@localhost/a")
            break
    await alice.close()
    assert alice.closed and alice.close_reason is None
    bob.abort()
    await asyncio.wait_for(bob.wait_closed(), 10)


async def test_aio_login_failure_raises_with_the_condition(
    tls_server: tuple[int, ssl.SSLContext],
) -> None:
    port, context = tls_server
    with pytest.raises(LoginError) as failure:
        await login("127.0.0.1", port, "alice@localhost", "wrong", ssl_context=context)
    assert failure.value.condition == "not-authorized"
    with pytest.raises(LoginError, match="certificate verify failed") as failure:
        await login(
            "127.0.0.1",
            port,
            "alice@localhost",
            PASSWORD,
            ssl_context=context,
            server_hostname="not-the-server.example",
        )
    assert failure.value.condition == "tls-failure"


def test_ping_is_answered_while_enable_is_pending() -> None:
    stream_ = client(mechanism="PLAIN", stream_management=True)
    stream_.start()
    stream_.receive_data((HEADER + TLS_FEATURES).encode())
    stream_.receive_data(f"<proceed xmlns='{ns.TLS}'/>".encode())
    stream_.tls_established()
    stream_.receive_data((HEADER + AUTH_FEATURES).encode())
    stream_.receive_data(f"<success xmlns='{ns.SASL}'/>".encode())
    stream_.receive_data((HEADER + SM_BIND_FEATURES).encode())
    stream_.receive_data(
        f"<iq type='result' id='bind'><bind xmlns='{ns.BIND}'><jid>alice@localhost/r</jid>"
        "</bind></iq>".encode()
    )
    assert stream_.data_to_send().endswith(f"<enable xmlns='{ns.SM}' resume='true'/>".encode())
    events = stream_.receive_data(
        b"<iq type='get' id='p1' from='localhost'><ping xmlns='urn:xmpp:ping'/></iq>"
    )
    assert events == []
    assert stream_.data_to_send() == b"<iq type='result' id='p1' to='localhost'/>"
    events = stream_.receive_data(f"<enabled xmlns='{ns.SM}' id='r1' resume='true'/>".encode())
    assert events == [SessionStarted("alice@localhost/r", sm_enabled=True, resume_id="r1")]


def test_refused_resumption_reports_only_what_the_server_did_not_handle() -> None:
    sm = StreamManagement()
    for n in range(3):
        sm.track_outbound(ET.Element(ns.tag(ns.CLIENT, "message"), {"id": f"m{n}"}))
    stream_ = client(mechanism="PLAIN", resume=ResumeState("alice@localhost/r", "old-session", sm))
    stream_.start()
    stream_.receive_data((HEADER + TLS_FEATURES).encode())
    stream_.receive_data(f"<proceed xmlns='{ns.TLS}'/>".encode())
    stream_.tls_established()
    stream_.receive_data((HEADER + AUTH_FEATURES).encode())
    stream_.receive_data(f"<success xmlns='{ns.SASL}'/>".encode())
    stream_.data_to_send()
    stream_.receive_data((HEADER + SM_BIND_FEATURES).encode())
    assert (
        stream_.data_to_send() == f"<resume xmlns='{ns.SM}' previd='old-session' h='0'/>".encode()
    )
    events = stream_.receive_data(
        f"<failed xmlns='{ns.SM}' h='2'><item-not-found xmlns='{ns.STANZAS}'/></failed>".encode()
    )
    (failed,) = events
    assert isinstance(failed, ResumeFailed)
    assert [stanza.get("id") for stanza in failed.unacked] == ["m2"]
    assert stream_.phase is ClientPhase.BINDING
