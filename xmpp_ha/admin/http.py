"""A small, strict HTTP/1.1 server for the admin RPC port (DESIGN §6).

Rules, in the order a request meets them:

- **One request per connection.** Every response carries `Connection: close`
  and the server closes after it. The admin API is polled once a second by one
  page and called now and then by the CLI; keep-alive would buy nothing and
  cost request-smuggling surface. Pipelined bytes after the first request are
  ignored.
- **Bounds.** Request line plus headers at most 16 KiB and 100 fields (431),
  lines end in CRLF; body at most 1 MiB (413), framed by `Content-Length` only
  (any `Transfer-Encoding` is 501). The whole request must arrive within
  10 s (408). Past `max_connections` open connections a new one gets 503.
- **Strict parsing** (`parse_head`, pure): request line `METHOD SP
  origin-form SP HTTP/1.x`, token header names, no obs-fold, no control
  characters, one Host (required for HTTP/1.1), one Content-Length of digits,
  unique query keys, path segments valid UTF-8 after percent-decoding. Anything
  else is 400 (505 for other HTTP versions).
- **Routing** (`Router`): unknown path 404; known path, other method 405 with
  `Allow`. Patterns match whole segments; `{name}` matches one non-empty
  percent-decoded segment; a literal segment beats a parameter.
- **Authorization**, decided before the body is read: an `auth=True` route
  needs `Authorization: Bearer <token>` (compared in constant time), else 401
  with `WWW-Authenticate: Bearer`. An `auth=False` route (read-only status,
  metrics, page) is served without a token only to a loopback peer that names
  a loopback host in `Host` (so a DNS-rebinding page cannot read it), else 403.
  A token that is presented is always checked: a wrong one is 401.
- **Handlers** get a `Request` and return a `Response`. `HTTPError` becomes
  `{"error": message}` with its status; any other exception becomes a generic
  500 and its traceback is logged. Nothing a client sends stops the server.

Error responses to requests that were not read in full are followed by a
short lingering close, so the client reads the answer instead of a reset.
Handlers run in the connection's task: a client that goes away does not
cancel an action half-done; `AdminServer.stop()` does cancel what is in
progress. HEAD and OPTIONS are not served (405 unless a route names them).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, unquote

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 16 * 1024  # request line + header fields + the blank line
MAX_HEADER_FIELDS = 100
MAX_BODY_BYTES = 1024 * 1024
READ_TIMEOUT = 10.0  # seconds for the whole request (and for writing the answer)
MAX_CONNECTIONS = 100
LINGER_SECONDS = 2.0  # after an early error: read what the client still sends
LINGER_BYTES = 2 * MAX_BODY_BYTES

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION = re.compile(rb"HTTP/([0-9])\.([0-9])")
_TARGET = re.compile(rb"/[\x21-\x7e]*")  # origin-form, visible ASCII only
_FIELD_VALUE_BAD = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # CTLs but HTAB
_DIGITS = re.compile(r"[0-9]{1,20}")
_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_BEARER_TOKEN = re.compile(r"[\x21-\x7e]+")
# Set by the server itself; a handler must not set them.
_RESERVED_HEADERS = frozenset({"content-length", "content-type", "connection", "date"})


class HTTPError(Exception):
    """An answer that is not a success: rendered as `{"error": message}`."""

    def __init__(
        self, status: int, message: str | None = None, headers: Mapping[str, str] | None = None
    ) -> None:
        if not 400 <= status <= 599:
            raise ValueError(f"HTTPError status must be 4xx or 5xx, got {status}")
        self.status = status
        self.message = message if message is not None else _phrase(status).lower()
        self.headers: dict[str, str] = dict(headers or {})
        super().__init__(status, self.message)

    def response(self) -> Response:
        response = Response.json({"error": self.message}, status=self.status)
        response.headers.update(self.headers)
        return response


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # as sent, still percent-encoded, without the query
    query: dict[str, str]  # decoded; each key at most once
    headers: dict[str, str]  # lower-case names; repeated fields joined with ", "
    body: bytes
    peer: str  # the client's IP address
    params: dict[str, str] = field(default_factory=dict)  # decoded path parameters

    def json(self) -> Any:
        """The body as JSON; None for an empty body; HTTPError(400) if it is not JSON."""
        if not self.body:
            return None
        try:
            return json.loads(self.body.decode("utf-8"), parse_constant=_reject_constant)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise HTTPError(400, f"request body is not valid JSON: {exc}") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, obj: Any, status: int = 200) -> Response:
        text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        return cls(status, text.encode("utf-8"), "application/json")

    @classmethod
    def text(
        cls, text: str, status: int = 200, content_type: str = "text/plain; charset=utf-8"
    ) -> Response:
        return cls(status, text.encode("utf-8"), content_type)

    @classmethod
    def html(cls, text: str, status: int = 200) -> Response:
        return cls(status, text.encode("utf-8"), "text/html; charset=utf-8")


Handler = Callable[[Request], Awaitable[Response]]


# --- parsing (pure) ---------------------------------------------------------


@dataclass(frozen=True)
class RequestHead:
    method: str
    path: str
    query: dict[str, str]
    version: tuple[int, int]
    headers: dict[str, str]


def parse_head(data: bytes, *, max_fields: int = MAX_HEADER_FIELDS) -> RequestHead:
    """Parse a request line and header fields, ending in CRLF CRLF. Raises HTTPError."""
    if not data.endswith(b"\r\n\r\n"):
        raise HTTPError(400, "request head must end with CRLF CRLF")
    lines = data[:-4].split(b"\r\n")
    method, path, query, version = _parse_request_line(lines[0])
    if len(lines) - 1 > max_fields:
        raise HTTPError(431, f"more than {max_fields} header fields")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, value = _parse_field(line)
        if name in headers:
            if name in ("host", "content-length", "authorization", "transfer-encoding"):
                raise HTTPError(400, f"repeated {name} header")
            headers[name] = f"{headers[name]}, {value}"
        else:
            headers[name] = value
    if version == (1, 1) and "host" not in headers:
        raise HTTPError(400, "HTTP/1.1 request without Host header")
    return RequestHead(method, path, query, version, headers)


def _parse_request_line(line: bytes) -> tuple[str, str, dict[str, str], tuple[int, int]]:
    parts = line.split(b" ")
    if len(parts) != 3:
        raise HTTPError(400, "malformed request line")
    method, target, version = parts
    if not _TOKEN.fullmatch(method):
        raise HTTPError(400, "malformed method")
    matched = _VERSION.fullmatch(version)
    if matched is None:
        raise HTTPError(400, "malformed HTTP version")
    major, minor = int(matched[1]), int(matched[2])
    if (major, minor) not in ((1, 0), (1, 1)):
        raise HTTPError(505, "only HTTP/1.0 and HTTP/1.1 are spoken here")
    if not _TARGET.fullmatch(target) or b"#" in target:
        raise HTTPError(400, "request target must be a path starting with '/'")
    raw_path, _, raw_query = target.decode("ascii").partition("?")
    return method.decode("ascii"), raw_path, _parse_query(raw_query), (major, minor)


def _parse_query(raw: str) -> dict[str, str]:
    if not raw:
        return {}
    try:
        pairs = parse_qsl(
            raw, keep_blank_values=True, strict_parsing=True, errors="strict", max_num_fields=100
        )
    except (ValueError, UnicodeDecodeError) as exc:
        raise HTTPError(400, f"malformed query string: {exc}") from None
    query: dict[str, str] = {}
    for key, value in pairs:
        if key in query:
            raise HTTPError(400, f"query parameter {key!r} given twice")
        query[key] = value
    return query


def _parse_field(line: bytes) -> tuple[str, str]:
    name, colon, value = line.partition(b":")
    if not colon:
        raise HTTPError(400, "header field without ':'")
    if not _TOKEN.fullmatch(name):  # also refuses obs-fold and space before ':'
        raise HTTPError(400, "malformed header field name")
    if _FIELD_VALUE_BAD.search(value):
        raise HTTPError(400, "control character in header field value")
    return name.decode("ascii").lower(), value.strip(b" \t").decode("latin-1")


def body_length(head: RequestHead, *, max_body: int = MAX_BODY_BYTES) -> int:
    """The body's length from the head's framing. Raises HTTPError."""
    if "transfer-encoding" in head.headers:
        raise HTTPError(501, "Transfer-Encoding is not supported: send Content-Length")
    raw = head.headers.get("content-length")
    if raw is None:
        return 0
    if not _DIGITS.fullmatch(raw):
        raise HTTPError(400, "malformed Content-Length")
    length = int(raw)
    if length > max_body:
        raise HTTPError(413, f"request body larger than {max_body} bytes")
    return length


def split_path(path: str) -> list[str]:
    """Percent-decoded segments of an absolute path: "/a/b%20c" -> ["a", "b c"]."""
    try:
        return [unquote(segment, errors="strict") for segment in path.split("/")[1:]]
    except UnicodeDecodeError:
        raise HTTPError(400, "path is not valid UTF-8 after percent-decoding") from None


def is_loopback(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address.partition("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def is_loopback_host(host: str | None) -> bool:
    """Whether a Host header names this machine's loopback (absent: HTTP/1.0, no browser)."""
    if host is None:
        return True
    if host.startswith("["):
        name, bracket, rest = host[1:].partition("]")
        if not bracket or (rest and not _port_suffix(rest)):
            return False
    else:
        name, colon, port = host.rpartition(":")
        if not colon:
            name = port
        elif not _port_suffix(":" + port):
            return False
    name = name.lower().rstrip(".")
    return name == "localhost" or name.endswith(".localhost") or is_loopback(name)


def _port_suffix(text: str) -> bool:
    return text.startswith(":") and _DIGITS.fullmatch(text[1:]) is not None


def serialize(response: Response) -> bytes:
    """The response on the wire. Raises ValueError on a header a handler may not set."""
    fields = {
        "Date": formatdate(usegmt=True),
        "Connection": "close",
        "Content-Type": response.content_type,
        "Content-Length": str(len(response.body)),
        "Cache-Control": "no-store",  # live state: never cache
        "X-Content-Type-Options": "nosniff",
    }
    defaults = {name.lower(): name for name in fields}
    for name, value in response.headers.items():
        key = name.lower()
        if not _TOKEN.fullmatch(name.encode("latin-1", "replace")):
            raise ValueError(f"malformed response header name {name!r}")
        if key in _RESERVED_HEADERS:
            raise ValueError(f"response header {name!r} is set by the server")
        try:
            encoded = value.encode("latin-1")
        except UnicodeEncodeError:
            raise ValueError(f"response header {name!r} is not Latin-1") from None
        if _FIELD_VALUE_BAD.search(encoded):
            raise ValueError(f"control character in response header {name!r}")
        fields.pop(defaults.get(key, ""), None)
        fields[name] = value
    lines = [f"HTTP/1.1 {response.status} {_phrase(response.status)}"]
    lines += [f"{name}: {value}" for name, value in fields.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace") + response.body


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


# --- routing ----------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    method: str
    pattern: str
    segments: tuple[str | None, ...]  # a literal, or None for a parameter
    names: tuple[str, ...]  # parameter names, in order
    handler: Handler
    auth: bool

    def match(self, segments: list[str]) -> dict[str, str] | None:
        if len(segments) != len(self.segments):
            return None
        values: list[str] = []
        for expected, actual in zip(self.segments, segments, strict=True):
            if expected is None:
                if not actual:
                    return None
                values.append(actual)
            elif expected != actual:
                return None
        return dict(zip(self.names, values, strict=True))

    @property
    def specificity(self) -> tuple[int, ...]:
        """Smaller is more specific: a literal segment beats a parameter."""
        return tuple(0 if segment is not None else 1 for segment in self.segments)


class Router:
    def __init__(self) -> None:
        self._routes: list[Route] = []

    def add(self, method: str, pattern: str, handler: Handler, *, auth: bool) -> None:
        """Route `method pattern` ("/services/{name}/stop") to `handler`."""
        if not _TOKEN.fullmatch(method.encode("ascii", "replace")) or method != method.upper():
            raise ValueError(f"malformed method {method!r}")
        if not pattern.startswith("/"):
            raise ValueError(f"route pattern must start with '/': {pattern!r}")
        segments: list[str | None] = []
        names: list[str] = []
        for part in pattern.split("/")[1:]:
            param = _PARAM.fullmatch(part)
            if param is not None:
                if param[1] in names:
                    raise ValueError(f"parameter {param[1]!r} twice in {pattern!r}")
                names.append(param[1])
                segments.append(None)
            elif "{" in part or "}" in part:
                raise ValueError(f"malformed parameter in route pattern {pattern!r}")
            else:
                segments.append(part)
        route = Route(method, pattern, tuple(segments), tuple(names), handler, auth)
        for other in self._routes:
            if other.method == method and other.segments == route.segments:
                raise ValueError(f"route {method} {pattern} clashes with {other.pattern}")
        self._routes.append(route)

    def resolve(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        """The most specific route for `method path`; HTTPError 404 or 405 if none."""
        segments = split_path(path)
        allowed: set[str] = set()
        best: tuple[Route, dict[str, str]] | None = None
        for route in self._routes:
            params = route.match(segments)
            if params is None:
                continue
            if route.method != method:
                allowed.add(route.method)
            elif best is None or route.specificity < best[0].specificity:
                best = (route, params)
        if best is not None:
            return best
        if allowed:
            raise HTTPError(
                405, f"method {method} not allowed here", {"Allow": ", ".join(sorted(allowed))}
            )
        raise HTTPError(404, f"no resource at {path}")


# --- the server (asyncio adapter) -------------------------------------------


class _PeerGone(Exception):
    """The client closed before sending anything: nobody to answer."""


class AdminServer:
    def __init__(
        self,
        router: Router,
        *,
        host: str,
        port: int,
        token: str,
        read_timeout: float = READ_TIMEOUT,
        max_header_bytes: int = MAX_HEADER_BYTES,
        max_body_bytes: int = MAX_BODY_BYTES,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        if not _BEARER_TOKEN.fullmatch(token):
            raise ValueError("the admin token must be non-empty visible ASCII without spaces")
        self._router = router
        self._host = host
        self._requested_port = port
        self._token = token.encode("ascii")
        self._read_timeout = read_timeout
        self._max_header_bytes = max_header_bytes
        self._max_body_bytes = max_body_bytes
        self._max_connections = max_connections
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[Any]] = set()
        self._stopping = False

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the admin server is not listening")
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("the admin server is already started")
        self._server = await asyncio.start_server(
            self._serve, self._host, self._requested_port, limit=self._max_header_bytes
        )
        log.info("admin API listening on %s port %d", self._host, self.port)

    async def stop(self) -> None:
        """Stop listening and end the connections in progress."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        self._stopping = True
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()
        self._stopping = False

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        peername = writer.get_extra_info("peername")
        peer = str(peername[0]) if isinstance(peername, tuple) else ""
        read_in_full = False
        try:
            if len(self._connections) > self._max_connections:
                response = HTTPError(503, "too many admin connections").response()
                response.headers["Retry-After"] = "1"
            else:
                try:
                    request, route = await self._read_request(reader, writer, peer)
                except HTTPError as error:
                    response = error.response()
                else:
                    read_in_full = True
                    response = await self._call(route, request)
            await self._send(writer, response)
            if not read_in_full:
                await self._linger(reader, writer)
        except _PeerGone:
            pass
        except asyncio.CancelledError:
            if not self._stopping:
                raise
            # stop() ended us: finish quietly (asyncio logs a cancelled connection task)
        except (ConnectionError, TimeoutError) as exc:
            log.debug("admin connection from %s ended: %r", peer, exc)
        except Exception:
            log.exception("admin connection from %s failed", peer)
        finally:
            self._connections.discard(task)
            writer.close()
            with suppress(ConnectionError, TimeoutError):
                await writer.wait_closed()

    async def _read_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str
    ) -> tuple[Request, Route]:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout_at(loop.time() + self._read_timeout):
                head = parse_head(await self._read_head(reader))
                route, params = self._router.resolve(head.method, head.path)
                self._authorize(route, head, peer)
                length = body_length(head, max_body=self._max_body_bytes)
                expect = head.headers.get("expect")
                if expect is not None:
                    if expect.lower() != "100-continue":
                        raise HTTPError(417, "only 'Expect: 100-continue' is understood")
                    if head.version == (1, 1) and length:
                        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                try:
                    body = await reader.readexactly(length)
                except asyncio.IncompleteReadError:
                    raise HTTPError(400, "request body shorter than Content-Length") from None
        except TimeoutError:
            raise HTTPError(408, "request not received in time") from None
        request = Request(head.method, head.path, head.query, head.headers, body, peer, params)
        return request, route

    async def _read_head(self, reader: asyncio.StreamReader) -> bytes:
        too_large = HTTPError(431, f"request head larger than {self._max_header_bytes} bytes")
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            raise too_large from None
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                raise _PeerGone from None
            raise HTTPError(400, "incomplete request head") from None
        if len(head) > self._max_header_bytes:
            raise too_large
        return head

    def _authorize(self, route: Route, head: RequestHead, peer: str) -> None:
        credentials = head.headers.get("authorization")
        if credentials is not None:
            scheme, _, token = credentials.partition(" ")
            presented = token.strip().encode("latin-1")
            if scheme.lower() != "bearer" or not hmac.compare_digest(presented, self._token):
                raise HTTPError(
                    401,
                    "invalid admin token",
                    {"WWW-Authenticate": 'Bearer realm="xmpp-ha", error="invalid_token"'},
                )
            return
        if route.auth:
            raise HTTPError(
                401,
                "this request needs the admin token: send 'Authorization: Bearer <token>'",
                {"WWW-Authenticate": 'Bearer realm="xmpp-ha"'},
            )
        if not is_loopback(peer):
            raise HTTPError(
                403,
                "read-only endpoints are served without a token to loopback clients only; "
                "send 'Authorization: Bearer <token>'",
            )
        if not is_loopback_host(head.headers.get("host")):
            raise HTTPError(403, "Host header does not name this machine's loopback address")

    async def _call(self, route: Route, request: Request) -> Response:
        try:
            response = await route.handler(request)
            if not isinstance(response, Response):
                raise TypeError(f"handler returned {type(response).__name__}, not Response")
            serialize(response)  # a malformed header is the handler's bug: 500 below
        except HTTPError as error:
            response = error.response()
        except Exception:
            log.exception("admin handler for %s %s failed", request.method, request.path)
            response = HTTPError(500, "internal server error").response()
        log.debug("%s %s %s -> %d", request.peer, request.method, request.path, response.status)
        return response

    async def _send(self, writer: asyncio.StreamWriter, response: Response) -> None:
        writer.write(serialize(response))
        async with asyncio.timeout(self._read_timeout):
            await writer.drain()

    async def _linger(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Half-close and drain the client's leftovers, so the answer is not lost to a reset."""
        with suppress(OSError, RuntimeError, TimeoutError):
            if writer.can_write_eof():
                writer.write_eof()
            async with asyncio.timeout(LINGER_SECONDS):
                drained = 0
                while drained < LINGER_BYTES:
                    chunk = await reader.read(64 * 1024)
                    if not chunk:
                        break
                    drained += len(chunk)
