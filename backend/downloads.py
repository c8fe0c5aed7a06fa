"""Streaming a rendered video from the provider to a file: the activities' download and the
seed's `download_video`. Nothing here knows Temporal; callers word the errors for their own
world (an activity's retry policy, a script's exception)."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from pathlib import Path

import httpcore
import httpx

# A download reads and writes up to this many bytes at a time, and reports its progress after
# each write: one report a MiB was ~5% of the CPU of a loopback download (bench/download.py).
CHUNK = 4 * 1024 * 1024


class DownloadError(Exception):
    """A download that did not give a whole file; the message is fit for a user."""


class VideoGone(DownloadError):
    """The provider answered 404 or 410: the output was deleted (after its hour) or never was."""

    def __init__(self, status: int) -> None:
        super().__init__(f"The video is gone from the provider (HTTP {status})")
        self.status = status


class VideoTooLarge(DownloadError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"Video is larger than the {limit}-byte limit (MAX_VIDEO_BYTES)")


class TransferFailed(DownloadError):
    """A failed transfer (a server error, a dropped connection): worth another try."""


async def stream_to_file(
    http: httpx.AsyncClient,
    url: str,
    path: Path,
    *,
    headers: dict[str, str] | None = None,
    limit: int,
    on_progress: Callable[[int], None] | None = None,
) -> int:
    """Writes the body of GET `url` to `path` and returns its size. `on_progress(bytes so far)`
    is called after each write (an activity heartbeats there)."""
    size = 0
    try:
        async with http.stream("GET", url, headers=headers or {}) as response:
            if response.status_code in (404, 410):
                raise VideoGone(response.status_code)
            if response.status_code >= 400:
                raise TransferFailed(f"Video download failed: HTTP {response.status_code}")
            declared = response.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > limit:
                raise VideoTooLarge(limit)
            loop = asyncio.get_running_loop()
            # One write in flight on a thread of its own while the next chunk arrives:
            # receiving and writing overlap, and the event loop never waits on the disk.
            # The last chunks stay referenced here so that they are freed on this thread,
            # where they were allocated: freed by the writer, the heap kept shrinking and
            # growing again (~35k page faults a GiB, a fifth slower; bench/download.py).
            writing: asyncio.Future[None] | None = None
            recent: deque[list[bytes]] = deque(maxlen=3)
            batch: list[bytes] = []
            batched = 0
            with ThreadPoolExecutor(1, "download") as writer, path.open("wb") as out:
                try:
                    async with aclosing(_body(response)) as chunks:
                        async for chunk in chunks:
                            size += len(chunk)
                            if size > limit:
                                raise VideoTooLarge(limit)
                            batch.append(chunk)
                            batched += len(chunk)
                            # A socket read is often far smaller than CHUNK: a hand-over
                            # to the writer per read would cost more than the write.
                            if batched < CHUNK:
                                continue
                            if writing is not None:
                                # Shielded: a cancel must not leave a write running unseen.
                                await asyncio.shield(writing)
                            recent.append(batch)
                            writing = loop.run_in_executor(writer, out.writelines, batch)
                            batch, batched = [], 0
                            if on_progress is not None:
                                on_progress(size)
                    if writing is not None:
                        await asyncio.shield(writing)
                    out.writelines(batch)
                finally:
                    if writing is not None and not writing.done():
                        # A thread cannot be stopped: the file closes once it is done.
                        await asyncio.wait({writing})
    except httpx.HTTPError as exc:
        raise TransferFailed(f"Video download failed ({_reason(exc)})") from exc
    return size


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    if not text or "/" in text:
        return type(exc).__name__
    return text[:200]


async def _body(response: httpx.Response) -> AsyncIterator[bytes]:
    """The response body in chunks of up to CHUNK bytes.

    A plain HTTP/1.x body of known length is read straight off the connection httpx hands
    back (its documented `network_stream` extension): httpx's own iteration takes it 64 KiB at
    a time through h11, copying it several times over, which held a 1 GiB download to a third
    of curl's speed (bench/download.py). Anything else (chunked, compressed, HTTP/2) takes
    httpx's iteration.
    """
    chunks = response.aiter_bytes()
    connection = response.extensions.get("network_stream")
    declared = response.headers.get("content-length", "")
    if not (
        isinstance(connection, httpcore.AsyncNetworkStream)
        and response.http_version in ("HTTP/1.0", "HTTP/1.1")
        and declared.isdigit()
        and "transfer-encoding" not in response.headers
        and response.headers.get("content-encoding", "identity") == "identity"
    ):
        async for chunk in chunks:
            yield chunk
        return
    remaining = int(declared)
    timeout = response.request.extensions.get("timeout", {}).get("read")
    try:
        # h11 read the first bytes of the body with the headers, and its first chunk hands
        # over all it holds; from there on the connection carries only the rest of the body.
        async for chunk in chunks:
            remaining -= len(chunk)
            yield chunk
            break
        while remaining > 0:
            try:
                data = await connection.read(min(remaining, CHUNK), timeout=timeout)
            except httpcore.TimeoutException as exc:
                raise httpx.ReadTimeout(str(exc) or "read timed out") from exc
            except httpcore.NetworkError as exc:
                raise httpx.ReadError(str(exc) or type(exc).__name__) from exc
            if not data:
                raise httpx.RemoteProtocolError(
                    f"the server closed the connection {remaining} bytes short"
                )
            remaining -= len(data)
            yield data
    finally:
        # h11 never saw this body end, so httpcore closes the connection instead of pooling it.
        await chunks.aclose()
