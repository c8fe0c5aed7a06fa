"""A small closed-loop HTTP/1.1 load generator (there is no wrk here), run in its own process.

`python -m bench.api_load --port P --path /x [--connections 16 --warmup 1 --seconds 8]` keeps
N keep-alive connections busy with one pre-built GET each (several --path: connection i asks
for path i mod their number) and prints JSON: completed responses, non-200s and per-request
latencies inside the measurement window. `--serve P` instead runs a trivial asyncio HTTP
server, to measure the generator's own ceiling against it.

Protocols, not streams, and no body parsing beyond Content-Length (which every response must
carry): per request the generator does one write, a header scan and a counter bump, so it
stays far below the server's cost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any


class Window:
    """Responses count when their request was sent at or after `start` and they arrived by
    `stop`; `start` stays infinite while warming up."""

    start = float("inf")
    stop = float("inf")


class Conn(asyncio.Protocol):
    def __init__(self, request: bytes, stats: dict[str, Any], done: asyncio.Future[None]) -> None:
        self.request = request
        self.stats = stats
        self.done = done
        self.buf = b""
        self.need = -1  # bytes of the current response (headers + body); -1 until headers
        self.sent = 0.0
        self.status = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self._send()

    def _send(self) -> None:
        self.sent = time.perf_counter()
        if self.sent >= Window.stop:
            self.transport.close()
            return
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            if self.need < 0:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = self.buf[:end].lower()
                at = head.find(b"\r\ncontent-length:")
                length = 0
                if at >= 0:
                    eol = head.find(b"\r\n", at + 2)
                    length = int(head[at + 17 : eol if eol >= 0 else len(head)])
                self.need = end + 4 + length
                self.status = self.buf[9:12]
            if len(self.buf) < self.need:
                return
            self.buf = self.buf[self.need :]
            self.need = -1
            now = time.perf_counter()
            self.stats["all"] += 1
            if self.sent >= Window.start and now <= Window.stop:
                self.stats["latencies"].append(now - self.sent)
                if self.status != b"200":
                    self.stats["non_200"] += 1
            elif self.status != b"200":
                self.stats["warmup_non_200"] += 1
            self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        if time.perf_counter() < Window.stop:
            self.stats["errors"] += 1  # the server hung up mid-run
        if not self.done.done():
            self.done.set_result(None)


async def load(
    port: int,
    paths: list[str],
    connections: int,
    warmup: float,
    seconds: float,
    headers: list[str] | None = None,
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    extra = "".join(f"{header}\r\n" for header in headers or [])
    requests = [
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: */*\r\n{extra}\r\n".encode()
        for path in paths
    ]
    stats: dict[str, Any] = {
        "latencies": [], "non_200": 0, "warmup_non_200": 0, "errors": 0, "all": 0
    }  # fmt: skip
    begin = time.perf_counter()
    Window.stop = begin + warmup + seconds
    closed = [loop.create_future() for _ in range(connections)]
    for i, fut in enumerate(closed):
        conn = Conn(requests[i % len(requests)], stats, fut)
        await loop.create_connection(lambda c=conn: c, "127.0.0.1", port)
    await asyncio.sleep(warmup - (time.perf_counter() - begin))
    Window.start = time.perf_counter()
    cpu0 = time.process_time()
    await asyncio.wait_for(asyncio.gather(*closed), warmup + seconds + 30)
    window = Window.stop - Window.start
    lat = sorted(stats.pop("latencies"))
    return {
        **stats,
        "connections": connections,
        "seconds": window,
        "completed": len(lat),
        "rps": len(lat) / window,
        # How busy the generator itself was: near 1.0 would mean it is the bottleneck.
        "generator_cpu": (time.process_time() - cpu0) / window,
        "latencies_ms": [round(x * 1000, 3) for x in lat],
    }


class Trivial(asyncio.Protocol):
    """Answers every request with a fixed 200; only for the generator's ceiling."""

    body = json.dumps({"status": "completed", "job_id": 1}).encode()
    response = (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        count = self.buf.count(b"\r\n\r\n")
        if count:
            self.buf = self.buf[self.buf.rfind(b"\r\n\r\n") + 4 :]
            self.transport.write(self.response * count)


async def serve(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(Trivial, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.api_load", description=__doc__)
    ap.add_argument("--port", type=int)
    ap.add_argument("--path", action="append", help="default: /")
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--header", action="append", help="'Name: value' sent with every request")
    ap.add_argument("--serve", type=int, metavar="PORT", help="run the trivial server instead")
    args = ap.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve))
        return
    paths = args.path or ["/"]
    out = asyncio.run(
        load(args.port, paths, args.connections, args.warmup, args.seconds, args.header)
    )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
