"""The job store's side of a render: validation, approval, cost, closing, and the reconciler
that repairs any job whose status disagrees with its closed workflow."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from temporalio import activity
from temporalio.client import Client
from temporalio.exceptions import ApplicationError

from activities.common import fatal, in_thread, short_reason
from backend.database import JobStatus, JobStore
from backend.planning import PlanError, clip_name, plan_units
from backend.profiles import billed_cost, profile_for
from backend.reconcile import repair_job, running_workflow_ids
from backend.settings import Settings
from backend.storage import Storage, StorageError, scene_key, storage_for, video_key
from backend.storyboard import NO_STORYBOARD, NOT_APPROVED, Storyboard, StoryboardError
from workflows.payloads import (
    ApprovalRecorded,
    CostRecord,
    JobClosed,
    MarkJobFailedInput,
    ReconcileInput,
    ReconcileResult,
    RecordApprovalInput,
    RecordCostInput,
    RecordSceneInput,
    RenderPlan,
    RenderPlanInput,
    ScenePlan,
    StoryboardSummary,
    ValidateStoryboardInput,
)


def video_url_for(job_id: int) -> str:
    return f"/api/videos/{job_id}/data"


class JobActivities:
    """Given the job store and the settings; the reconciler also needs a Temporal client."""

    def __init__(
        self,
        store: JobStore,
        settings: Settings,
        temporal: Client | None = None,
        storage: Storage | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.temporal = temporal
        self.storage = storage or storage_for(settings)
        # Fails at worker start, not mid-render, when REPLICATE_MODEL has no profile.
        self.profile = profile_for(settings)

    def all(self) -> list[Callable[..., Any]]:
        return [
            self.validate_storyboard,
            self.record_approval,
            self.plan_render,
            self.record_scene,
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
        await self._check_output_writable(input.job_id)
        units = await self._plan(input.job_id, storyboard, input.rerender)
        planned = [unit for unit in units if unit.clip is None]
        renders = sum((Decimal(unit.billed_seconds) for unit in planned), Decimal(0))
        job = await in_thread(self.store.get, input.job_id)
        spent = Decimal(str(job["billed_seconds"] or 0))
        # What the job will have cost: its images, and every second billed for it so far or
        # about to be.
        estimate = billed_cost(self.profile, len(storyboard.scenes), spent + renders, self.settings)
        await self._check_spend_cap(job, estimate)
        job = await in_thread(self.store.set_estimate, input.job_id, estimate)
        max_cost = job["max_cost"]
        return StoryboardSummary(
            scenes_total=len(storyboard.scenes),
            planned_seconds=storyboard.total_seconds,
            estimated_cost=str(estimate),
            max_cost=f"{Decimal(str(max_cost)):.2f}" if max_cost is not None else None,
            renders=len(planned),
            billed_seconds=str(renders),
        )

    async def _check_spend_cap(self, job: dict[str, Any], estimate: Decimal) -> None:
        """A tenant's spend cap, checked before any prediction is created: what its jobs cost
        in the period, and what those going now are estimated to, plus this one."""
        tenant = await in_thread(self.store.tenant, job["tenant"])
        cap = tenant["spend_cap"] or self.settings.tenant_spend_cap
        if cap is None:
            return
        days = self.settings.tenant_spend_period_days
        since = datetime.now(UTC) - timedelta(days=days)
        spent = await in_thread(self.store.spent_since, job["tenant"], since)
        own = Decimal(str(job["actual_cost"] or 0)) if job["status"] == "completed" else 0
        if spent - own + estimate > Decimal(cap):
            raise fatal(
                f"Tenant {job['tenant']}'s spend cap of ${Decimal(cap):.2f} per {days:g} days "
                f"would be exceeded: ${spent - own:.2f} spent or committed, and this job is "
                f"estimated at ${estimate}; no prediction was created",
                "StoryboardInvalid",
            )

    async def _plan(self, job_id: int, storyboard: Storyboard, rerender: bool) -> list[ScenePlan]:
        kept = {key.rsplit("/", 1)[-1] for key in await self._list(scene_key(job_id))}
        scenes = await in_thread(self.store.scenes, job_id)
        try:
            return plan_units(
                storyboard,
                self.profile,
                self.settings,
                scenes,
                kept.__contains__,
                rerender=rerender,
            )
        except PlanError as exc:
            raise fatal(str(exc), "StoryboardInvalid") from exc

    async def _list(self, prefix: str) -> list[str]:
        try:
            return await self.storage.list(prefix)
        except (OSError, StorageError) as exc:
            raise ApplicationError(
                f"Could not list the job's files ({short_reason(exc)})", type="StorageError"
            ) from exc

    @activity.defn
    async def plan_render(self, input: RenderPlanInput) -> RenderPlan:
        """The predictions this run makes: one per scene whose clip is missing or out of date
        (every scene with `rerender`), or one for a whole-storyboard model. Scenes whose clip
        is kept count as done."""
        storyboard = await self._storyboard(input.job_id)
        units = await self._plan(input.job_id, storyboard, input.rerender)
        digests = {number: unit.digest for unit in units for number in unit.covers}
        kept = {number for unit in units if unit.clip for number in unit.covers}
        await in_thread(self.store.plan_scenes, input.job_id, digests, kept)
        await self._drop_stale_clips(input.job_id, units)
        todo = sum(1 for unit in units if unit.clip is None)
        await in_thread(
            self.store.progress,
            input.job_id,
            "planned",
            f"{todo} prediction{'s' if todo != 1 else ''} to render; "
            f"{len(kept)} of {len(storyboard.scenes)} scenes kept",
            scenes_total=len(storyboard.scenes),
            scenes_completed=len(kept),
        )
        return RenderPlan(
            units=units,
            scenes_total=len(storyboard.scenes),
            still_image=self.profile.still_image,
        )

    async def _drop_stale_clips(self, job_id: int, units: list[ScenePlan]) -> None:
        # A clip made from an input the storyboard no longer has will never be used again.
        current = {clip_name(unit.number, unit.digest) for unit in units}
        for key in await self._list(scene_key(job_id)):
            name = key.rsplit("/", 1)[-1]
            if not name.startswith(".") and name not in current:
                try:
                    await self.storage.delete(key)
                except (OSError, StorageError) as exc:
                    activity.logger.warning("Job %s: could not remove %s: %s", job_id, name, exc)

    @activity.defn
    async def record_scene(self, input: RecordSceneInput) -> None:
        await in_thread(
            self.store.record_scene,
            input.job_id,
            input.covers or [input.number],
            input.status,
            prediction_id=input.prediction_id,
            billed_seconds=Decimal(input.billed_seconds) if input.billed_seconds else None,
            clip=input.clip,
            error=input.error,
            prediction_status=input.prediction_status,
        )

    async def _check_output_writable(self, job_id: int) -> None:
        if self.storage.remote:
            try:
                await self.storage.check()
            except StorageError as exc:
                if exc.code in ("NoSuchBucket", "AccessDenied", "InvalidAccessKeyId"):
                    raise fatal(
                        f"The job's video cannot be stored: {exc}; no prediction was created",
                        "OutputNotWritable",
                    ) from exc
                # Most likely passing (the store is down or slow): tried again, not failed.
                raise ApplicationError(str(exc), type="StorageError") from exc
            return
        await in_thread(self._check_folder_writable, job_id)

    def _check_folder_writable(self, job_id: int) -> None:
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
    async def record_cost(self, input: RecordCostInput) -> CostRecord:
        """Completes the job: its cost is its images and every second the provider billed for
        it (retakes included), at the model's price."""
        job = await in_thread(self.store.get, input.job_id)
        billed = Decimal(str(job["billed_seconds"] or 0))
        cost = billed_cost(self.profile, input.image_count, billed, self.settings)
        url = video_url_for(input.job_id)
        over = input.max_cost is not None and cost > Decimal(input.max_cost)
        if over:
            activity.logger.warning(
                "Job %s cost $%s, over its budget of $%s", input.job_id, cost, input.max_cost
            )
        await in_thread(
            self.store.complete,
            input.job_id,
            video_url=url,
            actual_cost=cost,
            over_budget=over,
            duration_seconds=round(input.duration_seconds, 3),
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
            if self.storage.remote:
                notes, problems = await self._remove_stored_leftovers(input.job_id)
            else:
                notes, problems = await in_thread(self._remove_leftovers, input.job_id)
        message = input.message
        if problems:
            message += f" (cleanup failed: {'; '.join(problems)})"
        await in_thread(self.store.fail, input.job_id, message, status=status)
        return JobClosed(job_id=input.job_id, status=status, notes=notes + problems)

    async def _remove_stored_leftovers(self, job_id: int) -> tuple[list[str], list[str]]:
        """`_remove_leftovers` for object storage: the unverified objects (names that start
        with a dot) go; a partial upload never became an object."""
        removed: list[str] = []
        problems: list[str] = []
        try:
            keys = [*await self.storage.list(video_key(job_id))]
            keys += await self.storage.list(scene_key(job_id))
        except StorageError as exc:
            return [], [f"could not list the job's files ({short_reason(exc)})"]
        for key in keys:
            name = key.rsplit("/", 1)[-1]
            if not name.startswith("."):
                continue
            try:
                await self.storage.delete(key)
                removed.append(f"removed {name}")
            except StorageError as exc:
                problems.append(f"could not remove {name} ({short_reason(exc)})")
        return removed, problems

    def _remove_leftovers(self, job_id: int) -> tuple[list[str], list[str]]:
        """A job that did not complete keeps nothing unverified behind: partial downloads,
        clips not yet checked, a stitched video not yet published. Verified clips stay (a job
        approved again renders only the scenes it lacks), and so does a final.mp4, which is
        only ever a verified video (a job whose storyboard changed keeps serving it)."""
        folder = self.settings.video_dir(job_id)
        removed: list[str] = []
        problems: list[str] = []
        try:
            leftovers = [
                path
                for where in (folder, self.settings.scenes_dir(job_id))
                for path in (where.glob(".*") if where.is_dir() else [])
            ]
            final = self.settings.video_path(job_id)
            if final.exists() and not final.is_file():
                leftovers.append(final)  # not a video at all: in the way of the next render
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
        # An empty scenes folder says nothing; one with clips keeps them for the next run.
        with contextlib.suppress(OSError):
            self.settings.scenes_dir(job_id).rmdir()
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
