"""The RenderVideo activities. Each one records its progress in the job store."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import av
import httpcore
import httpx
from temporalio import activity
from temporalio.exceptions import ApplicationError, ApplicationErrorCategory

from backend.cost import render_cost
from backend.database import JobNotFound, JobStatus, JobStore
from backend.provider import PredictionState, ProviderClient, ReplicateError, is_retryable
from backend.settings import Settings
from backend.storyboard import NO_STORYBOARD, NOT_APPROVED, Storyboard, StoryboardError
from workflows.payloads import (
    ApprovalRecorded,
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
    RecordApprovalInput,
    RecordCostInput,
    StartPredictionInput,
    StoryboardSummary,
    ValidateStoryboardInput,
    VerifyVideoInput,
    VideoInfo,
)

T = TypeVar("T")

# A download reads and writes up to this many bytes at a time, and heartbeats its progress
# after each write: one a MiB was ~5% of the CPU of a loopback download (bench/download.py).
# _heartbeating keeps it alive in between.
CHUNK = 4 * 1024 * 1024
MP4_MAGIC = b"ftyp"
DOWNLOAD_ATTEMPTS = 3
# Heartbeats go out this often during long calls, so a cancel or a dead worker is
# noticed within the activity's heartbeat timeout rather than its whole run time.
HEARTBEAT_EVERY = 1.0
# A create that went through unseen shows up in the provider's list this close to its intent.
CLOCK_SLACK = timedelta(minutes=2)


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
            self.record_approval,
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

    async def _storyboard(self, job_id: int, *, require_approval: bool = True) -> Storyboard:
        job = await self._db(self.store.get, job_id)
        if require_approval and not job["approved"]:
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
    async def validate_storyboard(self, input: ValidateStoryboardInput) -> StoryboardSummary:
        await self._progress(input.job_id, "validating", "Validating storyboard...")
        storyboard = await self._storyboard(input.job_id, require_approval=input.require_approval)
        estimate = render_cost(
            len(storyboard.scenes),
            Decimal(str(round(storyboard.total_seconds, 3))),
            price_per_image=self.settings.price_per_image,
            price_per_second=self.settings.price_per_video_second,
        )
        job = await self._db(self.store.set_estimate, input.job_id, estimate)
        max_cost = job["max_cost"]
        return StoryboardSummary(
            scenes_total=len(storyboard.scenes),
            planned_seconds=storyboard.total_seconds,
            estimated_cost=str(estimate),
            max_cost=f"{Decimal(str(max_cost)):.2f}" if max_cost is not None else None,
        )

    @activity.defn
    async def record_approval(self, input: RecordApprovalInput) -> ApprovalRecorded:
        job = await self._db(self.store.record_approval, input.job_id, input.approved_by)
        return ApprovalRecorded(job_id=input.job_id, status=job["status"])

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

    def _model_input(self, input: StartPredictionInput) -> dict[str, Any]:
        fields = self.settings
        model_input: dict[str, Any] = {
            **fields.model_extra_input,
            fields.model_images_field: input.image_urls,
            fields.model_durations_field: input.durations,
        }
        if input.prompt and fields.model_prompt_field:
            model_input[fields.model_prompt_field] = input.prompt
        return model_input

    def _digest(self, model_input: dict[str, Any]) -> str:
        model = self.settings.replicate_model.partition(":")[0]
        canonical = json.dumps({"model": model, "input": model_input}, sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()

    @activity.defn
    async def start_prediction(self, input: StartPredictionInput) -> PredictionRef:
        """Creates the job's one prediction, or adopts the one an earlier attempt created.

        Replicate has no idempotency key, so the ledger records the intent before the
        create and the id after it. An intent without an id means a worker died (or the
        answer was lost) mid-create: the provider's list is searched for that prediction
        before anything new is created.
        """
        run_id = activity.info().workflow_run_id
        model_input = self._model_input(input)
        digest = self._digest(model_input)
        webhook = self.settings.webhook_url
        entries = await self._db(self.store.ledger, input.job_id, run_id)

        for entry in entries:
            if entry["prediction_id"] and entry["state"] in ("created", "adopted"):
                state = await self._provider_call(self.provider.get(entry["prediction_id"]))
                return self._ref(state, adopted=True, webhook=bool(webhook))

        job = await self._db(self.store.get, input.job_id)
        earlier = job["prediction_id"]
        if earlier and not entries:
            # An earlier run of this job (terminated, so it cleaned nothing up) left its
            # prediction running: adopt it rather than pay for the same render twice.
            state = await self._provider_call(self.provider.get(earlier))
            if not state.terminal and await self._db(
                self.store.move_to_run, input.job_id, earlier, run_id
            ):
                return self._ref(state, adopted=True, webhook=bool(webhook))

        unrecorded = [entry for entry in entries if not entry["prediction_id"]]
        if unrecorded:
            since = _earliest_intent(unrecorded)
            adopted = await self._adopt_unrecorded(
                input.job_id, run_id, digest, unrecorded[-1]["id"], since
            )
            if adopted is not None:
                return self._ref(adopted, adopted=True, webhook=bool(webhook))

        entry_id = await self._db(
            self.store.record_intent,
            input.job_id,
            run_id,
            digest,
            workflow_id=activity.info().workflow_id,
        )
        state = await self._provider_call(
            self.provider.create(
                model_input,
                webhook=f"{webhook}?job_id={input.job_id}" if webhook else None,
                webhook_events_filter=["completed"] if webhook else None,
            ),
            refused="Replicate refused the prediction",
        )
        await self._db(self.store.record_prediction, entry_id, state.id, "created")
        await self._progress(input.job_id, "rendering", "Rendering video from images...")
        return self._ref(state, adopted=False, webhook=bool(webhook))

    @staticmethod
    def _ref(state: PredictionState, *, adopted: bool, webhook: bool) -> PredictionRef:
        return PredictionRef(
            prediction_id=state.id,
            status=state.status,
            adopted=adopted,
            webhook=webhook,
            output_url=state.output_url,
            error=state.error,
        )

    async def _find_unrecorded(self, digest: str, since: datetime) -> list[dict[str, Any]]:
        """Predictions with this exact input created since `since` that no ledger entry holds,
        newest first."""
        model = self.settings.replicate_model.partition(":")[0]
        listed = await self._provider_call(self.provider.list_since(since - CLOCK_SLACK))
        candidates = [
            item
            for item in listed
            if isinstance(item.get("input"), dict)
            and self._digest(item["input"]) == digest
            and item.get("model") in (None, model)
        ]
        ids = [item["id"] for item in candidates]
        claimed = await self._db(self.store.claimed, ids)
        return [item for item in candidates if item["id"] not in claimed]

    async def _adopt_unrecorded(
        self,
        job_id: int,
        run_id: str,
        digest: str,
        entry_id: int,
        since: datetime,
    ) -> PredictionState | None:
        found = await self._find_unrecorded(digest, since)
        adopted: PredictionState | None = None
        # Newest first: keep the one most likely still rendering; cancel the rest.
        for item in found:
            if adopted is None and item.get("status") not in ("failed", "canceled", "aborted"):
                if await self._db(self.store.record_prediction, entry_id, item["id"], "adopted"):
                    adopted = PredictionState.from_json(item)
                    activity.logger.warning(
                        "Adopted prediction %s, created by an attempt that did not record it",
                        item["id"],
                    )
                    continue
            await self._cancel_orphan(job_id, run_id, digest, item["id"])
        if adopted is not None:
            await self._progress(job_id, "rendering", "Rendering video from images...")
        return adopted

    async def _cancel_orphan(
        self, job_id: int, run_id: str, digest: str, prediction_id: str
    ) -> None:
        state = await self._provider_call(self.provider.cancel(prediction_id))
        await self._db(self.store.record_orphan, job_id, run_id, prediction_id, digest)
        activity.logger.warning(
            "Cancelled orphaned prediction %s of job %s (%s)", prediction_id, job_id, state.status
        )

    async def _provider_call(
        self, call: Awaitable[T], refused: str = "Replicate refused the request"
    ) -> T:
        """A provider call with heartbeats, and Replicate's errors in our words."""
        try:
            return await _heartbeating(call)
        except ReplicateError as exc:
            message = f"{refused} (HTTP {exc.status}): {exc.detail or exc}"
            if is_retryable(exc):
                raise ApplicationError(message, type="ProviderUnavailable") from exc
            raise _fatal(message, "BadRequest") from exc
        except httpx.HTTPError as exc:
            raise ApplicationError(
                f"Could not reach Replicate at {self.provider.base_url}: {exc!r}",
                type="ProviderUnavailable",
            ) from exc
        except TimeoutError as exc:
            raise ApplicationError(
                f"Replicate at {self.provider.base_url} did not answer in time",
                type="ProviderUnavailable",
            ) from exc

    @activity.defn
    async def poll_prediction(self, input: PollPredictionInput) -> PredictionOutcome:
        state = await self._provider_call(
            self.provider.get(input.prediction_id),
            refused=f"Could not read prediction {input.prediction_id}",
        )
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
        """Cancels the run's prediction, and any its ledger shows was created unrecorded."""
        run_id = activity.info().workflow_run_id
        ids = [input.prediction_id] if input.prediction_id else []
        entries = await self._db(self.store.ledger, input.job_id, run_id)
        ids += [
            e["prediction_id"]
            for e in entries
            if e["prediction_id"]
            and e["state"] != "orphan_cancelled"
            and e["prediction_id"] not in ids
        ]
        status = None
        for prediction_id in ids:
            state = await self._provider_call(self.provider.cancel(prediction_id))
            status = status or state.status
        unrecorded = [e for e in entries if not e["prediction_id"]]
        if unrecorded:
            since = _earliest_intent(unrecorded)
            digest = unrecorded[-1]["input_digest"]
            for item in await self._find_unrecorded(digest, since):
                await self._cancel_orphan(input.job_id, run_id, digest, item["id"])
                ids.append(item["id"])
        if ids:
            await self._progress(
                input.job_id, "cancelling", f"Prediction {', '.join(ids)} cancelled"
            )
        return CancelPredictionResult(cancelled=ids, status=status)

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
            size = await _heartbeating(self._stream_to(input.url, headers, partial, limit))
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
                                    raise _fatal(too_big, "VideoTooLarge")
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
        over = input.max_cost is not None and cost > Decimal(input.max_cost)
        if over:
            activity.logger.warning(
                "Job %s cost $%s, over its budget of $%s", input.job_id, cost, input.max_cost
            )
        await self._db(
            self.store.complete, input.job_id, video_url=url, actual_cost=cost, over_budget=over
        )
        return CostRecord(actual_cost=str(cost), video_url=url, over_budget=over)

    @activity.defn
    async def mark_job_failed(self, input: MarkJobFailedInput) -> JobClosed:
        status = JobStatus(input.status)
        notes = []
        job = await self._db(self.store.get, input.job_id)
        if job["status"] != JobStatus.COMPLETED:
            # A job that did not complete keeps no download behind, partial or whole.
            folder = self.settings.video_dir(input.job_id)
            for leftover in [*folder.glob(".download-*.part"), folder / "final.mp4"]:
                if leftover.exists():
                    leftover.unlink(missing_ok=True)
                    notes.append(f"removed {leftover.name}")
        await self._db(self.store.fail, input.job_id, input.message, status=status)
        return JobClosed(job_id=input.job_id, status=status, notes=notes)


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


async def _heartbeating(call: Awaitable[T]) -> T:
    """Awaits `call`, heartbeating meanwhile; a cancel of the activity cancels the call."""
    task = asyncio.ensure_future(call)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=HEARTBEAT_EVERY)
            if done:
                return task.result()
            activity.heartbeat()
    finally:
        task.cancel()


def _earliest_intent(entries: list[dict[str, Any]]) -> datetime:
    # SQLite hands datetimes back without their zone; they were written in UTC.
    moment: datetime = min(entry["intent_at"] for entry in entries)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


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
