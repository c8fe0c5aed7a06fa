"""Serve any ASGI app with uvicorn on a background thread: for tests and benchmarks."""

from __future__ import annotations

import asyncio
import socket
import threading
from types import TracebackType
from typing import Any

import uvicorn


class UvicornThread:
    """A real HTTP server on 127.0.0.1 with its own event loop, usable from sync and async code."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        self.app = app
        self.host = host
        self.port = port
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> str:
        # Binding here lets port 0 pick a free port with no window for another process to take it.
        # proto IPPROTO_TCP, inherited by accepted sockets, is what makes asyncio set TCP_NODELAY;
        # with proto 0 every response pays a ~40 ms Nagle/delayed-ACK stall
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        server = uvicorn.Server(
            uvicorn.Config(self.app, log_level="warning", lifespan="on", access_log=False)
        )
        self._server = server
        self._thread = threading.Thread(
            target=lambda: asyncio.run(server.serve(sockets=[sock])),
            name=f"uvicorn:{self.port}",
            daemon=True,
        )
        self._thread.start()
        waiter = threading.Event()
        for _ in range(int(timeout / 0.01)):
            if server.started or not self._thread.is_alive():
                break
            waiter.wait(0.01)
        if not server.started:
            self.stop()
            raise RuntimeError(f"server did not start on {self.base_url}")
        return self.base_url

    def stop(self, timeout: float = 10.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        self._server = None
        self._thread = None

    def __enter__(self) -> UvicornThread:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> UvicornThread:
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.stop)
