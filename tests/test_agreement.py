"""The job store and Temporal always agree: whatever mix of approve, review and cancel lands on
a job, and however it interleaves with a run that is closing, the job's status ends up saying
what its workflow ended as. And a safety net (ReconcileJobs, run by a Temporal Schedule)
repairs any job that disagrees anyway."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path
from typing import Any

import httpx
from support import Stack, running_stack
from temporalio.client import WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import WorkflowEnvironment

from local_replicate.testing import RunningServer
from workflows.payloads import workflow_id_for

# What a job may say for each way its workflow can stand.
AGREES = {
    WorkflowExecutionStatus.RUNNING: {"rendering", "in_review"},
    WorkflowExecutionStatus.COMPLETED: {"completed"},
    WorkflowExecutionStatus.FAILED: {"failed", "expired"},
    WorkflowExecutionStatus.CANCELED: {"cancelled"},
    # Terminate is the escape hatch with no cleanup: the job is closed by the reconciler, or
    # by a cancel that finds no run going.
    WorkflowExecutionStatus.TERMINATED: {"failed", "cancelled"},
    # Never started (a start refused), or nothing to run.
    None: {"draft", "ready", "failed", "cancelled"},
}


async def disagreements(stack: Stack, job_ids: list[int]) -> list[str]:
    found = []
    for job_id in job_ids:
        job = stack.store.get(job_id)
        handle = stack.temporal.get_workflow_handle(workflow_id_for(job_id))
        try:
            closed: WorkflowExecutionStatus | None = (await handle.describe()).status
        except RPCError as exc:
            assert exc.status == RPCStatusCode.NOT_FOUND, exc
            closed = None
        if job["status"] not in AGREES[closed]:
            found.append(f"job {job_id} is {job['status']} but its workflow is {closed}")
    return found


async def agree_within(stack: Stack, job_ids: list[int], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while problems := await disagreements(stack, job_ids):
        assert time.monotonic() < deadline, "\n".join(problems)
        await asyncio.sleep(0.25)


async def test_concurrent_approve_review_and_cancel_leave_every_job_agreeing(
    stack: Stack,
) -> None:
    rng = random.Random(20261130)
    base = str(stack.api.base_url).rstrip("/")
    good = [{"image_url": f"{base}/samples/scene-1.jpg", "duration_seconds": 1}]
    # Most runs fail their validation at once, so requests keep landing on closing runs.
    bad = [{"prompt": "a scene whose image is still being generated"}]
    job_ids = [await stack.create_job(good if n % 4 == 0 else bad) for n in range(16)]

    async def request(job_id: int, action: str) -> int:
        await asyncio.sleep(rng.uniform(0, 0.05))
        try:
            response = await stack.api.post(f"/api/v2/jobs/{job_id}/{action}")
        except httpx.HTTPError:
            return 0
        # Every answer is a decision: never a 500.
        assert response.status_code in (200, 202, 409), (action, response.text)
        return response.status_code

    for _ in range(10):
        calls: list[Any] = []
        for job_id in job_ids:
            actions = ["approve", "review", "cancel", rng.choice(["approve", "review"])]
            rng.shuffle(actions)
            calls += [request(job_id, action) for action in actions]
        rng.shuffle(calls)
        await asyncio.gather(*calls)

    await agree_within(stack, job_ids, seconds=30)


async def test_reconcile_schedule_repairs_jobs_whose_workflow_closed(
    temporal_env: WorkflowEnvironment, renderer: RunningServer, tmp_path: Path, jobs_db: str
) -> None:
    """Jobs left saying `rendering` although their workflow completed, failed, was
    terminated, or never existed: the scheduled ReconcileJobs sets each to what happened."""
    async with running_stack(
        temporal_env,
        renderer,
        tmp_path,
        database_url=jobs_db,
        reconcile_interval_seconds=1,
        reconcile_grace_seconds=0,
    ) as stack:
        scenes = stack.sample_scenes(count=1, seconds=1)
        completed = await stack.create_job(scenes)
        failed = await stack.create_job([{"prompt": "no image yet"}])
        terminated = await stack.create_job(scenes)
        vanished = await stack.create_job(scenes)
        for job_id in (terminated, completed, failed):
            assert (await stack.api.post(f"/api/v2/jobs/{job_id}/approve")).status_code == 200
        await stack.temporal.get_workflow_handle(workflow_id_for(terminated)).terminate("stuck")
        for job_id in (completed, failed):
            await stack.wait_closed(job_id)
        truth = stack.store.get(completed)
        # What a lost write, or an operator's edit, leaves behind.
        for job_id in (completed, failed, terminated, vanished):
            stack.store.mark_rendering(job_id, workflow_id_for(job_id))
        assert {stack.store.get(j)["status"] for j in (failed, terminated, vanished)} == {
            "rendering"
        }

        jobs = [completed, failed, terminated, vanished]
        await agree_within(stack, jobs, seconds=60)
        after = {job_id: stack.store.get(job_id) for job_id in jobs}
        assert after[completed]["status"] == "completed"
        assert after[completed]["video_url"] == truth["video_url"]
        assert after[completed]["actual_cost"] == truth["actual_cost"]
        assert after[failed]["status"] == "failed"
        assert after[failed]["error_message"] == "Scene 1 is missing image"
        assert after[terminated]["status"] == "failed"
        assert "terminated" in after[terminated]["error_message"]
        assert after[vanished]["status"] == "failed"
        assert "no longer exists" in after[vanished]["error_message"]
