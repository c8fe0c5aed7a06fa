"""Keeping the job store and Temporal in agreement: what a job should say once its workflow
has closed. Used by the reconciler's activity and by a cancel that finds no run going."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

from temporalio.client import Client, WorkflowExecutionStatus, WorkflowFailureError
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from backend.database import JobStatus, JobStore
from workflows.payloads import RENDER_WORKFLOW, RenderVideoResult, workflow_id_for


async def repair_job(client: Client, store: JobStore, job: dict[str, Any]) -> str | None:
    """Sets a job whose workflow has closed (or is gone) to what the workflow ended as;
    returns what was written, or None when the run is still going or the job changed
    meanwhile (a new request owns it then)."""
    workflow_id = job["workflow_id"] or workflow_id_for(job["id"])
    handle = client.get_workflow_handle(workflow_id, result_type=RenderVideoResult)
    try:
        description = await handle.describe()
    except RPCError as exc:
        if exc.status != RPCStatusCode.NOT_FOUND:
            raise
        return await _settle(
            store, job, JobStatus.FAILED, "The job's workflow no longer exists; approve it again"
        )
    closed = description.status
    if closed in (None, WorkflowExecutionStatus.RUNNING, WorkflowExecutionStatus.CONTINUED_AS_NEW):
        return None
    if closed == WorkflowExecutionStatus.COMPLETED:
        result = await handle.result()
        changed = await asyncio.to_thread(
            store.repair,
            job["id"],
            job["updated_at"],
            status=JobStatus.COMPLETED,
            video_url=result.video_url,
            actual_cost=Decimal(result.actual_cost) if result.actual_cost else None,
            over_budget=result.over_budget,
        )
        return "completed" if changed else None
    if closed == WorkflowExecutionStatus.CANCELED:
        return await _settle(store, job, JobStatus.CANCELLED, "Render cancelled")
    if closed == WorkflowExecutionStatus.TERMINATED:
        return await _settle(
            store,
            job,
            JobStatus.FAILED,
            "Render terminated (from the Temporal CLI or UI); approve it again to resume",
        )
    status, message = JobStatus.FAILED, f"Render {closed.name.lower().replace('_', ' ')}"
    try:
        await handle.result()
    except WorkflowFailureError as exc:
        cause = exc.cause
        if isinstance(cause, ApplicationError):
            message = cause.message
            if cause.type == "ReviewExpired":
                status = JobStatus.EXPIRED
    return await _settle(store, job, status, message)


async def _settle(store: JobStore, job: dict[str, Any], status: str, message: str) -> str | None:
    changed = await asyncio.to_thread(
        store.repair, job["id"], job["updated_at"], status=status, message=message
    )
    return f"{status}: {message}" if changed else None


async def running_workflow_ids(client: Client) -> set[str]:
    """The ids of every RenderVideo run going now, from Temporal's visibility store."""
    query = f"WorkflowType = '{RENDER_WORKFLOW}' AND ExecutionStatus = 'Running'"
    return {execution.id async for execution in client.list_workflows(query)}
