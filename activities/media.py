"""The job's files: download the rendered video, and verify it."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from datetime import timedelta
from pathlib import Path
from typing import Any

import av
import httpcore
import httpx
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.common import fatal, heartbeating, in_thread, short_reason
from backend.database import JobStore
from backend.provider import ProviderClient
from backend.settings import Settings
from workflows.payloads import DownloadedVideo, DownloadVideoInput, VerifyVideoInput, VideoInfo

# A download reads and writes up to this many bytes at a time, and heartbeats its progress
# after each write: one a MiB was ~5% of the CPU of a loopback download (bench/download.py).
# heartbeating keeps it alive in between.
CHUNK = 4 * 1024 * 1024
MP4_MAGIC = b"ftyp"
DOWNLOAD_ATTEMPTS = 3
# The seed's backoff after a failed transfer: 30 s, then 90 s.
DOWNLOAD_BACKOFF = (timedelta(seconds=30), timedelta(seconds=90))


def download_retry_delay(attempt: int) -> timedelta:
    """How long a failed transfer waits before attempt `attempt + 1`."""
    return DOWNLOAD_BACKOFF[min(attempt, len(DOWNLOAD_BACKOFF)) - 1]


class MediaActivities:
    """Given the job store (for progress), the provider client (to know which URLs may see
    our token), the settings and the HTTP client downloads go through."""

    def __init__(
        self,
        store: JobStore,
        provider: ProviderClient,
        settings: Settings,
        http: httpx.AsyncClient,
    ) -> None:
        self.store = store
        self.provider = provider
        self.settings = settings
        self.http = http

    def all(self) -> list[Callable[..., Any]]:
        return [self.download_video, self.verify_video]

    @activity.defn
    async def download_video(self, input: DownloadVideoInput) -> DownloadedVideo:
        attempt = activity.info().attempt
        await in_thread(self.store.set_download_retries, input.job_id, attempt - 1)
        await in_thread(
            self.store.progress,
            input.job_id,
            "downloading",
            f"Downloading video (attempt {attempt} of {DOWNLOAD_ATTEMPTS})...",
        )
        if not input.url.lower().startswith(("http://", "https://")):
            raise fatal("Refusing to download a URL that is not http(s)", "BadRequest")

        folder = self.settings.video_dir(input.job_id)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            # A worker killed mid-download leaves its partial file; one download runs per job.
            for stale in folder.glob(".download-*.part"):
                stale.unlink(missing_ok=True)
        except OSError as exc:
            raise ApplicationError(
                f"Could not prepare the job's video folder ({short_reason(exc)})",
                type="StorageError",
            ) from exc
        final = folder / "final.mp4"
        partial = folder / f".download-{uuid.uuid4().hex}.part"
        headers = (
            {"Authorization": f"Bearer {self.settings.api_token}"}
            if self.provider.owns(input.url)
            else {}
        )
        limit = self.settings.max_video_bytes
        try:
            size = await heartbeating(self._stream_to(input.url, headers, partial, limit))
            os.replace(partial, final)
        except ApplicationError as exc:
            if exc.non_retryable:
                raise
            raise ApplicationError(
                exc.message, type=exc.type, next_retry_delay=download_retry_delay(attempt)
            ) from exc
        except OSError as exc:
            # A disk that is full or a folder that cannot be written: retried like a failed
            # transfer, and said without the server's paths.
            raise ApplicationError(
                f"Could not store the video ({short_reason(exc)})",
                type="StorageError",
                next_retry_delay=download_retry_delay(attempt),
            ) from exc
        finally:
            partial.unlink(missing_ok=True)
        return DownloadedVideo(path=str(final), size_bytes=size, attempt=attempt)

    async def _stream_to(self, url: str, headers: dict[str, str], path: Path, limit: int) -> int:
        too_big = f"Video is larger than the {limit}-byte limit (MAX_VIDEO_BYTES)"
        size = 0
        try:
            async with self.http.stream("GET", url, headers=headers) as response:
                if response.status_code in (404, 410):
                    raise fatal(
                        f"The video is gone from the provider (HTTP {response.status_code})",
                        "VideoGone",
                    )
                if response.status_code >= 400:
                    raise ApplicationError(
                        f"Video download failed: HTTP {response.status_code}",
                        type="DownloadFailed",
                    )
                declared = response.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > limit:
                    raise fatal(too_big, "VideoTooLarge")
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
                                    raise fatal(too_big, "VideoTooLarge")
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
                                activity.heartbeat(size)
                        if writing is not None:
                            await asyncio.shield(writing)
                        out.writelines(batch)
                    finally:
                        if writing is not None and not writing.done():
                            # A thread cannot be stopped: the file closes once it is done.
                            await asyncio.wait({writing})
        except httpx.HTTPError as exc:
            raise ApplicationError(
                f"Video download failed ({short_reason(exc)})", type="DownloadFailed"
            ) from exc
        return size

    @activity.defn
    async def verify_video(self, input: VerifyVideoInput) -> VideoInfo:
        await in_thread(self.store.progress, input.job_id, "verifying", "Verifying video...")
        path = Path(input.path)
        try:
            # Heartbeats while the decode runs: a worker killed mid-verify is noticed within
            # the heartbeat timeout, not after the whole start-to-close timeout.
            info = await heartbeating(asyncio.to_thread(probe_video, path))
        except InvalidVideo as exc:
            # A broken file must never be served as the job's video.
            path.unlink(missing_ok=True)
            raise fatal(str(exc), "InvalidVideo") from exc
        return info


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


class InvalidVideo(ValueError):
    pass


def probe_video(path: Path) -> VideoInfo:
    """Checks the MP4 signature, then decodes every frame: a header alone proves nothing."""
    if not path.is_file():
        raise InvalidVideo("The downloaded video is missing")
    with path.open("rb") as handle:
        head = handle.read(12)
    if len(head) < 8 or head[4:8] != MP4_MAGIC:
        raise InvalidVideo("Downloaded file is not an MP4 (no 'ftyp' box at byte 4)")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise InvalidVideo("MP4 has no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            frames = 0
            last_time = 0.0
            for frame in container.decode(stream):
                frames += 1
                if frame.time is not None:
                    last_time = max(last_time, frame.time)
            duration = (container.duration or 0) / 1_000_000
            codec = stream.codec_context.name
            width, height = stream.codec_context.width, stream.codec_context.height
    except av.FFmpegError as exc:
        raise InvalidVideo(
            f"MP4 could not be decoded (truncated or corrupt): {short_reason(exc)}"
        ) from exc
    if frames == 0:
        raise InvalidVideo("MP4 holds no decodable video frames (truncated or corrupt)")
    if duration <= 0:
        raise InvalidVideo("MP4 has no duration")
    # A cut-off file can keep a full-length index: the frames must reach its end.
    frame_gap = 1.0 / float(stream.average_rate) if stream.average_rate else 0.5
    if last_time + frame_gap + 0.5 < duration:
        raise InvalidVideo(f"MP4 is truncated: frames stop at {last_time:.2f}s of {duration:.2f}s")
    return VideoInfo(
        duration_seconds=round(duration, 3), width=width, height=height, codec=codec, frames=frames
    )
