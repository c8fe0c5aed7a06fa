"""Starting and joining RenderVideo runs: shared by the API, the CLI and `render_video_task`."""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import timedelta
from typing import Any

from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import (
    AddSearchAttributesRequest,
    ListSearchAttributesRequest,
)
from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleIntervalSpec,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleSpec,
    ScheduleState,
    WorkflowExecutionStatus,
    WorkflowFailureError,
    WorkflowHandle,
)
from temporalio.common import (
    Priority,
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig
from temporalio.service import RPCError, RPCStatusCode

from backend import telemetry
from backend.database import ACTIVE, FINISHED, JobConflict, JobStatus, JobStore
from backend.provider import ProviderClient
from backend.reconcile import repair_job
from backend.settings import Settings
from workflows.deliver_event import DeliverJobEvent
from workflows.payloads import (
    ApproveSignal,
    DeliverEventInput,
    ReconcileInput,
    RenderVideoInput,
    RenderVideoResult,
    ReviewSignal,
    webhook_id_for,
    workflow_id_for,
)
from workflows.reconcile import ReconcileJobs
from workflows.render_video import JOB_ID, RENDER_STAGE, RenderVideo

log = logging.getLogger(__name__)


class TemporalUnavailable(RuntimeError):
    """Temporal could not be reached or refused the call; nothing was started."""


class TenantAtCapacity(RuntimeError):
    """The tenant has as many jobs going as it may; nothing was started."""


async def connect(
    settings: Settings, *, lazy: bool = False, runtime: Runtime | None = None
) -> Client:
    # lazy: the API should come up and serve reads even while Temporal is still starting.
    # With tracing on, the plugin carries the trace through every start, signal and activity
    # (and into the workers made from this client).
    return await Client.connect(
        settings.temporal_address,
        namespace=settings.temporal_namespace,
        lazy=lazy,
        runtime=runtime,
        plugins=telemetry.temporal_plugins(),
    )


def metrics_runtime(settings: Settings) -> Runtime | None:
    """A runtime that serves the SDK's Prometheus metrics at WORKER_METRICS_ADDRESS, if set."""
    if not settings.worker_metrics_address:
        return None
    return Runtime(
        telemetry=TelemetryConfig(
            metrics=PrometheusConfig(bind_address=settings.worker_metrics_address)
        )
    )


async def ensure_search_attributes(client: Client, settings: Settings) -> None:
    """Registers JobId and RenderStage where the server lets us (dev server, self-hosted);
    elsewhere (Temporal Cloud) they are added in its console, and runs start without them
    until then."""
    try:
        listed = await client.operator_service.list_search_attributes(
            ListSearchAttributesRequest(namespace=settings.temporal_namespace)
        )
        missing = {
            key.name: IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD
            for key in (JOB_ID, RENDER_STAGE)
            if key.name not in listed.custom_attributes
        }
        if missing:
            await client.operator_service.add_search_attributes(
                AddSearchAttributesRequest(
                    namespace=settings.temporal_namespace, search_attributes=missing
                )
            )
            log.info("Registered search attributes %s", ", ".join(missing))
    except RPCError as exc:
        log.warning("Could not register search attributes JobId/RenderStage: %s", exc)


def render_input(
    settings: Settings,
    job_id: int,
    *,
    review: bool = False,
    rerender: bool = False,
    notify: bool = False,
) -> RenderVideoInput:
    return RenderVideoInput(
        job_id=job_id,
        poll_interval_seconds=settings.poll_interval_seconds,
        render_timeout_seconds=settings.render_timeout_seconds,
        review=review,
        review_timeout_seconds=settings.review_timeout_seconds,
        webhook_wait_seconds=settings.webhook_wait_seconds,
        scene_concurrency=settings.scene_concurrency,
        rerender=rerender,
        create_task_queue=settings.create_task_queue,
        notify=notify,
        callback_retry_initial_seconds=settings.callback_retry_initial_seconds,
    )


async def start_render(
    client: Client,
    store: JobStore,
    settings: Settings,
    job_id: int,
    *,
    review: bool = False,
    approved_by: str | None = None,
    rerender: bool = False,
) -> str:
    """Starts the job's run, or signals the run already going; returns the workflow id.

    Both are a signal-with-start: approving sends `approve` (a run waiting in review is
    approved, a running one is left alone, otherwise a new run starts); submitting for review
    sends `review` to a run that validates and then waits for `approve`. The row is marked
    first and the signal follows, so a run that is closing when the request lands sees it and
    writes the job's final status again after it (see RenderVideo._close_failed).
    Never starts a second billed render: one workflow id per job, a completed job is left
    alone, and only a failed, cancelled or expired job may run again.
    """
    job = await asyncio.to_thread(store.get, job_id)
    workflow_id = workflow_id_for(job_id, settings.workflow_id_prefix)
    if job["status"] == JobStatus.COMPLETED and not rerender:
        return workflow_id
    if review and job["status"] == JobStatus.RENDERING:
        raise JobConflict(f"Job {job_id} is already rendering; it is past review")
    previous = job["status"], job["workflow_id"], job["approved"]
    tenant = await asyncio.to_thread(store.tenant, job["tenant"])
    if job["status"] not in ACTIVE:
        cap = tenant["max_active_jobs"] or settings.tenant_max_active_jobs
        going = await asyncio.to_thread(store.active_jobs_of, job["tenant"], besides=job_id)
        if going >= cap:
            raise TenantAtCapacity(
                f"Tenant {job['tenant']} has {going} jobs rendering or in review, its cap; "
                "approve this one once one of them ends"
            )
    # Marked before the start so a run that ends at once cannot be overwritten afterwards.
    marked = await asyncio.to_thread(
        store.mark_rendering, job_id, workflow_id, review=review, again=rerender
    )
    if marked["status"] == JobStatus.COMPLETED:
        return workflow_id  # its run completed in the meantime: nothing to start
    signal: tuple[str, Any] = (
        ("review", ReviewSignal()) if review else ("approve", ApproveSignal(approved_by))
    )
    options: dict[str, Any] = {
        "id": workflow_id,
        "task_queue": settings.task_queue,
        "id_conflict_policy": WorkflowIDConflictPolicy.USE_EXISTING,
        # A job with a video (completed once, then changed or asked for fresh takes) may run
        # after its completed run; otherwise only after a failed one, so a job store that
        # lost a completed job's row is not billed for it twice.
        "id_reuse_policy": WorkflowIDReusePolicy.ALLOW_DUPLICATE
        if job["video_url"]
        else WorkflowIDReusePolicy.ALLOW_DUPLICATE_FAILED_ONLY,
        "static_summary": f"Render job {job_id} into a video"
        + (" (after review)" if review else ""),
        "static_details": f"Job {job_id}: `GET /api/v2/jobs/{job_id}` on the API",
        "start_signal": signal[0],
        "start_signal_args": [signal[1]],
        # Task queue fairness: one tenant's backlog does not hold back another's work (the
        # scene runs and activities inherit it).
        "priority": Priority(fairness_key=job["tenant"]),
    }
    try:
        await _start(
            client,
            render_input(
                settings,
                job_id,
                review=review,
                rerender=rerender,
                notify=bool(job["callback_url"] or tenant["callback_url"]),
            ),
            job_id,
            options,
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


async def _start(
    client: Client, input: RenderVideoInput, job_id: int, options: dict[str, Any]
) -> None:
    attributes = TypedSearchAttributes(
        [SearchAttributePair(JOB_ID, str(job_id)), SearchAttributePair(RENDER_STAGE, "queued")]
    )
    try:
        await client.start_workflow(RenderVideo.run, input, search_attributes=attributes, **options)
    except RPCError as exc:
        # A namespace without our search attributes still renders; the runs just cannot
        # be found by JobId. The worker registers them where it may (the dev server).
        if (
            exc.status != RPCStatusCode.INVALID_ARGUMENT
            or "search attribute" not in str(exc).lower()
        ):
            raise
        log.warning("Search attributes JobId/RenderStage are not registered: %s", exc)
        await client.start_workflow(RenderVideo.run, input, **options)


class NothingToCancel(JobConflict):
    """The job has no run to cancel."""


async def cancel_render(
    client: Client, store: JobStore, job_id: int, provider: ProviderClient | None = None
) -> dict[str, Any]:
    """Asks the job's run to cancel: the workflow cancels the prediction, stops the
    download, removes partial files and marks the job cancelled."""
    job = await asyncio.to_thread(store.get, job_id)
    status = job["status"]
    if status in FINISHED:
        raise NothingToCancel(f"Job {job_id} is already {status}; there is nothing to cancel")
    if status not in ACTIVE:
        raise NothingToCancel(f"Job {job_id} is {status}: no render is running to cancel")
    workflow_id = job["workflow_id"] or workflow_id_for(job_id)
    handle = client.get_workflow_handle(workflow_id)
    unavailable = "Temporal is unavailable; the render was not cancelled, try again shortly"
    closed: WorkflowExecutionStatus | None = None
    try:
        description = await handle.describe()
        if description.status == WorkflowExecutionStatus.RUNNING:
            await handle.cancel()
            return {"status": "cancelling", "job_id": job_id, "workflow_id": workflow_id}
        closed = description.status
    except RPCError as exc:
        if exc.status != RPCStatusCode.NOT_FOUND:
            log.warning("Could not cancel %s: %s", workflow_id, exc)
            raise TemporalUnavailable(unavailable) from exc
    except RuntimeError as exc:
        raise TemporalUnavailable(unavailable) from exc
    if closed is not None and closed != WorkflowExecutionStatus.TERMINATED:
        # The run ended on its own and the job was not told yet: it says so now.
        await repair_job(client, store, job)
        now = (await asyncio.to_thread(store.get, job_id))["status"]
        raise NothingToCancel(f"Job {job_id}'s render already ended; the job is {now}")
    # No run is going (it was terminated, or never reached Temporal): nobody else will stop
    # its prediction or close the job row.
    if provider is not None and job["prediction_id"]:
        try:
            await provider.cancel(job["prediction_id"])
        except Exception as exc:  # noqa: BLE001 - the job is closed either way; say so in logs
            log.warning("Could not cancel prediction %s: %s", job["prediction_id"], exc)
    await asyncio.to_thread(
        store.fail, job_id, "Render cancelled (no run was going)", status=JobStatus.CANCELLED
    )
    return {"status": "cancelled", "job_id": job_id, "workflow_id": workflow_id}


async def ensure_reconcile_schedule(client: Client, settings: Settings) -> None:
    """The Temporal Schedule that runs ReconcileJobs every RECONCILE_INTERVAL_SECONDS (one per
    task queue; every worker makes sure it exists, the first one creates it)."""
    if settings.reconcile_interval_seconds <= 0:
        return
    schedule_id = f"{settings.workflow_id_prefix}reconcile-jobs-{settings.task_queue}"
    schedule = Schedule(
        action=ScheduleActionStartWorkflow(
            ReconcileJobs.run,
            ReconcileInput(grace_seconds=settings.reconcile_grace_seconds),
            id=schedule_id,
            task_queue=settings.task_queue,
        ),
        spec=ScheduleSpec(
            intervals=[
                ScheduleIntervalSpec(every=timedelta(seconds=settings.reconcile_interval_seconds))
            ]
        ),
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP),
        state=ScheduleState(note="Repairs jobs whose status disagrees with their workflow"),
    )
    try:
        await client.create_schedule(schedule_id, schedule)
        log.info("Created schedule %s", schedule_id)
    except ScheduleAlreadyRunningError:
        pass
    except RPCError as exc:
        log.warning("Could not create the reconcile schedule %s: %s", schedule_id, exc)


async def redeliver_event(
    client: Client, store: JobStore, settings: Settings, job: dict[str, Any]
) -> dict[str, str]:
    """Sends a finished job's event to its callback again, under the webhook-id it was first
    sent with (a new one only if it was never sent)."""
    job_id = job["id"]
    if job["status"] not in FINISHED:
        raise JobConflict(f"Job {job_id} is {job['status']}: it has not ended, so no event yet")
    tenant = await asyncio.to_thread(store.tenant, job["tenant"])
    if not (job["callback_url"] or tenant["callback_url"]):
        raise JobConflict(
            f"Job {job_id} has no callback URL: set the tenant's (PUT /api/v2/tenant), or give "
            "jobs a callback_url when they are created"
        )
    event = str(job["status"])
    sent = [a["webhook_id"] for a in job.get("callbacks", []) if a["event"] == event]
    webhook_id = sent[-1] if sent else webhook_id_for(job_id, event, uuid.uuid4().hex)
    try:
        await client.start_workflow(
            DeliverJobEvent.run,
            DeliverEventInput(
                job_id=job_id,
                event=event,
                webhook_id=webhook_id,
                retry_initial_seconds=settings.callback_retry_initial_seconds,
            ),
            id=f"{job['workflow_id'] or workflow_id_for(job_id, settings.workflow_id_prefix)}"
            f"-event-{event}-again-{uuid.uuid4().hex[:8]}",
            task_queue=settings.task_queue,
            static_summary=f"Tell job {job_id}'s caller again: {event}",
            priority=Priority(fairness_key=job["tenant"]),
        )
    except (RPCError, RuntimeError) as exc:
        raise TemporalUnavailable(
            f"Temporal at {settings.temporal_address} is unavailable; try again shortly"
        ) from exc
    return {"event": event, "webhook_id": webhook_id}


async def _revert(
    store: JobStore, job_id: int, previous: tuple[str, str | None, bool], message: str
) -> None:
    status, workflow_id, approved = previous
    # A job that was rendering keeps its run; one in review goes back to waiting there.
    if status != JobStatus.RENDERING:
        if status == JobStatus.IN_REVIEW:
            approved = False  # the run in review never heard of this approval
        await asyncio.to_thread(
            store.revert_rendering, job_id, status, message, workflow_id, approved
        )


async def wait_for_render(
    client: Client, job_id: int, prefix: str = ""
) -> RenderVideoResult | None:
    """Waits for the job's run to close; None when it failed or was cancelled."""
    handle: WorkflowHandle = client.get_workflow_handle(
        workflow_id_for(job_id, prefix), result_type=RenderVideoResult
    )
    try:
        return await handle.result()
    except WorkflowFailureError:
        return None
