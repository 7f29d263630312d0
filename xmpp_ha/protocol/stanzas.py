"""Typed views of the three stanza kinds and the replies a server builds.

Stanzas travel as `ElementTree.Element`s so that unknown children are kept
and forwarded untouched; `StanzaHeader` is the typed part every routing
decision reads (kind, type, addresses, id), parsed once per stanza.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Literal

from xmpp_ha.core.errors import StanzaCondition, StanzaError
from xmpp_ha.core.jid import JID, InvalidJID
from xmpp_ha.protocol import ns

Kind = Literal["message", "presence", "iq"]

MESSAGE = ns.tag(ns.CLIENT, "message")
PRESENCE = ns.tag(ns.CLIENT, "presence")
IQ = ns.tag(ns.CLIENT, "iq")
_KINDS: dict[str, Kind] = {MESSAGE: "message", PRESENCE: "presence", IQ: "iq"}

MESSAGE_TYPES = frozenset({"normal", "chat", "groupchat", "headline", "error"})
PRESENCE_TYPES = frozenset(
    {"available", "unavailable", "subscribe", "subscribed", "unsubscribe", "unsubscribed",
     "probe", "error"}
)  # fmt: skip
IQ_TYPES = frozenset({"get", "set", "result", "error"})
SUBSCRIPTION_TYPES = frozenset({"subscribe", "subscribed", "unsubscribe", "unsubscribed"})
OFFLINE_TYPES = frozenset({"normal", "chat"})  # message types kept for an absent user


@dataclass(frozen=True, slots=True)
class StanzaHeader:
    kind: Kind
    type: str  # defaulted: 'normal' for messages, 'available' for presence
    to: JID | None
    sender: JID
    id: str

    @classmethod
    def of(cls, stanza: ET.Element) -> StanzaHeader:
        """Parse and check the routing attributes; raise a StanzaError when they are bad."""
        kind = _KINDS.get(stanza.tag)
        if kind is None:
            raise StanzaError(StanzaCondition.BAD_REQUEST, "not a stanza")
        raw_type = stanza.get("type")
        if kind == "message":
            stanza_type = raw_type or "normal"
            allowed = MESSAGE_TYPES
        elif kind == "presence":
            stanza_type = raw_type or "available"
            allowed = PRESENCE_TYPES
            if raw_type == "available":
                raise StanzaError(StanzaCondition.BAD_REQUEST, "available is no presence type")
        else:
            stanza_type = raw_type or ""
            allowed = IQ_TYPES
        if stanza_type not in allowed:
            raise StanzaError(StanzaCondition.BAD_REQUEST, f"unknown {kind} type")
        if kind == "iq":
            if not stanza.get("id"):
                raise StanzaError(StanzaCondition.BAD_REQUEST, "an iq needs an id")
            if stanza_type in ("get", "set") and len(stanza) != 1:
                raise StanzaError(StanzaCondition.BAD_REQUEST, "get/set carries exactly one child")
        to_text = stanza.get("to")
        try:
            to = JID.parse(to_text) if to_text else None
        except InvalidJID as exc:
            raise StanzaError(StanzaCondition.JID_MALFORMED, str(exc)) from exc
        sender = JID.parse(stanza.get("from", ""))
        return cls(kind, stanza_type, to, sender, stanza.get("id", ""))


def payload(stanza: ET.Element) -> ET.Element | None:
    """The first child of an iq (its request or result), if any."""
    return stanza[0] if len(stanza) else None


def error_reply(stanza: ET.Element, error: StanzaError, *, sender: str | None = None) -> ET.Element:
    """The error stanza answering `stanza` (RFC 6120 §8.3): addresses swapped."""
    reply = ET.Element(stanza.tag, {"type": "error"})
    if stanza.get("id"):
        reply.set("id", stanza.get("id", ""))
    origin = sender if sender is not None else stanza.get("to")
    if origin:
        reply.set("from", origin)
    if stanza.get("from"):
        reply.set("to", stanza.get("from", ""))
    if stanza.tag == IQ and len(stanza):
        reply.append(stanza[0])
    element = ET.SubElement(reply, ns.tag(ns.CLIENT, "error"), {"type": error.error_type})
    ET.SubElement(element, ns.tag(ns.STANZAS, error.condition.element_name))
    if error.text:
        ET.SubElement(element, ns.tag(ns.STANZAS, "text")).text = error.text
    return reply


def iq_result(
    request: ET.Element, child: ET.Element | None = None, *, sender: str = ""
) -> ET.Element:
    attrs = {"type": "result", "id": request.get("id", "")}
    if request.get("from"):
        attrs["to"] = request.get("from", "")
    if sender:
        attrs["from"] = sender
    result = ET.Element(IQ, attrs)
    if child is not None:
        result.append(child)
    return result


def make_presence(
    sender: str, to: str | None = None, presence_type: str | None = None
) -> ET.Element:
    attrs = {"from": sender}
    if to:
        attrs["to"] = to
    if presence_type and presence_type != "available":
        attrs["type"] = presence_type
    return ET.Element(PRESENCE, attrs)


def readdressed(stanza: ET.Element, to: str) -> ET.Element:
    """A shallow copy of `stanza` sent to `to` (children shared, never mutated)."""
    copy = ET.Element(stanza.tag, dict(stanza.attrib))
    copy.text = stanza.text
    copy.extend(list(stanza))
    copy.set("to", to)
    return copy


def delay(stanza: ET.Element, *, from_domain: str, stamp: str) -> None:
    """Mark a stored stanza with its original time (XEP-0203)."""
    ET.SubElement(stanza, ns.tag(ns.DELAY, "delay"), {"from": from_domain, "stamp": stamp})


def priority_of(presence: ET.Element) -> int:
    text = presence.findtext(ns.tag(ns.CLIENT, "priority"))
    if text is None:
        return 0
    try:
        value = int(text.strip())
    except ValueError as exc:
        raise StanzaError(StanzaCondition.BAD_REQUEST, "priority is an integer") from exc
    if not -128 <= value <= 127:
        raise StanzaError(StanzaCondition.BAD_REQUEST, "priority is within -128..127")
    return value
