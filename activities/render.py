"""The RenderVideo activities. Each one records its progress in the job store."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import av
import httpx
from temporalio import activity
from temporalio.exceptions import ApplicationError, ApplicationErrorCategory

from backend.cost import render_cost
from backend.database import JobNotFound, JobStatus, JobStore
from backend.provider import ProviderClient, ReplicateError, is_retryable
from backend.settings import Settings
from backend.storyboard import NO_STORYBOARD, NOT_APPROVED, Storyboard, StoryboardError
from workflows.payloads import (
    CancelPredictionInput,
    CancelPredictionResult,
    CostRecord,
    DownloadedVideo,
    DownloadVideoInput,
    ExtractedImages,
    JobClosed,
    JobRef,
    MarkJobFailedInput,
    PollPredictionInput,
    PredictionOutcome,
    PredictionRef,
    RecordCostInput,
    StartPredictionInput,
    StoryboardSummary,
    VerifyVideoInput,
    VideoInfo,
)

T = TypeVar("T")

CHUNK = 1024 * 1024
MP4_MAGIC = b"ftyp"
DOWNLOAD_ATTEMPTS = 3


def video_url_for(job_id: int) -> str:
    return f"/api/videos/{job_id}/data"


def _fatal(message: str, kind: str) -> ApplicationError:
    return ApplicationError(message, type=kind, non_retryable=True)


class RenderActivities:
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
        """Every activity, for registering on a worker."""
        return [
            self.validate_storyboard,
            self.extract_images,
            self.start_prediction,
            self.poll_prediction,
            self.cancel_prediction,
            self.download_video,
            self.verify_video,
            self.record_cost,
            self.mark_job_failed,
        ]

    async def _db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        # SQLModel sessions block; keep them off the worker's event loop.
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except JobNotFound as exc:
            raise _fatal(str(exc), "JobNotFound") from exc

    async def _progress(self, job_id: int, stage: str, message: str, **counts: int) -> None:
        await self._db(self.store.progress, job_id, stage, message, **counts)

    async def _storyboard(self, job_id: int) -> Storyboard:
        job = await self._db(self.store.get, job_id)
        if not job["approved"]:
            raise _fatal(NOT_APPROVED, "StoryboardInvalid")
        if not job["storyboard_data"]:
            raise _fatal(NO_STORYBOARD, "StoryboardInvalid")
        try:
            storyboard = Storyboard.parse(job["storyboard_data"])
            storyboard.require_images()
        except StoryboardError as exc:
            raise _fatal(str(exc), "StoryboardInvalid") from exc
        return storyboard

    @activity.defn
    async def validate_storyboard(self, input: JobRef) -> StoryboardSummary:
        await self._progress(input.job_id, "validating", "Validating storyboard...")
        storyboard = await self._storyboard(input.job_id)
        return StoryboardSummary(
            scenes_total=len(storyboard.scenes), planned_seconds=storyboard.total_seconds
        )

    @activity.defn
    async def extract_images(self, input: JobRef) -> ExtractedImages:
        storyboard = await self._storyboard(input.job_id)
        urls = storyboard.require_images()
        await self._progress(
            input.job_id,
            "extracting",
            f"Extracted {len(urls)} images from the storyboard",
            scenes_total=len(urls),
            scenes_completed=0,
        )
        prompts = [scene.prompt for scene in storyboard.scenes if scene.prompt]
        return ExtractedImages(
            image_urls=urls,
            durations=[scene.duration_seconds for scene in storyboard.scenes],
            prompt=" / ".join(prompts) or None,
        )

    @activity.defn
    async def start_prediction(self, input: StartPredictionInput) -> PredictionRef:
        job = await self._db(self.store.get, input.job_id)
        if job["prediction_id"]:
            # An earlier attempt created it and recorded it, then lost its answer: never
            # pay for a second one.
            state = await self.provider.get(job["prediction_id"])
            return PredictionRef(prediction_id=state.id, status=state.status, adopted=True)

        fields = self.settings
        model_input: dict[str, Any] = {
            fields.model_images_field: input.image_urls,
            fields.model_durations_field: input.durations,
        }
        if input.prompt and fields.model_prompt_field:
            model_input[fields.model_prompt_field] = input.prompt
        try:
            state = await self.provider.create(model_input)
        except ReplicateError as exc:
            message = f"Replicate refused the prediction (HTTP {exc.status}): {exc.detail or exc}"
            if is_retryable(exc):
                raise ApplicationError(message, type="ProviderUnavailable") from exc
            raise _fatal(message, "BadRequest") from exc
        except httpx.HTTPError as exc:
            raise ApplicationError(
                f"Could not reach Replicate at {self.provider.base_url}: {exc!r}",
                type="ProviderUnavailable",
            ) from exc
        await self._db(self.store.set_prediction, input.job_id, state.id)
        await self._progress(input.job_id, "rendering", "Rendering video from images...")
        return PredictionRef(prediction_id=state.id, status=state.status)

    @activity.defn
    async def poll_prediction(self, input: PollPredictionInput) -> PredictionOutcome:
        try:
            state = await self.provider.get(input.prediction_id)
        except ReplicateError as exc:
            message = (
                f"Could not read prediction {input.prediction_id} "
                f"(HTTP {exc.status}): {exc.detail or exc}"
            )
            if is_retryable(exc):
                raise ApplicationError(message, type="ProviderUnavailable") from exc
            raise _fatal(message, "BadRequest") from exc
        except httpx.HTTPError as exc:
            raise ApplicationError(
                f"Could not reach Replicate: {exc!r}", type="ProviderUnavailable"
            ) from exc
        if not state.terminal:
            await self._progress(
                input.job_id,
                "rendering",
                f"Rendering video from images... (prediction {state.status}, "
                f"check {activity.info().attempt})",
            )
            # Benign: "not ready yet" is the normal way this activity waits.
            raise ApplicationError(
                f"Prediction {state.id} is still {state.status}",
                type="PredictionPending",
                category=ApplicationErrorCategory.BENIGN,
            )
        await self._progress(input.job_id, "rendered", f"Prediction {state.status}")
        return PredictionOutcome(
            prediction_id=state.id,
            status=state.status,
            output_url=state.output_url,
            error=state.error,
        )

    @activity.defn
    async def cancel_prediction(self, input: CancelPredictionInput) -> CancelPredictionResult:
        state = await self.provider.cancel(input.prediction_id)
        await self._progress(
            input.job_id, "cancelling", f"Prediction {state.id} cancelled ({state.status})"
        )
        return CancelPredictionResult(prediction_id=state.id, status=state.status)

    @activity.defn
    async def download_video(self, input: DownloadVideoInput) -> DownloadedVideo:
        attempt = activity.info().attempt
        await self._db(self.store.set_download_retries, input.job_id, attempt - 1)
        await self._progress(
            input.job_id,
            "downloading",
            f"Downloading video (attempt {attempt} of {DOWNLOAD_ATTEMPTS})...",
        )
        if not input.url.lower().startswith(("http://", "https://")):
            raise _fatal(f"Refusing to download a non-http(s) URL: {input.url}", "BadRequest")

        folder = self.settings.video_dir(input.job_id)
        folder.mkdir(parents=True, exist_ok=True)
        # A worker killed mid-download leaves its partial file; one download runs per job.
        for stale in folder.glob(".download-*.part"):
            stale.unlink(missing_ok=True)
        final = folder / "final.mp4"
        partial = folder / f".download-{uuid.uuid4().hex}.part"
        headers = (
            {"Authorization": f"Bearer {self.settings.api_token}"}
            if self.provider.owns(input.url)
            else {}
        )
        limit = self.settings.max_video_bytes
        try:
            size = await self._stream_to(input.url, headers, partial, limit)
            os.replace(partial, final)
        finally:
            partial.unlink(missing_ok=True)
        return DownloadedVideo(path=str(final), size_bytes=size, attempt=attempt)

    async def _stream_to(self, url: str, headers: dict[str, str], path: Path, limit: int) -> int:
        too_big = f"Video is larger than the {limit}-byte limit (MAX_VIDEO_BYTES)"
        size = 0
        try:
            async with self.http.stream("GET", url, headers=headers) as response:
                if response.status_code in (404, 410):
                    raise _fatal(
                        f"Video is gone from {url} (HTTP {response.status_code})", "BadRequest"
                    )
                if response.status_code >= 400:
                    raise ApplicationError(
                        f"Video download failed: HTTP {response.status_code} from {url}",
                        type="DownloadFailed",
                    )
                declared = response.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > limit:
                    raise _fatal(too_big, "VideoTooLarge")
                with path.open("wb") as out:
                    async for chunk in response.aiter_bytes(CHUNK):
                        size += len(chunk)
                        if size > limit:
                            raise _fatal(too_big, "VideoTooLarge")
                        out.write(chunk)
                        activity.heartbeat(size)
        except httpx.HTTPError as exc:
            raise ApplicationError(
                f"Video download failed: {exc!r}", type="DownloadFailed"
            ) from exc
        return size

    @activity.defn
    async def verify_video(self, input: VerifyVideoInput) -> VideoInfo:
        await self._progress(input.job_id, "verifying", "Verifying video...")
        path = Path(input.path)
        try:
            info = await asyncio.to_thread(probe_video, path)
        except InvalidVideo as exc:
            # A broken file must never be served as the job's video.
            path.unlink(missing_ok=True)
            raise _fatal(str(exc), "InvalidVideo") from exc
        return info

    @activity.defn
    async def record_cost(self, input: RecordCostInput) -> CostRecord:
        cost = render_cost(
            input.image_count,
            Decimal(str(round(input.duration_seconds, 3))),
            price_per_image=self.settings.price_per_image,
            price_per_second=self.settings.price_per_video_second,
        )
        url = video_url_for(input.job_id)
        await self._db(self.store.complete, input.job_id, video_url=url, actual_cost=cost)
        return CostRecord(actual_cost=str(cost), video_url=url)

    @activity.defn
    async def mark_job_failed(self, input: MarkJobFailedInput) -> JobClosed:
        status = JobStatus(input.status)
        notes = []
        if status is JobStatus.CANCELLED:
            # A cancelled job keeps no partial download behind.
            for leftover in self.settings.video_dir(input.job_id).glob(".download-*.part"):
                leftover.unlink(missing_ok=True)
                notes.append(f"removed {leftover.name}")
        await self._db(self.store.fail, input.job_id, input.message, status=status)
        return JobClosed(job_id=input.job_id, status=status, notes=notes)


class InvalidVideo(ValueError):
    pass


def probe_video(path: Path) -> VideoInfo:
    """Checks the MP4 signature, then decodes every frame: a header alone proves nothing."""
    if not path.is_file():
        raise InvalidVideo(f"Downloaded video is missing: {path}")
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
        raise InvalidVideo(f"MP4 could not be decoded (truncated or corrupt): {exc}") from exc
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
