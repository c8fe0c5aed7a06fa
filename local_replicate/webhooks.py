"""Standard Webhooks signing and delivery with Replicate's retry rules."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import time
import uuid
from collections.abc import Sequence
from typing import Any

import httpx

EVENTS = ("start", "output", "logs", "completed")


def secret_bytes(secret: str) -> bytes:
    prefix, sep, b64 = secret.partition("_")
    if prefix != "whsec" or not sep:
        raise ValueError("webhook secret must look like whsec_<base64>")
    return base64.b64decode(b64)


def sign(secret: str, msg_id: str, timestamp: int, body: str) -> str:
    mac = hmac.new(secret_bytes(secret), f"{msg_id}.{timestamp}.{body}".encode(), hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


class WebhookSender:
    """Delivers events in order per prediction; only `completed` is retried.

    Every attempt is recorded in `deliveries`: prediction_id, event, url, webhook_id, attempt
    (1-based, counting redeliveries too), duplicate, status_code, ok, error.
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        secret: str,
        retry_delays: Sequence[float],
        deliveries: list[dict[str, Any]],
    ) -> None:
        self._client = client
        self._secret = secret
        self._retry_delays = tuple(retry_delays)
        self._deliveries = deliveries
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def send(
        self,
        prediction_id: str,
        url: str,
        event: str,
        body: str,
        redeliveries: int = 0,
        redelivery_delay: float = 0.0,
    ) -> None:
        """Queue one event; `redeliveries` sends it again, same webhook-id, once acknowledged."""
        # the lock is taken in task start order, which keeps a prediction's events in order
        lock = self._locks.setdefault(prediction_id, asyncio.Lock())
        task = asyncio.create_task(
            self._deliver(lock, prediction_id, url, event, body, redeliveries, redelivery_delay)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(
        self,
        lock: asyncio.Lock,
        prediction_id: str,
        url: str,
        event: str,
        body: str,
        redeliveries: int,
        redelivery_delay: float,
    ) -> None:
        async with lock:
            msg_id = f"msg_{uuid.uuid4().hex}"
            delays = self._retry_delays if event == "completed" else ()
            attempt = 0
            for copy in range(redeliveries + 1):
                if copy:
                    await asyncio.sleep(redelivery_delay)
                for retry in range(len(delays) + 1):
                    if retry:
                        await asyncio.sleep(delays[retry - 1])
                    attempt += 1
                    if await self._attempt(
                        prediction_id, url, event, body, msg_id, attempt, duplicate=copy > 0
                    ):
                        break
                else:
                    return  # never acknowledged: a redelivery would not be a duplicate

    async def _attempt(
        self,
        prediction_id: str,
        url: str,
        event: str,
        body: str,
        msg_id: str,
        attempt: int,
        duplicate: bool,
    ) -> bool:
        ts = int(time.time())
        headers = {
            "content-type": "application/json",
            "webhook-id": msg_id,
            "webhook-timestamp": str(ts),
            "webhook-signature": sign(self._secret, msg_id, ts, body),
        }
        record: dict[str, Any] = {
            "prediction_id": prediction_id,
            "event": event,
            "url": url,
            "webhook_id": msg_id,
            "attempt": attempt,
            # a redelivery of a message the receiver already acknowledged
            "duplicate": duplicate,
            "status_code": None,
            "ok": False,
            "error": None,
        }
        try:
            # Replicate does not follow redirects: a 3xx is a failed delivery
            resp = await self._client.post(
                url, content=body.encode(), headers=headers, follow_redirects=False
            )
            record["status_code"] = resp.status_code
            record["ok"] = 200 <= resp.status_code < 300
        except httpx.HTTPError as exc:
            record["error"] = f"{type(exc).__name__}: {exc}"
        self._deliveries.append(record)
        return bool(record["ok"])

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._locks.clear()
