"""The XMPP stream parser and serializer, driven by XML conversation scripts."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xmpp_ha.core.errors import StreamCondition, StreamError
from xmpp_ha.protocol.xml import (
    STREAM_CLOSE,
    ElementReceived,
    StreamClosed,
    StreamEvent,
    StreamOpened,
    XMLStreamParser,
    serialize,
    stream_error,
    stream_header,
)

XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"
HEADER = (
    b"<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
    b"xmlns:stream='http://etherx.jabber.org/streams' to='example.com' "
    b"version='1.0' xml:lang='en'>"
)
CHAT = (
    b"<message to='juliet@example.com/balcony' from='romeo@example.net/orchard' "
    b"type='chat' id='ktx72v49' xml:lang='en'><body>Art thou not Romeo, and a "
    b"Montague? &amp; &lt;3 &#x263A;</body>"
    b"<active xmlns='http://jabber.org/protocol/chatstates'/></message>"
)
CONVERSATION = (
    HEADER
    + b"\n  "
    + CHAT
    + b" \r\n\t"
    + b"<iq type='get' id='p1'><ping xmlns='urn:xmpp:ping'/></iq>"
    + b"<presence><show>away</show><status>gone &apos;fishing&quot;</status>"
    + b"<x xmlns='jabber:x:data' type='form'><field var='a'><value>1</value></field>"
    + b"</x>tail text</presence>"
    + b"<message><body><![CDATA[<b>not markup</b> & more]]></body></message>"
    + b"<stream:features/><r xmlns='urn:xmpp:sm:3'/>"
    + "<message><body>\u00e9\u4e2d\U0001f600</body></message>".encode()
    + STREAM_CLOSE
)


def describe(events: list[StreamEvent]) -> list[object]:
    """Events in a form compared by structure (ElementTree elements are not)."""
    described: list[object] = []
    for event in events:
        if isinstance(event, ElementReceived):
            described.append(("element", tree(event.element)))
        else:
            described.append(event)
    return described


def tree(element: ET.Element) -> tuple[object, ...]:
    return (
        element.tag,
        dict(element.attrib),
        element.text or "",
        element.tail or "",
        tuple(tree(child) for child in element),
    )


def feed_all(chunks: list[bytes], parser: XMLStreamParser | None = None) -> list[StreamEvent]:
    parser = parser or XMLStreamParser()
    events: list[StreamEvent] = []
    for chunk in chunks:
        events.extend(parser.feed(chunk))
    return events


def error_of(data: bytes, parser: XMLStreamParser | None = None) -> StreamCondition:
    parser = parser or XMLStreamParser()
    with pytest.raises(StreamError) as caught:
        parser.feed(data)
    return caught.value.condition


# --- a whole conversation ----------------------------------------------------


def test_conversation_events() -> None:
    events = feed_all([CONVERSATION])
    opened = events[0]
    assert opened == StreamOpened(
        {"to": "example.com", "version": "1.0", XML_LANG: "en"}, "jabber:client", True
    )
    elements = [e.element for e in events if isinstance(e, ElementReceived)]
    assert [e.tag for e in elements] == [
        "{jabber:client}message",
        "{jabber:client}iq",
        "{jabber:client}presence",
        "{jabber:client}message",
        "{http://etherx.jabber.org/streams}features",
        "{urn:xmpp:sm:3}r",
        "{jabber:client}message",
    ]
    chat = elements[0]
    assert chat.get(XML_LANG) == "en"
    assert chat.get("type") == "chat"
    assert chat.findtext("{jabber:client}body") == "Art thou not Romeo, and a Montague? & <3 \u263a"
    assert chat[1].tag == "{http://jabber.org/protocol/chatstates}active"
    assert chat.tail is None
    presence = elements[2]
    assert presence.findtext("{jabber:client}status") == "gone 'fishing\""
    assert presence.find("{jabber:x:data}x/{jabber:x:data}field").get("var") == "a"  # type: ignore[union-attr]
    assert presence[2].tail == "tail text"
    assert elements[3].findtext("{jabber:client}body") == "<b>not markup</b> & more"
    assert elements[6].findtext("{jabber:client}body") == "\u00e9\u4e2d\U0001f600"
    assert events[-1] == StreamClosed()


def test_whitespace_keepalives_are_ignored() -> None:
    parser = XMLStreamParser()
    parser.feed(HEADER)
    assert parser.feed(b" ") == []
    assert parser.feed(b"\n\n\t ") == []
    assert len(parser.feed(b"<presence/>  ")) == 1


def test_header_without_xml_declaration_and_jabber_server() -> None:
    events = feed_all(
        [
            b"<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams'"
            b" from='a.example' id='x1'>"
        ]
    )
    assert events == [StreamOpened({"from": "a.example", "id": "x1"}, "jabber:server", True)]


def test_stream_prefix_may_be_other_than_stream() -> None:
    events = feed_all(
        [
            b"<s:stream xmlns='jabber:client' xmlns:s='http://etherx.jabber.org/streams'>"
            b"<message/></s:stream>"
        ]
    )
    assert isinstance(events[0], StreamOpened)
    assert isinstance(events[1], ElementReceived)
    assert events[2] == StreamClosed()


def test_reset_starts_a_new_stream() -> None:
    parser = XMLStreamParser()
    parser.feed(HEADER + b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
    parser.reset()
    events = parser.feed(HEADER + b"<presence/>")
    assert isinstance(events[0], StreamOpened)
    assert isinstance(events[1], ElementReceived)


def test_reset_after_failure_gives_a_working_parser() -> None:
    parser = XMLStreamParser()
    error_of(HEADER + b"<!-- x -->", parser)
    parser.reset()
    assert len(parser.feed(HEADER + b"<presence/>")) == 2


# --- arbitrary splits ----------------------------------------------------------

EXPECTED = describe(feed_all([CONVERSATION]))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(CONVERSATION)), max_size=40))
def test_any_split_gives_the_same_events(cuts: list[int]) -> None:
    points = [0, *sorted(cuts), len(CONVERSATION)]
    chunks = [CONVERSATION[a:b] for a, b in zip(points, points[1:], strict=False)]
    assert describe(feed_all(chunks)) == EXPECTED


def test_byte_at_a_time() -> None:
    chunks = [CONVERSATION[i : i + 1] for i in range(len(CONVERSATION))]
    assert describe(feed_all(chunks)) == EXPECTED


# --- restricted XML (RFC 6120 §11.1) -------------------------------------------

BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>
<message><body>&lol9;</body></message>"""


def test_billion_laughs_fails_fast() -> None:
    assert error_of(BILLION_LAUGHS) is StreamCondition.RESTRICTED_XML


def test_billion_laughs_fed_in_pieces_fails_at_the_doctype() -> None:
    parser = XMLStreamParser()
    doctype_at = BILLION_LAUGHS.index(b"<!DOCTYPE")
    assert parser.feed(BILLION_LAUGHS[:doctype_at]) == []
    with pytest.raises(StreamError) as caught:
        parser.feed(BILLION_LAUGHS[doctype_at : doctype_at + 20])
    assert caught.value.condition is StreamCondition.RESTRICTED_XML


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"<!DOCTYPE stream><stream:stream/>", id="doctype"),
        pytest.param(
            b"<!DOCTYPE s SYSTEM 'http://evil.example/x.dtd'><stream:stream/>", id="external-dtd"
        ),
        pytest.param(HEADER + b"<?php echo 1; ?>", id="processing-instruction"),
        pytest.param(b"<?xml version='1.0'?><?xml-stylesheet href='a'?>" + HEADER, id="pi-prolog"),
        pytest.param(HEADER + b"<!-- hello -->", id="comment"),
        pytest.param(HEADER + b"<message><!-- hello --></message>", id="comment-in-stanza"),
        pytest.param(b"<!-- hello -->" + HEADER, id="comment-in-prolog"),
        pytest.param(HEADER + b"<message><body>&nbsp;</body></message>", id="undefined-entity"),
        pytest.param(HEADER + b"<message to='&xxe;'/>", id="entity-in-attribute"),
    ],
)
def test_restricted_xml(data: bytes) -> None:
    assert error_of(data) is StreamCondition.RESTRICTED_XML


BAD_DOCUMENTS = [
    (BILLION_LAUGHS, StreamCondition.RESTRICTED_XML),
    (HEADER + b"<message><!-- hello --></message>", StreamCondition.RESTRICTED_XML),
    (HEADER + b"<message><?pi x?></message>", StreamCondition.RESTRICTED_XML),
    (HEADER + b"<message><body>&nbsp;</body></message>", StreamCondition.RESTRICTED_XML),
    (HEADER + b"<message><body></message>", StreamCondition.NOT_WELL_FORMED),
    (HEADER + b"<a>" * 70, StreamCondition.POLICY_VIOLATION),
]


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(BAD_DOCUMENTS),
    st.lists(st.integers(min_value=0, max_value=len(BILLION_LAUGHS)), max_size=20),
)
def test_any_split_gives_the_same_error(
    case: tuple[bytes, StreamCondition], cuts: list[int]
) -> None:
    document, condition = case
    points = [0, *sorted(min(cut, len(document)) for cut in cuts), len(document)]
    parser = XMLStreamParser()
    with pytest.raises(StreamError) as caught:
        for a, b in zip(points, points[1:], strict=False):
            parser.feed(document[a:b])
    assert caught.value.condition is condition


def test_predefined_and_character_references_are_allowed() -> None:
    events = feed_all(
        [HEADER, b"<message a='&quot;&apos;'><body>&lt;&gt;&amp;&#65;&#x42;</body></message>"]
    )
    element = events[1].element  # type: ignore[union-attr]
    assert element.get("a") == "\"'"
    assert element.findtext("{jabber:client}body") == "<>&AB"


# --- malformed XML and bad headers -------------------------------------------


@pytest.mark.parametrize(
    ("data", "condition"),
    [
        (HEADER + b"<message><body></message>", StreamCondition.NOT_WELL_FORMED),
        (HEADER + b"<message a='1' a='2'/>", StreamCondition.NOT_WELL_FORMED),
        (HEADER + b"<message>\xff\xfe</message>", StreamCondition.NOT_WELL_FORMED),
        (HEADER + b"<message>&#0;</message>", StreamCondition.NOT_WELL_FORMED),
        (HEADER + b"<message><</message>", StreamCondition.NOT_WELL_FORMED),
        (HEADER + b"</stream:stream><presence/>", StreamCondition.NOT_WELL_FORMED),
        (HEADER + b"<foo:message/>", StreamCondition.BAD_NAMESPACE_PREFIX),
        (
            b"<stream:stream xmlns='jabber:client'>",
            StreamCondition.BAD_NAMESPACE_PREFIX,
        ),
        (
            b"<stream:stream xmlns='jabber:client' xmlns:stream='urn:wrong'>",
            StreamCondition.INVALID_NAMESPACE,
        ),
        (
            b"<stream xmlns='jabber:client'>",
            StreamCondition.INVALID_NAMESPACE,
        ),
        (
            b"<stream:stream xmlns='jabber:wrong' xmlns:stream='http://etherx.jabber.org/streams'>",
            StreamCondition.INVALID_NAMESPACE,
        ),
        (
            b"<stream:stream xmlns:stream='http://etherx.jabber.org/streams'>",
            StreamCondition.INVALID_NAMESPACE,
        ),
        (
            b"<message xmlns='jabber:client'/>",
            StreamCondition.BAD_FORMAT,
        ),
        (HEADER + b"hello", StreamCondition.BAD_FORMAT),
        (
            b"<?xml version='1.0' encoding='ISO-8859-1'?>" + HEADER[21:],
            StreamCondition.UNSUPPORTED_ENCODING,
        ),
    ],
)
def test_stream_errors(data: bytes, condition: StreamCondition) -> None:
    assert error_of(data) is condition


def test_utf8_declaration_is_fine() -> None:
    events = feed_all([b"<?xml version='1.0' encoding='UTF-8'?>" + HEADER[21:]])
    assert isinstance(events[0], StreamOpened)


def test_parser_is_unusable_after_an_error() -> None:
    parser = XMLStreamParser()
    parser.feed(HEADER)
    with pytest.raises(StreamError) as first:
        parser.feed(b"<message><!-- no --></message>")
    with pytest.raises(StreamError) as second:
        parser.feed(b"<presence/>")
    assert second.value is first.value


def test_error_inside_a_handler_stops_the_parse() -> None:
    """The stanza before the comment in the same chunk is not delivered after the error."""
    parser = XMLStreamParser()
    parser.feed(HEADER)
    with pytest.raises(StreamError):
        parser.feed(b"<presence/><!-- x --><presence/>")
    with pytest.raises(StreamError):
        parser.feed(b"")


# --- size and depth limits ------------------------------------------------------


def test_one_mebibyte_stanza_is_a_policy_violation() -> None:
    stanza = b"<message><body>" + b"a" * (1 << 20) + b"</body></message>"
    assert error_of(HEADER + stanza) is StreamCondition.POLICY_VIOLATION


def test_never_ending_stanza_is_cut_off_while_streaming() -> None:
    parser = XMLStreamParser(max_stanza_bytes=10_000)
    parser.feed(HEADER + b"<message><body>")
    with pytest.raises(StreamError) as caught:
        for _ in range(100):
            parser.feed(b"x" * 1000)
    assert caught.value.condition is StreamCondition.POLICY_VIOLATION


def test_never_ending_start_tag_is_cut_off() -> None:
    """Expat holds an unfinished tag without calling a handler; the fed bytes still count."""
    parser = XMLStreamParser(max_stanza_bytes=10_000)
    parser.feed(HEADER + b"<presence/><message id='")
    with pytest.raises(StreamError) as caught:
        for _ in range(100):
            parser.feed(b"x" * 1000)
    assert caught.value.condition is StreamCondition.POLICY_VIOLATION


def test_never_ending_stream_header_is_cut_off() -> None:
    parser = XMLStreamParser(max_stanza_bytes=10_000)
    parser.feed(HEADER[:-1])
    with pytest.raises(StreamError) as caught:
        for _ in range(100):
            parser.feed(b" a" + str(_).encode() + b"='" + b"x" * 1000 + b"'")
    assert caught.value.condition is StreamCondition.POLICY_VIOLATION


def test_whitespace_keepalives_never_add_up() -> None:
    parser = XMLStreamParser(max_stanza_bytes=1000)
    parser.feed(HEADER)
    for _ in range(2000):
        assert parser.feed(b"  \n ") == []
    assert parser.feed(b" " * 900 + b"<presence/>" + b" " * 900) != []


def test_many_small_elements_count_towards_the_limit() -> None:
    parser = XMLStreamParser(max_stanza_bytes=10_000)
    parser.feed(HEADER + b"<message>")
    with pytest.raises(StreamError) as caught:
        for _ in range(1000):
            parser.feed(b"<x/><y>z</y>")
    assert caught.value.condition is StreamCondition.POLICY_VIOLATION


def test_stanza_size_counts_from_its_own_start_tag() -> None:
    parser = XMLStreamParser(max_stanza_bytes=200)
    parser.feed(HEADER)
    stanza = b"<message><body>" + b"a" * 150 + b"</body></message>"
    for _ in range(50):  # the stream as a whole is far over 200 bytes
        assert len(parser.feed(stanza + b" ")) == 1


def test_stanza_just_over_the_limit_in_one_chunk() -> None:
    parser = XMLStreamParser(max_stanza_bytes=200)
    parser.feed(HEADER)
    with pytest.raises(StreamError) as caught:
        parser.feed(b"<message><body>" + b"a" * 200 + b"</body></message><presence/>")
    assert caught.value.condition is StreamCondition.POLICY_VIOLATION


def test_deep_nesting_is_a_policy_violation() -> None:
    depth = 65
    stanza = b"<a>" * depth + b"</a>" * depth
    assert error_of(HEADER + stanza) is StreamCondition.POLICY_VIOLATION


def test_nesting_at_the_limit_is_fine() -> None:
    depth = 64
    stanza = b"<a>" * depth + b"</a>" * depth
    events = feed_all([HEADER, stanza])
    assert isinstance(events[1], ElementReceived)


def test_very_deep_nesting_fails_without_recursion() -> None:
    assert error_of(HEADER + b"<a>" * 100_000) is StreamCondition.POLICY_VIOLATION


def test_limits_validated() -> None:
    with pytest.raises(ValueError):
        XMLStreamParser(max_stanza_bytes=0)
    with pytest.raises(ValueError):
        XMLStreamParser(max_depth=0)


# --- serializer -------------------------------------------------------------------


def parse_stanza(data: bytes) -> ET.Element:
    events = feed_all([HEADER, data])
    assert len(events) == 2, events
    event = events[1]
    assert isinstance(event, ElementReceived)
    return event.element


def test_serialize_declares_namespaces_only_where_they_change() -> None:
    element = parse_stanza(CHAT)
    assert serialize(element) == (
        b"<message to='juliet@example.com/balcony' from='romeo@example.net/orchard' "
        b"type='chat' id='ktx72v49' xml:lang='en'><body>Art thou not Romeo, and a "
        b"Montague? &amp; &lt;3 \xe2\x98\xba</body>"
        b"<active xmlns='http://jabber.org/protocol/chatstates'/></message>"
    )


def test_serialize_built_tree() -> None:
    iq = ET.Element("{jabber:client}iq", {"type": "result", "id": "b1"})
    bind = ET.SubElement(iq, "{urn:ietf:params:xml:ns:xmpp-bind}bind")
    ET.SubElement(bind, "{urn:ietf:params:xml:ns:xmpp-bind}jid").text = "a@b/c"
    assert serialize(iq) == (
        b"<iq type='result' id='b1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
        b"<jid>a@b/c</jid></bind></iq>"
    )


def test_serialize_escapes() -> None:
    message = ET.Element("{jabber:client}message", {"id": "a'b\"c<d>&e\tf\ng\rh"})
    ET.SubElement(message, "{jabber:client}body").text = "x < y & z > w \r\n ]]>"
    out = serialize(message)
    assert out == (
        b"<message id='a&apos;b&quot;c&lt;d&gt;&amp;e&#9;f&#10;g&#13;h'>"
        b"<body>x &lt; y &amp; z &gt; w &#13;\n ]]&gt;</body></message>"
    )
    assert tree(parse_stanza(out)) == tree(message)


def test_serialize_stream_namespace_uses_the_stream_prefix() -> None:
    features = ET.Element("{http://etherx.jabber.org/streams}features")
    ET.SubElement(features, "{urn:xmpp:sm:3}sm")
    ET.SubElement(features, "{jabber:client}x")
    out = serialize(features)
    assert out == b"<stream:features><sm xmlns='urn:xmpp:sm:3'/><x/></stream:features>"
    assert tree(parse_stanza(out)) == tree(features)


def test_serialize_no_namespace_and_namespaced_attributes() -> None:
    element = ET.Element("{jabber:client}message", {"{urn:ext}flag": "1", "{urn:ext2}o": "2"})
    ET.SubElement(element, "plain")
    out = serialize(element)
    assert b"xmlns=''" in out
    assert tree(parse_stanza(out)) == tree(element)


def test_serialize_under_another_parent_namespace() -> None:
    element = ET.Element("{jabber:client}message")
    assert serialize(element, parent_ns="urn:xmpp:forward:0") == b"<message xmlns='jabber:client'/>"


def test_serialize_keeps_tails_of_children_but_not_its_own() -> None:
    element = parse_stanza(b"<presence>a<x/>b<y>c</y>d</presence>")
    element.tail = "ignored"
    assert serialize(element) == b"<presence>a<x/>b<y>c</y>d</presence>"


xml_text = st.text(
    st.characters(
        min_codepoint=0x09,
        blacklist_categories=["Cs"],
        blacklist_characters="\x0b\x0c\x0e\x0f\x10\x11\x12\x13\x14\x15\x16\x17\x18\x19"
        "\x1a\x1b\x1c\x1d\x1e\x1f\ufffe\uffff",
    ),
    max_size=30,
)
names = st.sampled_from(["body", "x", "item", "a-b", "q.r", "n_1"])
namespaces = st.sampled_from(["jabber:client", "urn:a", "urn:b", "http://example.com/c?d&e"])


@st.composite
def elements(draw: st.DrawFn, depth: int = 0) -> ET.Element:
    element = ET.Element(
        f"{{{draw(namespaces)}}}{draw(names)}",
        draw(st.dictionaries(names, xml_text, max_size=3)),
    )
    element.text = draw(st.none() | xml_text)
    if depth < 3:
        for child in draw(st.lists(elements(depth + 1), max_size=3)):
            child.tail = draw(st.none() | xml_text)
            element.append(child)
    return element


def normalize(element: ET.Element) -> tuple[object, ...]:
    return (
        element.tag,
        dict(element.attrib),
        element.text or "",
        element.tail or "",
        tuple(normalize(child) for child in element),
    )


@settings(max_examples=300, deadline=None)
@given(elements())
def test_serialize_round_trips(element: ET.Element) -> None:
    element.tail = None
    assert normalize(parse_stanza(serialize(element))) == normalize(element)


# --- stream framing helpers --------------------------------------------------------


def test_stream_header() -> None:
    header = stream_header(stream_id="abc", from_domain="example.com", to="juliet@example.com")
    assert header == (
        b"<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
        b"xmlns:stream='http://etherx.jabber.org/streams' id='abc' from='example.com' "
        b"to='juliet@example.com' version='1.0' xml:lang='en'>"
    )
    events = feed_all([header, STREAM_CLOSE])
    assert events == [
        StreamOpened(
            {
                "id": "abc",
                "from": "example.com",
                "to": "juliet@example.com",
                "version": "1.0",
                XML_LANG: "en",
            },
            "jabber:client",
            True,
        ),
        StreamClosed(),
    ]
    no_to = stream_header(stream_id="i'd", from_domain="e", to=None, lang="de")
    assert b" to=" not in no_to
    assert b"id='i&apos;d'" in no_to
    assert b"xml:lang='de'" in no_to


def test_stream_error() -> None:
    assert stream_error(StreamCondition.NOT_WELL_FORMED) == (
        b"<stream:error><not-well-formed xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>"
        b"</stream:error>"
    )
    with_text = stream_error(StreamCondition.POLICY_VIOLATION, "too <big>")
    assert with_text.endswith(
        b"<text xmlns='urn:ietf:params:xml:ns:xmpp-streams'>too &lt;big&gt;</text></stream:error>"
    )
    moved = stream_error(StreamCondition.SEE_OTHER_HOST, other_host="n2.example.com:5222")
    assert moved == (
        b"<stream:error><see-other-host xmlns='urn:ietf:params:xml:ns:xmpp-streams'>"
        b"n2.example.com:5222</see-other-host></stream:error>"
    )
    element = parse_stanza(moved)
    assert element.tag == "{http://etherx.jabber.org/streams}error"
    assert element[0].text == "n2.example.com:5222"
