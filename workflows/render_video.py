"""The RenderVideo workflow: a storyboard in, a verified and costed MP4 out."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from datetime import datetime, timedelta
from decimal import Decimal
from typing import TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy, SearchAttributeKey
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    RetryState,
    TimeoutType,
    is_cancelled_exception,
)
from temporalio.exceptions import (
    TimeoutError as TemporalTimeoutError,
)
from temporalio.workflow import ActivityCancellationType

# Passed through: plain dataclasses, the same in and out of the sandbox, so they are not
# built again for every run (a profile showed that was a tenth of the worker's CPU).
with workflow.unsafe.imports_passed_through():
    from activities.jobs import JobActivities
    from activities.media import MediaActivities
    from activities.predictions import PredictionActivities
    from workflows.payloads import (
        RENDER_WORKFLOW,
        ApprovalResult,
        ApproveRenderInput,
        ApproveSignal,
        CancelPredictionInput,
        DownloadVideoInput,
        JobRef,
        MarkJobFailedInput,
        PollPredictionInput,
        PredictionOutcome,
        PredictionRef,
        PredictionWebhook,
        RecordApprovalInput,
        RecordCostInput,
        RenderProgress,
        RenderVideoInput,
        RenderVideoResult,
        ReviewSignal,
        StartPredictionInput,
        StoryboardSummary,
        ValidateStoryboardInput,
        VerifyVideoInput,
    )

T = TypeVar("T")

WORKFLOW_NAME = RENDER_WORKFLOW

# Find a job's runs with `temporal workflow list -q "JobId = '12'"`, or by stage.
JOB_ID = SearchAttributeKey.for_keyword("JobId")
RENDER_STAGE = SearchAttributeKey.for_keyword("RenderStage")
SEARCH_ATTRIBUTES = (JOB_ID, RENDER_STAGE)

TERMINAL = frozenset({"succeeded", "failed", "canceled", "aborted"})

# Validation and bad-input errors carry these types; retrying them cannot help.
NON_RETRYABLE = [
    "StoryboardInvalid",
    "JobNotFound",
    "InvalidVideo",
    "VideoTooLarge",
    "VideoGone",
    "BadRequest",
    "OutputNotWritable",
    "LedgerConflict",
]
# Failures our activities word for users; anything else is described by its step alone.
OUR_ERRORS = frozenset(
    [
        *NON_RETRYABLE,
        "ProviderUnavailable",
        "ProviderThrottled",
        "DownloadFailed",
        "StorageError",
        "SameInputInFlight",
        "RenderFailed",
        "ReviewExpired",
    ]
)
# A webhook wakes the run to read the prediction; after this many wake-ups that found it
# still running, webhooks for it are not believed any more and polling decides.
MAX_WAKEUPS = 3

QUICK = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=30),
    maximum_attempts=5,
    non_retryable_error_types=NON_RETRYABLE,
)
# Throttling (429, waited out as long as the provider says), provider outages and another
# job's create of the same input pass within minutes (bounded by CREATE_WINDOW); a bad request
# fails at once.
PROVIDER_CREATE = RetryPolicy(
    initial_interval=timedelta(seconds=5),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=60),
    non_retryable_error_types=NON_RETRYABLE,
)
CREATE_WINDOW = timedelta(minutes=15)
# The seed's download retries: 3 attempts. A failed transfer waits 30 s, then 90 s (the
# activity asks for those delays with its error); an attempt lost with its worker (a heartbeat
# timeout) is retried at once, so a crash does not wait out a backoff meant for a flaky CDN.
DOWNLOAD_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=1.0,
    maximum_attempts=3,
    non_retryable_error_types=NON_RETRYABLE,
)
# Closing a job must not be lost to a database blip: keep trying for a day.
PERSISTENT = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=1),
)
# Long calls heartbeat every second: a dead worker or a cancel is noticed this fast.
HEARTBEAT = timedelta(seconds=5)


class RenderFailed(Exception):
    """A failure already explained in words fit for the job's `error_message`."""


class ReviewExpired(RenderFailed):
    """Nobody approved the job within its review window."""


@workflow.defn(name=WORKFLOW_NAME)
class RenderVideo:
    @workflow.init
    def __init__(self, input: RenderVideoInput) -> None:
        self._job_id = input.job_id
        # A run started without review was approved before it started.
        self._approved = not input.review
        self._approved_by: str | None = None
        self._validation: StoryboardSummary | None = None
        self._validation_error: str | None = None
        self._prediction_id: str | None = None
        self._prediction_requested = False
        # Approve and review requests received: each one was preceded by the API changing
        # the job's row for this run, so a run that closes must write the row after the last.
        self._requests = 0
        # Predictions a webhook woke us for, not yet read; wake-ups read per prediction.
        self._woken: set[str] = set()
        self._wakeups: dict[str, int] = {}
        self._progress = RenderProgress(
            job_id=input.job_id, stage="queued", message="Waiting for a worker"
        )

    # -- the outside world's handles: Web UI, `temporal workflow signal/query/update` --

    @workflow.signal(name="approve")
    async def approve(self, input: ApproveSignal | None = None) -> None:
        """Approves a run waiting in review; harmless at any other time."""
        self._requests += 1
        if not self._approved:
            self._approved = True
            by = input.approved_by if input else None
            self._approved_by = None if by is None else str(by)[:200]

    @workflow.signal(name="review")
    async def review(self, input: ReviewSignal | None = None) -> None:
        """Sent with the start of a run for review; counted like an approval request."""
        self._requests += 1

    @workflow.update(name="approve_render")
    async def approve_render(self, input: ApproveRenderInput) -> ApprovalResult:
        """Like the `approve` signal, but answers once the storyboard is validated: with the
        validation errors when it cannot be rendered."""
        await workflow.wait_condition(
            lambda: self._validation is not None or self._validation_error is not None
        )
        if self._validation_error is not None:
            # The run is closing as failed with this very message.
            return ApprovalResult(
                job_id=self._job_id, accepted=False, stage="failed", errors=[self._validation_error]
            )
        if not self._approved:
            self._approved = True
            self._approved_by = input.approved_by
        return ApprovalResult(job_id=self._job_id, accepted=True, stage=self._progress.stage)

    @approve_render.validator
    def _check_approve_render(self, input: ApproveRenderInput) -> None:
        if self._progress.stage in ("completed", "failed", "cancelled", "expired"):
            raise ValueError(f"Job {self._job_id} is already {self._progress.stage}")

    @workflow.signal(name="prediction_finished")
    async def prediction_finished(self, input: PredictionWebhook) -> None:
        """A verified webhook, relayed by the API: a wake-up call, not the truth. The run
        reads the prediction from the provider before it believes anything."""
        if input.prediction_id == self._prediction_id or self._prediction_id is None:
            self._woken.add(input.prediction_id)

    @workflow.query(name="progress")
    def progress(self) -> RenderProgress:
        return self._progress

    # -- the run --

    @workflow.run
    async def run(self, input: RenderVideoInput) -> RenderVideoResult:
        try:
            return await self._render(input)
        # CancelledError is a BaseException: a cancel that lands outside an activity arrives so.
        except (Exception, asyncio.CancelledError) as err:
            cancelled = is_cancelled_exception(err)
            if cancelled:
                status, message = "cancelled", "Render cancelled"
            elif isinstance(err, ReviewExpired):
                status, message = "expired", str(err)
            else:
                status, message = "failed", _explain(err)
            await self._close_failed(input.job_id, message, status)
            if cancelled:
                raise
            kind = "ReviewExpired" if status == "expired" else "RenderFailed"
            raise ApplicationError(message, type=kind, non_retryable=True) from None

    async def _render(self, input: RenderVideoInput) -> RenderVideoResult:
        job_id = input.job_id
        self._stage("validating", "Validating storyboard...")
        try:
            summary = await workflow.execute_activity_method(
                JobActivities.validate_storyboard,
                ValidateStoryboardInput(job_id=job_id, require_approval=not input.review),
                start_to_close_timeout=timedelta(seconds=30),
                retry_policy=QUICK,
                summary=f"Validate the storyboard of job {job_id}",
            )
        except ActivityError as err:
            self._validation_error = _explain(err)
            raise
        self._progress.scenes_total = summary.scenes_total
        self._progress.estimated_cost = summary.estimated_cost
        self._progress.max_cost = summary.max_cost
        # The budget is part of validation: checked before anything is billed, and before
        # a reviewer is asked to approve a render that could never start.
        if summary.max_cost is not None and summary.estimated_cost is not None:
            if Decimal(summary.estimated_cost) > Decimal(summary.max_cost):
                self._validation_error = (
                    f"Estimated cost ${summary.estimated_cost} exceeds the job's budget "
                    f"(max_cost) of ${summary.max_cost}; no prediction was created"
                )
                raise RenderFailed(self._validation_error)
        self._validation = summary

        if input.review:
            await self._await_approval(input)

        images = await workflow.execute_activity_method(
            JobActivities.extract_images,
            JobRef(job_id),
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=QUICK,
            summary=f"Extract the scene images of job {job_id}",
        )
        started_at = workflow.now()
        self._stage("starting", f"Starting a prediction for {len(images.image_urls)} images")
        self._prediction_requested = True
        prediction = await workflow.execute_activity_method(
            PredictionActivities.start_prediction,
            StartPredictionInput(
                job_id=job_id,
                image_urls=images.image_urls,
                durations=images.durations,
                prompt=images.prompt,
            ),
            start_to_close_timeout=timedelta(minutes=2),
            schedule_to_close_timeout=CREATE_WINDOW,
            heartbeat_timeout=HEARTBEAT,
            retry_policy=PROVIDER_CREATE,
            # A cancel lets the create finish or fail first, so the sweep sees its result.
            cancellation_type=ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
            summary=f"Create (or adopt) the Replicate prediction of job {job_id}",
        )
        self._prediction_id = prediction.prediction_id
        self._progress.prediction_id = prediction.prediction_id
        self._progress.prediction_status = prediction.status

        outcome = await self._wait_for_prediction(input, prediction, started_at)
        self._progress.prediction_status = outcome.status
        if outcome.status != "succeeded":
            raise RenderFailed(
                f"Prediction {outcome.prediction_id} {outcome.status}: "
                f"{outcome.error or 'the provider gave no reason'}"
            )
        if not outcome.output_url:
            raise RenderFailed(
                f"Prediction {outcome.prediction_id} succeeded but returned no video URL"
            )

        self._stage("downloading", "Downloading video...")
        downloaded = await workflow.execute_activity_method(
            MediaActivities.download_video,
            DownloadVideoInput(job_id=job_id, url=outcome.output_url),
            start_to_close_timeout=timedelta(minutes=30),
            heartbeat_timeout=HEARTBEAT,
            retry_policy=DOWNLOAD_RETRY,
            # A cancel waits for the download to stop and remove its partial file.
            cancellation_type=ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
            summary=f"Download the video of job {job_id}",
        )
        self._stage("verifying", "Verifying video...")
        video = await workflow.execute_activity_method(
            MediaActivities.verify_video,
            VerifyVideoInput(job_id=job_id, path=downloaded.path),
            start_to_close_timeout=timedelta(minutes=10),
            heartbeat_timeout=HEARTBEAT,
            retry_policy=QUICK,
            summary=f"Verify the MP4 of job {job_id}",
        )
        # The commit point: once the cost is being written the job completes, and a cancel
        # that arrives now is too late (the job store and the run must tell the same story).
        cost = await _uncancellable(
            workflow.execute_activity_method(
                JobActivities.record_cost,
                RecordCostInput(
                    job_id=job_id,
                    image_count=summary.scenes_total,
                    duration_seconds=video.duration_seconds,
                    max_cost=summary.max_cost,
                ),
                start_to_close_timeout=timedelta(seconds=30),
                retry_policy=PERSISTENT,
                summary=f"Record the cost of job {job_id}",
            )
        )
        self._progress.scenes_completed = summary.scenes_total
        self._stage(
            "completed",
            f"Video ready; cost ${cost.actual_cost}"
            + (f", over the budget of ${summary.max_cost}" if cost.over_budget else ""),
        )
        return RenderVideoResult(
            job_id=job_id,
            status="completed",
            video_url=cost.video_url,
            actual_cost=cost.actual_cost,
            duration_seconds=video.duration_seconds,
            prediction_id=prediction.prediction_id,
            over_budget=cost.over_budget,
        )

    async def _await_approval(self, input: RenderVideoInput) -> None:
        # An approval that came before validation finished passes straight through, and is
        # still recorded in the job store below.
        window = _duration(input.review_timeout_seconds)
        if not self._approved:
            self._stage(
                "awaiting_approval", f"Validated; waiting for approval (expires in {window})"
            )
            self._progress.awaiting_approval = True
        try:
            await workflow.wait_condition(
                lambda: self._approved,
                timeout=timedelta(seconds=input.review_timeout_seconds),
                timeout_summary="review window",
            )
        except TimeoutError:
            raise ReviewExpired(
                f"Review expired: job {input.job_id} was not approved within {window}"
            ) from None
        self._progress.awaiting_approval = False
        by = f" by {self._approved_by}" if self._approved_by else ""
        self._stage("approved", f"Approved{by}")
        await workflow.execute_activity_method(
            JobActivities.record_approval,
            RecordApprovalInput(job_id=input.job_id, approved_by=self._approved_by),
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=PERSISTENT,
            summary=f"Record the approval of job {input.job_id}",
        )

    async def _wait_for_prediction(
        self, input: RenderVideoInput, prediction: PredictionRef, started_at: datetime
    ) -> PredictionOutcome:
        """Until the provider says the prediction has ended, or the render timeout passes.

        A webhook wakes the run early: it then reads the prediction once (the provider's word,
        not the webhook's, decides). Without a webhook it polls.
        """
        prediction_id = prediction.prediction_id
        if prediction.status in TERMINAL:
            return PredictionOutcome(
                prediction_id=prediction_id,
                status=prediction.status,
                output_url=prediction.output_url,
                error=prediction.error,
            )
        deadline = started_at + timedelta(seconds=input.render_timeout_seconds)

        def woken() -> bool:
            return (
                prediction_id in self._woken and self._wakeups.get(prediction_id, 0) < MAX_WAKEUPS
            )

        if prediction.webhook:
            self._stage("rendering", "Rendering video from images... (waiting for the webhook)")
            webhook_deadline = min(
                workflow.now() + timedelta(seconds=input.webhook_wait_seconds), deadline
            )
            while (wait := webhook_deadline - workflow.now()) > timedelta(0):
                try:
                    await workflow.wait_condition(
                        woken, timeout=max(wait, timedelta(seconds=1)), timeout_summary="webhook"
                    )
                except TimeoutError:
                    workflow.logger.info("No webhook for %s yet; polling instead", prediction_id)
                    break
                outcome = await self._read_prediction(input.job_id, prediction_id)
                if outcome.status in TERMINAL:
                    return outcome
                if not woken() and self._wakeups[prediction_id] >= MAX_WAKEUPS:
                    break

        # Polling is the retry policy of one activity: each "still running" is a failed
        # attempt that the server retries after the poll interval, so the history stays
        # the same size however long the render takes. A webhook that arrives meanwhile
        # wakes the run to read the prediction at once.
        interval = timedelta(seconds=input.poll_interval_seconds)
        self._stage("rendering", "Rendering video from images... (polling)")
        while True:
            remaining = deadline - workflow.now()
            poll = workflow.start_activity_method(
                PredictionActivities.poll_prediction,
                PollPredictionInput(job_id=input.job_id, prediction_id=prediction_id),
                schedule_to_close_timeout=max(remaining, timedelta(seconds=1)),
                start_to_close_timeout=timedelta(seconds=60),
                heartbeat_timeout=HEARTBEAT,
                retry_policy=RetryPolicy(
                    initial_interval=interval,
                    backoff_coefficient=1.0,
                    maximum_interval=interval,
                    non_retryable_error_types=NON_RETRYABLE,
                ),
                summary=f"Poll prediction {prediction_id} every "
                f"{_duration(interval.total_seconds())}",
            )
            try:
                await workflow.wait_condition(lambda poll=poll: poll.done() or woken())
            finally:
                # A webhook came, or the run itself is being cancelled: stop polling either way.
                if not poll.done():
                    poll.cancel()
            if poll.done() and not poll.cancelled():
                try:
                    return poll.result()
                except ActivityError as err:
                    if not _is_schedule_to_close_timeout(err):
                        raise
                await self._cancel_prediction(input.job_id, prediction_id)
                raise RenderFailed(
                    f"Render timed out after {_duration(input.render_timeout_seconds)}; "
                    f"prediction {prediction_id} was cancelled"
                )
            with contextlib.suppress(ActivityError):
                await poll  # settles the cancelled poll
            outcome = await self._read_prediction(input.job_id, prediction_id)
            if outcome.status in TERMINAL:
                return outcome

    async def _read_prediction(self, job_id: int, prediction_id: str) -> PredictionOutcome:
        self._woken.discard(prediction_id)
        self._wakeups[prediction_id] = self._wakeups.get(prediction_id, 0) + 1
        return await workflow.execute_activity_method(
            PredictionActivities.get_prediction,
            PollPredictionInput(job_id=job_id, prediction_id=prediction_id),
            start_to_close_timeout=timedelta(seconds=60),
            heartbeat_timeout=HEARTBEAT,
            retry_policy=QUICK,
            summary=f"Read prediction {prediction_id} (a webhook said it changed)",
        )

    def _stage(self, stage: str, message: str) -> None:
        """Moves the progress the `progress` query shows, and the RenderStage attribute."""
        changed = stage != self._progress.stage
        self._progress.stage = stage
        self._progress.message = message
        self._progress.updated_at = workflow.now().isoformat()
        workflow.set_current_details(f"**{stage}**: {message}")
        # Only where the starter set JobId: a namespace without the attributes still renders.
        if changed and workflow.info().typed_search_attributes.get(JOB_ID) is not None:
            workflow.upsert_search_attributes([RENDER_STAGE.value_set(stage)])

    async def _cancel_prediction(self, job_id: int, prediction_id: str | None) -> None:
        await workflow.execute_activity_method(
            PredictionActivities.cancel_prediction,
            CancelPredictionInput(job_id=job_id, prediction_id=prediction_id),
            start_to_close_timeout=timedelta(minutes=2),
            heartbeat_timeout=HEARTBEAT,
            retry_policy=QUICK,
            summary=f"Cancel the prediction of job {job_id} at Replicate",
        )

    async def _close_failed(self, job_id: int, message: str, status: str) -> None:
        """Cancels what was started and writes the job's final status. Nothing interrupts it
        (a cancel arriving now is too late), and it writes the status again for every
        approve or review request that changed the job's row meanwhile: a run that is
        closing takes requests too, and the job must end saying what the run ended as."""
        if status == "cancelled" and self._prediction_requested:
            # Also finds a prediction whose create went through but whose id never came back.
            try:
                await _uncancellable(self._cancel_prediction(job_id, self._prediction_id))
            except ActivityError:
                workflow.logger.warning("Could not cancel the prediction of job %s", job_id)
        written = -1
        while written != self._requests:
            written = self._requests
            await _uncancellable(
                workflow.execute_activity_method(
                    JobActivities.mark_job_failed,
                    MarkJobFailedInput(job_id=job_id, message=message, status=status),
                    start_to_close_timeout=timedelta(seconds=30),
                    schedule_to_close_timeout=timedelta(days=1),
                    retry_policy=PERSISTENT,
                    summary=f"Mark job {job_id} {status}",
                )
            )
        self._stage(status, message)


async def _uncancellable(work: Awaitable[T]) -> T:
    """Awaits `work` to its end even if the run is cancelled meanwhile."""
    task = asyncio.ensure_future(work)
    while True:
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done():
                return task.result()


def _is_schedule_to_close_timeout(err: ActivityError) -> bool:
    # When the next retry would pass the deadline, the server ends the activity with the
    # last attempt's failure and retry state TIMEOUT, not with a TimeoutError.
    cause = err.cause
    if isinstance(cause, TemporalTimeoutError) and cause.type == TimeoutType.SCHEDULE_TO_CLOSE:
        return True
    return err.retry_state == RetryState.TIMEOUT


def _explain(err: BaseException) -> str:
    """The most specific human message in a failure chain."""
    if isinstance(err, RenderFailed):
        return str(err)
    if isinstance(err, ActivityError):
        cause = err.cause
        if isinstance(cause, ApplicationError):
            if cause.type in OUR_ERRORS:
                return cause.message
            # An unexpected error's text may name files or objects on a server: the step and
            # the kind of error are what a user can act on (the worker's log has the rest).
            return f"Step {err.activity_type} failed ({cause.type or 'unexpected error'})"
        if isinstance(cause, TemporalTimeoutError):
            kind = cause.type.name.lower() if cause.type else "timeout"
            return f"Step {err.activity_type} timed out ({kind})"
        if cause is not None:
            return f"Step {err.activity_type} failed: {cause}"
        return f"Step {err.activity_type} failed"
    if isinstance(err, ApplicationError):
        return err.message
    return f"Render failed: {err}"


def _duration(seconds: float) -> str:
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            count = int(seconds // size)
            return f"{count} {unit}{'s' if count != 1 else ''}"
    return f"{seconds:g} second{'s' if seconds != 1 else ''}"
