"""The client side of an XMPP c2s stream as a pure state machine (RFC 6120, XEP-0198).

Bytes from the server go in through `receive_data()`, which returns events;
bytes for the server wait in `data_to_send()`. No sockets, no clock, no random
source: the SCRAM nonce comes from the `nonce` callable the caller injects.

Rules and invariants:
- Order: header -> STARTTLS (required; `TLSRequested` asks the driver to
  switch, then it calls `tls_established()`) -> SASL (SCRAM-SHA-1,
  SCRAM-SHA-256 or PLAIN) -> restart -> XEP-0198 resume, or bind -> optional
  `<enable/>` -> ESTABLISHED. One transition table keyed by (phase, element).
- Every element the phase does not expect is a stream error we send
  (`ProtocolViolation`), never silence; a `<stream:error>` from the server is
  `StreamErrorReceived`. Every way out ends with exactly one `StreamEnded`,
  after which the driver flushes `data_to_send()` and closes the socket.
- The server is authenticated too: a SCRAM `<success/>` whose server
  signature does not match fails the login.
- PBKDF2 runs once per (hash, password, salt, iterations) in a
  `SaltedPasswordCache`, which many clients of one process share.
- Server pings (XEP-0199) are answered here; `<r/>` is answered with `<a h/>`.
- Calling the API in a phase that does not allow it is a `LocalProtocolError`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import ClassVar, Literal

from xmpp_ha.core.errors import LocalProtocolError, StreamCondition, StreamError
from xmpp_ha.core.jid import JID
from xmpp_ha.protocol import ns
from xmpp_ha.protocol.scram import HASHES, saslprep
from xmpp_ha.protocol.sm import StreamManagement, parse_h
from xmpp_ha.protocol.xml import (
    STREAM_CLOSE,
    ElementReceived,
    StreamClosed,
    StreamOpened,
    XMLStreamParser,
    serialize,
    stream_error,
)

Mechanism = Literal["SCRAM-SHA-1", "SCRAM-SHA-256", "PLAIN"]
MECHANISMS: tuple[Mechanism, ...] = ("SCRAM-SHA-1", "SCRAM-SHA-256", "PLAIN")

_FEATURES = ns.tag(ns.STREAM, "features")
_STREAM_ERROR = ns.tag(ns.STREAM, "error")
_STARTTLS = ns.tag(ns.TLS, "starttls")
_PROCEED = ns.tag(ns.TLS, "proceed")
_TLS_FAILURE = ns.tag(ns.TLS, "failure")
_MECHANISMS = ns.tag(ns.SASL, "mechanisms")
_CHALLENGE = ns.tag(ns.SASL, "challenge")
_SUCCESS = ns.tag(ns.SASL, "success")
_SASL_FAILURE = ns.tag(ns.SASL, "failure")
_BIND = ns.tag(ns.BIND, "bind")
_SM = ns.tag(ns.SM, "sm")
_DUAL = ns.tag(ns.DUAL, "dual")
_DUAL_STANDBY = ns.tag(ns.DUAL, "standby")
_ENABLED = ns.tag(ns.SM, "enabled")
_RESUMED = ns.tag(ns.SM, "resumed")
_SM_FAILED = ns.tag(ns.SM, "failed")
_SM_R = ns.tag(ns.SM, "r")
_SM_A = ns.tag(ns.SM, "a")
_MESSAGE = ns.tag(ns.CLIENT, "message")
_PRESENCE = ns.tag(ns.CLIENT, "presence")
_IQ = ns.tag(ns.CLIENT, "iq")
_PING = ns.tag(ns.PING, "ping")
_BODY = ns.tag(ns.CLIENT, "body")
_MAX_ITERATIONS = 1_000_000  # a server asking for more is burning our CPU


class ClientPhase(Enum):
    IDLE = auto()  # nothing sent yet; start() opens the stream
    OPENING = auto()  # first header sent; waiting for features offering STARTTLS
    STARTTLS = auto()  # <starttls/> sent; waiting for <proceed/>
    TLS_HANDSHAKE = auto()  # the driver runs the TLS handshake, then tls_established()
    AUTH_OPENING = auto()  # header sent over TLS; waiting for the SASL mechanisms
    AUTHENTICATING = auto()  # <auth/> sent; the SASL exchange runs
    BIND_OPENING = auto()  # authenticated, header sent; waiting for the bind feature
    RESUMING = auto()  # <resume/> sent (XEP-0198); waiting for <resumed/> or <failed/>
    BINDING = auto()  # bind iq sent; waiting for its result
    ENABLING = auto()  # bound, <enable/> sent; waiting for <enabled/> or <failed/>
    ESTABLISHED = auto()  # the session runs: stanzas flow both ways
    CLOSED = auto()  # the stream is over; nothing more is read or sent


# --- events -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TLSRequested:
    """The driver must start TLS on the transport, then call `tls_established()`."""


@dataclass(frozen=True, slots=True)
class Authenticated:
    username: str
    mechanism: Mechanism


@dataclass(frozen=True, slots=True)
class AuthenticationFailed:
    condition: str  # the RFC 6120 §6.5 condition, or 'server-not-authenticated'
    text: str = ""


@dataclass(frozen=True, slots=True)
class BindFailed:
    condition: str  # the stanza error condition of the bind result


@dataclass(frozen=True, slots=True)
class SessionStarted:
    """Bound (or resumed) and, when asked for, stream management answered."""

    jid: str  # our full JID
    sm_enabled: bool
    resume_id: str = ""  # XEP-0198 id to resume this session with, "" if not resumable
    resumed: bool = False  # True: an old session was resumed, nothing was re-bound
    standby: bool = False  # an inactive standby session (dual connections), as confirmed
    dual_offered: bool = False  # the server offers dual connections (urn:xmpp-ha:dual:0)


@dataclass(frozen=True, slots=True)
class ResumeFailed:
    """`<resume/>` was refused; the core binds a new session instead."""

    unacked: list[ET.Element]  # what the old session never had acknowledged


@dataclass(frozen=True, slots=True)
class _StanzaEvent:
    element: ET.Element  # as received: 'from' is the sender's JID
    _default_type: ClassVar[str] = ""

    @property
    def sender(self) -> str:
        return self.element.get("from", "")

    @property
    def id(self) -> str:
        return self.element.get("id", "")

    @property
    def type(self) -> str:
        return self.element.get("type", self._default_type)


@dataclass(frozen=True, slots=True)
class MessageReceived(_StanzaEvent):
    _default_type: ClassVar[str] = "normal"

    @property
    def body(self) -> str | None:
        return self.element.findtext(_BODY)


@dataclass(frozen=True, slots=True)
class PresenceReceived(_StanzaEvent):
    _default_type: ClassVar[str] = "available"


@dataclass(frozen=True, slots=True)
class IqReceived(_StanzaEvent):
    """An iq other than a server ping (those are answered here)."""


@dataclass(frozen=True, slots=True)
class StanzasAcknowledged:
    stanzas: list[ET.Element]  # ours that the server newly acknowledged, oldest first


@dataclass(frozen=True, slots=True)
class StreamErrorReceived:
    condition: str  # e.g. 'conflict', 'system-shutdown', 'see-other-host'
    text: str = ""
    other_host: str = ""  # the host of a see-other-host error


@dataclass(frozen=True, slots=True)
class ProtocolViolation:
    """The server broke the protocol; we sent it this stream error and closed."""

    condition: StreamCondition
    text: str = ""


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The stream is over: flush `data_to_send()`, then close the connection."""


ClientEvent = (
    TLSRequested
    | Authenticated
    | AuthenticationFailed
    | BindFailed
    | SessionStarted
    | ResumeFailed
    | MessageReceived
    | PresenceReceived
    | IqReceived
    | StanzasAcknowledged
    | StreamErrorReceived
    | ProtocolViolation
    | StreamEnded
)


@dataclass(slots=True)
class ResumeState:
    """What a new connection needs to resume an XEP-0198 session (`ClientStream.resume_state`)."""

    jid: str
    resume_id: str
    sm: StreamManagement = field(repr=False)


# --- SCRAM, client side (RFC 5802) --------------------------------------------


class AuthError(Exception):
    def __init__(self, condition: str, text: str = "") -> None:
        super().__init__(f"{condition}: {text}" if text else condition)
        self.condition = condition
        self.text = text


@dataclass(frozen=True, slots=True)
class ScramKeys:
    client_key: bytes
    stored_key: bytes
    server_key: bytes


class SaltedPasswordCache:
    """SCRAM keys per (hash, password, salt, iterations): PBKDF2 runs once for each."""

    def __init__(self, max_entries: int = 100_000) -> None:
        self.max_entries = max_entries
        self.derivations = 0  # PBKDF2 runs done, for the curious
        self._keys: dict[tuple[str, str, bytes, int], ScramKeys] = {}

    def keys(self, hash_name: str, password: str, salt: bytes, iterations: int) -> ScramKeys:
        key = (hash_name, password, salt, iterations)
        found = self._keys.get(key)
        if found is None:
            salted = hashlib.pbkdf2_hmac(hash_name, saslprep(password).encode(), salt, iterations)
            self.derivations += 1
            client_key = hmac.digest(salted, b"Client Key", hash_name)
            found = ScramKeys(
                client_key,
                hashlib.new(hash_name, client_key).digest(),
                hmac.digest(salted, b"Server Key", hash_name),
            )
            if len(self._keys) >= self.max_entries:
                self._keys.pop(next(iter(self._keys)))  # the oldest entry
            self._keys[key] = found
        return found


SHARED_CACHE = SaltedPasswordCache()


def _saslname(name: str) -> str:
    return name.replace("=", "=3D").replace(",", "=2C")


class ScramClient:
    """One client-side SCRAM exchange without channel binding (gs2 header 'n,,')."""

    def __init__(
        self,
        mechanism: str,
        username: str,
        password: str,
        nonce: str,
        cache: SaltedPasswordCache,
    ) -> None:
        self._hash_name = HASHES[mechanism]  # type: ignore[index]
        self._password = password
        self._nonce = nonce
        self._cache = cache
        self._client_first_bare = f"n={_saslname(saslprep(username))},r={nonce}"
        self._server_signature = b""
        self.verified = False  # the server proved it knows our keys

    def client_first(self) -> bytes:
        return ("n,," + self._client_first_bare).encode()

    def client_final(self, server_first: bytes) -> bytes:
        try:
            text = server_first.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise AuthError("malformed-request", "server-first is not UTF-8") from exc
        fields = dict(item.split("=", 1) for item in text.split(",") if "=" in item)
        nonce, salt_text, iterations_text = fields.get("r"), fields.get("s"), fields.get("i")
        if "m" in fields or nonce is None or salt_text is None or iterations_text is None:
            raise AuthError("malformed-request", "expected r=...,s=...,i=...")
        if not nonce.startswith(self._nonce) or len(nonce) == len(self._nonce):
            raise AuthError("server-not-authenticated", "the server nonce does not extend ours")
        if not iterations_text.isdigit() or not 0 < int(iterations_text) <= _MAX_ITERATIONS:
            raise AuthError("malformed-request", f"bad iteration count {iterations_text!r}")
        try:
            salt = base64.b64decode(salt_text, validate=True)
        except binascii.Error as exc:
            raise AuthError("malformed-request", "bad salt") from exc
        keys = self._cache.keys(self._hash_name, self._password, salt, int(iterations_text))
        without_proof = f"c=biws,r={nonce}"
        auth_message = f"{self._client_first_bare},{text},{without_proof}".encode()
        signature = hmac.digest(keys.stored_key, auth_message, self._hash_name)
        proof = bytes(a ^ b for a, b in zip(keys.client_key, signature, strict=True))
        self._server_signature = hmac.digest(keys.server_key, auth_message, self._hash_name)
        return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()

    def verify_server_final(self, server_final: bytes) -> None:
        expected = b"v=" + base64.b64encode(self._server_signature)
        if not self._server_signature or not hmac.compare_digest(server_final, expected):
            raise AuthError("server-not-authenticated", "wrong server signature")
        self.verified = True


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii") if data else "="


def _unb64(text: str | None) -> bytes:
    if text is None or not text.strip() or text.strip() == "=":
        return b""
    try:
        return binascii.a2b_base64(text.strip(), strict_mode=True)
    except binascii.Error as exc:
        raise AuthError("incorrect-encoding", "bad base64 from the server") from exc


_ATTR_ESCAPES = str.maketrans(
    {
        "&": "&amp;",
        "<": "&lt;",
        ">": "&gt;",
        "'": "&apos;",
        '"': "&quot;",
        "\r": "&#13;",
        "\n": "&#10;",
        "\t": "&#9;",
    }
)
_TEXT_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", "\r": "&#13;"})


def _attr(text: str) -> str:
    return text.translate(_ATTR_ESCAPES)


# --- the stream ---------------------------------------------------------------


class ClientStream:
    """One client-to-server XML stream, from TCP connect to close."""

    def __init__(
        self,
        *,
        jid: str,
        password: str,
        nonce: Callable[[], str],
        mechanism: Mechanism = "SCRAM-SHA-1",
        resource: str | None = None,
        stream_management: bool = False,
        resumable: bool = True,
        resume: ResumeState | None = None,
        ack_interval: int = 10,
        key_cache: SaltedPasswordCache | None = None,
        max_stanza_bytes: int = 262144,
        standby: bool = False,
    ) -> None:
        if mechanism not in MECHANISMS:
            raise ValueError(f"unsupported mechanism {mechanism!r}")
        address = JID.parse(jid)
        if not address.local:
            raise ValueError(f"{jid!r} has no localpart to log in with")
        self.username = address.local
        self.domain = address.domain
        self.resource = resource if resource is not None else (address.resource or None)
        self.mechanism: Mechanism = mechanism
        self.stream_management = stream_management or resume is not None
        self.resumable = resumable  # ask for resume='true' when enabling stream management
        self._password = password
        self._nonce = nonce
        self._resume = resume
        self._ack_interval = ack_interval
        self._cache = key_cache if key_cache is not None else SHARED_CACHE
        self._parser = XMLStreamParser(max_stanza_bytes=max_stanza_bytes)
        self._out: list[bytes] = []
        self._scram: ScramClient | None = None
        self._ids = 0
        self._ended = False
        self._restarted = False  # the parser was reset while its events were handled
        self._sm_offered = False
        self.standby = standby  # bind an inactive standby session (dual connections)
        self.dual_offered = False
        self._standby_confirmed = False
        self.phase = ClientPhase.IDLE
        self.stream_id = ""  # the server's id for the current stream
        self.jid = ""  # full JID once bound
        self.sm: StreamManagement | None = None  # set once <enabled/> or <resumed/> arrives
        self.resume_id = ""

    # --- input and output ---------------------------------------------------

    @property
    def closed(self) -> bool:
        return self.phase is ClientPhase.CLOSED

    @property
    def established(self) -> bool:
        return self.phase is ClientPhase.ESTABLISHED

    def start(self) -> None:
        """Open the stream: queue the first header."""
        self._require(ClientPhase.IDLE)
        self._open(ClientPhase.OPENING)

    def receive_data(self, data: bytes) -> list[ClientEvent]:
        if self.phase is ClientPhase.CLOSED:
            return []
        events: list[ClientEvent] = []
        self._restarted = False
        try:
            for parsed in self._parser.feed(data):
                if isinstance(parsed, ElementReceived):
                    self._on_element(parsed.element, events)
                elif isinstance(parsed, StreamOpened):
                    self.stream_id = parsed.attributes.get("id", "")
                elif isinstance(parsed, StreamClosed):
                    self._end(events)
                if self.phase in _STOP_PARSING or self._restarted:
                    # Past <proceed/> only TLS records come; past <success/> the
                    # old stream is over; past the end nothing.
                    break
        except StreamError as error:
            self._violation(error.condition, error.text, events)
        except AuthError as error:
            events.append(AuthenticationFailed(error.condition, error.text))
            self._end(events)
        return events

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    def connection_lost(self) -> list[ClientEvent]:
        """The transport is gone (not a clean close): the stream ends without a word."""
        events: list[ClientEvent] = []
        if not self._ended:
            self.phase = ClientPhase.CLOSED
            self._ended = True
            events.append(StreamEnded())
        return events

    # --- calls from the driver ----------------------------------------------

    def tls_established(self) -> None:
        self._require(ClientPhase.TLS_HANDSHAKE)
        self._restart(ClientPhase.AUTH_OPENING)

    def send_message(self, to: str, body: str, *, id: str | None = None, type: str = "chat") -> str:
        """Queue a message; returns its id."""
        self._require(ClientPhase.ESTABLISHED)
        stanza_id = id if id is not None else self._next_id()
        if self.sm is None:  # the fast path: no element to keep for re-sending
            self._out.append(
                f"<message to='{_attr(to)}' type='{_attr(type)}' id='{_attr(stanza_id)}'>"
                f"<body>{body.translate(_TEXT_ESCAPES)}</body></message>".encode()
            )
            return stanza_id
        message = ET.Element(_MESSAGE, {"to": to, "type": type, "id": stanza_id})
        ET.SubElement(message, _BODY).text = body
        self.send_stanza(message)
        return stanza_id

    def send_presence(
        self,
        *,
        to: str | None = None,
        type: str | None = None,
        children: list[ET.Element] | None = None,
    ) -> None:
        """Queue a presence: with no arguments, our available presence to everyone."""
        presence = ET.Element(_PRESENCE)
        if to is not None:
            presence.set("to", to)
        if type is not None:
            presence.set("type", type)
        presence.extend(children or ())
        self.send_stanza(presence)

    def send_iq(
        self,
        type: str,
        payload: ET.Element | None = None,
        *,
        to: str | None = None,
        id: str | None = None,
    ) -> str:
        """Queue an iq ('get', 'set', 'result' or 'error'); returns its id."""
        stanza_id = id if id is not None else self._next_id()
        iq = ET.Element(_IQ, {"type": type, "id": stanza_id})
        if to is not None:
            iq.set("to", to)
        if payload is not None:
            iq.append(payload)
        self.send_stanza(iq)
        return stanza_id

    def send_stanza(self, stanza: ET.Element) -> None:
        """Queue any stanza (`{jabber:client}` message, presence or iq)."""
        self._require(ClientPhase.ESTABLISHED)
        self._queue(stanza)

    def _queue(self, stanza: ET.Element) -> None:
        self._out.append(serialize(stanza))
        if self.sm is not None:
            self.sm.track_outbound(stanza)
            if self.sm.should_request_ack:
                self._out.append(b"<r xmlns='urn:xmpp:sm:3'/>")

    def request_ack(self) -> None:
        if self.sm is None or self.phase is not ClientPhase.ESTABLISHED:
            raise LocalProtocolError("stream management is not enabled")
        self._out.append(b"<r xmlns='urn:xmpp:sm:3'/>")

    def resume_state(self) -> ResumeState | None:
        """What a new connection needs to resume this session, if it is resumable."""
        if self.sm is None or not self.resume_id:
            return None
        return ResumeState(self.jid, self.resume_id, self.sm)

    def close(self) -> None:
        """End the stream cleanly (`</stream:stream>`); the server ends the session."""
        if self.phase is ClientPhase.CLOSED:
            return
        if self.phase is not ClientPhase.IDLE:
            self._out.append(STREAM_CLOSE)
        self.phase = ClientPhase.CLOSED

    # --- internals ----------------------------------------------------------

    def _require(self, phase: ClientPhase) -> None:
        if self.phase is not phase:
            raise LocalProtocolError(f"client stream is {self.phase.name}, not {phase.name}")

    def _next_id(self) -> str:
        self._ids += 1
        return f"c{self._ids}"

    def _restart(self, phase: ClientPhase) -> None:
        self._parser.reset()
        self._restarted = True
        self._open(phase)

    def _open(self, phase: ClientPhase) -> None:
        self.phase = phase
        self._out.append(
            f"<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
            f"xmlns:stream='{ns.STREAM}' to='{_attr(self.domain)}' version='1.0' "
            f"xml:lang='en'>".encode()
        )

    def _end(self, events: list[ClientEvent]) -> None:
        if self.phase is not ClientPhase.CLOSED:
            self._out.append(STREAM_CLOSE)
            self.phase = ClientPhase.CLOSED
        if not self._ended:
            self._ended = True
            events.append(StreamEnded())

    def _violation(self, condition: StreamCondition, text: str, events: list[ClientEvent]) -> None:
        if self.phase is not ClientPhase.CLOSED:
            self._out.append(stream_error(condition, text))
        events.append(ProtocolViolation(condition, text))
        self._end(events)

    def _on_element(self, element: ET.Element, events: list[ClientEvent]) -> None:
        handler = _TRANSITIONS.get((self.phase, element.tag))
        if handler is not None:
            handler(self, element, events)
        elif element.tag == _STREAM_ERROR:
            self._stream_error(element, events)
        elif self.phase in _STANZA_PHASES and element.tag in _STANZA_TAGS:
            self._on_stanza(element, events)
        else:
            raise StreamError(
                StreamCondition.UNSUPPORTED_STANZA_TYPE,
                f"unexpected {element.tag} in phase {self.phase.name}",
            )

    def _stream_error(self, element: ET.Element, events: list[ClientEvent]) -> None:
        condition, text, other_host = "undefined-condition", "", ""
        for child in element:
            namespace, _, local = child.tag[1:].partition("}")
            if namespace != ns.STREAMS:
                continue
            if local == "text":
                text = child.text or ""
            else:
                condition = local
                other_host = (child.text or "").strip() if local == "see-other-host" else ""
        events.append(StreamErrorReceived(condition, text, other_host))
        self._end(events)

    # one handler per (phase, element): the transition table below

    def _features_plain(self, features: ET.Element, events: list[ClientEvent]) -> None:
        if features.find(_STARTTLS) is None:
            raise StreamError(StreamCondition.POLICY_VIOLATION, "the server offers no STARTTLS")
        self._out.append(f"<starttls xmlns='{ns.TLS}'/>".encode())
        self.phase = ClientPhase.STARTTLS

    def _proceed(self, element: ET.Element, events: list[ClientEvent]) -> None:
        self.phase = ClientPhase.TLS_HANDSHAKE
        events.append(TLSRequested())

    def _tls_refused(self, element: ET.Element, events: list[ClientEvent]) -> None:
        # RFC 6120 §5.4.2.2: the server closes the stream after <failure/>.
        events.append(StreamErrorReceived("undefined-condition", "the server refused STARTTLS"))
        self._end(events)

    def _features_auth(self, features: ET.Element, events: list[ClientEvent]) -> None:
        offered = {(m.text or "").strip() for m in features.iterfind(f"{_MECHANISMS}/*")}
        if self.mechanism not in offered:
            raise AuthError("invalid-mechanism", f"the server does not offer {self.mechanism}")
        if self.mechanism == "PLAIN":
            initial = f"\0{self.username}\0{self._password}".encode()
        else:
            self._scram = ScramClient(
                self.mechanism, self.username, self._password, self._nonce(), self._cache
            )
            initial = self._scram.client_first()
        self._out.append(
            f"<auth xmlns='{ns.SASL}' mechanism='{self.mechanism}'>{_b64(initial)}</auth>".encode()
        )
        self.phase = ClientPhase.AUTHENTICATING

    def _challenge(self, element: ET.Element, events: list[ClientEvent]) -> None:
        scram = self._scram
        if scram is None:
            raise AuthError("malformed-request", "a challenge for PLAIN")
        data = _unb64(element.text)
        if data.startswith(b"v="):  # server-final sent as a challenge (RFC 6120 §6.3.10)
            scram.verify_server_final(data)
            response = b""
        else:
            response = scram.client_final(data)
        self._out.append(f"<response xmlns='{ns.SASL}'>{_b64(response)}</response>".encode())

    def _success(self, element: ET.Element, events: list[ClientEvent]) -> None:
        scram, self._scram = self._scram, None
        data = _unb64(element.text)
        if scram is not None:
            if data:
                scram.verify_server_final(data)
            elif not scram.verified:
                raise AuthError("server-not-authenticated", "no server signature")
        events.append(Authenticated(self.username, self.mechanism))
        self._restart(ClientPhase.BIND_OPENING)

    def _sasl_failure(self, element: ET.Element, events: list[ClientEvent]) -> None:
        condition = next(
            (
                child.tag.rpartition("}")[2]
                for child in element
                if child.tag.rpartition("}")[2] != "text"
            ),
            "not-authorized",
        )
        events.append(
            AuthenticationFailed(condition, element.findtext(ns.tag(ns.SASL, "text"), ""))
        )
        self._end(events)

    def _features_bind(self, features: ET.Element, events: list[ClientEvent]) -> None:
        if features.find(_BIND) is None:
            raise StreamError(StreamCondition.POLICY_VIOLATION, "the server offers no binding")
        self._sm_offered = features.find(_SM) is not None
        self.dual_offered = features.find(_DUAL) is not None
        if self._resume is not None and self._sm_offered:
            self._out.append(
                f"<resume xmlns='{ns.SM}' previd='{_attr(self._resume.resume_id)}' "
                f"h='{self._resume.sm.inbound_handled}'/>".encode()
            )
            self.phase = ClientPhase.RESUMING
            return
        self._bind()

    def _bind(self) -> None:
        resource = ""
        if self.resource:
            resource = f"<resource>{self.resource.translate(_TEXT_ESCAPES)}</resource>"
        standby = f"<standby xmlns='{ns.DUAL}'/>" if self.standby else ""
        inside = resource + standby
        bind = (
            f"<bind xmlns='{ns.BIND}'>{inside}</bind>" if inside else f"<bind xmlns='{ns.BIND}'/>"
        )
        self._out.append(f"<iq type='set' id='bind'>{bind}</iq>".encode())
        self.phase = ClientPhase.BINDING

    def _bound(self, iq: ET.Element, events: list[ClientEvent]) -> None:
        if iq.get("id") != "bind" or iq.get("type") not in ("result", "error"):
            raise StreamError(StreamCondition.POLICY_VIOLATION, "expected the bind result")
        jid = iq.findtext(f"{_BIND}/{ns.tag(ns.BIND, 'jid')}")
        if iq.get("type") == "error" or not jid:
            error = iq.find(ns.tag(ns.CLIENT, "error"))
            names = [child.tag.rpartition("}")[2] for child in (error if error is not None else ())]
            events.append(BindFailed(names[0] if names else "undefined-condition"))
            self._end(events)
            return
        self.jid = jid.strip()
        self._standby_confirmed = iq.find(f"{_BIND}/{_DUAL_STANDBY}") is not None
        if self.stream_management and self._sm_offered:
            resume = " resume='true'" if self.resumable else ""
            self._out.append(f"<enable xmlns='{ns.SM}'{resume}/>".encode())
            self.phase = ClientPhase.ENABLING
            return
        self.phase = ClientPhase.ESTABLISHED
        events.append(self._started(sm_enabled=False))

    def _enabled(self, element: ET.Element, events: list[ClientEvent]) -> None:
        self.sm = StreamManagement(ack_interval=self._ack_interval)
        if element.get("resume") in ("true", "1"):
            self.resume_id = element.get("id", "")
        self.phase = ClientPhase.ESTABLISHED
        events.append(self._started(sm_enabled=True))

    def _enable_failed(self, element: ET.Element, events: list[ClientEvent]) -> None:
        self.phase = ClientPhase.ESTABLISHED
        events.append(self._started(sm_enabled=False))

    def _started(self, *, sm_enabled: bool) -> SessionStarted:
        return SessionStarted(self.jid, sm_enabled=sm_enabled, resume_id=self.resume_id,
                              standby=self._standby_confirmed, dual_offered=self.dual_offered)  # fmt: skip

    def _resumed(self, element: ET.Element, events: list[ClientEvent]) -> None:
        old = self._resume
        assert old is not None
        if element.get("previd") != old.resume_id:
            raise StreamError(StreamCondition.UNDEFINED_CONDITION, "resumed another session")
        sm = old.sm
        resend = sm.resume(parse_h(element.get("h")))
        self._resume = None
        self.sm, self.jid, self.resume_id = sm, old.jid, old.resume_id
        self.phase = ClientPhase.ESTABLISHED
        events.append(
            SessionStarted(self.jid, sm_enabled=True, resume_id=self.resume_id, resumed=True)
        )
        for stanza in resend:
            self._queue(stanza)

    def _resume_failed(self, element: ET.Element, events: list[ClientEvent]) -> None:
        old = self._resume
        assert old is not None
        self._resume = None
        if element.get("h") is not None:  # XEP-0198 §5: what the old session did handle
            old.sm.acknowledge(parse_h(element.get("h")))
        events.append(ResumeFailed(old.sm.unacked()))
        self._bind()

    def _on_stanza(self, stanza: ET.Element, events: list[ClientEvent]) -> None:
        if self.sm is not None:
            self.sm.count_inbound()
        tag = stanza.tag
        if tag == _MESSAGE:
            events.append(MessageReceived(stanza))
        elif tag == _PRESENCE:
            events.append(PresenceReceived(stanza))
        elif stanza.get("type") == "get" and len(stanza) == 1 and stanza[0].tag == _PING:
            pong = {"type": "result", "id": stanza.get("id", "")}
            if stanza.get("from"):
                pong["to"] = stanza.get("from", "")
            self._queue(ET.Element(_IQ, pong))  # also while <enable/> is unanswered
        else:
            events.append(IqReceived(stanza))

    def _ack_request(self, element: ET.Element, events: list[ClientEvent]) -> None:
        if self.sm is None:
            raise StreamError(StreamCondition.UNSUPPORTED_STANZA_TYPE, "<r/> without <enable/>")
        self._out.append(f"<a xmlns='{ns.SM}' h='{self.sm.inbound_handled}'/>".encode())

    def _ack(self, element: ET.Element, events: list[ClientEvent]) -> None:
        if self.sm is None:
            raise StreamError(StreamCondition.UNSUPPORTED_STANZA_TYPE, "<a/> without <enable/>")
        acknowledged = self.sm.acknowledge(parse_h(element.get("h")))
        if acknowledged:
            events.append(StanzasAcknowledged(acknowledged))


_STANZA_TAGS = frozenset((_MESSAGE, _PRESENCE, _IQ))
_STOP_PARSING = frozenset((ClientPhase.TLS_HANDSHAKE, ClientPhase.CLOSED))
# Stanzas may arrive as soon as we are bound, before <enabled/> answers <enable/>.
_STANZA_PHASES = frozenset((ClientPhase.ENABLING, ClientPhase.ESTABLISHED))

_Handler = Callable[[ClientStream, ET.Element, list[ClientEvent]], None]
_TRANSITIONS: dict[tuple[ClientPhase, str], _Handler] = {
    (ClientPhase.OPENING, _FEATURES): ClientStream._features_plain,
    (ClientPhase.STARTTLS, _PROCEED): ClientStream._proceed,
    (ClientPhase.STARTTLS, _TLS_FAILURE): ClientStream._tls_refused,
    (ClientPhase.AUTH_OPENING, _FEATURES): ClientStream._features_auth,
    (ClientPhase.AUTHENTICATING, _CHALLENGE): ClientStream._challenge,
    (ClientPhase.AUTHENTICATING, _SUCCESS): ClientStream._success,
    (ClientPhase.AUTHENTICATING, _SASL_FAILURE): ClientStream._sasl_failure,
    (ClientPhase.BIND_OPENING, _FEATURES): ClientStream._features_bind,
    (ClientPhase.RESUMING, _RESUMED): ClientStream._resumed,
    (ClientPhase.RESUMING, _SM_FAILED): ClientStream._resume_failed,
    (ClientPhase.BINDING, _IQ): ClientStream._bound,
    (ClientPhase.ENABLING, _ENABLED): ClientStream._enabled,
    (ClientPhase.ENABLING, _SM_FAILED): ClientStream._enable_failed,
    (ClientPhase.ESTABLISHED, _SM_R): ClientStream._ack_request,
    (ClientPhase.ESTABLISHED, _SM_A): ClientStream._ack,
}
