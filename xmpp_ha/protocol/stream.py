"""The c2s stream as a pure state machine (RFC 6120 §4-§7, XEP-0198 framing).

Bytes go in through `receive_data()`, events come out as a list, bytes to send
wait in `data_to_send()`. The machine never touches a socket, a clock or the
store: SASL verification and resource binding are decisions of the session
layer, which answers with `sasl_challenge()/sasl_success()/sasl_failure()` and
`bind_succeeded()/bind_failed()`.

Rules it enforces:
- STARTTLS is required before anything else; a stanza before authentication
  is a `<not-authorized/>` stream error.
- Each phase accepts only its own elements (one transition table, below);
  anything else is a stream error, never silence.
- Once established, every stanza's `from` is the session's full JID: a
  forged `from` is `<invalid-from/>`.
- A stream error closes this stream only; the caller closes the socket once
  `closed` is true and the bytes are flushed.
"""

from __future__ import annotations

import binascii
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum, auto

from xmpp_ha.core.errors import LocalProtocolError, StreamCondition, StreamError
from xmpp_ha.core.jid import JID, InvalidJID
from xmpp_ha.protocol import ns
from xmpp_ha.protocol.sm import StreamManagement
from xmpp_ha.protocol.xml import (
    STREAM_CLOSE,
    ElementReceived,
    StreamClosed,
    StreamOpened,
    XMLStreamParser,
    serialize,
    stream_error,
    stream_header,
)

SASL_MECHANISMS = ("SCRAM-SHA-256", "SCRAM-SHA-1", "PLAIN")
STANZA_KINDS = frozenset(ns.tag(ns.CLIENT, kind) for kind in ("message", "presence", "iq"))

_STARTTLS = ns.tag(ns.TLS, "starttls")
_AUTH = ns.tag(ns.SASL, "auth")
_RESPONSE = ns.tag(ns.SASL, "response")
_ABORT = ns.tag(ns.SASL, "abort")
_IQ = ns.tag(ns.CLIENT, "iq")
_BIND = ns.tag(ns.BIND, "bind")
_STANDBY = ns.tag(ns.DUAL, "standby")
_SM_ENABLE = ns.tag(ns.SM, "enable")
_SM_RESUME = ns.tag(ns.SM, "resume")
_SM_R = ns.tag(ns.SM, "r")
_SM_A = ns.tag(ns.SM, "a")


class Phase(Enum):
    PLAIN = auto()  # TCP only; STARTTLS is the one thing allowed
    TLS_PENDING = auto()  # <proceed/> sent; the adapter is doing the handshake
    AUTH = auto()  # encrypted, SASL not started
    SASL = auto()  # a SASL exchange is running
    BIND = auto()  # authenticated, no resource bound yet
    ESTABLISHED = auto()  # bound: stanzas flow
    CLOSED = auto()  # stream closed or failed; nothing more is read


# --- events -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TLSRequested:
    """The adapter must switch the transport to TLS, then call `tls_established()`."""


@dataclass(frozen=True, slots=True)
class SaslStarted:
    mechanism: str
    initial_response: bytes | None


@dataclass(frozen=True, slots=True)
class SaslResponse:
    data: bytes


@dataclass(frozen=True, slots=True)
class SaslAborted:
    pass


@dataclass(frozen=True, slots=True)
class BindRequested:
    iq_id: str
    resource: str  # "" when the client leaves the choice to the server
    standby: bool = False  # an inactive standby session (<standby xmlns='urn:xmpp-ha:dual:0'/>)


@dataclass(frozen=True, slots=True)
class ResumeRequested:
    previd: str
    handled: int  # the client's 'h': our stanzas it has received


@dataclass(frozen=True, slots=True)
class SMEnableRequested:
    resume: bool


@dataclass(frozen=True, slots=True)
class StanzaReceived:
    stanza: ET.Element  # 'from' stamped with the session's full JID
    number: int | None = None  # its XEP-0198 inbound count (None without stream management)


@dataclass(frozen=True, slots=True)
class AckRequested:
    """The client's `<r/>` (XEP-0198), with `defer_acks` set: `handled` stanzas came
    before it; the session answers with `send_ack()` once they are safely on their way."""

    handled: int


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The client closed its stream; the session should go away."""


StreamEvent = (
    TLSRequested
    | SaslStarted
    | SaslResponse
    | SaslAborted
    | BindRequested
    | ResumeRequested
    | SMEnableRequested
    | StanzaReceived
    | AckRequested
    | StreamEnded
)


def _b64decode(text: str | None) -> bytes | None:
    """SASL payload: None when absent, b"" for '=' (RFC 6120 §6.4.2)."""
    if text is None or not text.strip():
        return None
    text = text.strip()
    if text == "=":
        return b""
    try:
        return binascii.a2b_base64(text, strict_mode=True)
    except binascii.Error as exc:
        raise _SaslMalformed from exc


def _b64encode(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).decode("ascii") if data else "="


class _SaslMalformed(Exception):
    pass


class C2SStream:
    """One client-to-server XML stream, from TCP connect to close."""

    def __init__(
        self,
        *,
        domain: str,
        new_stream_id: Callable[[], str],
        max_stanza_bytes: int = 262144,
        extra_features: Callable[[], list[ET.Element]] | None = None,
    ) -> None:
        self.domain = domain
        self._new_stream_id = new_stream_id
        self._parser = XMLStreamParser(max_stanza_bytes=max_stanza_bytes)
        self._extra_features = extra_features
        self._out: list[bytes] = []
        self._header_seen = False
        self.phase = Phase.PLAIN
        self.stream_id = ""
        self.username = ""  # set by sasl_success
        self.jid: JID | None = None  # full JID, set by bind_succeeded
        self.sm: StreamManagement | None = None
        # stanzas received after <enable/> before the session answered it: XEP-0198
        # counts from the enable request on (the client counts from when it sent it)
        self._sm_early: int | None = None
        self.lang = "en"
        self.encrypted = False  # TLS established (every phase from AUTH on requires it)
        # <r/> becomes an AckRequested event instead of an immediate <a/>: the session
        # acknowledges a stanza only once it is safely on its way (routed, stored, sent)
        self.defer_acks = False

    # --- input ------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self.phase is Phase.CLOSED

    def receive_data(self, data: bytes) -> list[StreamEvent]:
        if self.phase is Phase.CLOSED:
            return []
        events: list[StreamEvent] = []
        try:
            for parsed in self._parser.feed(data):
                if isinstance(parsed, ElementReceived):
                    self._on_element(parsed.element, events)
                elif isinstance(parsed, StreamOpened):
                    self._on_open(parsed)
                elif isinstance(parsed, StreamClosed):
                    self._finish()
                    events.append(StreamEnded())
                if self.phase in (Phase.CLOSED, Phase.TLS_PENDING):
                    break  # bytes after <starttls/> are TLS records, not XML
        except StreamError as error:
            self.fail(error.condition, error.text, error.other_host)
            events.append(StreamEnded())
        return events

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    # --- answers from the session layer -------------------------------------

    def tls_established(self) -> None:
        self._require(Phase.TLS_PENDING)
        self.encrypted = True
        self._restart(Phase.AUTH)

    def sasl_challenge(self, data: bytes) -> None:
        self._require(Phase.SASL)
        self._out.append(f"<challenge xmlns='{ns.SASL}'>{_b64encode(data)}</challenge>".encode())

    def sasl_success(self, username: str, additional_data: bytes = b"") -> None:
        self._require(Phase.SASL)
        body = _b64encode(additional_data) if additional_data else ""
        self._out.append(f"<success xmlns='{ns.SASL}'>{body}</success>".encode())
        self.username = username
        self._restart(Phase.BIND)

    def sasl_failure(self, condition: str, text: str = "") -> None:
        self._require(Phase.SASL)
        inner = f"<{condition}/>" + (f"<text>{_escape(text)}</text>" if text else "")
        self._out.append(f"<failure xmlns='{ns.SASL}'>{inner}</failure>".encode())
        self.phase = Phase.AUTH

    def bind_succeeded(self, iq_id: str, jid: JID, *, standby: bool = False) -> None:
        self._require(Phase.BIND)
        self.jid = jid
        self.phase = Phase.ESTABLISHED
        marker = f"<standby xmlns='{ns.DUAL}'/>" if standby else ""
        self._out.append(
            f"<iq type='result' id='{_escape(iq_id)}'><bind xmlns='{ns.BIND}'>"
            f"<jid>{_escape(str(jid))}</jid>{marker}</bind></iq>".encode()
        )

    def bind_failed(
        self, iq_id: str, condition: str, error_type: str = "cancel", text: str = ""
    ) -> None:
        self._require(Phase.BIND)
        said = f"<text xmlns='{ns.STANZAS}'>{_escape(text)}</text>" if text else ""
        self._out.append(
            f"<iq type='error' id='{_escape(iq_id)}'><error type='{error_type}'>"
            f"<{condition} xmlns='{ns.STANZAS}'/>{said}</error></iq>".encode()
        )

    def resumed(self, jid: JID, sm: StreamManagement, previd: str) -> list[ET.Element]:
        """Adopt a hibernated session's counters; returns the stanzas to re-send."""
        self._require(Phase.BIND)
        self.jid = jid
        self.sm = sm
        self.phase = Phase.ESTABLISHED
        self._out.append(
            f"<resumed xmlns='{ns.SM}' previd='{_escape(previd)}' "
            f"h='{sm.inbound_handled}'/>".encode()
        )
        return sm.unacked()

    def sm_enabled(self, sm: StreamManagement, resume_id: str = "", max_seconds: int = 0) -> None:
        for _ in range(self._sm_early or 0):
            sm.count_inbound()
        self.sm, self._sm_early = sm, None
        attrs = f" id='{_escape(resume_id)}' resume='true' max='{max_seconds}'" if resume_id else ""
        self._out.append(f"<enabled xmlns='{ns.SM}'{attrs}/>".encode())

    def sm_failed(self, condition: str = "unexpected-request", handled: int | None = None) -> None:
        h = f" h='{handled}'" if handled is not None else ""
        self._out.append(
            f"<failed xmlns='{ns.SM}'{h}><{condition} xmlns='{ns.STANZAS}'/></failed>".encode()
        )

    # --- output -------------------------------------------------------------

    def send_stanza(self, stanza: ET.Element) -> None:
        """Queue one stanza for the client; counted for stream management."""
        if self.phase is Phase.CLOSED:
            return
        self._out.append(serialize(stanza))
        if self.sm is not None:
            self.sm.track_outbound(stanza)
            if self.sm.should_request_ack:
                self._out.append(b"<r xmlns='urn:xmpp:sm:3'/>")

    def send_raw(self, data: bytes) -> None:
        if self.phase is not Phase.CLOSED:
            self._out.append(data)

    def request_ack(self) -> None:
        if self.sm is not None and self.phase is not Phase.CLOSED:
            self._out.append(b"<r xmlns='urn:xmpp:sm:3'/>")

    def fail(self, condition: StreamCondition, text: str = "", other_host: str = "") -> None:
        """Send a stream error and close the stream (RFC 6120 §4.9)."""
        if self.phase is Phase.CLOSED:
            return
        if not self._header_seen:
            self._out.append(self._header())
        self._out.append(stream_error(condition, text, other_host))
        self._finish()

    def close(self) -> None:
        if self.phase is not Phase.CLOSED:
            if not self._header_seen:
                self._out.append(self._header())
            self._finish()

    # --- internals ----------------------------------------------------------

    def _finish(self) -> None:
        self._out.append(STREAM_CLOSE)
        self.phase = Phase.CLOSED

    def _require(self, phase: Phase) -> None:
        if self.phase is not phase:
            raise LocalProtocolError(f"stream is {self.phase.name}, not {phase.name}")

    def _restart(self, phase: Phase) -> None:
        self.phase = phase
        self._header_seen = False
        self._parser.reset()

    def _header(self) -> bytes:
        self.stream_id = self._new_stream_id()
        return stream_header(stream_id=self.stream_id, from_domain=self.domain, to=None)

    def _on_open(self, opened: StreamOpened) -> None:
        if self._header_seen:
            raise StreamError(StreamCondition.BAD_FORMAT, "second stream header")
        self._out.append(self._header())
        self._header_seen = True
        self.lang = opened.attributes.get(ns.tag(ns.XML, "lang"), self.lang)
        to = opened.attributes.get("to", "")
        try:
            to_domain = JID.parse(to).domain if to else ""
        except InvalidJID:
            to_domain = ""
        if to_domain != self.domain:
            raise StreamError(StreamCondition.HOST_UNKNOWN, f"this server is {self.domain}")
        if opened.attributes.get("version", "") != "1.0":
            raise StreamError(StreamCondition.UNSUPPORTED_VERSION, "version='1.0' is required")
        self._out.append(serialize(self._features(), parent_ns=ns.STREAM))

    def _features(self) -> ET.Element:
        features = ET.Element(ns.tag(ns.STREAM, "features"))
        if self.phase is Phase.PLAIN:
            starttls = ET.SubElement(features, ns.tag(ns.TLS, "starttls"))
            ET.SubElement(starttls, ns.tag(ns.TLS, "required"))
        elif self.phase is Phase.AUTH:
            mechanisms = ET.SubElement(features, ns.tag(ns.SASL, "mechanisms"))
            for name in SASL_MECHANISMS:
                ET.SubElement(mechanisms, ns.tag(ns.SASL, "mechanism")).text = name
        elif self.phase is Phase.BIND:
            ET.SubElement(features, _BIND)
            session = ET.SubElement(features, ns.tag(ns.SESSION, "session"))
            ET.SubElement(session, ns.tag(ns.SESSION, "optional"))
            ET.SubElement(features, ns.tag(ns.SM, "sm"))
            if self._extra_features is not None:
                features.extend(self._extra_features())
        return features

    def _on_element(self, element: ET.Element, events: list[StreamEvent]) -> None:
        handler = _TRANSITIONS.get((self.phase, element.tag))
        if handler is not None:
            handler(self, element, events)
        elif self.phase is Phase.ESTABLISHED and element.tag in STANZA_KINDS:
            self._on_stanza(element, events)
        elif element.tag in STANZA_KINDS:
            raise StreamError(StreamCondition.NOT_AUTHORIZED, "authenticate and bind first")
        elif self.phase is Phase.PLAIN:
            raise StreamError(StreamCondition.POLICY_VIOLATION, "STARTTLS is required")
        else:
            raise StreamError(
                StreamCondition.UNSUPPORTED_STANZA_TYPE, f"unexpected {element.tag} here"
            )

    def _on_stanza(self, stanza: ET.Element, events: list[StreamEvent]) -> None:
        assert self.jid is not None
        claimed = stanza.get("from")
        if claimed is not None and claimed != str(self.jid):
            try:
                claimed_jid = JID.parse(claimed)
            except InvalidJID as exc:
                raise StreamError(StreamCondition.INVALID_FROM) from exc
            if claimed_jid != self.jid and claimed_jid != self.jid.bare:
                raise StreamError(StreamCondition.INVALID_FROM, "from must be your own JID")
        stanza.set("from", str(self.jid))
        self._count_inbound()
        events.append(StanzaReceived(stanza, self.sm.inbound_handled if self.sm else None))

    def _count_inbound(self) -> None:
        if self.sm is not None:
            self.sm.count_inbound()
        elif self._sm_early is not None:
            self._sm_early += 1

    # one handler per (phase, element), the transition table
    def _starttls(self, element: ET.Element, events: list[StreamEvent]) -> None:
        self._out.append(f"<proceed xmlns='{ns.TLS}'/>".encode())
        self.phase = Phase.TLS_PENDING
        events.append(TLSRequested())

    def _auth(self, element: ET.Element, events: list[StreamEvent]) -> None:
        mechanism = element.get("mechanism", "")
        self.phase = Phase.SASL
        if mechanism not in SASL_MECHANISMS:
            self.sasl_failure("invalid-mechanism")
            return
        try:
            initial = _b64decode(element.text)
        except _SaslMalformed:
            self.sasl_failure("incorrect-encoding")
            return
        events.append(SaslStarted(mechanism, initial))

    def _response(self, element: ET.Element, events: list[StreamEvent]) -> None:
        try:
            data = _b64decode(element.text) or b""
        except _SaslMalformed:
            self.sasl_failure("incorrect-encoding")
            return
        events.append(SaslResponse(data))

    def _abort(self, element: ET.Element, events: list[StreamEvent]) -> None:
        self.sasl_failure("aborted")
        events.append(SaslAborted())

    def _bind_iq(self, element: ET.Element, events: list[StreamEvent]) -> None:
        iq_id = element.get("id", "")
        bind = element.find(_BIND)
        if element.get("type") != "set" or bind is None:
            if element.find(ns.tag(ns.SESSION, "session")) is None:
                raise StreamError(StreamCondition.NOT_AUTHORIZED, "bind a resource first")
            # a legacy session request before bind: harmless, answer it
            self._out.append(f"<iq type='result' id='{_escape(iq_id)}'/>".encode())
            return
        resource = (bind.findtext(ns.tag(ns.BIND, "resource")) or "").strip()
        standby = bind.find(_STANDBY) is not None
        events.append(BindRequested(iq_id, resource, standby))

    def _sm_enable(self, element: ET.Element, events: list[StreamEvent]) -> None:
        if self.sm is not None or self._sm_early is not None:
            self.sm_failed("unexpected-request")
            return
        self._sm_early = 0
        resume = element.get("resume", "false") in ("true", "1")
        events.append(SMEnableRequested(resume))

    def _sm_too_early(self, element: ET.Element, events: list[StreamEvent]) -> None:
        self.sm_failed("unexpected-request")  # XEP-0198 §3: enable only after binding

    def _sm_resume(self, element: ET.Element, events: list[StreamEvent]) -> None:
        try:
            handled = int(element.get("h", ""))
        except ValueError:
            self.sm_failed("bad-request")
            return
        events.append(ResumeRequested(element.get("previd", ""), handled))

    def _sm_request(self, element: ET.Element, events: list[StreamEvent]) -> None:
        if self.sm is None:
            self.sm_failed("unexpected-request")
            return
        if self.defer_acks:
            events.append(AckRequested(self.sm.inbound_handled))
        else:
            self.send_ack(self.sm.inbound_handled)

    def send_ack(self, handled: int) -> None:
        """`<a h=.../>`: asked for, or on our own (XEP-0198 §4 allows it at any time)."""
        if self.sm is not None and self.phase is not Phase.CLOSED:
            self._out.append(f"<a xmlns='{ns.SM}' h='{handled}'/>".encode())

    def _sm_answer(self, element: ET.Element, events: list[StreamEvent]) -> None:
        if self.sm is None:
            self.sm_failed("unexpected-request")
            return
        try:
            handled = int(element.get("h", ""))
        except ValueError as exc:
            raise StreamError(StreamCondition.BAD_FORMAT, "h must be a number") from exc
        self.sm.acknowledge(handled)

    def _bound_bind(self, element: ET.Element, events: list[StreamEvent]) -> None:
        if element.find(_BIND) is not None:
            self._out.append(
                f"<iq type='error' id='{_escape(element.get('id', ''))}'><error type='cancel'>"
                f"<not-allowed xmlns='{ns.STANZAS}'/></error></iq>".encode()
            )
            self._count_inbound()
            return
        self._on_stanza(element, events)


_Handler = Callable[[C2SStream, ET.Element, list[StreamEvent]], None]
_TRANSITIONS: dict[tuple[Phase, str], _Handler] = {
    (Phase.PLAIN, _STARTTLS): C2SStream._starttls,
    (Phase.AUTH, _AUTH): C2SStream._auth,
    (Phase.SASL, _RESPONSE): C2SStream._response,
    (Phase.SASL, _ABORT): C2SStream._abort,
    (Phase.BIND, _IQ): C2SStream._bind_iq,
    (Phase.BIND, _SM_RESUME): C2SStream._sm_resume,
    (Phase.BIND, _SM_ENABLE): C2SStream._sm_too_early,
    (Phase.ESTABLISHED, _IQ): C2SStream._bound_bind,
    (Phase.ESTABLISHED, _SM_ENABLE): C2SStream._sm_enable,
    (Phase.ESTABLISHED, _SM_R): C2SStream._sm_request,
    (Phase.ESTABLISHED, _SM_A): C2SStream._sm_answer,
}


def _escape(text: str) -> str:
    return (
        text.replace("&", "&amp;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace("'", "&apos;")
        .replace('"', "&quot;")
    )
