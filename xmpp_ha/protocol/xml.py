"""The XMPP XML stream: an incremental parser over expat, and the serializer.

Pure: bytes in, events out; no sockets, no clock. Rules (RFC 6120 §11):

- The root must be `<stream:stream>` in `http://etherx.jabber.org/streams`
  with default namespace `jabber:client` or `jabber:server`.
- DOCTYPE, entity declarations, processing instructions (other than the XML
  declaration), comments and references to entities other than the five
  predefined ones are `restricted-xml`. Expat handlers raise at the first
  token of each, so nothing is ever expanded (billion laughs fails at
  `<!DOCTYPE`).
- A stanza (a child of the root) may hold at most `max_stanza_bytes`, counted
  from the first byte of its start tag; bytes fed while a stanza is open count
  at once, so a stanza that never ends is cut off. Outside stanzas the same
  bound applies to bytes not yet part of a finished event (a start tag that
  never ends). Nesting deeper than `max_depth` below the root is
  `policy-violation`.
- Any error leaves the parser unusable: every later `feed()` raises the same
  `StreamError`. The caller sends it and closes the stream.
- Whitespace between stanzas is ignored; other text there is `bad-format`.

Elements come out as ElementTree trees with `{namespace}local` names, and
`serialize()` writes them back declaring `xmlns` only where it changes.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from xml.parsers import expat

from xmpp_ha.core.errors import STREAMS_NS, StreamCondition, StreamError

STREAM_NS = "http://etherx.jabber.org/streams"
XML_NS = "http://www.w3.org/XML/1998/namespace"
CONTENT_NAMESPACES = frozenset(("jabber:client", "jabber:server"))
STREAM_CLOSE = b"</stream:stream>"

_STREAM_ROOT = STREAM_NS + "}stream"  # expat's name for the root, separator "}"
_FEED_CHUNK = 65536  # larger feeds are parsed in slices so the size limit bites early
_CACHE_LIMIT = 4096  # name caches are filled from untrusted input: bound them

_errors = expat.errors
_ERROR_CONDITIONS: dict[int, StreamCondition] = {
    _errors.codes[_errors.XML_ERROR_UNDEFINED_ENTITY]: StreamCondition.RESTRICTED_XML,
    _errors.codes[_errors.XML_ERROR_RECURSIVE_ENTITY_REF]: StreamCondition.RESTRICTED_XML,
    _errors.codes[_errors.XML_ERROR_PARAM_ENTITY_REF]: StreamCondition.RESTRICTED_XML,
    _errors.codes[_errors.XML_ERROR_BINARY_ENTITY_REF]: StreamCondition.RESTRICTED_XML,
    _errors.codes[_errors.XML_ERROR_ATTRIBUTE_EXTERNAL_ENTITY_REF]: StreamCondition.RESTRICTED_XML,
    _errors.codes[_errors.XML_ERROR_EXTERNAL_ENTITY_HANDLING]: StreamCondition.RESTRICTED_XML,
    _errors.codes[_errors.XML_ERROR_ENTITY_DECLARED_IN_PE]: StreamCondition.RESTRICTED_XML,
    _errors.codes[_errors.XML_ERROR_UNBOUND_PREFIX]: StreamCondition.BAD_NAMESPACE_PREFIX,
    _errors.codes[_errors.XML_ERROR_UNKNOWN_ENCODING]: StreamCondition.UNSUPPORTED_ENCODING,
    _errors.codes[_errors.XML_ERROR_INCORRECT_ENCODING]: StreamCondition.UNSUPPORTED_ENCODING,
}
if hasattr(_errors, "XML_ERROR_AMPLIFICATION_LIMIT_BREACH"):  # expat >= 2.4
    _ERROR_CONDITIONS[_errors.codes[_errors.XML_ERROR_AMPLIFICATION_LIMIT_BREACH]] = (
        StreamCondition.RESTRICTED_XML
    )


@dataclass(frozen=True, slots=True)
class StreamOpened:
    """The peer's `<stream:stream>` header."""

    attributes: dict[str, str]  # 'to', 'from', 'version', 'id', '{XML_NS}lang'
    namespace: str = "jabber:client"  # the default (content) namespace declared
    # The parser raises instead of emitting a header outside the streams
    # namespace, so an event it produces always says True.
    stream_ns_ok: bool = True


@dataclass(frozen=True, slots=True)
class ElementReceived:
    element: ET.Element  # a complete child of <stream:stream>


@dataclass(frozen=True, slots=True)
class StreamClosed:
    pass


StreamEvent = StreamOpened | ElementReceived | StreamClosed


# expat gives "ns}local"; ElementTree wants "{ns}local". Shared by all parsers.
_names: dict[str, str] = {}


def _fix_name(raw: str) -> str:
    fixed = "{" + raw if "}" in raw else raw
    if len(_names) >= _CACHE_LIMIT:
        _names.clear()
    _names[raw] = fixed
    return fixed


def _fix_attributes(attrs: dict[str, str]) -> dict[str, str]:
    names = _names
    return {(names.get(key) or _fix_name(key)): value for key, value in attrs.items()}


def _restricted(what: str) -> StreamError:
    return StreamError(StreamCondition.RESTRICTED_XML, f"{what} is not allowed in XMPP")


class XMLStreamParser:
    """One XML stream. `reset()` starts the next one after STARTTLS or SASL success."""

    __slots__ = (
        "_max_stanza_bytes",
        "_depth_limit",
        "_parser",
        "_events",
        "_stack",
        "_depth",
        "_pending_from",
        "_fed",
        "_failure",
        "_default_ns",
    )

    def __init__(self, *, max_stanza_bytes: int = 262144, max_depth: int = 64) -> None:
        if max_stanza_bytes < 1:
            raise ValueError("max_stanza_bytes must be positive")
        if max_depth < 1:
            raise ValueError("max_depth must be positive")
        self._max_stanza_bytes = max_stanza_bytes
        self._depth_limit = max_depth + 1  # open elements counted with the root
        self.reset()

    def reset(self) -> None:
        parser = expat.ParserCreate("UTF-8", "}")
        parser.buffer_text = True
        parser.buffer_size = 1024  # the 8 KiB default is a third of an idle session's memory
        parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
        parser.XmlDeclHandler = self._on_xml_decl
        parser.StartDoctypeDeclHandler = self._on_doctype
        parser.EntityDeclHandler = self._on_entity_decl
        parser.UnparsedEntityDeclHandler = self._on_entity_decl
        parser.NotationDeclHandler = self._on_entity_decl
        parser.ExternalEntityRefHandler = self._on_external_entity
        parser.SkippedEntityHandler = self._on_skipped_entity
        parser.ProcessingInstructionHandler = self._on_processing_instruction
        parser.CommentHandler = self._on_comment
        parser.StartNamespaceDeclHandler = self._on_namespace_decl
        parser.StartElementHandler = self._on_start
        parser.EndElementHandler = self._on_end
        parser.CharacterDataHandler = self._on_text
        self._parser = parser
        self._events: list[StreamEvent] = []
        self._stack: list[ET.Element] = []  # the open elements of the current stanza
        self._depth = 0  # open elements, the root included
        # Where the bytes expat holds without a finished stream-level event begin:
        # the open stanza's start tag, or just after the last stream-level event.
        self._pending_from = 0
        self._fed = 0  # bytes given to this expat parser
        self._failure: StreamError | None = None
        self._default_ns: str | None = None

    def feed(self, data: bytes) -> list[StreamEvent]:
        if self._failure is not None:
            raise self._failure
        events: list[StreamEvent] = []
        self._events = events
        try:
            if len(data) <= _FEED_CHUNK:
                self._parse(data)
            else:
                for offset in range(0, len(data), _FEED_CHUNK):
                    self._parse(data[offset : offset + _FEED_CHUNK])
        except StreamError as error:
            self._fail(error)
            raise
        except expat.ExpatError as exc:
            condition = _ERROR_CONDITIONS.get(exc.code, StreamCondition.NOT_WELL_FORMED)
            failure = StreamError(condition, str(exc))
            self._fail(failure)
            raise failure from exc
        except Exception:
            self._fail(StreamError(StreamCondition.INTERNAL_SERVER_ERROR))
            raise
        return events

    def _parse(self, data: bytes) -> None:
        self._parser.Parse(data, False)
        self._fed += len(data)
        if self._fed - self._pending_from > self._max_stanza_bytes:
            raise self._too_big()

    def _fail(self, error: StreamError) -> None:
        self._failure = error
        self._events = []
        self._stack = []
        # Drop the handlers (they hold self) and the parser: it is finished.
        self._parser = expat.ParserCreate()

    def _too_big(self) -> StreamError:
        return StreamError(
            StreamCondition.POLICY_VIOLATION,
            f"stanza larger than {self._max_stanza_bytes} bytes",
        )

    # --- expat handlers ----------------------------------------------------

    def _on_start(self, name: str, attrs: dict[str, str]) -> None:
        depth = self._depth
        tag = _names.get(name) or _fix_name(name)
        if attrs:
            for key in attrs:
                if "}" in key:
                    attrs = _fix_attributes(attrs)
                    break
        if depth > 1:
            if depth >= self._depth_limit:
                raise StreamError(
                    StreamCondition.POLICY_VIOLATION,
                    f"elements nested deeper than {self._depth_limit - 1}",
                )
            stack = self._stack
            stack.append(ET.SubElement(stack[-1], tag, attrs))
        elif depth == 1:
            self._pending_from = self._parser.CurrentByteIndex
            self._stack.append(ET.Element(tag, attrs))
        else:
            self._open_stream(tag, attrs)
        self._depth = depth + 1

    def _on_end(self, name: str) -> None:
        depth = self._depth - 1
        self._depth = depth
        if depth > 1:
            self._stack.pop()
        elif depth == 1:
            end = self._parser.CurrentByteIndex
            if end - self._pending_from > self._max_stanza_bytes:
                raise self._too_big()
            self._pending_from = end
            self._events.append(ElementReceived(self._stack.pop()))
        else:
            self._pending_from = self._parser.CurrentByteIndex
            self._events.append(StreamClosed())

    def _on_text(self, data: str) -> None:
        stack = self._stack
        if stack:
            element = stack[-1]
            if len(element):
                last = element[-1]
                last.tail = data if last.tail is None else last.tail + data
            else:
                element.text = data if element.text is None else element.text + data
        elif data.isspace():
            self._pending_from = self._parser.CurrentByteIndex  # the end of the whitespace
        else:
            raise StreamError(StreamCondition.BAD_FORMAT, "text outside of a stanza")

    def _open_stream(self, tag: str, attrs: dict[str, str]) -> None:
        if tag != "{" + _STREAM_ROOT:
            if tag.rpartition("}")[2] == "stream":
                raise StreamError(
                    StreamCondition.INVALID_NAMESPACE, f"stream namespace is not {STREAM_NS}"
                )
            raise StreamError(
                StreamCondition.BAD_FORMAT, "the root element must be <stream:stream>"
            )
        namespace = self._default_ns
        if namespace not in CONTENT_NAMESPACES:
            raise StreamError(
                StreamCondition.INVALID_NAMESPACE,
                f"default namespace {namespace!r} is not jabber:client",
            )
        self._pending_from = self._parser.CurrentByteIndex
        # Declarations below the root do not matter to us; stop paying for them.
        self._parser.StartNamespaceDeclHandler = None
        self._events.append(StreamOpened(dict(attrs), namespace))

    def _on_namespace_decl(self, prefix: str | None, uri: str) -> None:
        if prefix is None:
            self._default_ns = uri

    def _on_xml_decl(self, version: str | None, encoding: str | None, standalone: int) -> None:
        if encoding is not None and encoding.lower() not in ("utf-8", "utf8"):
            raise StreamError(StreamCondition.UNSUPPORTED_ENCODING, "XMPP streams are UTF-8")

    def _on_doctype(self, *args: object) -> None:
        raise _restricted("a DOCTYPE")

    def _on_entity_decl(self, *args: object) -> None:
        raise _restricted("an entity declaration")

    def _on_external_entity(self, *args: object) -> int:
        raise _restricted("an external entity")

    def _on_skipped_entity(self, *args: object) -> None:
        raise _restricted("an entity reference")

    def _on_processing_instruction(self, target: str, data: str) -> None:
        raise _restricted("a processing instruction")

    def _on_comment(self, data: str) -> None:
        raise _restricted("a comment")


# --- serializer ---------------------------------------------------------------

# (tag, namespace in scope) -> (open tag text, namespace for children, close tag)
_open_tags: dict[tuple[str, str], tuple[str, str, str]] = {}
# attribute key -> " name='" ; None for a namespaced attribute needing a prefix
_attr_names: dict[str, str | None] = {}


def _escape_text(text: str) -> str:
    if "&" in text:
        text = text.replace("&", "&amp;")
    if "<" in text:
        text = text.replace("<", "&lt;")
    if ">" in text:
        text = text.replace(">", "&gt;")
    if "\r" in text:  # a literal CR would be read back as LF
        text = text.replace("\r", "&#13;")
    return text


_ATTR_ESCAPES = str.maketrans(
    {
        "&": "&amp;",
        "<": "&lt;",
        ">": "&gt;",
        "'": "&apos;",
        '"': "&quot;",
        "\t": "&#9;",
        "\n": "&#10;",
        "\r": "&#13;",
    }
)
_ATTR_SPECIALS = frozenset("&<>'\"\t\n\r")


def _escape_attr(value: str) -> str:
    if _ATTR_SPECIALS.isdisjoint(value):
        return value
    return value.translate(_ATTR_ESCAPES)


def _open_tag(tag: str, scope_ns: str) -> tuple[str, str, str]:
    if tag[:1] == "{":
        namespace, _, local = tag[1:].partition("}")
    else:
        namespace, local = "", tag
    if namespace == STREAM_NS:  # the stream header binds this prefix
        entry = (f"<stream:{local}", scope_ns, f"</stream:{local}>")
    elif namespace == scope_ns:
        entry = (f"<{local}", namespace, f"</{local}>")
    else:
        entry = (f"<{local} xmlns='{_escape_attr(namespace)}'", namespace, f"</{local}>")
    if len(_open_tags) >= _CACHE_LIMIT:
        _open_tags.clear()
    _open_tags[(tag, scope_ns)] = entry
    return entry


def _attr_name(key: str) -> str | None:
    if key[:1] != "{":
        name: str | None = f" {key}='"
    elif key.startswith("{" + XML_NS + "}"):
        name = f" xml:{key[len(XML_NS) + 2 :]}='"
    else:
        name = None
    if len(_attr_names) >= _CACHE_LIMIT:
        _attr_names.clear()
    _attr_names[key] = name
    return name


def _write(element: ET.Element, scope_ns: str, parts: list[str]) -> None:
    tag = element.tag
    entry = _open_tags.get((tag, scope_ns)) or _open_tag(tag, scope_ns)
    parts.append(entry[0])
    attrib = element.attrib
    if attrib:
        prefixes = 0
        for key, value in attrib.items():
            name = _attr_names.get(key, "") or _attr_name(key)
            if name is None:  # rare: an attribute in a namespace of its own
                namespace, _, local = key[1:].partition("}")
                prefix = f"a{prefixes}"
                prefixes += 1
                parts.append(f" xmlns:{prefix}='{_escape_attr(namespace)}' {prefix}:{local}='")
            else:
                parts.append(name)
            parts.append(_escape_attr(value))
            parts.append("'")
    text = element.text
    if text or len(element):
        parts.append(">")
        if text:
            parts.append(_escape_text(text))
        child_ns = entry[1]
        for child in element:
            _write(child, child_ns, parts)
            if child.tail:
                parts.append(_escape_text(child.tail))
        parts.append(entry[2])
    else:
        parts.append("/>")


def serialize(element: ET.Element, parent_ns: str = "jabber:client") -> bytes:
    """`element` as UTF-8, for a place where `parent_ns` is the default namespace.

    Elements in the streams namespace are written with the `stream:` prefix the
    stream header declares; the element's own tail is not written.
    """
    parts: list[str] = []
    _write(element, parent_ns, parts)
    return "".join(parts).encode()


def stream_header(
    *,
    stream_id: str,
    from_domain: str,
    to: str | None,
    version: str = "1.0",
    lang: str = "en",
) -> bytes:
    to_attr = f" to='{_escape_attr(to)}'" if to is not None else ""
    return (
        f"<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
        f"xmlns:stream='{STREAM_NS}' id='{_escape_attr(stream_id)}' "
        f"from='{_escape_attr(from_domain)}'{to_attr} version='{_escape_attr(version)}' "
        f"xml:lang='{_escape_attr(lang)}'>"
    ).encode()


def stream_error(condition: StreamCondition, text: str = "", other_host: str = "") -> bytes:
    """`<stream:error>` (RFC 6120 §4.9); see-other-host carries the host as its text."""
    name = condition.value
    if condition is StreamCondition.SEE_OTHER_HOST and other_host:
        inner = f"<{name} xmlns='{STREAMS_NS}'>{_escape_text(other_host)}</{name}>"
    else:
        inner = f"<{name} xmlns='{STREAMS_NS}'/>"
    if text:
        inner += f"<text xmlns='{STREAMS_NS}'>{_escape_text(text)}</text>"
    return f"<stream:error>{inner}</stream:error>".encode()
