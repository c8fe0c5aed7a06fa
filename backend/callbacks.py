"""Job events sent to the caller: `job.completed`, `job.failed`, `job.cancelled`, `job.expired`,
signed the Standard Webhooks way (the `standardwebhooks` library) under the tenant's secret,
to a callback URL that must be a public address unless ALLOW_PRIVATE_CALLBACKS says otherwise
(a render service must not be a way into its own network)."""

from __future__ import annotations

import asyncio
import ipaddress
import json
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from standardwebhooks import Webhook

EVENTS = {
    "completed": "job.completed",
    "failed": "job.failed",
    "cancelled": "job.cancelled",
    "expired": "job.expired",
}
MAX_METADATA_BYTES = 1024
MAX_URL_LENGTH = 2048


class CallbackRefused(ValueError):
    """The callback URL may not be called; the message says why."""


def check_callback_url(url: str, *, allow_private: bool) -> str:
    """The URL if it may be called as far as can be told without DNS: http(s), a host, no
    credentials, and (unless allowed) no private, loopback or link-local literal address."""
    if len(url) > MAX_URL_LENGTH:
        raise CallbackRefused(f"callback_url is longer than {MAX_URL_LENGTH} characters")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CallbackRefused("callback_url must be an http or https URL with a host")
    if parts.username or parts.password:
        raise CallbackRefused("callback_url must not carry credentials")
    if any(ch.isspace() or ord(ch) < 0x20 for ch in url):
        raise CallbackRefused("callback_url must not contain spaces or control characters")
    host = parts.hostname
    if not allow_private:
        if host == "localhost" or host.endswith((".localhost", ".local", ".internal")):
            raise CallbackRefused(_private(host))
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return url  # a name: checked when it is resolved, at delivery
        if not address.is_global:
            raise CallbackRefused(_private(host))
    return url


async def check_resolved(url: str, *, allow_private: bool) -> None:
    """Refuses a callback host that resolves to any address that is not public: a name is
    checked where it is called, as it resolves then (not when the job was created)."""
    if allow_private:
        return
    host = urlsplit(url).hostname or ""
    port = urlsplit(url).port or (443 if url.startswith("https") else 80)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port)
    except OSError as exc:
        raise CallbackRefused(f"callback host {host} could not be resolved") from exc
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if not address.is_global:
            raise CallbackRefused(_private(host))


def _private(host: str) -> str:
    return (
        f"callback host {host} is a private, loopback or link-local address; "
        "set ALLOW_PRIVATE_CALLBACKS=true to allow it"
    )


def check_metadata(metadata: Any) -> dict[str, Any] | None:
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise ValueError("metadata must be a JSON object")
    size = len(json.dumps(metadata, separators=(",", ":")).encode())
    if size > MAX_METADATA_BYTES:
        raise ValueError(f"metadata is {size} bytes as JSON; at most {MAX_METADATA_BYTES}")
    return metadata


def signed_request(
    secret: str, webhook_id: str, event: str, data: dict[str, Any]
) -> tuple[bytes, dict[str, str]]:
    """The body and headers of one delivery: `{"type", "timestamp", "data"}` as Standard
    Webhooks suggests, signed over id, timestamp and body."""
    now = datetime.now(UTC)
    body = json.dumps(
        {"type": EVENTS[event], "timestamp": now.isoformat(), "data": data},
        separators=(",", ":"),
        default=str,
    )
    signature = Webhook(secret).sign(webhook_id, now, body)
    headers = {
        "content-type": "application/json",
        "webhook-id": webhook_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": signature,
        "user-agent": "storyboard-video-renderer",
    }
    return body.encode(), headers
