"""A cap on request bodies, enforced before any route reads one."""

from __future__ import annotations

import asyncio
import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

# After refusing a streamed body, how long (and how much more of it) is read and dropped before
# the connection closes. Closing on unread bytes makes the kernel answer with a reset, which
# can wipe the 413 from the client's buffers before it reads it (RFC 9112, section 9.6): a
# client that reads while it sends gets this long to see the answer and stop.
LINGER_SECONDS = 2.0
LINGER_BYTES = 16 * 1024 * 1024


class BodyTooLarge(Exception):
    """Raised out of `receive` once a body passes the cap; the middleware answers 413."""


class BodyLimit:
    """Refuses request bodies over `max_bytes` with 413 and a JSON body.

    A declared Content-Length over the cap is refused before a byte of the body is read (a
    client that waits for `100 Continue` never sends it). A body without one (chunked) is
    counted as it streams in, and refused once it passes the cap: the route never holds more
    than the cap in memory.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > self.max_bytes:
                    await self._refuse(send)
                    return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if started:
                raise
            await self._refuse(send, linger=receive)

    async def _refuse(self, send: Send, linger: Receive | None = None) -> None:
        body = json.dumps(
            {"detail": f"Request body too large: at most {self.max_bytes} bytes are accepted"}
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    # The rest of the body is never read: the connection cannot be reused.
                    (b"connection", b"close"),
                ],
            }
        )
        if linger is None:
            await send({"type": "http.response.body", "body": body})
            return
        # The whole answer goes out now; the response ends once the lingering is over.
        await send({"type": "http.response.body", "body": body, "more_body": True})
        await _drain(linger)
        await send({"type": "http.response.body", "body": b""})


async def _drain(receive: Receive) -> None:
    """Reads and drops what more of the body comes, for a bounded time and size."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + LINGER_SECONDS
    drained = 0
    while drained < LINGER_BYTES:
        try:
            async with asyncio.timeout_at(deadline):
                message = await receive()
        except TimeoutError:
            return
        if message["type"] != "http.request":
            return
        drained += len(message.get("body", b""))
        if not message.get("more_body", False):
            return
