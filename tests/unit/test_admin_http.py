"""The admin HTTP server over real sockets on port 0, its client, and the web page.

Independent peers: stdlib `http.client` in threads, raw bytes over asyncio
streams for what no polite client sends, and the page's own script run by
Node.js against a minimal DOM that refuses `innerHTML`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import http.client
import json
import logging
import re
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.unit.test_metrics import parse_exposition, sample_status
from xmpp_ha.admin.client import AdminAPIError, AdminClient, AdminUnreachable
from xmpp_ha.admin.http import (
    AdminServer,
    HTTPError,
    Request,
    Response,
    Router,
    is_loopback,
    is_loopback_host,
    parse_head,
)
from xmpp_ha.admin.metrics import CONTENT_TYPE, metrics_response
from xmpp_ha.admin.page import PagePaths, content_security_policy, page_response, render_page

TOKEN = "s3cret-Token_42"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def _echo(request: Request) -> Response:
    return Response.json(
        {
            "method": request.method,
            "path": request.path,
            "query": request.query,
            "params": request.params,
            "body": request.json(),
            "peer": request.peer,
            "content_type": request.headers.get("content-type"),
        }
    )


async def _status(request: Request) -> Response:
    return Response.json(sample_status())


async def _boom(request: Request) -> Response:
    raise RuntimeError("secret internals")


async def _conflict(request: Request) -> Response:
    raise HTTPError(409, "node n1 is Idle: failover is not allowed")


async def _not_a_response(request: Request) -> Response:
    return "oops"  # type: ignore[return-value]


async def _bad_header(request: Request) -> Response:
    return Response(headers={"X-Split": "a\r\nSet-Cookie: x=1"})


async def _metrics(request: Request) -> Response:
    return metrics_response(sample_status())


async def _page(request: Request) -> Response:
    return page_response()


def make_router() -> Router:
    router = Router()
    router.add("GET", "/", _page, auth=False)
    router.add("GET", "/status", _status, auth=False)
    router.add("GET", "/metrics", _metrics, auth=False)
    router.add("POST", "/services/{name}/stop", _echo, auth=True)
    router.add("POST", "/nodes/{node}/services/{service}/{op}", _echo, auth=True)
    router.add("GET", "/groups/{name}", _echo, auth=True)
    router.add("GET", "/groups/current", _status, auth=True)
    router.add("DELETE", "/groups/{name}", _echo, auth=True)
    router.add("PUT", "/echo", _echo, auth=True)
    router.add("POST", "/echo", _echo, auth=True)
    router.add("GET", "/boom", _boom, auth=True)
    router.add("POST", "/conflict", _conflict, auth=True)
    router.add("GET", "/not-a-response", _not_a_response, auth=True)
    router.add("GET", "/bad-header", _bad_header, auth=True)
    return router


@pytest.fixture
async def server() -> AsyncIterator[AdminServer]:
    admin = AdminServer(make_router(), host="127.0.0.1", port=0, token=TOKEN, read_timeout=0.5)
    await admin.start()
    yield admin
    await admin.stop()


# --- helpers ----------------------------------------------------------------------


class Reply:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)


def _request(
    port: int,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    host: str = "127.0.0.1",
) -> Reply:
    connection = http.client.HTTPConnection(host, port, timeout=5)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        data = response.read()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, data)
    finally:
        connection.close()


async def call(
    port: int,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    host: str = "127.0.0.1",
) -> Reply:
    return await asyncio.to_thread(_request, port, method, path, headers, body, host)


def parse_reply(data: bytes) -> Reply:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Reply(status, headers, body)


async def raw(port: int, data: bytes, *, timeout: float = 5.0) -> bytes:
    """Send bytes, half-close nothing, read until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(timeout):
            return await reader.read(-1)
    finally:
        writer.close()


async def raw_reply(port: int, data: bytes) -> Reply:
    return parse_reply(await raw(port, data))


def get(path: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n".encode("latin-1")


# --- routing and parameters -------------------------------------------------------


async def test_status_is_compact_json(server: AdminServer) -> None:
    reply = await call(server.port, "GET", "/status")
    assert reply.status == 200
    assert reply.headers["content-type"] == "application/json"
    assert reply.headers["connection"] == "close"
    assert reply.headers["cache-control"] == "no-store"
    assert reply.json() == sample_status()
    compact = json.dumps(sample_status(), separators=(",", ":"), ensure_ascii=False)
    assert reply.body == compact.encode("utf-8")


async def test_path_params_are_decoded(server: AdminServer) -> None:
    reply = await call(
        server.port, "POST", "/services/client%20listener/stop?force=yes&why=a%26b", AUTH
    )
    assert reply.status == 200
    assert reply.json() == {
        "method": "POST",
        "path": "/services/client%20listener/stop",
        "query": {"force": "yes", "why": "a&b"},
        "params": {"name": "client listener"},
        "body": None,
        "peer": "127.0.0.1",
        "content_type": None,
    }
    path = AdminClient.path("nodes", "n/1", "services", "sync agent", "start")
    assert path == "/nodes/n%2F1/services/sync%20agent/start"
    reply = await call(server.port, "POST", path, AUTH)
    assert reply.json()["params"] == {"node": "n/1", "service": "sync agent", "op": "start"}


async def test_literal_segment_beats_parameter(server: AdminServer) -> None:
    assert (await call(server.port, "GET", "/groups/current", AUTH)).json() == sample_status()
    reply = await call(server.port, "GET", "/groups/g%C3%A9", AUTH)
    assert reply.json()["params"] == {"name": "gé"}
    # only the parameter route has DELETE
    reply = await call(server.port, "DELETE", "/groups/current", AUTH)
    assert reply.json()["params"] == {"name": "current"}


async def test_unknown_path_is_404(server: AdminServer) -> None:
    for path in ("/nope", "/status/", "//status", "/services//stop", "/services/x/stop/more"):
        reply = await call(server.port, "GET", path)
        assert reply.status == 404, path
        assert reply.json() == {"error": f"no resource at {path}"}


async def test_wrong_method_is_405_with_allow(server: AdminServer) -> None:
    reply = await call(server.port, "DELETE", "/echo", AUTH)
    assert reply.status == 405
    assert reply.headers["allow"] == "POST, PUT"
    assert "DELETE" in reply.json()["error"]
    reply = await call(server.port, "POST", "/groups/current", AUTH)
    assert reply.status == 405 and reply.headers["allow"] == "DELETE, GET"


async def test_json_body(server: AdminServer) -> None:
    body = json.dumps({"name": "gé", "n": [1, 2]}).encode()
    headers = {**AUTH, "Content-Type": "application/json"}
    reply = await call(server.port, "PUT", "/echo", headers, body)
    assert reply.json()["body"] == {"name": "gé", "n": [1, 2]}
    for bad in (b"{", b"\xff", b"[NaN]", b"[" * 100_000):
        reply = await call(server.port, "POST", "/echo", headers, bad)
        assert reply.status == 400
        assert reply.json()["error"].startswith("request body is not valid JSON")


def test_response_helpers() -> None:
    assert Response.json({"é": [1, None]}).body == '{"é":[1,null]}'.encode()
    text = Response.text("hi", status=201)
    assert (text.status, text.body, text.content_type) == (201, b"hi", "text/plain; charset=utf-8")
    assert Response.html("<p>").content_type == "text/html; charset=utf-8"
    assert HTTPError(404).message == "not found"
    with pytest.raises(ValueError):
        HTTPError(200)


def test_router_refuses_bad_patterns() -> None:
    router = Router()
    router.add("GET", "/a/{x}", _echo, auth=False)
    with pytest.raises(ValueError, match="clashes"):
        router.add("GET", "/a/{y}", _echo, auth=False)
    router.add("POST", "/a/{y}", _echo, auth=False)
    for pattern in ("a/b", "/a/{x}/{x}", "/a/{1x}", "/a/b{x}"):
        with pytest.raises(ValueError):
            router.add("GET", pattern, _echo, auth=False)
    with pytest.raises(ValueError, match="method"):
        router.add("get", "/b", _echo, auth=False)


# --- authorization ----------------------------------------------------------------


async def test_token_required_for_auth_routes(server: AdminServer) -> None:
    reply = await call(server.port, "POST", "/echo")
    assert reply.status == 401
    assert reply.headers["www-authenticate"] == 'Bearer realm="xmpp-ha"'
    assert "Authorization: Bearer" in reply.json()["error"]
    for wrong in ("Bearer nope", f"Basic {TOKEN}", f"Bearer {TOKEN}x", "Bearer", "Bearer é"):
        reply = await call(server.port, "POST", "/echo", {"Authorization": wrong})
        assert reply.status == 401, wrong
        assert "invalid_token" in reply.headers["www-authenticate"]
        assert reply.json() == {"error": "invalid admin token"}
    for right in (f"Bearer {TOKEN}", f"bearer {TOKEN}", f"Bearer  {TOKEN} "):
        assert (await call(server.port, "POST", "/echo", {"Authorization": right})).status == 200


async def test_read_only_routes_on_loopback(server: AdminServer) -> None:
    assert (await call(server.port, "GET", "/status")).status == 200
    assert (await call(server.port, "GET", "/status", AUTH)).status == 200
    # a token that is presented is checked
    reply = await call(server.port, "GET", "/status", {"Authorization": "Bearer wrong"})
    assert reply.status == 401
    # DNS rebinding: a loopback peer, but a browser that thinks it talks to evil.example
    reply = await call(server.port, "GET", "/status", {"Host": "evil.example:80"})
    assert reply.status == 403
    assert "Host" in reply.json()["error"]
    assert (await call(server.port, "GET", "/status", {"Host": "localhost:1"})).status == 200
    reply = await call(server.port, "GET", "/status", {**AUTH, "Host": "evil.example"})
    assert reply.status == 200


def test_loopback_rules() -> None:
    for address in ("127.0.0.1", "127.9.8.7", "::1", "::ffff:127.0.0.1"):
        assert is_loopback(address), address
    for address in ("192.0.2.2", "::ffff:192.0.2.2", "fd00::2", "", "localhost", "junk"):
        assert not is_loopback(address), address
    for host in (None, "localhost", "LOCALHOST:20075", "localhost.", "app.localhost:8",
                 "127.0.0.1", "127.0.0.1:20075", "[::1]", "[::1]:20075"):  # fmt: skip
        assert is_loopback_host(host), host
    for host in ("evil.example", "evil.example:80", "192.0.2.2:20075", "[fd00::2]:1",
                 "localhost:x", "[::1", "[::1]x", "localhost.evil.example", ""):  # fmt: skip
        assert not is_loopback_host(host), host


def test_server_refuses_weak_tokens() -> None:
    for token in ("", "has space", "tab\t", "é"):
        with pytest.raises(ValueError, match="admin token"):
            AdminServer(Router(), host="127.0.0.1", port=0, token=token)


# --- malformed requests -----------------------------------------------------------


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /status\r\nHost: x\r\n\r\n", 400),
        (b"GET  /status HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GE(T /status HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET /status HTTP/1.1\r\n\r\n", 400),  # no Host
        (b"GET /status HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET /status HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n  folded\r\n\r\n", 400),
        (b"GET /status HTTP/1.1\r\nHost: x\r\nX-A : 1\r\n\r\n", 400),
        (b"GET /status HTTP/1.1\r\nHost: x\r\nNoColon\r\n\r\n", 400),
        (b"GET /status HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n", 400),
        (b"GET /status HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n", 400),
        (b"GET /status HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\n", 400),
        (b"GET /status HTTP/1.1\r\nHost: x\r\nContent-Length: \xb2\r\n\r\n", 400),
        (b"GET /status HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n", 400),
        (b"GET http://x/status HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET * HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET /st\xc3\xa9 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET /status#frag HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (
            b"GET /groups/%FF HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + TOKEN.encode()
            + b"\r\n\r\n",
            400,
        ),
        (b"GET /status?a=1&a=2 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET /status?a=%FF HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET /status HTTP/1.x\r\nHost: x\r\n\r\n", 400),
        (b"GET /status HTTP/2.0\r\nHost: x\r\n\r\n", 505),
        (b"GET /status HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 501),
        (b"GET /status HTTP/1.1\r\nHost: x\r\nExpect: 200-ok\r\n\r\n", 417),
        (b"GET /status HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nab", 400),  # then EOF
    ],
)
async def test_malformed_requests(server: AdminServer, request_bytes: bytes, status: int) -> None:
    request_bytes = request_bytes.replace(b"Host: x\r\n", b"Host: 127.0.0.1\r\n")
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(request_bytes)
    if status == 400 and request_bytes.endswith(b"ab"):
        writer.write_eof()
    await writer.drain()
    async with asyncio.timeout(5):
        reply = parse_reply(await reader.read(-1))
    writer.close()
    assert reply.status == status, reply.body
    assert reply.headers["content-type"] == "application/json"
    assert isinstance(json.loads(reply.body)["error"], str)


async def test_http_1_0_needs_no_host(server: AdminServer) -> None:
    reply = await raw_reply(server.port, b"GET /status HTTP/1.0\r\n\r\n")
    assert reply.status == 200
    assert json.loads(reply.body)["group"]["name"] == "g1"


def test_parse_head_joins_repeated_fields() -> None:
    head = parse_head(b"GET /a?x=1 HTTP/1.1\r\nHost: h\r\nX-A: 1\r\nx-a:\t2 \r\n\r\n")
    assert head.headers == {"host": "h", "x-a": "1, 2"}
    assert (head.method, head.path, head.query, head.version) == ("GET", "/a", {"x": "1"}, (1, 1))
    with pytest.raises(HTTPError) as caught:
        parse_head(b"GET / HTTP/1.1\r\nHost: h\r\n" + b"X: 1\r\n" * 100 + b"\r\n")
    assert caught.value.status == 431


async def test_request_timeout_is_408(server: AdminServer) -> None:
    started = time.monotonic()
    reply = parse_reply(await raw(server.port, b"GET /status HTTP/1.1\r\nHost: x\r\n"))
    assert reply.status == 408
    assert 0.4 < time.monotonic() - started < 3
    # a slow body counts against the same deadline
    head = b"POST /echo HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n" % TOKEN.encode()
    reply = parse_reply(await raw(server.port, head + b"Content-Length: 10\r\n\r\n{}"))
    assert reply.status == 408
    # bare LF line ends are not HTTP/1.1: the head never ends
    reply = parse_reply(await raw(server.port, b"GET /status HTTP/1.1\nHost: x\n\n"))
    assert reply.status == 408


async def test_closed_without_a_byte_gets_no_answer(server: AdminServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write_eof()
    async with asyncio.timeout(2):
        assert await reader.read(-1) == b""
    writer.close()


async def test_body_limit_is_413(server: AdminServer) -> None:
    head = f"POST /echo HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
    reply = await raw_reply(server.port, (head + "Content-Length: 1048577\r\n\r\n").encode())
    assert reply.status == 413
    assert "1048576" in json.loads(reply.body)["error"]
    # exactly 1 MiB is fine, even from a client that sends it all at once
    body = json.dumps("x" * (1024 * 1024 - 2)).encode()
    assert len(body) == 1024 * 1024
    reply = await call(server.port, "POST", "/echo", {**AUTH, "Content-Type": "x"}, body)
    assert reply.status == 200 and len(reply.json()["body"]) == 1024 * 1024 - 2


async def test_body_of_an_unauthorized_request_is_not_read(server: AdminServer) -> None:
    # the answer comes before the 1 MiB body is sent, and arrives intact
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1048576\r\n\r\n")
    async with asyncio.timeout(2):
        head = parse_reply(await reader.readuntil(b"\r\n\r\n"))
        body = await reader.readexactly(int(head.headers["content-length"]))
    assert head.status == 401 and b"Bearer" in body
    writer.write(b"x" * 1048576)  # read and dropped by the lingering close
    async with asyncio.timeout(5):
        await writer.drain()
        writer.write_eof()
        assert await reader.read(-1) == b""
    writer.close()


async def test_header_section_limit_is_431(server: AdminServer) -> None:
    def head_of(size: int) -> bytes:
        start = b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: "
        data = start + b"a" * (size - len(start) - 4) + b"\r\n\r\n"
        assert len(data) == size
        return data

    assert (await raw_reply(server.port, head_of(16 * 1024))).status == 200
    assert (await raw_reply(server.port, head_of(16 * 1024 + 1))).status == 431
    reply = await raw_reply(server.port, head_of(64 * 1024))
    assert reply.status == 431
    assert json.loads(reply.body) == {"error": "request head larger than 16384 bytes"}


async def test_expect_100_continue(server: AdminServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(
        f"POST /echo HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        "Expect: 100-continue\r\nContent-Length: 7\r\n\r\n".encode()
    )
    async with asyncio.timeout(2):
        assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b'"hello"')
        reply = parse_reply(await reader.read(-1))
    writer.close()
    assert reply.status == 200 and json.loads(reply.body)["body"] == "hello"


async def test_one_request_per_connection(server: AdminServer) -> None:
    data = await raw(server.port, get("/status") + get("/nope"))
    assert data.count(b"HTTP/1.1 ") == 1
    assert parse_reply(data).status == 200


# --- handler failures -------------------------------------------------------------


async def test_handler_exception_is_500_and_logged(
    server: AdminServer, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="xmpp_ha.admin.http"):
        reply = await call(server.port, "GET", "/boom", AUTH)
    assert reply.status == 500
    assert reply.json() == {"error": "internal server error"}
    assert b"secret" not in reply.body
    assert any(
        record.exc_info and "secret internals" in str(record.exc_info[1])
        for record in caplog.records
    )
    for path in ("/not-a-response", "/bad-header"):
        reply = await call(server.port, "GET", path, AUTH)
        assert reply.status == 500, path
        assert "set-cookie" not in reply.headers
    assert (await call(server.port, "GET", "/status")).status == 200  # still serving


async def test_handler_http_error(server: AdminServer) -> None:
    reply = await call(server.port, "POST", "/conflict", AUTH)
    assert reply.status == 409
    assert reply.json() == {"error": "node n1 is Idle: failover is not allowed"}


# --- concurrency and lifecycle ----------------------------------------------------


async def test_concurrent_requests() -> None:
    clients = 20
    barrier = asyncio.Barrier(clients)

    async def wait_for_all(request: Request) -> Response:
        await barrier.wait()  # deadlocks unless every request is handled at once
        return Response.json({"n": request.query["n"]})

    router = Router()
    router.add("GET", "/wait", wait_for_all, auth=False)
    admin = AdminServer(router, host="127.0.0.1", port=0, token=TOKEN)
    await admin.start()
    try:
        # a stalled client holds a connection without stopping anyone else
        _stalled_reader, stalled = await asyncio.open_connection("127.0.0.1", admin.port)
        stalled.write(b"GET /wait HTTP/1.1\r\n")
        async with asyncio.timeout(5):
            replies = await asyncio.gather(
                *(raw_reply(admin.port, get(f"/wait?n={n}")) for n in range(clients))
            )
        assert [json.loads(reply.body)["n"] for reply in replies] == [
            str(n) for n in range(clients)
        ]
        stalled.close()
    finally:
        await admin.stop()


async def test_connection_limit_is_503() -> None:
    admin = AdminServer(make_router(), host="127.0.0.1", port=0, token=TOKEN, max_connections=2)
    await admin.start()
    try:
        held = [await asyncio.open_connection("127.0.0.1", admin.port) for _ in range(2)]
        await asyncio.sleep(0.05)
        reply = await raw_reply(admin.port, get("/status"))
        assert reply.status == 503 and reply.headers["retry-after"] == "1"
        for _, writer in held:
            writer.close()
        await asyncio.sleep(0.05)
        assert (await raw_reply(admin.port, get("/status"))).status == 200
    finally:
        await admin.stop()


async def test_stop_ends_open_connections_and_frees_the_port() -> None:
    admin = AdminServer(make_router(), host="127.0.0.1", port=0, token=TOKEN)
    with pytest.raises(RuntimeError):
        _ = admin.port
    await admin.start()
    port = admin.port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /status HTTP/1.1\r\n")  # in progress
    await asyncio.sleep(0.05)
    async with asyncio.timeout(2):
        await admin.stop()
        assert await reader.read(-1) == b""
    await admin.stop()  # idempotent
    writer.close()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)


# --- metrics and page through the server -------------------------------------------


async def test_metrics_route(server: AdminServer) -> None:
    reply = await call(server.port, "GET", "/metrics")
    assert reply.headers["content-type"] == CONTENT_TYPE
    families = parse_exposition(reply.body.decode())
    assert families["xmpp_ha_jsm_sessions_client"]["samples"] == [({"node": "n1"}, 3.0)]


async def test_page_route_and_csp(server: AdminServer) -> None:
    reply = await call(server.port, "GET", "/")
    assert reply.status == 200
    assert reply.headers["content-type"] == "text/html; charset=utf-8"
    page = reply.body.decode()
    assert page == render_page()
    csp = reply.headers["content-security-policy"]
    assert csp == content_security_policy()
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    for tag in ("script", "style"):
        inline = re.search(f"<{tag}>(.*?)</{tag}>", page, re.S)
        assert inline is not None
        digest = base64.b64encode(hashlib.sha256(inline[1].encode()).digest()).decode()
        assert f"{tag}-src 'sha256-{digest}'" in csp
    assert reply.headers["x-frame-options"] == "DENY"


# --- the client -------------------------------------------------------------------


async def test_client_against_the_server(server: AdminServer) -> None:
    client = AdminClient("127.0.0.1", server.port, TOKEN)
    assert await asyncio.to_thread(client.get, "/status") == sample_status()
    echoed = await asyncio.to_thread(client.post, "/echo", {"a": "é"})
    assert echoed["body"] == {"a": "é"} and echoed["content_type"] == "application/json"
    assert (await asyncio.to_thread(client.put, "/echo"))["body"] is None
    assert (await asyncio.to_thread(client.delete, "/groups/g1"))["params"] == {"name": "g1"}
    metrics = await asyncio.to_thread(client.get, "/metrics")
    assert isinstance(metrics, str) and "xmpp_ha_node_state" in metrics
    path = AdminClient.path("services", "sync agent", "stop", query={"why": "test & see"})
    echoed = await asyncio.to_thread(client.post, path)
    assert echoed["params"] == {"name": "sync agent"} and echoed["query"] == {"why": "test & see"}


async def test_client_errors_carry_the_server_message(server: AdminServer) -> None:
    client = AdminClient("127.0.0.1", server.port, TOKEN)
    with pytest.raises(AdminAPIError) as caught:
        await asyncio.to_thread(client.post, "/conflict")
    assert caught.value.status == 409
    assert caught.value.message == "node n1 is Idle: failover is not allowed"
    assert str(caught.value) == "admin API error 409: node n1 is Idle: failover is not allowed"
    with pytest.raises(AdminAPIError) as caught:
        await asyncio.to_thread(client.get, "/nope")
    assert caught.value.status == 404
    anonymous = AdminClient("127.0.0.1", server.port, None)
    with pytest.raises(AdminAPIError) as caught:
        await asyncio.to_thread(anonymous.post, "/echo")
    assert caught.value.status == 401 and "Bearer" in caught.value.message
    wrong = AdminClient("127.0.0.1", server.port, "wrong")
    with pytest.raises(AdminAPIError, match="invalid admin token"):
        await asyncio.to_thread(wrong.get, "/status")
    with pytest.raises(ValueError):
        client.get("status")


def test_client_unreachable() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(AdminUnreachable) as caught:
        AdminClient("127.0.0.1", port, TOKEN).get("/status")
    assert caught.value.port == port
    message = str(caught.value)
    assert message.startswith(f"cannot reach the admin API at 127.0.0.1:{port}: connection refused")
    assert "HA enabled" in message
    with pytest.raises(AdminUnreachable, match=r"\[::1\]:"):
        AdminClient("::1", port, None).get("/status")


def test_client_timeout() -> None:
    with socket.socket() as silent:  # accepts (backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        client = AdminClient("127.0.0.1", silent.getsockname()[1], TOKEN, timeout=0.3)
        with pytest.raises(AdminUnreachable, match="no answer within 0.3 s"):
            client.get("/status")
        with pytest.raises(AdminUnreachable, match="may still be carried out"):
            client.post("/nodes/n1/failover")


# --- the page ---------------------------------------------------------------------


def test_page_is_self_contained_and_uses_text_content() -> None:
    page = render_page()
    assert page.startswith("<!DOCTYPE html>")
    script = re.search(r"<script>(.*?)</script>", page, re.S)
    assert script is not None
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
                 "new Function", "setAttribute", ".src", ".href", "javascript:"):  # fmt: skip
        assert sink not in page, sink
    assert script[1].count(".textContent =") >= 20
    assert "encodeURIComponent" in script[1]
    # no external assets, no absolute URLs
    assert not re.search(r"(src|href)\s*=", page)
    assert "http://" not in page and "https://" not in page and "@import" not in page
    assert page.count("<script") == 1 and page.count("<style") == 1
    # what it offers and where it goes
    for word in ('"failover"', '"fallback"', '"recovery"', "allowed_actions", "sessionStorage",
                 '"Authorization"', '"Bearer "', "ActiveJsmSessions", "recommended_action"):  # fmt: skip
        assert word in page, word


def test_page_paths_are_relative_and_complete() -> None:
    assert '"status":"status"' in render_page()
    custom = render_page(PagePaths(action="api/{node}/{action}"))
    assert '"action":"api/{node}/{action}"' in custom
    with pytest.raises(ValueError, match="relative"):
        PagePaths(status="/status")
    with pytest.raises(ValueError, match="relative"):
        PagePaths(status="https://evil.example/status")
    with pytest.raises(ValueError, match="exactly"):
        PagePaths(action="nodes/{node}/failover")
    with pytest.raises(ValueError, match="exactly"):
        PagePaths(service="nodes/{node}/{service}/{op}/{extra}")


_HARNESS = r"""
"use strict";
const fs = require("fs");
const vm = require("vm");
const script = fs.readFileSync(process.argv[2], "utf8");
const scenario = JSON.parse(fs.readFileSync(process.argv[3], "utf8"));

class Element {
  constructor(tag, id) {
    Object.assign(this, { tagName: tag, id: id || "", children: [], parent: null, ownText: "",
                          className: "", hidden: false, disabled: false, type: "", listeners: {} });
  }
  get textContent() { return this.ownText + this.children.map((c) => c.textContent).join(""); }
  set textContent(value) { this.replaceChildren(); this.ownText = String(value); }
  appendChild(child) {
    if (child.parent) { child.parent.children.splice(child.parent.children.indexOf(child), 1); }
    child.parent = this; this.children.push(child); return child;
  }
  replaceChildren(...nodes) {
    for (const child of this.children) { child.parent = null; }
    this.children = []; this.ownText = "";
    for (const node of nodes) { this.appendChild(node); }
  }
  addEventListener(type, fn) { (this.listeners[type] = this.listeners[type] || []).push(fn); }
  click() { for (const fn of this.listeners.click || []) { fn({}); } }
}
for (const sink of ["innerHTML", "outerHTML"]) {
  Object.defineProperty(Element.prototype, sink, {
    get() { throw new Error(sink + " used"); }, set() { throw new Error(sink + " used"); } });
}
Element.prototype.insertAdjacentHTML = function () { throw new Error("insertAdjacentHTML used"); };

const ids = {};
const storage = new Map();
const requests = [];
const questions = [];
let prompts = 0;
let timers = new Map();
let nextTimer = 1;
const statusQueue = scenario.statuses.slice();
const postQueue = scenario.posts.slice();

function reply(spec) {
  return Promise.resolve({ ok: spec.status >= 200 && spec.status < 300, status: spec.status,
                           statusText: "", text: () => Promise.resolve(spec.body) });
}
const context = {
  document: {
    getElementById: (id) => ids[id] || (ids[id] = new Element("div", id)),
    createElement: (tag) => new Element(tag),
  },
  sessionStorage: {
    getItem: (key) => (storage.has(key) ? storage.get(key) : null),
    setItem: (key, value) => storage.set(key, String(value)),
    removeItem: (key) => storage.delete(key),
  },
  fetch: (url, options) => {
    requests.push({ url: url, method: options.method, headers: options.headers });
    if (options.method === "GET") {
      const spec = statusQueue.shift();
      return spec.status === 0 ? Promise.reject(new TypeError("Failed to fetch")) : reply(spec);
    }
    return reply(postQueue.shift());
  },
  setTimeout: (fn, ms) => { const id = nextTimer++; timers.set(id, { fn: fn, ms: ms }); return id; },
  clearTimeout: (id) => timers.delete(id),
  prompt: () => { prompts += 1; return scenario.token; },
  confirm: (question) => { questions.push(question); return true; },
  AbortController: AbortController,
};
vm.createContext(context);
for (const id of ["conn-error", "action-result"]) {  // hidden in the page's HTML
  context.document.getElementById(id).hidden = true;
}

function visible(element) {
  for (let at = element; at; at = at.parent) { if (at.hidden) { return false; } }
  return true;
}
function walk(element, out) {
  out.push(element);
  for (const child of element.children) { walk(child, out); }
  return out;
}
function snapshot() {
  const cards = ids.nodes.children.map((card) => {
    const all = walk(card, []).filter(visible);
    return {
      texts: all.filter((e) => e.ownText).map((e) => e.ownText),
      buttons: all.filter((e) => e.tagName === "button")
                  .map((e) => ({ text: e.textContent, disabled: e.disabled })),
    };
  });
  const banner = (id) => ({ shown: !ids[id].hidden, kind: ids[id].className,
                            text: ids[id].textContent });
  const group = {};
  for (const id of ["group-name", "group-description", "group-nodes", "group-ha", "group-mode"]) {
    group[id] = ids[id].textContent;
  }
  return { group: group, cards: cards, conn: banner("conn-error"),
           action: banner("action-result") };
}
function findButton(cardIndex, text) {
  const card = ids.nodes.children[cardIndex];
  return walk(card, []).filter((e) => e.tagName === "button" && e.textContent === text
                               && visible(e))[0];
}
async function settle() { for (let i = 0; i < 20; i++) { await new Promise((r) => setImmediate(r)); } }
function tick() {  // fire the pending poll timer
  const due = [...timers.entries()].filter(([, t]) => t.ms === 1000);
  for (const [id, t] of due) { timers.delete(id); t.fn(); }
}

(async () => {
  const out = { snapshots: [] };
  vm.runInContext(script, context);
  await settle();
  out.snapshots.push(snapshot());
  findButton(0, "Failover").click();
  await settle();
  out.snapshots.push(snapshot());
  findButton(0, "Stop").click();
  await settle();
  out.snapshots.push(snapshot());
  tick(); await settle();
  out.snapshots.push(snapshot());
  tick(); await settle();
  out.snapshots.push(snapshot());
  tick(); await settle();
  out.snapshots.push(snapshot());
  out.requests = requests;
  out.questions = questions;
  out.prompts = prompts;
  out.token = storage.get("xmpp-ha-admin-token") || null;
  process.stdout.write(JSON.stringify(out));
})().catch((error) => { process.stderr.write(String(error.stack)); process.exit(1); });
"""


def _texts(card: dict[str, Any]) -> list[str]:
    return list(card["texts"])


def test_page_script_renders_and_acts(tmp_path: Path) -> None:
    node_binary = shutil.which("node") or shutil.which("nodejs")
    if node_binary is None:
        pytest.skip("Node.js is not installed")
    hostile = '<img src=x onerror="alert(1)">'
    first = sample_status()
    first["group"]["description"] = hostile
    first["node"]["recommended_action"] = hostile
    assert first["peer"] is not None
    first["peer"]["state"] = "Running in Backup Mode"
    first["peer"]["allowed_actions"] = []
    second = sample_status(state="Idle", reason="On Admin Request", allowed_actions=["fallback"])
    second["node"]["services"]["client listener"] = False
    second["peer"] = None
    second["group"]["nodes"] = ["n2", "n1"]
    scenario = {
        "token": TOKEN,
        "statuses": [
            {"status": 200, "body": json.dumps(first)},
            {"status": 200, "body": json.dumps(second)},
            {"status": 503, "body": json.dumps({"error": "store <down>"})},
            {"status": 0, "body": ""},
        ],
        "posts": [
            {"status": 409, "body": json.dumps({"error": "peer not ready <b>now</b>"})},
            {"status": 200, "body": json.dumps({"message": "client listener stopped"})},
        ],
    }
    (tmp_path / "harness.js").write_text(_HARNESS)
    script = re.search(r"<script>(.*?)</script>", render_page(), re.S)
    assert script is not None
    (tmp_path / "page.js").write_text(script[1])
    (tmp_path / "scenario.json").write_text(json.dumps(scenario))
    done = subprocess.run(
        [node_binary, "harness.js", "page.js", "scenario.json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    initial, after_failover, after_stop, idle, failing, unreachable = out["snapshots"]

    # the group and both nodes, hostile text shown as text
    assert initial["group"] == {
        "group-name": "g1",
        "group-description": hostile,
        "group-nodes": "n1, n2",
        "group-ha": "On",
        "group-mode": "balanced",
    }
    local, peer = initial["cards"]
    assert hostile in _texts(local)
    for text in ("n1", "Normal", "Reason: Normal", "127.0.0.1", "5222", "20075", "22001",
                 "connected", "ActiveJsmSessions", "3", "client listener", "running"):  # fmt: skip
        assert text in _texts(local), text
    assert [b["text"] for b in local["buttons"]] == ["Failover"] + ["Stop"] * 7
    assert not any(b["disabled"] for b in local["buttons"])
    assert "Running in Backup Mode" in _texts(peer) and "n2" in _texts(peer)
    assert [b["text"] for b in peer["buttons"]] == ["Stop"] * 7
    assert "No action is offered in this state." in _texts(peer)
    assert not initial["conn"]["shown"] and not initial["action"]["shown"]

    # failover: confirmed, token asked once, POSTed with the bearer token, error shown
    status_get, failover, stop = out["requests"][:3]
    assert status_get == {
        "url": "status",
        "method": "GET",
        "headers": {"Accept": "application/json"},
    }
    assert failover["url"] == "nodes/n1/failover" and failover["method"] == "POST"
    assert failover["headers"]["Authorization"] == f"Bearer {TOKEN}"
    assert out["questions"][0].startswith("Fail over node n1?")
    assert after_failover["action"] == {
        "shown": True,
        "kind": "banner error",
        "text": "Failover of n1 failed: HTTP 409: peer not ready <b>now</b>",
    }
    assert out["prompts"] == 1 and out["token"] == TOKEN
    # service stop: the service name is URL-encoded, the token is reused
    assert stop["url"] == "nodes/n1/services/client%20listener/stop"
    assert stop["headers"]["Authorization"] == f"Bearer {TOKEN}"
    assert after_stop["action"]["kind"] == "banner ok"
    assert after_stop["action"]["text"] == "Stop client listener on n1: client listener stopped"

    # next poll: Idle offers Fallback only; the stopped service offers Start; peer missing
    peer_card, local_card = idle["cards"]  # group order: n2 first
    assert "No report from this node yet." in _texts(peer_card) and peer_card["buttons"] == []
    assert "Idle" in _texts(local_card) and "Reason: On Admin Request" in _texts(local_card)
    assert [b["text"] for b in local_card["buttons"]] == ["Fallback", "Start"] + ["Stop"] * 6
    assert "stopped" in _texts(local_card)
    assert out["requests"][3]["headers"]["Authorization"] == f"Bearer {TOKEN}"

    # API errors and an unreachable API are shown, the last status stays
    assert failing["conn"] == {
        "shown": True,
        "kind": "banner error",
        "text": "Status unavailable: HTTP 503: store <down>",
    }
    assert unreachable["conn"]["text"] == (
        "Status unavailable: admin API unreachable: Failed to fetch"
    )
    assert "Idle" in _texts(unreachable["cards"][1])
