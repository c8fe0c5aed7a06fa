"""Starting and joining RenderVideo runs: shared by the API, the CLI and `render_video_task`."""

from __future__ import annotations

import asyncio
import logging

from temporalio.client import Client, WorkflowFailureError, WorkflowHandle
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError

from backend.database import JobConflict, JobStatus, JobStore
from backend.settings import Settings
from workflows.payloads import RenderVideoInput, RenderVideoResult
from workflows.render_video import RenderVideo, workflow_id_for

log = logging.getLogger(__name__)


class TemporalUnavailable(RuntimeError):
    """Temporal could not be reached or refused the call; nothing was started."""


async def connect(settings: Settings, *, lazy: bool = False) -> Client:
    # lazy: the API should come up and serve reads even while Temporal is still starting.
    return await Client.connect(
        settings.temporal_address, namespace=settings.temporal_namespace, lazy=lazy
    )


async def start_render(client: Client, store: JobStore, settings: Settings, job_id: int) -> str:
    """Starts the job's render, or joins the run already going; returns the workflow id.

    Never starts a second billed render: a running run is reused, and a completed job
    is left alone. A failed or cancelled job may be rendered again.
    """
    job = await asyncio.to_thread(store.get, job_id)
    workflow_id = workflow_id_for(job_id)
    if job["status"] == JobStatus.COMPLETED:
        return workflow_id
    previous = job["status"], job["workflow_id"]
    # Marked before the start so a run that ends at once cannot be overwritten afterwards.
    await asyncio.to_thread(store.mark_rendering, job_id, workflow_id)
    try:
        await client.start_workflow(
            RenderVideo.run,
            RenderVideoInput(
                job_id=job_id,
                poll_interval_seconds=settings.poll_interval_seconds,
                render_timeout_seconds=settings.render_timeout_seconds,
            ),
            id=workflow_id,
            task_queue=settings.task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE_FAILED_ONLY,
            static_summary=f"Render job {job_id} into a video",
        )
    except WorkflowAlreadyStartedError as exc:
        # A completed run already holds this id, yet the job row does not say so (the job
        # store was reset or restored from a backup). Rendering again would bill twice.
        message = (
            f"Workflow {workflow_id} already completed, but job {job_id} is not marked "
            "completed in the job store; refusing to render it again"
        )
        await _revert(store, job_id, previous, message)
        raise JobConflict(message) from exc
    except (RPCError, RuntimeError) as exc:
        # RuntimeError is how a lazy client reports that its first connect failed.
        log.warning("Could not start %s: %s", workflow_id, exc)
        message = f"Temporal at {settings.temporal_address} is unavailable; try again shortly"
        await _revert(store, job_id, previous, f"Could not start the render: {message}")
        raise TemporalUnavailable(message) from exc
    except BaseException:
        await _revert(store, job_id, previous, "Could not start the render")
        raise
    return workflow_id


async def _revert(
    store: JobStore, job_id: int, previous: tuple[str, str | None], message: str
) -> None:
    status, workflow_id = previous
    if status != JobStatus.RENDERING:
        await asyncio.to_thread(store.revert_rendering, job_id, status, message, workflow_id)


async def wait_for_render(client: Client, job_id: int) -> RenderVideoResult | None:
    """Waits for the job's run to close; None when it failed or was cancelled."""
    handle: WorkflowHandle = client.get_workflow_handle(
        workflow_id_for(job_id), result_type=RenderVideoResult
    )
    try:
        return await handle.result()
    except WorkflowFailureError:
        return None
