"""The RenderVideo workflow: a storyboard in, a verified and costed MP4 out."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    RetryState,
    TimeoutError,
    TimeoutType,
    is_cancelled_exception,
)

from workflows.payloads import (
    CancelPredictionInput,
    DownloadVideoInput,
    JobRef,
    MarkJobFailedInput,
    PollPredictionInput,
    PredictionOutcome,
    RecordCostInput,
    RenderVideoInput,
    RenderVideoResult,
    StartPredictionInput,
    VerifyVideoInput,
)

with workflow.unsafe.imports_passed_through():
    from activities.render import RenderActivities

WORKFLOW_NAME = "RenderVideo"

# Validation and bad-input errors carry these types; retrying them cannot help.
NON_RETRYABLE = ["StoryboardInvalid", "JobNotFound", "InvalidVideo", "VideoTooLarge", "BadRequest"]

QUICK = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=30),
    maximum_attempts=5,
    non_retryable_error_types=NON_RETRYABLE,
)
# Throttling (429) and provider outages pass within minutes; a bad request fails at once.
PROVIDER_CREATE = RetryPolicy(
    initial_interval=timedelta(seconds=5),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=60),
    maximum_attempts=6,
    non_retryable_error_types=NON_RETRYABLE,
)
# The seed's download retries: 3 attempts, 30 s then 90 s apart.
DOWNLOAD_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=30),
    backoff_coefficient=3.0,
    maximum_interval=timedelta(seconds=90),
    maximum_attempts=3,
    non_retryable_error_types=NON_RETRYABLE,
)
# Closing a job must not be lost to a database blip: keep trying for a day.
PERSISTENT = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=1),
)


def workflow_id_for(job_id: int) -> str:
    return f"render-video-{job_id}"


class RenderFailed(Exception):
    """A failure already explained in words fit for the job's `error_message`."""


@workflow.defn(name=WORKFLOW_NAME)
class RenderVideo:
    def __init__(self) -> None:
        self._prediction_id: str | None = None

    @workflow.run
    async def run(self, input: RenderVideoInput) -> RenderVideoResult:
        job = JobRef(input.job_id)
        try:
            return await self._render(input, job)
        # CancelledError is a BaseException: a cancel that lands outside an activity arrives so.
        except (Exception, asyncio.CancelledError) as err:
            cancelled = is_cancelled_exception(err)
            message = "Render cancelled" if cancelled else _explain(err)
            await self._close_failed(input.job_id, message, cancelled=cancelled)
            if cancelled:
                raise
            raise ApplicationError(message, type="RenderFailed", non_retryable=True) from None

    async def _render(self, input: RenderVideoInput, job: JobRef) -> RenderVideoResult:
        acts = RenderActivities
        summary = await workflow.execute_activity_method(
            acts.validate_storyboard,
            job,
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=QUICK,
        )
        images = await workflow.execute_activity_method(
            acts.extract_images,
            job,
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=QUICK,
        )
        started_at = workflow.now()
        prediction = await workflow.execute_activity_method(
            acts.start_prediction,
            StartPredictionInput(
                job_id=input.job_id,
                image_urls=images.image_urls,
                durations=images.durations,
                prompt=images.prompt,
            ),
            start_to_close_timeout=timedelta(seconds=60),
            retry_policy=PROVIDER_CREATE,
        )
        self._prediction_id = prediction.prediction_id

        outcome = await self._wait_for_prediction(input, prediction.prediction_id, started_at)
        if outcome.status != "succeeded":
            raise RenderFailed(
                f"Prediction {outcome.prediction_id} {outcome.status}: "
                f"{outcome.error or 'the provider gave no reason'}"
            )
        if not outcome.output_url:
            raise RenderFailed(
                f"Prediction {outcome.prediction_id} succeeded but returned no video URL"
            )

        downloaded = await workflow.execute_activity_method(
            acts.download_video,
            DownloadVideoInput(job_id=input.job_id, url=outcome.output_url),
            start_to_close_timeout=timedelta(minutes=30),
            heartbeat_timeout=timedelta(seconds=30),
            retry_policy=DOWNLOAD_RETRY,
        )
        video = await workflow.execute_activity_method(
            acts.verify_video,
            VerifyVideoInput(job_id=input.job_id, path=downloaded.path),
            start_to_close_timeout=timedelta(minutes=10),
            retry_policy=QUICK,
        )
        cost = await workflow.execute_activity_method(
            acts.record_cost,
            RecordCostInput(
                job_id=input.job_id,
                image_count=summary.scenes_total,
                duration_seconds=video.duration_seconds,
            ),
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=PERSISTENT,
        )
        return RenderVideoResult(
            job_id=input.job_id,
            status="completed",
            video_url=cost.video_url,
            actual_cost=cost.actual_cost,
            duration_seconds=video.duration_seconds,
            prediction_id=prediction.prediction_id,
        )

    async def _wait_for_prediction(
        self, input: RenderVideoInput, prediction_id: str, started_at: datetime
    ) -> PredictionOutcome:
        # Polling is the retry policy of one activity: each "still running" is a failed
        # attempt that the server retries after the poll interval, so the history stays
        # the same size however long the render takes.
        interval = timedelta(seconds=input.poll_interval_seconds)
        deadline = timedelta(seconds=input.render_timeout_seconds)
        remaining = deadline - (workflow.now() - started_at)
        try:
            return await workflow.execute_activity_method(
                RenderActivities.poll_prediction,
                PollPredictionInput(job_id=input.job_id, prediction_id=prediction_id),
                schedule_to_close_timeout=max(remaining, timedelta(seconds=1)),
                start_to_close_timeout=timedelta(seconds=60),
                retry_policy=RetryPolicy(
                    initial_interval=interval,
                    backoff_coefficient=1.0,
                    maximum_interval=interval,
                    non_retryable_error_types=NON_RETRYABLE,
                ),
            )
        except ActivityError as err:
            if not _is_schedule_to_close_timeout(err):
                raise
        await self._cancel_prediction(input.job_id, prediction_id)
        raise RenderFailed(
            f"Render timed out after {_duration(input.render_timeout_seconds)}; "
            f"prediction {prediction_id} was cancelled"
        )

    async def _cancel_prediction(self, job_id: int, prediction_id: str) -> None:
        await workflow.execute_activity_method(
            RenderActivities.cancel_prediction,
            CancelPredictionInput(job_id=job_id, prediction_id=prediction_id),
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=QUICK,
        )

    async def _close_failed(self, job_id: int, message: str, *, cancelled: bool) -> None:
        if cancelled and self._prediction_id:
            try:
                await self._cancel_prediction(job_id, self._prediction_id)
            except ActivityError:
                workflow.logger.warning("Could not cancel prediction %s", self._prediction_id)
        await workflow.execute_activity_method(
            RenderActivities.mark_job_failed,
            MarkJobFailedInput(
                job_id=job_id, message=message, status="cancelled" if cancelled else "failed"
            ),
            start_to_close_timeout=timedelta(seconds=30),
            schedule_to_close_timeout=timedelta(days=1),
            retry_policy=PERSISTENT,
        )


def _is_schedule_to_close_timeout(err: ActivityError) -> bool:
    # When the next retry would pass the deadline, the server ends the activity with the
    # last attempt's failure and retry state TIMEOUT, not with a TimeoutError.
    cause = err.cause
    if isinstance(cause, TimeoutError) and cause.type == TimeoutType.SCHEDULE_TO_CLOSE:
        return True
    return err.retry_state == RetryState.TIMEOUT


def _explain(err: BaseException) -> str:
    """The most specific human message in a failure chain."""
    if isinstance(err, RenderFailed):
        return str(err)
    if isinstance(err, ActivityError):
        cause = err.cause
        if isinstance(cause, ApplicationError):
            return cause.message
        if isinstance(cause, TimeoutError):
            kind = cause.type.name.lower() if cause.type else "timeout"
            return f"Step {err.activity_type} timed out ({kind})"
        if cause is not None:
            return f"Step {err.activity_type} failed: {cause}"
        return f"Step {err.activity_type} failed"
    if isinstance(err, ApplicationError):
        return err.message
    return f"Render failed: {err}"


def _duration(seconds: float) -> str:
    if seconds >= 60 and seconds % 60 == 0:
        minutes = int(seconds // 60)
        return f"{minutes} minute{'s' if minutes != 1 else ''}"
    return f"{seconds:g} seconds"
