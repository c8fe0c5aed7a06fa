"""Run the server in a background thread, for tests of this and other packages."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from .config import ServerConfig
from .server import create_app
from .threaded import UvicornThread


class RunningServer(UvicornThread):
    """The render server on its own thread and event loop, with its admin calls at hand.

    The admin endpoints are on (`config.admin` is overridden) unless `admin=False`.
    """

    def __init__(
        self, config: ServerConfig, host: str = "127.0.0.1", port: int = 0, *, admin: bool = True
    ) -> None:
        config = dataclasses.replace(config, admin=admin)
        super().__init__(create_app(config), host, port)
        self.config = config

    @property
    def webhook_secret(self) -> str:
        """The whsec_... secret the server signs webhooks with (what
        GET /v1/webhooks/default/secret answers)."""
        secret: str = self.app.state.engine.webhook_secret
        return secret

    def __enter__(self) -> RunningServer:
        self.start()
        return self

    async def __aenter__(self) -> RunningServer:
        await asyncio.to_thread(self.start)
        return self

    # -- admin helpers (blocking; short calls on localhost) --

    def add_fault(
        self,
        kind: str,
        times: int | None = 1,
        delay: float = 0.0,
        detail: str | None = None,
        match: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Queue a fault (kinds, what `delay` means for each, and `match`, which limits it to
        creates whose input matches: local_replicate.faults)."""
        body: dict[str, Any] = {"kind": kind, "times": times, "delay": delay}
        if detail is not None:
            body["detail"] = detail
        if match is not None:
            body["match"] = match
        resp = httpx.post(f"{self.base_url}/_admin/faults", json=body)
        resp.raise_for_status()
        result: dict[str, Any] = resp.json()
        return result

    def clear_faults(self) -> None:
        httpx.delete(f"{self.base_url}/_admin/faults").raise_for_status()

    def stats(self) -> dict[str, Any]:
        resp = httpx.get(f"{self.base_url}/_admin/stats")
        resp.raise_for_status()
        result: dict[str, Any] = resp.json()
        return result

    def prediction(self, prediction_id: str) -> dict[str, Any]:
        """A prediction's record: model, input, status, and the Cancel-After `deadline`."""
        resp = httpx.get(f"{self.base_url}/_admin/predictions/{prediction_id}")
        resp.raise_for_status()
        result: dict[str, Any] = resp.json()
        return result

    def reset(self) -> None:
        httpx.post(f"{self.base_url}/_admin/reset").raise_for_status()


@contextmanager
def run_in_thread(config: ServerConfig, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Start a server for the duration of the block and yield its base URL (no trailing slash)."""
    with RunningServer(config, host, port) as server:
        yield server.base_url
