"""RSS per idle TLS connection held by a server process. Prints JSON.

The server runs in a subprocess (`--serve`, started by this script). The
driver opens N connections that each do STARTTLS, complete the handshake,
echo one line and then stay idle; it reads the server's VmRSS from
/proc/<pid>/status after the server has run gc and `malloc_trim(0)`, once
after a warm-up and once with the N connections held.

    python bench/bench_tls_idle.py                       # 2,000 conns, TLS 1.3, StreamConnection
    python bench/bench_tls_idle.py --transport stock     # asyncio's own TLS transport, for contrast
    python bench/bench_tls_idle.py --connections 5000 --tls 1.2
    python bench/bench_tls_idle.py --payload 262144     # idle after a burst of traffic
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import json
import resource
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from xmpp_ha.certs import init_certs  # noqa: E402
from xmpp_ha.net.tls import (  # noqa: E402
    StreamConnection,
    StreamHandler,
    client_context,
    server_context,
)

STARTTLS = b"STARTTLS\n"
GO = b"GO\n"
PING = b"ping\n"
WARMUP_CONNECTIONS = 50


# --------------------------------------------------------------------- server


class _EchoHandler:
    """Echoes; on the line STARTTLS answers GO and switches to TLS."""

    __slots__ = ("conn", "context")

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.conn: StreamConnection | None = None

    def connection_made(self, conn: StreamConnection) -> None:
        self.conn = conn

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        assert conn is not None
        if not conn.tls_started and data.startswith(STARTTLS):
            conn.write(GO)
            conn.start_tls(self.context, server_side=True, initial_data=data[len(STARTTLS) :])
        else:
            conn.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn = None

    def tls_established(self) -> None:
        pass


class _StockEcho(asyncio.Protocol):
    __slots__ = ("transport",)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


async def _serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    context = server_context(args.cert, args.key)
    if args.tls == "1.2":
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    server: asyncio.Server
    if args.transport == "stream":

        def factory() -> StreamHandler:
            return _EchoHandler(context)

        server = await loop.create_server(
            lambda: StreamConnection(factory), "127.0.0.1", 0, backlog=4096, reuse_address=True
        )
    else:
        server = await loop.create_server(
            _StockEcho, "127.0.0.1", 0, ssl=context, backlog=4096, reuse_address=True
        )
    port = server.sockets[0].getsockname()[1]
    print(f"port {port}", flush=True)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        if line.strip() == b"measure":
            _trim()
            print(f"cpu {time.process_time()}", flush=True)
    server.close()


# --------------------------------------------------------------------- client


class _Client:
    __slots__ = ("conn", "context", "plain", "done", "payload", "echoed")

    def __init__(self, context: ssl.SSLContext, done: asyncio.Future[None], payload: int) -> None:
        self.context = context
        self.conn: StreamConnection | None = None
        self.plain = b""
        self.done = done
        self.payload = payload
        self.echoed = 0

    def connection_made(self, conn: StreamConnection) -> None:
        self.conn = conn
        conn.write(STARTTLS)

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        assert conn is not None
        if conn.tls_started:
            self.echoed += len(data)
            if self.echoed >= self.payload + len(PING) and not self.done.done():
                self.done.set_result(None)
            return
        self.plain += data
        if self.plain.startswith(GO):
            conn.start_tls(
                self.context,
                server_side=False,
                server_hostname="localhost",
                initial_data=self.plain[len(GO) :],
            )

    def tls_established(self) -> None:
        assert self.conn is not None
        if self.payload:
            self.conn.write(b"x" * self.payload)
        self.conn.write(PING)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(exc or ConnectionError("closed"))


async def _open_stream(port: int, context: ssl.SSLContext, payload: int) -> Any:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    transport, _ = await loop.create_connection(
        lambda: StreamConnection(lambda: _Client(context, done, payload)), "127.0.0.1", port
    )
    await asyncio.wait_for(done, 30)
    return transport


async def _open_stock(port: int, context: ssl.SSLContext, payload: int) -> Any:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname="localhost"
    )
    writer.write(b"x" * payload + PING)
    echoed = await asyncio.wait_for(reader.readexactly(payload + len(PING)), 30)
    assert echoed.endswith(PING)
    return writer


def _vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def _drive(args: argparse.Namespace) -> dict[str, Any]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if args.connections + 256 > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, args.connections + 512), hard))
    with tempfile.TemporaryDirectory() as tmp:
        paths = init_certs(Path(tmp), node_names=["server"])
        node = paths.nodes["server"]
        command = [
            sys.executable,
            __file__,
            "--serve",
            "--cert",
            str(node.cert_file),
            "--key",
            str(node.key_file),
            "--transport",
            args.transport,
            "--tls",
            args.tls,
        ]
        server = await asyncio.create_subprocess_exec(
            *command, stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert server.stdin is not None and server.stdout is not None
        try:
            port = int((await server.stdout.readline()).split()[1])
            client_ctx = client_context(paths.ca_file)
            opener = _open_stream if args.transport == "stream" else _open_stock

            async def measure() -> tuple[int, float]:
                assert server.stdin is not None and server.stdout is not None
                server.stdin.write(b"measure\n")
                await server.stdin.drain()
                cpu = float((await server.stdout.readline()).split()[1])
                return _vm_rss_kib(server.pid), cpu

            rss_start, _ = await measure()
            warm = [await opener(port, client_ctx, args.payload) for _ in range(WARMUP_CONNECTIONS)]
            for transport in warm:
                transport.close()
            await asyncio.sleep(0.5)
            rss_before, cpu_before = await measure()

            held: list[Any] = []
            semaphore = asyncio.Semaphore(args.parallel)

            async def one() -> None:
                async with semaphore:
                    held.append(await opener(port, client_ctx, args.payload))

            started = time.perf_counter()
            await asyncio.gather(*(one() for _ in range(args.connections)))
            elapsed = time.perf_counter() - started
            await asyncio.sleep(args.settle)
            rss_after, cpu_after = await measure()
            for transport in held:
                transport.close()
        finally:
            if server.stdin is not None:
                server.stdin.close()
            try:
                await asyncio.wait_for(server.wait(), 10)
            except TimeoutError:
                server.kill()
    per_connection = (rss_after - rss_before) / args.connections
    return {
        "transport": args.transport,
        "tls": "TLSv1.3" if args.tls == "1.3" else "TLSv1.2",
        "connections": args.connections,
        "payload_echoed_bytes": args.payload,
        "rss_start_kib": rss_start,
        "rss_before_kib": rss_before,
        "rss_after_kib": rss_after,
        "rss_per_connection_kib": round(per_connection, 2),
        "projected_10k_sessions_mib": round(per_connection * 10_000 / 1024, 1),
        "server_cpu_ms_per_connection": round(
            (cpu_after - cpu_before) * 1000 / args.connections, 3
        ),
        "connect_seconds": round(elapsed, 2),
        "python": sys.version.split()[0],
        "openssl": ssl.OPENSSL_VERSION,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--parallel", type=int, default=100, help="handshakes in flight")
    parser.add_argument("--settle", type=float, default=1.0, help="seconds idle before measuring")
    parser.add_argument(
        "--payload", type=int, default=0, help="bytes each connection echoes before idling"
    )
    parser.add_argument("--transport", choices=["stream", "stock"], default="stream")
    parser.add_argument("--tls", choices=["1.3", "1.2"], default="1.3")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cert", help=argparse.SUPPRESS)
    parser.add_argument("--key", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(_serve(args))
        return
    print(json.dumps(asyncio.run(_drive(args)), indent=2))


if __name__ == "__main__":
    main()
