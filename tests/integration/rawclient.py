"""A small raw XMPP client for tests that must send what real clients never would.

It speaks over asyncio streams: TCP, STARTTLS (`StreamWriter.start_tls`),
SASL PLAIN or SCRAM (its own few lines, independent of the server's), stream
restarts and resource binding, and it writes any bytes the test asks for.
Answers are read with a tolerant incremental parser (ElementTree's
`XMLPullParser`): each complete child of the server's `<stream:stream>`
comes out as an Element; the end of the stream and the end of the
connection are recorded, never raised from the reader.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import secrets
import socket
import ssl
import struct
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

STREAM_NS = "http://etherx.jabber.org/streams"
STREAMS_NS = "urn:ietf:params:xml:ns:xmpp-streams"
STANZAS_NS = "urn:ietf:params:xml:ns:xmpp-stanzas"
TLS_NS = "urn:ietf:params:xml:ns:xmpp-tls"
SASL_NS = "urn:ietf:params:xml:ns:xmpp-sasl"
BIND_NS = "urn:ietf:params:xml:ns:xmpp-bind"
DUAL_NS = "urn:xmpp-ha:dual:0"
CLIENT_NS = "jabber:client"

READ_SIZE = 65536
DEFAULT_TIMEOUT = 5.0


def tag(namespace: str, local: str) -> str:
    return f"{{{namespace}}}{local}"


def local_name(element: ET.Element) -> str:
    return element.tag.rpartition("}")[2]


def condition_of(error: ET.Element, namespace: str) -> str:
    """The defined condition in an error element: its child in `namespace` other than text."""
    for child in error:
        if child.tag.startswith("{" + namespace + "}") and local_name(child) != "text":
            return local_name(child)
    return ""


def stanza_error_condition(stanza: ET.Element) -> str:
    error = stanza.find(tag(CLIENT_NS, "error"))
    return "" if error is None else condition_of(error, STANZAS_NS)


def header(to: str | None = "localhost", version: str | None = "1.0", extra: str = "") -> bytes:
    attributes = ""
    if to is not None:
        attributes += f" to='{to}'"
    if version is not None:
        attributes += f" version='{version}'"
    return (
        f"<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
        f"xmlns:stream='{STREAM_NS}'{attributes}{extra}>"
    ).encode()


class ConnectionEnded(Exception):
    """The server closed the stream or the connection before the expected element."""


@dataclass
class StreamErrorSeen:
    condition: str
    text: str


class RawClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.received: list[ET.Element] = []  # every complete element, in order
        self.server_header: dict[str, str] | None = None
        self.stream_closed = False  # the server sent </stream:stream>
        self.eof = False  # the TCP connection ended
        self.parse_error: str = ""
        self.features: ET.Element | None = None  # the last stream features (set by bind)
        self._pending: list[ET.Element] = []
        self._new_parser()

    @classmethod
    async def connect(cls, host: str, port: int, timeout: float = DEFAULT_TIMEOUT) -> RawClient:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        return cls(reader, writer)

    # --- raw io ---------------------------------------------------------------

    def _new_parser(self) -> None:
        self._parser: ET.XMLPullParser[ET.Element] = ET.XMLPullParser(events=("start", "end"))
        self._depth = 0
        self.server_header = None
        self.stream_closed = False

    def restart(self) -> None:
        """Expect a new server stream (after <proceed/> or <success/>)."""
        self._new_parser()

    async def send(self, data: bytes | str) -> None:
        self.writer.write(data.encode() if isinstance(data, str) else data)
        await self.writer.drain()

    def _feed(self, data: bytes) -> None:
        if self.parse_error:
            return
        try:
            self._parser.feed(data)
            for item in self._parser.read_events():
                event, element = item[0], item[-1]  # ("start" | "end", Element) here
                assert isinstance(element, ET.Element)
                if event == "start":
                    self._depth += 1
                    if self._depth == 1:
                        self.server_header = dict(element.attrib)
                else:
                    self._depth -= 1
                    if self._depth == 1:
                        self._pending.append(element)
                        self.received.append(element)
                    elif self._depth == 0:
                        self.stream_closed = True
        except ET.ParseError as exc:
            self.parse_error = str(exc)

    async def _read_more(self, timeout: float) -> None:
        try:
            data = await asyncio.wait_for(self.reader.read(READ_SIZE), timeout)
        except (ConnectionError, ssl.SSLError):
            data = b""
        if not data:
            self.eof = True
            return
        self._feed(data)

    async def next_element(self, timeout: float = DEFAULT_TIMEOUT) -> ET.Element:
        """The next complete child of the server's stream."""
        async with asyncio.timeout(timeout):
            while not self._pending:
                if self.stream_closed or self.eof:
                    raise ConnectionEnded(
                        f"stream closed={self.stream_closed} eof={self.eof}; "
                        f"received {[local_name(e) for e in self.received]}"
                    )
                await self._read_more(timeout)
            return self._pending.pop(0)

    async def expect(self, name: str, timeout: float = DEFAULT_TIMEOUT) -> ET.Element:
        """Skip to the next element called `name` (local name); fail on a stream error."""
        while True:
            element = await self.next_element(timeout)
            if local_name(element) == name:
                return element
            if element.tag == tag(STREAM_NS, "error"):
                raise AssertionError(
                    f"stream error {condition_of(element, STREAMS_NS)} while waiting for {name}"
                )

    async def wait_closed(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Read (and keep) everything until the server ends the TCP connection."""
        async with asyncio.timeout(timeout):
            while not self.eof:
                await self._read_more(timeout)

    async def expect_stream_error(self, timeout: float = DEFAULT_TIMEOUT) -> StreamErrorSeen:
        """The server's stream error; then the stream and the connection must end."""
        while True:
            element = await self.next_element(timeout)
            if element.tag == tag(STREAM_NS, "error"):
                break
        await self.wait_closed(timeout)
        assert self.stream_closed, "no </stream:stream> after the stream error"
        text = element.findtext(tag(STREAMS_NS, "text")) or ""
        return StreamErrorSeen(condition_of(element, STREAMS_NS), text)

    def close(self) -> None:
        if not self.writer.is_closing():
            self.writer.close()

    def abort(self) -> None:
        """End the connection with a TCP reset, mid-whatever the test was doing."""
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()
        self.eof = True

    async def aclose(self) -> None:
        self.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 2)
        except (TimeoutError, ConnectionError, ssl.SSLError):
            pass

    # --- protocol steps -------------------------------------------------------

    async def open_stream(self, to: str | None = "localhost") -> ET.Element:
        """Send a header; return the server's <stream:features/>."""
        self.restart()
        await self.send(header(to))
        return await self.expect("features")

    async def starttls(self, ca_file: Path, server_hostname: str = "localhost") -> ET.Element:
        """STARTTLS with certificate verification; return the features after it."""
        await self.send(f"<starttls xmlns='{TLS_NS}'/>")
        await self.expect("proceed")
        context = ssl.create_default_context(cafile=str(ca_file))
        await self.writer.start_tls(context, server_hostname=server_hostname)
        return await self.open_stream()

    async def auth_plain(self, username: str, password: str) -> ET.Element:
        """One PLAIN attempt; returns <success/> or <failure/>."""
        token = base64.b64encode(f"\0{username}\0{password}".encode()).decode()
        await self.send(f"<auth xmlns='{SASL_NS}' mechanism='PLAIN'>{token}</auth>")
        return await self._sasl_outcome()

    async def _sasl_outcome(self, timeout: float = DEFAULT_TIMEOUT) -> ET.Element:
        while True:
            element = await self.next_element(timeout)
            if element.tag in (tag(SASL_NS, "success"), tag(SASL_NS, "failure")):
                return element
            if element.tag == tag(STREAM_NS, "error"):
                raise AssertionError(f"stream error {condition_of(element, STREAMS_NS)}")

    async def auth_scram(
        self, username: str, password: str, mechanism: str = "SCRAM-SHA-256"
    ) -> ScramAttempt:
        """One SCRAM attempt, recording what the server said at each step."""
        hash_name = {"SCRAM-SHA-1": "sha1", "SCRAM-SHA-256": "sha256"}[mechanism]
        client_nonce = secrets.token_urlsafe(18)
        first_bare = f"n={username},r={client_nonce}"
        first = base64.b64encode(("n,," + first_bare).encode()).decode()
        await self.send(f"<auth xmlns='{SASL_NS}' mechanism='{mechanism}'>{first}</auth>")
        challenge = await self.next_element()
        attempt = ScramAttempt(challenge=challenge)
        if challenge.tag != tag(SASL_NS, "challenge"):
            attempt.outcome = challenge
            return attempt
        server_first = base64.b64decode(challenge.text or "").decode()
        fields = dict(part.split("=", 1) for part in server_first.split(","))
        attempt.server_first = fields
        salt = base64.b64decode(fields["s"])
        iterations = int(fields["i"])
        salted = hashlib.pbkdf2_hmac(hash_name, password.encode(), salt, iterations)
        client_key = hmac.digest(salted, b"Client Key", hash_name)
        stored_key = hashlib.new(hash_name, client_key).digest()
        final_bare = f"c=biws,r={fields['r']}"
        auth_message = f"{first_bare},{server_first},{final_bare}".encode()
        signature = hmac.digest(stored_key, auth_message, hash_name)
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        final = f"{final_bare},p={base64.b64encode(proof).decode()}"
        await self.send(
            f"<response xmlns='{SASL_NS}'>{base64.b64encode(final.encode()).decode()}</response>"
        )
        attempt.outcome = await self._sasl_outcome()
        if attempt.outcome.tag == tag(SASL_NS, "success"):
            server_key = hmac.digest(salted, b"Server Key", hash_name)
            expected = base64.b64encode(hmac.digest(server_key, auth_message, hash_name))
            verifier = base64.b64decode(attempt.outcome.text or "").decode()
            assert verifier == "v=" + expected.decode(), "server signature does not verify"
        return attempt

    async def bind(self, resource: str = "raw", standby: bool = False) -> str:
        """Restart the stream after <success/>, bind; return the full JID. `standby`: an
        inactive session (dual connections); the stream's features are kept in
        `self.features`."""
        self.features = await self.open_stream()
        marker = f"<standby xmlns='{DUAL_NS}'/>" if standby else ""
        await self.send(
            f"<iq type='set' id='bind1'><bind xmlns='{BIND_NS}'>"
            f"<resource>{resource}</resource>{marker}</bind></iq>"
        )
        result = await self.expect("iq")
        assert result.get("type") == "result", ET.tostring(result)
        jid = result.findtext(f"{tag(BIND_NS, 'bind')}/{tag(BIND_NS, 'jid')}")
        assert jid, ET.tostring(result)
        return jid

    async def login(
        self,
        ca_file: Path,
        username: str,
        password: str,
        resource: str = "raw",
        standby: bool = False,
    ) -> str:
        await self.open_stream()
        await self.starttls(ca_file)
        outcome = await self.auth_plain(username, password)
        assert outcome.tag == tag(SASL_NS, "success"), ET.tostring(outcome)
        return await self.bind(resource, standby)


@dataclass
class ScramAttempt:
    challenge: ET.Element
    server_first: dict[str, str] | None = None
    outcome: ET.Element | None = None


async def connect_tls(host: str, port: int, ca_file: Path) -> RawClient:
    """Connected, STARTTLS done, not authenticated."""
    client = await RawClient.connect(host, port)
    await client.open_stream()
    await client.starttls(ca_file)
    return client


async def logged_in(
    host: str, port: int, ca_file: Path, username: str, password: str, resource: str = "raw"
) -> RawClient:
    client = await RawClient.connect(host, port)
    await client.login(ca_file, username, password, resource)
    return client


def client_hello(server_hostname: str = "localhost") -> bytes:
    """The first TLS flight a real client sends (a ClientHello record)."""
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()
