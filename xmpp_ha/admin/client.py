"""A tiny blocking client of the admin API, for the CLI (stdlib `http.client`).

One connection per request (the server closes after each answer). JSON
answers are decoded; other content types (e.g. `/metrics`) come back as text.
Every failure is an `AdminClientError` with a message fit for a terminal:

- `AdminUnreachable`: nothing answered at host:port (refused, timed out, no
  such host, connection dropped without an answer);
- `AdminAPIError`: the server answered with a non-2xx status; `message` is its
  `{"error": ...}` text (or the body, or the reason phrase).
"""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any
from urllib.parse import quote, urlencode


class AdminClientError(Exception):
    """Anything that kept an admin request from succeeding."""


class AdminUnreachable(AdminClientError):
    def __init__(self, host: str, port: int, reason: str = "connection refused") -> None:
        self.host = host
        self.port = port
        self.reason = reason
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        hint = ""
        if reason.startswith("connection refused"):
            hint = " (is the node running with HA enabled, and is this its admin port?)"
        super().__init__(f"cannot reach the admin API at {where}: {reason}{hint}")


class AdminAPIError(AdminClientError):
    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message
        super().__init__(f"admin API error {status}: {message}")


class AdminClient:
    def __init__(self, host: str, port: int, token: str | None, timeout: float = 10) -> None:
        self.host = host
        self.port = port
        self.token = token
        self.timeout = timeout

    @staticmethod
    def path(*segments: str, query: dict[str, str] | None = None) -> str:
        """An API path from raw segments: path("services", "client listener", "stop")."""
        text = "/" + "/".join(quote(segment, safe="") for segment in segments)
        return f"{text}?{urlencode(query)}" if query else text

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        return self.request("POST", path, body)

    def put(self, path: str, body: dict[str, Any] | None = None) -> Any:
        return self.request("PUT", path, body)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        if not path.startswith("/"):
            raise ValueError(f"admin API path must start with '/': {path!r}")
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        payload: bytes | None = None
        if body is not None:
            payload = json.dumps(body, separators=(",", ":")).encode("utf-8")
            headers["Content-Type"] = "application/json"
        connection = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            try:
                connection.request(method, path, body=payload, headers=headers)
                response = connection.getresponse()
                data = response.read()
            except ConnectionRefusedError:
                raise AdminUnreachable(self.host, self.port) from None
            except TimeoutError:
                reason = f"no answer within {self.timeout:g} s"
                if method != "GET":
                    reason += " (the request may still be carried out)"
                raise AdminUnreachable(self.host, self.port, reason) from None
            except socket.gaierror as exc:
                raise AdminUnreachable(self.host, self.port, f"unknown host ({exc})") from None
            except (http.client.HTTPException, OSError) as exc:
                reason = str(exc) or type(exc).__name__
                raise AdminUnreachable(self.host, self.port, reason) from None
        finally:
            connection.close()
        return _decode(response.status, response.reason, response.getheader("Content-Type"), data)


def _decode(status: int, reason: str, content_type: str | None, data: bytes) -> Any:
    is_json = (content_type or "").split(";")[0].strip().lower() == "application/json"
    text = data.decode("utf-8", "replace")
    decoded: Any = text
    if is_json and data:
        try:
            decoded = json.loads(text)
        except ValueError:
            if 200 <= status < 300:
                raise AdminAPIError(
                    status, f"malformed JSON in the answer: {text[:200]!r}"
                ) from None
    if 200 <= status < 300:
        return decoded if data else None
    if isinstance(decoded, dict) and isinstance(decoded.get("error"), str):
        message: str = decoded["error"]
    else:
        message = text.strip()[:500] or reason or "no details"
    raise AdminAPIError(status, message)
