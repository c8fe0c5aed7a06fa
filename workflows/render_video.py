"""The RenderVideo workflow: a storyboard in, a verified and costed MP4 out. Each scene is
rendered by a RenderScene child (or, for a whole-storyboard model, one child renders them
all); the clips are then stitched, verified and published."""

from __future__ import annotations

import asyncio
from decimal import Decimal

from temporalio import workflow
from temporalio.common import SearchAttributePair, TypedSearchAttributes
from temporalio.exceptions import ActivityError, ApplicationError, is_cancelled_exception
from temporalio.workflow import ParentClosePolicy

from workflows.common import (
    HEARTBEAT,
    JOB_ID,
    PERSISTENT,
    QUICK,
    RENDER_STAGE,
    SEARCH_ATTRIBUTES,
    RenderFailed,
    ReviewExpired,
    duration_words,
    explain,
    set_stage,
    uncancellable,
)
from workflows.deliver_event import DeliverJobEvent
from workflows.render_scene import RenderScene

# Passed through: plain dataclasses, the same in and out of the sandbox, so they are not
# built again for every run (a profile showed that was a tenth of the worker's CPU).
with workflow.unsafe.imports_passed_through():
    from datetime import timedelta

    from activities.jobs import JobActivities
    from activities.media import MediaActivities
    from workflows.payloads import (
        RENDER_WORKFLOW,
        ApprovalResult,
        ApproveRenderInput,
        ApproveSignal,
        ClipCut,
        CostRecord,
        DeliverEventInput,
        MarkJobFailedInput,
        PreviewsInput,
        PublishVideoInput,
        RecordApprovalInput,
        RecordCostInput,
        RenderPlan,
        RenderPlanInput,
        RenderProgress,
        RenderSceneInput,
        RenderVideoInput,
        RenderVideoResult,
        ReviewSignal,
        ScenePlan,
        SceneResult,
        StitchInput,
        StoryboardSummary,
        ValidateStoryboardInput,
        VerifyVideoInput,
        event_workflow_id,
        scene_run_id,
        webhook_id_for,
    )

__all__ = ["JOB_ID", "RENDER_STAGE", "SEARCH_ATTRIBUTES", "WORKFLOW_NAME", "RenderVideo"]

WORKFLOW_NAME = RENDER_WORKFLOW


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
        # Approve and review requests received: each one was preceded by the API changing
        # the job's row for this run, so a run that closes must write the row after the last.
        self._requests = 0
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
                status, message = "failed", explain(err)
            await self._close_failed(input, message, status)
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
                ValidateStoryboardInput(
                    job_id=job_id, require_approval=not input.review, rerender=input.rerender
                ),
                start_to_close_timeout=timedelta(seconds=30),
                retry_policy=QUICK,
                summary=f"Validate the storyboard of job {job_id}",
            )
        except ActivityError as err:
            self._validation_error = explain(err)
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

        plan = await workflow.execute_activity_method(
            JobActivities.plan_render,
            RenderPlanInput(job_id=job_id, rerender=input.rerender),
            start_to_close_timeout=timedelta(seconds=60),
            retry_policy=QUICK,
            summary=f"Plan the scenes of job {job_id}",
        )
        self._progress.scenes_total = plan.scenes_total
        clips = {unit.number: unit.clip for unit in plan.units if unit.clip}
        self._progress.scenes_completed = sum(len(u.covers) for u in plan.units if u.clip)
        pending = [unit for unit in plan.units if unit.clip is None]
        rendered = await self._render_scenes(input, plan, pending) if pending else []
        for result in rendered:
            clips[result.number] = result.clip

        self._stage("stitching", f"Joining {len(plan.units)} clips")
        stitched = await workflow.execute_activity_method(
            MediaActivities.stitch_video,
            StitchInput(
                job_id=job_id,
                clips=[
                    ClipCut(clip=clips[unit.number], seconds=unit.seconds) for unit in plan.units
                ],
            ),
            start_to_close_timeout=timedelta(minutes=30),
            heartbeat_timeout=HEARTBEAT,
            retry_policy=QUICK,
            summary=f"Stitch the scenes of job {job_id}",
        )
        self._stage("verifying", "Verifying video...")
        video = await workflow.execute_activity_method(
            MediaActivities.verify_video,
            VerifyVideoInput(job_id=job_id, path=stitched.path),
            start_to_close_timeout=timedelta(minutes=10),
            heartbeat_timeout=HEARTBEAT,
            retry_policy=QUICK,
            summary=f"Verify the MP4 of job {job_id}",
        )
        # The commit point: once the video is being published the job completes, and a
        # cancel that arrives now is too late (the job store and the run must tell the same
        # story).
        cost = await uncancellable(
            self._publish(input, stitched.path, video.duration_seconds, plan, clips)
        )
        self._progress.scenes_completed = plan.scenes_total
        await uncancellable(self._announce(input, "completed"))
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
            # A whole-storyboard model's one prediction (per scene, the job's scenes say).
            prediction_id=rendered[0].prediction_id if len(plan.units) == 1 and rendered else None,
            over_budget=cost.over_budget,
        )

    async def _publish(
        self,
        input: RenderVideoInput,
        path: str,
        seconds: float,
        plan: RenderPlan,
        clips: dict[int, str],
    ) -> CostRecord:
        job_id = input.job_id
        await workflow.execute_activity_method(
            MediaActivities.publish_video,
            PublishVideoInput(job_id=job_id, path=path),
            start_to_close_timeout=timedelta(seconds=60),
            retry_policy=PERSISTENT,
            summary=f"Publish the video of job {job_id}",
        )
        try:
            await workflow.execute_activity_method(
                MediaActivities.make_previews,
                PreviewsInput(
                    job_id=job_id,
                    clips=[(unit.number, clips[unit.number]) for unit in plan.units],
                ),
                start_to_close_timeout=timedelta(minutes=10),
                heartbeat_timeout=HEARTBEAT,
                retry_policy=QUICK,
                summary=f"Make the poster, preview and thumbnails of job {job_id}",
            )
        except ActivityError as err:
            # The video is whole and paid for: a missing poster does not fail the job.
            workflow.logger.warning("Job %s has no poster or preview: %s", job_id, explain(err))
        assert self._validation is not None
        return await workflow.execute_activity_method(
            JobActivities.record_cost,
            RecordCostInput(
                job_id=job_id,
                image_count=self._validation.scenes_total,
                duration_seconds=seconds,
                max_cost=self._validation.max_cost,
            ),
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=PERSISTENT,
            summary=f"Record the cost of job {job_id}",
        )

    async def _render_scenes(
        self, input: RenderVideoInput, plan: RenderPlan, pending: list[ScenePlan]
    ) -> list[SceneResult]:
        """One RenderScene child per prediction, at most `scene_concurrency` at once. The first
        scene that fails cancels the others (their finished clips are kept) and fails the job
        with its words."""
        job_id = input.job_id
        slots = asyncio.Semaphore(max(1, input.scene_concurrency))
        done: list[SceneResult] = []
        attributes = None
        if workflow.info().typed_search_attributes.get(JOB_ID) is not None:
            attributes = TypedSearchAttributes(
                [
                    SearchAttributePair(JOB_ID, str(job_id)),
                    SearchAttributePair(RENDER_STAGE, "queued"),
                ]
            )

        async def render(unit: ScenePlan) -> SceneResult:
            async with slots:
                if unit.number:
                    what = f"Scene {unit.number} of job {job_id}"
                elif plan.scenes_total == 1:
                    what = f"Scene 1 of job {job_id}, in one prediction"
                else:
                    what = f"Scenes 1-{plan.scenes_total} of job {job_id}, in one prediction"
                result = await workflow.execute_child_workflow(
                    RenderScene.run,
                    RenderSceneInput(
                        job_id=job_id,
                        plan=unit,
                        poll_interval_seconds=input.poll_interval_seconds,
                        render_timeout_seconds=input.render_timeout_seconds,
                        webhook_wait_seconds=input.webhook_wait_seconds,
                        still_image=plan.still_image,
                        create_task_queue=input.create_task_queue,
                    ),
                    # The job run's own id, prefix and all: scenes are found beside it.
                    id=scene_run_id(workflow.info().workflow_id, unit.number),
                    static_summary=what,
                    search_attributes=attributes,
                    # A parent that is terminated still gets its scenes' predictions cancelled.
                    parent_close_policy=ParentClosePolicy.REQUEST_CANCEL,
                )
            done.append(result)
            self._progress.scenes_completed += len(unit.covers)
            self._stage(
                "rendering",
                f"{self._progress.scenes_completed} of {plan.scenes_total} scenes rendered",
            )
            return result

        self._stage("rendering", f"Rendering {len(pending)} of {plan.scenes_total} scenes")
        tasks = [asyncio.ensure_future(render(unit)) for unit in pending]
        failed: list[BaseException] = []
        try:
            finished, _ = await workflow.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            failed = [
                error
                for task in tasks
                if task in finished and (error := task.exception()) is not None
            ]
        finally:
            # A scene failed, or the job is being cancelled: stop the others, and wait until
            # each has cancelled its prediction (their own outcomes say nothing new).
            for task in tasks:
                if not task.done():
                    task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if failed:
            raise failed[0]  # the scene that failed first (in storyboard order if together)
        return done

    async def _await_approval(self, input: RenderVideoInput) -> None:
        # An approval that came before validation finished passes straight through, and is
        # still recorded in the job store below.
        window = duration_words(input.review_timeout_seconds)
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

    def _stage(self, stage: str, message: str) -> None:
        """Moves the progress the `progress` query shows, and the RenderStage attribute."""
        previous = self._progress.stage
        self._progress.stage = stage
        self._progress.message = message
        self._progress.updated_at = workflow.now().isoformat()
        set_stage(stage, message, previous)

    async def _close_failed(self, input: RenderVideoInput, message: str, status: str) -> None:
        """Writes the job's final status. Nothing interrupts it (a cancel arriving now is too
        late), and it writes the status again for every approve or review request that
        changed the job's row meanwhile: a run that is closing takes requests too, and the
        job must end saying what the run ended as. (The scenes cancelled their own
        predictions before this.)"""
        job_id = input.job_id
        written = -1
        while written != self._requests:
            written = self._requests
            await uncancellable(
                workflow.execute_activity_method(
                    JobActivities.mark_job_failed,
                    MarkJobFailedInput(job_id=job_id, message=message, status=status),
                    start_to_close_timeout=timedelta(seconds=30),
                    schedule_to_close_timeout=timedelta(days=1),
                    retry_policy=PERSISTENT,
                    summary=f"Mark job {job_id} {status}",
                )
            )
        await uncancellable(self._announce(input, status))
        self._stage(status, message)

    async def _announce(self, input: RenderVideoInput, event: str) -> None:
        """Starts the delivery of the job's event to the caller's callback, and leaves it to
        run on (backoff for up to a day) after this run closes."""
        if not input.notify:
            return
        run_id = workflow.info().run_id
        await workflow.start_child_workflow(
            DeliverJobEvent.run,
            DeliverEventInput(
                job_id=input.job_id,
                event=event,
                webhook_id=webhook_id_for(input.job_id, event, run_id),
                retry_initial_seconds=input.callback_retry_initial_seconds,
            ),
            id=event_workflow_id(workflow.info().workflow_id, event, run_id),
            static_summary=f"Tell job {input.job_id}'s caller: {event}",
            parent_close_policy=ParentClosePolicy.ABANDON,
        )
