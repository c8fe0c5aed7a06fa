"""The job's files: download the rendered video, and verify it."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import av
import httpx
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.common import fatal, heartbeating, in_thread, short_reason
from backend import media
from backend.database import JobStore
from backend.downloads import DownloadError, VideoGone, VideoTooLarge, stream_to_file
from backend.planning import FINAL, POSTER, PREVIEW, clip_name, thumbnail_name
from backend.provider import ProviderClient
from backend.settings import Settings
from backend.storage import (
    Storage,
    StorageError,
    StoredObject,
    scene_key,
    storage_for,
    video_key,
)
from workflows.payloads import (
    CheckClipInput,
    ClipChecked,
    DownloadClipInput,
    DownloadedVideo,
    PreviewsInput,
    PreviewsMade,
    PublishVideoInput,
    StitchedVideo,
    StitchInput,
    VerifyVideoInput,
    VideoInfo,
)

T = TypeVar("T")

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
    our token), the settings, the HTTP client downloads go through and the storage the
    files live in."""

    def __init__(
        self,
        store: JobStore,
        provider: ProviderClient,
        settings: Settings,
        http: httpx.AsyncClient,
        storage: Storage | None = None,
        video_threads: Executor | None = None,
    ) -> None:
        self.store = store
        self.provider = provider
        self.settings = settings
        self.http = http
        self.storage = storage or storage_for(settings)
        # PyAV work runs here, at most MEDIA_THREADS at once: each call holds its codecs'
        # frame buffers, so running more than the cores adds memory and no speed. Waiting
        # calls heartbeat, and a cancelled one never starts.
        self.video_threads = video_threads or ThreadPoolExecutor(
            settings.media_threads, thread_name_prefix="media"
        )

    def _download_target(self, job_id: int, name: str, work: Path) -> Path:
        local = self.storage.local_path(scene_key(job_id))
        if local is None:
            return work / f".{name}.part"
        # A worker killed mid-download leaves its partial file; one download runs per clip.
        local.mkdir(parents=True, exist_ok=True)
        for stale in local.glob(f".{name}.*.part"):
            stale.unlink(missing_ok=True)
        return local / f".{name}.{uuid.uuid4().hex}.part"

    def all(self) -> list[Callable[..., Any]]:
        return [
            self.download_clip,
            self.check_clip,
            self.stitch_video,
            self.verify_video,
            self.publish_video,
            self.make_previews,
        ]

    @activity.defn
    async def download_clip(self, input: DownloadClipInput) -> DownloadedVideo:
        """Streams a scene's clip from the provider, as soon as it is rendered (outputs are
        deleted after an hour), to an unverified file beside where the checked clip will go."""
        attempt = activity.info().attempt
        await in_thread(self.store.note_download_retries, input.job_id, attempt - 1)
        await in_thread(
            self.store.progress,
            input.job_id,
            "downloading",
            f"Downloading {_scene_name(input.number)} (attempt {attempt} of "
            f"{DOWNLOAD_ATTEMPTS})...",
        )
        if not input.url.lower().startswith(("http://", "https://")):
            raise fatal("Refusing to download a URL that is not http(s)", "BadRequest")

        name = clip_name(input.number, input.digest)
        unverified_key = scene_key(input.job_id, f".{name}.unverified")
        headers = (
            {"Authorization": f"Bearer {self.settings.api_token}"}
            if self.provider.owns(input.url)
            else {}
        )
        limit = self.settings.max_video_bytes
        with self.storage.scratch() as work:
            try:
                partial = self._download_target(input.job_id, name, work)
            except OSError as exc:
                raise ApplicationError(
                    f"Could not prepare the job's video folder ({short_reason(exc)})",
                    type="StorageError",
                ) from exc
            try:
                size = await heartbeating(self._stream_to(input.url, headers, partial, limit))
                await heartbeating(self.storage.push(partial, unverified_key))
            except ApplicationError as exc:
                if exc.non_retryable:
                    raise
                raise ApplicationError(
                    exc.message, type=exc.type, next_retry_delay=download_retry_delay(attempt)
                ) from exc
            except (OSError, StorageError) as exc:
                # A disk that is full or a folder that cannot be written: retried like a
                # failed transfer, and said without the server's paths.
                raise ApplicationError(
                    f"Could not store the video ({short_reason(exc)})",
                    type="StorageError",
                    next_retry_delay=download_retry_delay(attempt),
                ) from exc
            finally:
                partial.unlink(missing_ok=True)
        # The name the clip will have once it passes its checks.
        return DownloadedVideo(path=name, size_bytes=size, attempt=attempt)

    @activity.defn
    async def check_clip(self, input: CheckClipInput) -> ClipChecked:
        """The quality gate: decodable, long enough, not black, not frozen (unless the model
        holds still images). A clip that passes becomes the scene's clip; one that fails is
        removed and the scene decides whether to render it again."""
        unverified_key = scene_key(input.job_id, f".{input.clip}.unverified")
        clip_key = scene_key(input.job_id, input.clip)
        checking = unverified_key
        if await self._head(unverified_key) is None and await self._head(clip_key) is not None:
            # Kept by an attempt whose answer was lost: its figures are read from it again,
            # rather than the scene rendered (and billed) once more.
            checking = clip_key
        with self.storage.scratch() as work:
            unverified = await self._pull(checking, work)
            try:
                await in_thread(_check_mp4_signature, unverified)
                report = await self._blocking(
                    media.check_clip,
                    unverified,
                    min_seconds=input.min_seconds,
                    still_image=input.still_image,
                )
            except (media.MediaError, InvalidVideo) as exc:
                await self._delete(checking)
                # The file's name is ours, not the user's: it is "the clip" to them.
                reason = str(exc).replace(unverified.name, "the clip")
                message = (
                    f"Scene {input.number}: {reason}"
                    if input.number
                    else reason[:1].upper() + reason[1:]
                )
                raise fatal(message, "InvalidClip") from exc
        try:
            if checking == unverified_key:
                await self.storage.rename(unverified_key, clip_key)
        except (OSError, StorageError) as exc:
            raise ApplicationError(
                f"Could not keep the clip ({short_reason(exc)})", type="StorageError"
            ) from exc
        return ClipChecked(
            duration_seconds=round(report.duration, 3), frames=report.frames, motion=report.motion
        )

    @activity.defn
    async def stitch_video(self, input: StitchInput) -> StitchedVideo:
        """Trims each clip to its scene's seconds and joins them (stream copy when the clips
        allow it, else one re-encode) into a new file beside final.mp4; the video served
        until now stays as it is until the new one is verified and published."""
        await in_thread(self.store.progress, input.job_id, "stitching", "Stitching the scenes...")
        with self.storage.scratch() as work:
            cuts = [
                media.ClipCut(
                    await self._pull(scene_key(input.job_id, cut.clip), work), cut.seconds
                )
                for cut in input.clips
            ]
            out = self.storage.staging(video_key(input.job_id, FINAL), work)
            try:
                report = await self._blocking(media.stitch, cuts, out)
                await heartbeating(self._push(out, video_key(input.job_id, out.name)))
            except media.MediaError as exc:
                out.unlink(missing_ok=True)
                raise fatal(f"The scenes could not be joined: {exc}", "InvalidVideo") from exc
            except BaseException:
                out.unlink(missing_ok=True)
                raise
        return StitchedVideo(path=out.name, duration_seconds=report.duration, mode=report.mode)

    @activity.defn
    async def publish_video(self, input: PublishVideoInput) -> DownloadedVideo:
        """The verified video becomes the job's final.mp4, in one rename."""
        final = video_key(input.job_id, FINAL)
        source = await self._head(video_key(input.job_id, input.path))
        if source is None:
            published = await self._head(final)
            if published is not None:
                # Published by an attempt whose answer was lost.
                return DownloadedVideo(path=FINAL, size_bytes=published.size, attempt=1)
            raise fatal("The stitched video is missing", "InvalidVideo")
        try:
            await self.storage.rename(source.key, final)
        except (OSError, StorageError) as exc:
            raise ApplicationError(
                f"Could not publish the video ({short_reason(exc)})", type="StorageError"
            ) from exc
        return DownloadedVideo(path=FINAL, size_bytes=source.size, attempt=1)

    @activity.defn
    async def make_previews(self, input: PreviewsInput) -> PreviewsMade:
        """The published video's poster (a representative frame, not a black first one), a
        short preview of at most 360p and about 1 MB, and a thumbnail per scene. Each is
        written beside its place and renamed into it, so a reader never gets half a file."""
        job = input.job_id
        with self.storage.scratch() as work:
            made: list[tuple[Path, str]] = []
            try:
                video = await self._pull(video_key(job, FINAL), work)
                poster = self.storage.staging(video_key(job, POSTER), work)
                made.append((poster, video_key(job, POSTER)))
                await self._blocking(media.poster, video, poster)
                preview = self.storage.staging(video_key(job, PREVIEW), work)
                made.append((preview, video_key(job, PREVIEW)))
                await self._blocking(media.preview, video, preview)
                for number, clip in input.clips:
                    name = thumbnail_name(number)
                    thumb = self.storage.staging(scene_key(job, name), work)
                    made.append((thumb, scene_key(job, name)))
                    source = await self._pull(scene_key(job, clip), work)
                    await heartbeating(self._video(media.thumbnail, source, thumb))
                for source, key in made:
                    await heartbeating(self._push(source, key))
            except (media.MediaError, OSError) as exc:
                raise fatal(
                    f"Could not make the poster and preview ({exc})", "InvalidVideo"
                ) from exc
            finally:
                for source, _ in made:
                    source.unlink(missing_ok=True)
        await in_thread(self.store.set_media_ready, input.job_id, True)
        return PreviewsMade(poster=POSTER, preview=PREVIEW, thumbnails=len(input.clips))

    async def _pull(self, key: str, work: Path) -> Path:
        try:
            return await heartbeating(self.storage.pull(key, work))
        except StorageError as exc:
            raise ApplicationError(str(exc), type="StorageError") from exc

    async def _push(self, path: Path, key: str) -> None:
        try:
            await self.storage.push(path, key)
        except StorageError as exc:
            raise ApplicationError(str(exc), type="StorageError") from exc

    async def _head(self, key: str) -> StoredObject | None:
        try:
            return await self.storage.head(key)
        except StorageError as exc:
            raise ApplicationError(str(exc), type="StorageError") from exc

    async def _delete(self, key: str) -> None:
        try:
            await self.storage.delete(key)
        except (OSError, StorageError) as exc:
            activity.logger.warning("Could not remove %s: %s", key, exc)

    def _video(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> asyncio.Future[T]:
        """`fn` on the video threads, in this activity's context (as asyncio.to_thread)."""
        call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
        return asyncio.get_running_loop().run_in_executor(self.video_threads, call)

    async def _blocking(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """A long PyAV call on a thread, heartbeating meanwhile; a cancel of the activity stops
        it at its next progress call (it removes its own partial output)."""
        stop = threading.Event()

        def progress() -> None:
            if stop.is_set():
                raise ActivityCancelled("cancelled")

        try:
            return await heartbeating(self._video(fn, *args, progress=progress, **kwargs))
        finally:
            stop.set()

    async def _stream_to(self, url: str, headers: dict[str, str], path: Path, limit: int) -> int:
        """The download, in an activity's terms: a gone or oversized video cannot be mended
        by trying again; a failed transfer can."""
        try:
            return await stream_to_file(
                self.http,
                url,
                path,
                headers=headers,
                limit=limit,
                on_progress=activity.heartbeat,
            )
        except (VideoGone, VideoTooLarge) as exc:
            kind = "VideoGone" if isinstance(exc, VideoGone) else "VideoTooLarge"
            raise fatal(str(exc), kind) from exc
        except DownloadError as exc:
            raise ApplicationError(str(exc), type="DownloadFailed") from exc

    @activity.defn
    async def verify_video(self, input: VerifyVideoInput) -> VideoInfo:
        """The stitched video, decoded in full before anyone is served it."""
        await in_thread(self.store.progress, input.job_id, "verifying", "Verifying video...")
        key = video_key(input.job_id, input.path)
        with self.storage.scratch() as work:
            path = await self._pull(key, work)
            try:
                # Heartbeats while the decode runs: a worker killed mid-verify is noticed
                # within the heartbeat timeout, not after the whole start-to-close timeout.
                info = await heartbeating(self._video(probe_video, path))
            except InvalidVideo as exc:
                # A broken file must never be served as the job's video.
                await self._delete(key)
                raise fatal(str(exc), "InvalidVideo") from exc
        return info


def _scene_name(number: int) -> str:
    return f"scene {number}" if number else "the video"


class ActivityCancelled(Exception):
    """Raised inside a PyAV call on a thread when its activity was cancelled."""


class InvalidVideo(ValueError):
    pass


def _check_mp4_signature(path: Path) -> None:
    if not path.is_file():
        raise InvalidVideo("The downloaded clip is missing")
    with path.open("rb") as handle:
        head = handle.read(12)
    if len(head) < 8 or head[4:8] != MP4_MAGIC:
        raise InvalidVideo("Downloaded file is not an MP4 (no 'ftyp' box at byte 4)")


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
