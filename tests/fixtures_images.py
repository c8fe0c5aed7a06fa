"""Real HTTP servers for tests: PNG images to render, and a webhook receiver that records calls."""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from PIL import Image

COLOURS = [(220, 40, 40), (40, 180, 60), (40, 80, 220), (230, 200, 30)]
SIZES = [(400, 300), (300, 500), (640, 360), (100, 100)]


def png_bytes(size: tuple[int, int], colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def png_data_url(size: tuple[int, int] = (64, 48), colour: tuple[int, int, int] = (9, 9, 9)) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(size, colour)).decode()


class _QuietFiles(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def serve_images(directory: Path, count: int = 4) -> Iterator[list[str]]:
    """Write `count` PNGs of assorted shapes into `directory` and serve them; yields their URLs."""
    directory.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(count):
        name = f"img{i}.png"
        (directory / name).write_bytes(png_bytes(SIZES[i % 4], COLOURS[i % 4]))
        names.append(name)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietFiles, directory=str(directory)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        yield [f"{base}/{name}" for name in names]
    finally:
        httpd.shutdown()
        httpd.server_close()


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: str
    at: float = field(default_factory=time.monotonic)  # when it arrived, to check retry spacing


@dataclass
class WebhookReceiver:
    """Records POSTs; `respond(path, n)` picks the status for the n-th POST to a path (1-based)."""

    base_url: str = ""
    calls: list[Received] = field(default_factory=list)
    respond: Callable[[str, int], int] = lambda path, n: 200
    lock: threading.Lock = field(default_factory=threading.Lock)

    def to(self, path: str) -> list[Received]:
        with self.lock:
            return [c for c in self.calls if c.path == path]


@contextmanager
def webhook_receiver() -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0))).decode()
            with receiver.lock:
                receiver.calls.append(Received(self.path, dict(self.headers.items()), body))
                n = sum(1 for c in receiver.calls if c.path == self.path)
            status = receiver.respond(self.path, n)
            self.send_response(status)
            if 300 <= status < 400:
                self.send_header("Location", f"{receiver.base_url}/redirected")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver.base_url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        httpd.shutdown()
        httpd.server_close()
