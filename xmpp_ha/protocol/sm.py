"""XEP-0198 stream management: the counters and the queue of unacknowledged stanzas.

Pure: no clock, no I/O. Invariants:

- Counters are unsigned 32-bit and wrap: `inbound_handled` is the 'h' we
  report (stanzas received from the client), `outbound_sent` counts stanzas
  we sent, and `(outbound_sent - acked) mod 2**32 == len(unacked())`.
- An `<a h=.../>` acknowledging more than we sent is a stream error
  (undefined-condition, with XEP-0198's handled-count-too-high).
- `resume(h)` rewinds `outbound_sent` to the client's `h`, so re-sending the
  returned stanzas through `track_outbound()` numbers them as before.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections import deque

from xmpp_ha.core.errors import STANZAS_NS, StanzaCondition, StreamCondition, StreamError

SM_NS = "urn:xmpp:sm:3"
_MOD = 2**32
_MASK = _MOD - 1
STANZA_TAGS = frozenset(f"{{jabber:client}}{kind}" for kind in ("message", "presence", "iq"))

_R = f"{{{SM_NS}}}r"
_A = f"{{{SM_NS}}}a"


def is_stanza(element: ET.Element) -> bool:
    """Whether `element` counts for 'h' (XEP-0198 §4: message, presence and iq)."""
    return element.tag in STANZA_TAGS


def parse_h(text: str | None) -> int:
    """The 'h' attribute of `<a/>` or `<resume/>`: an unsigned 32-bit integer."""
    if text is None or not text.isdigit() or not text.isascii():
        raise StreamError(StreamCondition.BAD_FORMAT, "h must be an unsigned integer")
    value = int(text)
    if value > _MASK:
        raise StreamError(StreamCondition.BAD_FORMAT, "h must fit in 32 bits")
    return value


class StreamManagement:
    """The stream-management state of one session, carried over on resumption."""

    __slots__ = (
        "max_unacked",
        "ack_interval",
        "inbound_handled",
        "outbound_sent",
        "should_request_ack",
        "_acked",
        "_queue",
        "_since_request",
    )

    def __init__(self, *, max_unacked: int = 1000, ack_interval: int = 5) -> None:
        if max_unacked < 1:
            raise ValueError("max_unacked must be positive")
        if ack_interval < 1:
            raise ValueError("ack_interval must be positive")
        self.max_unacked = max_unacked  # beyond this, `overflowed` tells the caller to give up
        self.ack_interval = ack_interval  # ask for an <a/> after this many stanzas
        self.inbound_handled = 0  # 'h' we report, mod 2**32
        self.outbound_sent = 0  # stanzas sent to the client, mod 2**32
        # True right after the track_outbound() that should be followed by <r/>.
        self.should_request_ack = False
        self._acked = 0  # the client's last 'h', mod 2**32
        self._queue: deque[ET.Element] = deque()
        self._since_request = 0

    def count_inbound(self) -> None:
        self.inbound_handled = (self.inbound_handled + 1) & _MASK

    def track_outbound(self, stanza: ET.Element) -> None:
        self._queue.append(stanza)
        self.outbound_sent = (self.outbound_sent + 1) & _MASK
        since = self._since_request + 1
        if since >= self.ack_interval or len(self._queue) > self.max_unacked:
            self._since_request = 0
            self.should_request_ack = True
        else:
            self._since_request = since
            self.should_request_ack = False

    def acknowledge(self, h: int) -> list[ET.Element]:
        """Process the client's `<a h=.../>`; returns the stanzas it newly acknowledged."""
        if not 0 <= h <= _MASK:
            raise StreamError(StreamCondition.BAD_FORMAT, "h must fit in 32 bits")
        newly_acked = (h - self._acked) & _MASK
        queue = self._queue
        if newly_acked > len(queue):
            raise StreamError(
                StreamCondition.UNDEFINED_CONDITION,
                f"handled-count-too-high: h={h}, send-count={self.outbound_sent}",
            )
        self._acked = h
        return [queue.popleft() for _ in range(newly_acked)]

    def resume(self, h: int) -> list[ET.Element]:
        """Resumption with the client's `h`: the stanzas to send again, in order.

        The queue is emptied and `outbound_sent` rewound to `h`; send the
        returned stanzas with `track_outbound()` as usual.
        """
        self.acknowledge(h)
        pending = list(self._queue)
        self._queue.clear()
        self.outbound_sent = self._acked
        self._since_request = 0
        self.should_request_ack = False
        return pending

    def covers(self, sent: int) -> bool:
        """Whether the client acknowledged the stanza numbered `sent` (an `outbound_sent`
        value just after it was tracked)."""
        return ((self._acked - sent) & _MASK) < _MOD // 2

    def unacked(self) -> list[ET.Element]:
        """Stanzas sent but not acknowledged, oldest first (for offline storage)."""
        return list(self._queue)

    @property
    def unacked_count(self) -> int:
        return len(self._queue)

    @property
    def overflowed(self) -> bool:
        """More than `max_unacked` stanzas wait: the client is not acking; end the stream."""
        return len(self._queue) > self.max_unacked


# --- the XEP-0198 elements ---------------------------------------------------


def request_element() -> ET.Element:
    return ET.Element(_R)


def answer_element(h: int) -> ET.Element:
    return ET.Element(_A, {"h": str(h)})


def enabled_element(resume_id: str | None = None, max_seconds: int | None = None) -> ET.Element:
    """`<enabled/>`; with `resume_id` the session may be resumed (`resume='true'`)."""
    element = ET.Element(f"{{{SM_NS}}}enabled")
    if resume_id is not None:
        element.set("id", resume_id)
        element.set("resume", "true")
        if max_seconds is not None:
            element.set("max", str(max_seconds))
    return element


def resumed_element(previd: str, h: int) -> ET.Element:
    return ET.Element(f"{{{SM_NS}}}resumed", {"previd": previd, "h": str(h)})


def failed_element(
    condition: StanzaCondition = StanzaCondition.UNEXPECTED_REQUEST, h: int | None = None
) -> ET.Element:
    """`<failed/>` with a stanza error condition, and our 'h' when a resume failed."""
    element = ET.Element(f"{{{SM_NS}}}failed")
    if h is not None:
        element.set("h", str(h))
    ET.SubElement(element, f"{{{STANZAS_NS}}}{condition.element_name}")
    return element


def handled_count_too_high(h: int, send_count: int) -> ET.Element:
    """The application condition to put in the `<stream:error>` for a bad `<a/>`."""
    return ET.Element(
        f"{{{SM_NS}}}handled-count-too-high", {"h": str(h), "send-count": str(send_count)}
    )
