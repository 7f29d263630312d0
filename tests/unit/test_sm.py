"""XEP-0198 counters: acks, wraparound, resumption, request cadence, elements."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xmpp_ha.core.errors import StanzaCondition, StreamCondition, StreamError
from xmpp_ha.protocol.sm import (
    StreamManagement,
    answer_element,
    enabled_element,
    failed_element,
    handled_count_too_high,
    is_stanza,
    parse_h,
    request_element,
    resumed_element,
)
from xmpp_ha.protocol.xml import serialize

WRAP = 2**32


def message(n: int) -> ET.Element:
    return ET.Element("{jabber:client}message", {"id": str(n)})


def ids(stanzas: list[ET.Element]) -> list[str]:
    return [stanza.get("id", "") for stanza in stanzas]


def send(sm: StreamManagement, first: int, count: int) -> None:
    for n in range(first, first + count):
        sm.track_outbound(message(n))


def test_inbound_counter_wraps() -> None:
    sm = StreamManagement()
    for _ in range(3):
        sm.count_inbound()
    assert sm.inbound_handled == 3
    sm.inbound_handled = WRAP - 1
    sm.count_inbound()
    assert sm.inbound_handled == 0


def test_acknowledge_drops_and_returns_acked_stanzas() -> None:
    sm = StreamManagement()
    send(sm, 1, 5)
    assert sm.outbound_sent == 5
    assert ids(sm.acknowledge(2)) == ["1", "2"]
    assert ids(sm.unacked()) == ["3", "4", "5"]
    assert sm.acknowledge(2) == []  # a repeated <a/> changes nothing
    assert ids(sm.acknowledge(5)) == ["3", "4", "5"]
    assert sm.unacked() == []


def test_h_higher_than_sent_is_a_stream_error() -> None:
    sm = StreamManagement()
    send(sm, 1, 3)
    with pytest.raises(StreamError) as caught:
        sm.acknowledge(4)
    assert caught.value.condition is StreamCondition.UNDEFINED_CONDITION
    assert "handled-count-too-high" in caught.value.text
    assert len(sm.unacked()) == 3  # nothing dropped


def test_h_going_backwards_is_a_stream_error() -> None:
    sm = StreamManagement()
    send(sm, 1, 3)
    sm.acknowledge(3)
    with pytest.raises(StreamError):
        sm.acknowledge(1)


@pytest.mark.parametrize("h", [-1, WRAP])
def test_h_out_of_range(h: int) -> None:
    with pytest.raises(StreamError) as caught:
        StreamManagement().acknowledge(h)
    assert caught.value.condition is StreamCondition.BAD_FORMAT


def test_outbound_wraparound() -> None:
    sm = StreamManagement()
    sm.outbound_sent = WRAP - 2  # a long session: the counters are just below the wrap
    sm._acked = WRAP - 2
    send(sm, 1, 4)  # numbered 2**32-1, 0, 1, 2
    assert sm.outbound_sent == 2
    assert ids(sm.acknowledge(WRAP - 1)) == ["1"]
    assert ids(sm.acknowledge(2)) == ["2", "3", "4"]
    assert sm.unacked() == []
    with pytest.raises(StreamError):
        sm.acknowledge(3)


def test_resume_rewinds_so_resent_stanzas_keep_their_numbers() -> None:
    sm = StreamManagement()
    send(sm, 1, 6)
    to_resend = sm.resume(4)
    assert ids(to_resend) == ["5", "6"]
    assert sm.outbound_sent == 4
    assert sm.unacked() == []
    for stanza in to_resend:
        sm.track_outbound(stanza)
    assert sm.outbound_sent == 6
    assert ids(sm.acknowledge(6)) == ["5", "6"]


def test_resume_with_bad_h() -> None:
    sm = StreamManagement()
    send(sm, 1, 2)
    with pytest.raises(StreamError):
        sm.resume(3)


def test_request_every_ack_interval_stanzas() -> None:
    sm = StreamManagement(ack_interval=5)
    flags = []
    for n in range(12):
        sm.track_outbound(message(n))
        flags.append(sm.should_request_ack)
    assert [i for i, flag in enumerate(flags) if flag] == [4, 9]


def test_request_on_every_stanza_when_overflowing() -> None:
    sm = StreamManagement(max_unacked=3, ack_interval=100)
    send(sm, 1, 3)
    assert not sm.should_request_ack
    assert not sm.overflowed
    sm.track_outbound(message(4))
    assert sm.should_request_ack
    assert sm.overflowed
    sm.track_outbound(message(5))
    assert sm.should_request_ack
    sm.acknowledge(5)
    assert not sm.overflowed


def test_config_validated() -> None:
    with pytest.raises(ValueError):
        StreamManagement(max_unacked=0)
    with pytest.raises(ValueError):
        StreamManagement(ack_interval=0)


@settings(max_examples=200)
@given(
    start=st.integers(min_value=0, max_value=WRAP - 1),
    steps=st.lists(st.tuples(st.integers(0, 20), st.integers(0, 25)), max_size=30),
)
def test_acks_across_any_start_point(start: int, steps: list[tuple[int, int]]) -> None:
    """Sent minus acked always equals the queue; every stanza is acked exactly once."""
    sm = StreamManagement(max_unacked=10_000)
    sm.outbound_sent = start
    sm._acked = start  # place the counters anywhere on the circle
    sent = acked = 0
    dropped: list[str] = []
    for to_send, to_ack in steps:
        send(sm, sent, to_send)
        sent += to_send
        target = min(acked + to_ack, sent)
        dropped += ids(sm.acknowledge((start + target) % WRAP))
        acked = target
        assert (sm.outbound_sent - (start + acked)) % WRAP == len(sm.unacked())
    assert dropped == [str(n) for n in range(acked)]
    assert ids(sm.unacked()) == [str(n) for n in range(acked, sent)]


def test_parse_h() -> None:
    assert parse_h("0") == 0
    assert parse_h(str(WRAP - 1)) == WRAP - 1
    for bad in (None, "", "-1", "+1", "1.0", " 1", "\u00b2", str(WRAP)):
        with pytest.raises(StreamError):
            parse_h(bad)


def test_is_stanza() -> None:
    assert is_stanza(ET.Element("{jabber:client}iq"))
    assert is_stanza(ET.Element("{jabber:client}presence"))
    assert not is_stanza(ET.Element("{urn:xmpp:sm:3}r"))


def test_elements() -> None:
    sm_ns = "xmlns='urn:xmpp:sm:3'"
    assert serialize(request_element()) == f"<r {sm_ns}/>".encode()
    assert serialize(answer_element(7)) == f"<a {sm_ns} h='7'/>".encode()
    assert serialize(enabled_element()) == f"<enabled {sm_ns}/>".encode()
    assert (
        serialize(enabled_element("s1", 300))
        == f"<enabled {sm_ns} id='s1' resume='true' max='300'/>".encode()
    )
    assert serialize(resumed_element("s1", 9)) == f"<resumed {sm_ns} previd='s1' h='9'/>".encode()
    assert (
        serialize(failed_element(StanzaCondition.ITEM_NOT_FOUND, h=3))
        == (
            f"<failed {sm_ns} h='3'>"
            "<item-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></failed>"
        ).encode()
    )
    assert (
        serialize(failed_element())
        == (
            f"<failed {sm_ns}><unexpected-request xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>"
            "</failed>"
        ).encode()
    )
    assert (
        serialize(handled_count_too_high(5, 3))
        == f"<handled-count-too-high {sm_ns} h='5' send-count='3'/>".encode()
    )
