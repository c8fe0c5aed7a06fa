"""The job store's side of a render: validation, approval, cost, closing, and the reconciler
that repairs any job whose status disagrees with its closed workflow."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from temporalio import activity
from temporalio.client import Client

from activities.common import fatal, in_thread, short_reason
from backend.cost import render_cost
from backend.database import JobStatus, JobStore
from backend.reconcile import repair_job, running_workflow_ids
from backend.settings import Settings
from backend.storyboard import NO_STORYBOARD, NOT_APPROVED, Storyboard, StoryboardError
from workflows.payloads import (
    ApprovalRecorded,
    CostRecord,
    ExtractedImages,
    JobClosed,
    JobRef,
    MarkJobFailedInput,
    ReconcileInput,
    ReconcileResult,
    RecordApprovalInput,
    RecordCostInput,
    StoryboardSummary,
    ValidateStoryboardInput,
)


def video_url_for(job_id: int) -> str:
    return f"/api/videos/{job_id}/data"


class JobActivities:
    """Given the job store and the settings; the reconciler also needs a Temporal client."""

    def __init__(self, store: JobStore, settings: Settings, temporal: Client | None = None) -> None:
        self.store = store
        self.settings = settings
        self.temporal = temporal

    def all(self) -> list[Callable[..., Any]]:
        return [
            self.validate_storyboard,
            self.record_approval,
            self.extract_images,
            self.record_cost,
            self.mark_job_failed,
            self.reconcile_jobs,
        ]

    async def _storyboard(self, job_id: int, *, require_approval: bool = True) -> Storyboard:
        job = await in_thread(self.store.get, job_id)
        if require_approval and not job["approved"]:
            raise fatal(NOT_APPROVED, "StoryboardInvalid")
        if not job["storyboard_data"]:
            raise fatal(NO_STORYBOARD, "StoryboardInvalid")
        try:
            storyboard = Storyboard.parse(job["storyboard_data"])
            storyboard.require_images()
        except StoryboardError as exc:
            raise fatal(str(exc), "StoryboardInvalid") from exc
        return storyboard

    @activity.defn
    async def validate_storyboard(self, input: ValidateStoryboardInput) -> StoryboardSummary:
        await in_thread(self.store.progress, input.job_id, "validating", "Validating storyboard...")
        storyboard = await self._storyboard(input.job_id, require_approval=input.require_approval)
        # Before anything is billed: a video that could not be stored would be paid for
        # and lost.
        await in_thread(self._check_output_writable, input.job_id)
        estimate = render_cost(
            len(storyboard.scenes),
            Decimal(str(round(storyboard.total_seconds, 3))),
            price_per_image=self.settings.price_per_image,
            price_per_second=self.settings.price_per_video_second,
        )
        job = await in_thread(self.store.set_estimate, input.job_id, estimate)
        max_cost = job["max_cost"]
        return StoryboardSummary(
            scenes_total=len(storyboard.scenes),
            planned_seconds=storyboard.total_seconds,
            estimated_cost=str(estimate),
            max_cost=f"{Decimal(str(max_cost)):.2f}" if max_cost is not None else None,
        )

    def _check_output_writable(self, job_id: int) -> None:
        folder = self.settings.video_dir(job_id)
        final = self.settings.video_path(job_id)
        problem = "no prediction was created"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if final.exists() and not final.is_file():
                raise fatal(
                    f"The job's video cannot be stored: its final.mp4 is not a file; {problem}",
                    "OutputNotWritable",
                )
            probe = folder / f".write-check-{uuid.uuid4().hex}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise fatal(
                f"The job's video folder cannot be written ({short_reason(exc)}); {problem}",
                "OutputNotWritable",
            ) from exc

    @activity.defn
    async def record_approval(self, input: RecordApprovalInput) -> ApprovalRecorded:
        job = await in_thread(self.store.record_approval, input.job_id, input.approved_by)
        return ApprovalRecorded(job_id=input.job_id, status=job["status"])

    @activity.defn
    async def extract_images(self, input: JobRef) -> ExtractedImages:
        storyboard = await self._storyboard(input.job_id)
        urls = storyboard.require_images()
        await in_thread(
            self.store.progress,
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
        await in_thread(
            self.store.complete, input.job_id, video_url=url, actual_cost=cost, over_budget=over
        )
        return CostRecord(actual_cost=str(cost), video_url=url, over_budget=over)

    @activity.defn
    async def mark_job_failed(self, input: MarkJobFailedInput) -> JobClosed:
        """Closes the job as failed, cancelled or expired. The status is always written: a
        leftover file that cannot be removed is logged and named in the message, never a
        reason to keep the job open."""
        status = JobStatus(input.status)
        job = await in_thread(self.store.get, input.job_id)
        notes: list[str] = []
        problems: list[str] = []
        if job["status"] != JobStatus.COMPLETED:
            notes, problems = await in_thread(self._remove_leftovers, input.job_id)
        message = input.message
        if problems:
            message += f" (cleanup failed: {'; '.join(problems)})"
        await in_thread(self.store.fail, input.job_id, message, status=status)
        return JobClosed(job_id=input.job_id, status=status, notes=notes + problems)

    def _remove_leftovers(self, job_id: int) -> tuple[list[str], list[str]]:
        """A job that did not complete keeps no download behind, partial or whole."""
        folder = self.settings.video_dir(job_id)
        removed: list[str] = []
        problems: list[str] = []
        try:
            leftovers = [*folder.glob(".download-*.part"), folder / "final.mp4"]
        except OSError as exc:
            return [], [f"could not list the job's video folder ({short_reason(exc)})"]
        for leftover in leftovers:
            try:
                if leftover.is_symlink() or leftover.exists():
                    leftover.unlink()
                    removed.append(f"removed {leftover.name}")
            except OSError as exc:
                activity.logger.warning(
                    "Job %s: could not remove %s: %s", job_id, leftover.name, exc
                )
                problems.append(f"could not remove {leftover.name} ({short_reason(exc)})")
        return removed, problems

    @activity.defn
    async def reconcile_jobs(self, input: ReconcileInput) -> ReconcileResult:
        """The safety net: a job that says a run is going while its workflow has closed (or
        is gone) is set to what the workflow ended as."""
        assert self.temporal is not None, "reconcile_jobs needs a Temporal client"
        cutoff = datetime.now(UTC) - timedelta(seconds=input.grace_seconds)
        active = await in_thread(self.store.active_jobs, cutoff, input.limit)
        if not active:
            return ReconcileResult(checked=0)
        running = await running_workflow_ids(self.temporal)
        repaired: list[str] = []
        for job in active:
            activity.heartbeat(job["id"])
            if job["workflow_id"] in running:
                continue
            outcome = await repair_job(self.temporal, self.store, job)
            if outcome is not None:
                activity.logger.warning("Reconciled job %s: %s", job["id"], outcome)
                repaired.append(f"job {job['id']}: {outcome}")
        return ReconcileResult(checked=len(active), repaired=repaired)
