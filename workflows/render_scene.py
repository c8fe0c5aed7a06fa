"""RenderScene: one scene of a job (or, for a whole-storyboard model, all of them) from
prediction to a verified clip. A child of RenderVideo, id `render-video-{job}-scene-{n}`."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, is_cancelled_exception
from temporalio.workflow import ActivityCancellationType

from workflows.common import (
    CREATE_WINDOW,
    DOWNLOAD_RETRY,
    HEARTBEAT,
    NON_RETRYABLE,
    PERSISTENT,
    PROVIDER_CREATE,
    QUICK,
    TERMINAL,
    RenderFailed,
    duration_words,
    error_type,
    explain,
    is_schedule_to_close_timeout,
    set_stage,
    uncancellable,
)

# Passed through: plain dataclasses, the same in and out of the sandbox, so they are not
# built again for every run (a profile showed that was a tenth of the worker's CPU).
with workflow.unsafe.imports_passed_through():
    from activities.jobs import JobActivities
    from activities.media import MediaActivities
    from activities.predictions import PredictionActivities
    from workflows.payloads import (
        CancelPredictionInput,
        CheckClipInput,
        DownloadClipInput,
        PollPredictionInput,
        PredictionOutcome,
        PredictionRef,
        PredictionWebhook,
        RecordSceneInput,
        RenderSceneInput,
        SceneProgress,
        SceneResult,
        StartPredictionInput,
    )

SCENE_WORKFLOW = "RenderScene"
# A webhook wakes the run to read the prediction; after this many wake-ups that found it
# still running, webhooks for it are not believed any more and polling decides.
MAX_WAKEUPS = 3
# A clip that fails its checks is rendered once more (a second, recorded charge), and so is
# one whose output the provider deleted before it was downloaded; never more.
MAX_RETAKES = 1
MAX_GONE_RERENDERS = 1


@workflow.defn(name=SCENE_WORKFLOW)
class RenderScene:
    @workflow.init
    def __init__(self, input: RenderSceneInput) -> None:
        self._input = input
        self._number = input.plan.number
        self._prediction_id: str | None = None
        self._prediction_requested = False
        # Predictions a webhook woke us for, not yet read; wake-ups read per prediction.
        self._woken: set[str] = set()
        self._wakeups: dict[str, int] = {}
        self._progress = SceneProgress(
            job_id=input.job_id,
            number=input.plan.number,
            stage="queued",
            message="Waiting for a worker",
        )

    @workflow.signal(name="prediction_finished")
    async def prediction_finished(self, input: PredictionWebhook) -> None:
        """A verified webhook, relayed by the API: a wake-up call, not the truth. The run
        reads the prediction from the provider before it believes anything."""
        if input.prediction_id == self._prediction_id or self._prediction_id is None:
            self._woken.add(input.prediction_id)

    @workflow.query(name="progress")
    def progress(self) -> SceneProgress:
        return self._progress

    @workflow.run
    async def run(self, input: RenderSceneInput) -> SceneResult:
        try:
            return await self._render(input)
        except (Exception, asyncio.CancelledError) as err:
            cancelled = is_cancelled_exception(err)
            message = "Render cancelled" if cancelled else explain(err)
            await uncancellable(self._close(input, cancelled, message))
            if cancelled:
                raise
            raise ApplicationError(message, type="SceneFailed", non_retryable=True) from None

    @property
    def _what(self) -> str:
        return f"Scene {self._number}" if self._number else "The video"

    async def _render(self, input: RenderSceneInput) -> SceneResult:
        plan = input.plan
        retakes = gone = 0
        take = 1
        while True:
            started_at = workflow.now()
            self._stage("starting", f"Starting take {take}" if take > 1 else "Starting")
            self._prediction_requested = True
            prediction = await workflow.execute_activity_method(
                PredictionActivities.start_prediction,
                StartPredictionInput(
                    job_id=input.job_id,
                    model_input=plan.model_input,
                    digest=plan.digest,
                    scene=plan.number,
                    take=take,
                    cancel_after_seconds=input.render_timeout_seconds,
                ),
                # Creates go through a task queue of their own, whose rate limit holds
                # across all workers.
                task_queue=input.create_task_queue,
                start_to_close_timeout=timedelta(minutes=2),
                schedule_to_close_timeout=CREATE_WINDOW,
                heartbeat_timeout=HEARTBEAT,
                retry_policy=PROVIDER_CREATE,
                # A cancel lets the create finish or fail first, so the sweep sees its result.
                cancellation_type=ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
                summary=f"Create (or adopt) the prediction of {self._what.lower()} "
                f"of job {input.job_id}" + (f", take {take}" if take > 1 else ""),
            )
            self._prediction_id = prediction.prediction_id
            self._progress.prediction_id = prediction.prediction_id
            self._progress.prediction_status = prediction.status
            self._progress.take = take
            await self._record(
                "rendering",
                prediction_id=prediction.prediction_id,
                prediction_status=prediction.status,
            )

            outcome = await self._wait_for_prediction(input, prediction, started_at)
            self._progress.prediction_status = outcome.status
            if outcome.status != "succeeded":
                reason = outcome.error or "the provider gave no reason"
                if self._number:
                    raise RenderFailed(f"Scene {self._number} failed: {reason}")
                raise RenderFailed(f"Prediction {outcome.prediction_id} {outcome.status}: {reason}")
            # The provider charged for this take, whatever becomes of its clip.
            await self._record(
                "rendered",
                prediction_id=outcome.prediction_id,
                prediction_status=outcome.status,
                billed=plan.billed_seconds,
            )
            if not outcome.output_url:
                raise RenderFailed(
                    f"{self._what}: prediction {outcome.prediction_id} succeeded but returned "
                    "no video URL"
                )

            self._stage("downloading", "Downloading the clip")
            try:
                downloaded = await workflow.execute_activity_method(
                    MediaActivities.download_clip,
                    DownloadClipInput(
                        job_id=input.job_id,
                        number=plan.number,
                        digest=plan.digest,
                        url=outcome.output_url,
                    ),
                    start_to_close_timeout=timedelta(minutes=30),
                    heartbeat_timeout=HEARTBEAT,
                    retry_policy=DOWNLOAD_RETRY,
                    # A cancel waits for the download to stop and remove its partial file.
                    cancellation_type=ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
                    summary=f"Download the clip of {self._what.lower()} of job {input.job_id}",
                )
            except ActivityError as err:
                if error_type(err) == "VideoGone" and gone < MAX_GONE_RERENDERS:
                    # The provider deleted the output before we fetched it: one more render.
                    gone += 1
                    take += 1
                    workflow.logger.warning("%s: output gone; rendering it again", self._what)
                    continue
                raise
            self._stage("checking", "Checking the clip")
            try:
                await workflow.execute_activity_method(
                    MediaActivities.check_clip,
                    CheckClipInput(
                        job_id=input.job_id,
                        number=plan.number,
                        clip=downloaded.path,
                        min_seconds=plan.seconds,
                        still_image=input.still_image,
                    ),
                    start_to_close_timeout=timedelta(minutes=10),
                    heartbeat_timeout=HEARTBEAT,
                    retry_policy=QUICK,
                    summary=f"Check the clip of {self._what.lower()} of job {input.job_id}",
                )
            except ActivityError as err:
                if error_type(err) == "InvalidClip" and retakes < MAX_RETAKES:
                    retakes += 1
                    take += 1
                    workflow.logger.warning("%s: %s; rendering it again", self._what, explain(err))
                    continue
                raise
            clip = downloaded.path
            await self._record("completed", prediction_id=outcome.prediction_id, clip=clip)
            self._stage("completed", "Clip ready")
            return SceneResult(
                number=plan.number, clip=clip, prediction_id=outcome.prediction_id, takes=take
            )

    async def _wait_for_prediction(
        self, input: RenderSceneInput, prediction: PredictionRef, started_at: datetime
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
            self._stage("rendering", "Rendering (waiting for the webhook)")
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
        self._stage("rendering", "Rendering (polling)")
        while True:
            remaining = deadline - workflow.now()
            poll = workflow.start_activity_method(
                PredictionActivities.poll_prediction,
                PollPredictionInput(
                    job_id=input.job_id, prediction_id=prediction_id, scene=self._number
                ),
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
                f"{duration_words(interval.total_seconds())}",
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
                    if not is_schedule_to_close_timeout(err):
                        raise
                await self._cancel_prediction(input.job_id, prediction_id)
                raise RenderFailed(
                    f"{self._what} timed out after "
                    f"{duration_words(input.render_timeout_seconds)}; "
                    f"prediction {prediction_id} was cancelled"
                    if self._number
                    else f"Render timed out after {duration_words(input.render_timeout_seconds)}; "
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
            PollPredictionInput(job_id=job_id, prediction_id=prediction_id, scene=self._number),
            start_to_close_timeout=timedelta(seconds=60),
            heartbeat_timeout=HEARTBEAT,
            retry_policy=QUICK,
            summary=f"Read prediction {prediction_id} (a webhook said it changed)",
        )

    async def _record(
        self,
        status: str,
        *,
        prediction_id: str | None = None,
        prediction_status: str | None = None,
        billed: str | None = None,
        clip: str | None = None,
        error: str | None = None,
    ) -> None:
        await workflow.execute_activity_method(
            JobActivities.record_scene,
            RecordSceneInput(
                job_id=self._input.job_id,
                number=self._number,
                covers=self._input.plan.covers,
                status=status,
                prediction_id=prediction_id,
                prediction_status=prediction_status,
                billed_seconds=billed,
                clip=clip,
                error=error,
            ),
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=PERSISTENT,
            summary=f"{self._what}: {status}",
        )

    async def _cancel_prediction(self, job_id: int, prediction_id: str | None) -> None:
        await workflow.execute_activity_method(
            PredictionActivities.cancel_prediction,
            CancelPredictionInput(job_id=job_id, prediction_id=prediction_id),
            start_to_close_timeout=timedelta(minutes=2),
            heartbeat_timeout=HEARTBEAT,
            retry_policy=QUICK,
            summary=f"Cancel the prediction of {self._what.lower()} of job {job_id}",
        )

    async def _close(self, input: RenderSceneInput, cancelled: bool, message: str) -> None:
        """Cancels what was started (a failure at the provider has nothing left to cancel)
        and records how the scene ended."""
        if cancelled and self._prediction_requested:
            # Also finds a prediction whose create went through but whose id never came back.
            try:
                await self._cancel_prediction(input.job_id, self._prediction_id)
            except ActivityError:
                workflow.logger.warning("Could not cancel the prediction of %s", self._what)
        status = "cancelled" if cancelled else "failed"
        await self._record(status, prediction_id=self._prediction_id, error=message)
        self._stage(status, message)

    def _stage(self, stage: str, message: str) -> None:
        previous = self._progress.stage
        self._progress.stage = stage
        self._progress.message = message
        set_stage(stage, message, previous)
