"""Jobs: create, set the storyboard and budget, approve or review (which starts the render),
cancel, read and follow. Every route needs an API key and sees only its tenant's jobs."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Query, Request, Response
from fastapi.responses import StreamingResponse
from sqlalchemy.exc import OperationalError
from temporalio.client import Client

from api.deps import (
    ProgressDep,
    ProviderDep,
    ReadsDep,
    SettingsDep,
    SignerDep,
    StoreDep,
    TemporalDep,
)
from api.errors import error_responses, invalid_field
from api.models import (
    ApproveBody,
    Budget,
    CancelAnswer,
    CreateJob,
    JobCreated,
    JobPage,
    JobView,
    RedeliveryStarted,
    RenderStarted,
    StoryboardInput,
)
from api.reads import JobReads, ProgressCache
from api.security import OwnedJob, ProtectedRoute, TenantDep
from api.views import VideoSigner, job_view, view_bytes, view_json
from backend.callbacks import CallbackRefused, check_callback_url
from backend.database import ACTIVE, FINISHED, JobConflict, JobNotFound, JobStatus
from backend.orchestration import cancel_render, redeliver_event, start_render
from backend.settings import Settings

router = APIRouter(prefix="/api/v2/jobs", tags=["jobs"], route_class=ProtectedRoute)

# Every job route: no key (401), not JSON (415), malformed (422), store or Temporal down (503).
_COMMON = (401, 415, 422, 503)


@router.post(
    "",
    status_code=201,
    response_model=JobCreated,
    responses=error_responses(*_COMMON, 413),
    summary="Create a job, with or without its storyboard",
)
async def create_job(
    tenant: TenantDep, store: StoreDep, settings: SettingsDep, body: CreateJob | None = None
) -> JobCreated:
    body = body or CreateJob()
    callback_url = checked_callback_url(body.callback_url, settings)
    # One insert: when the store is locked nothing is written and the answer is 503.
    job_id = await asyncio.to_thread(
        store.create,
        body.storyboard,
        max_cost=body.max_cost,
        tenant=tenant,
        callback_url=callback_url,
        metadata=body.metadata,
    )
    return JobCreated(job_id=job_id, status="ready" if body.storyboard is not None else "draft")


def checked_callback_url(url: str | None, settings: Settings) -> str | None:
    """The callback URL if it may be called; a 422 naming why not otherwise."""
    if url is None:
        return None
    try:
        return check_callback_url(url, allow_private=settings.allow_private_callbacks)
    except CallbackRefused as exc:
        raise invalid_field(("body", "callback_url"), str(exc)) from None


JobStatusFilter = Literal[
    "draft", "ready", "in_review", "rendering", "completed", "failed", "cancelled", "expired"
]


@router.get(
    "",
    response_model=JobPage,
    responses=error_responses(401, 422, 503),
    summary="The tenant's jobs, newest first, a page at a time",
)
async def list_jobs(
    tenant: TenantDep,
    store: StoreDep,
    signer: SignerDep,
    status: Annotated[JobStatusFilter | None, Query(description="Only jobs in this state")] = None,
    created_after: Annotated[
        str | None,
        Query(
            json_schema_extra={"format": "date-time"},
            description="Only jobs created at or after this ISO 8601 time",
        ),
    ] = None,
    created_before: Annotated[
        str | None,
        Query(
            json_schema_extra={"format": "date-time"},
            description="Only jobs created before this ISO 8601 time",
        ),
    ] = None,
    metadata_key: Annotated[
        str | None, Query(max_length=200, description="Only jobs whose metadata has this key")
    ] = None,
    metadata_value: Annotated[
        str | None,
        Query(max_length=1000, description="...and whose value there is this (as text)"),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=200, description="Jobs per page")] = 50,
    cursor: Annotated[
        str | None, Query(max_length=200, description="`next_cursor` of the previous page")
    ] = None,
) -> Any:
    """Keyset pages (a cursor names the last job seen): jobs created while paging never shift
    or repeat the pages that follow. Views here carry no `live` (no query to each run)."""
    if metadata_value is not None and metadata_key is None:
        raise invalid_field(("query", "metadata_value"), "needs metadata_key")
    after = _decode_cursor(cursor) if cursor else None
    jobs = await asyncio.to_thread(
        store.list_jobs,
        tenant,
        limit=limit + 1,
        after=after,
        status=status,
        created_after=_moment("created_after", created_after),
        created_before=_moment("created_before", created_before),
        metadata_key=metadata_key,
        metadata_value=metadata_value,
    )
    page, more = jobs[:limit], len(jobs) > limit
    last = page[-1] if page and more else None
    listed = JobPage(
        jobs=[job_view(job, signer) for job in page],
        next_cursor=_encode_cursor(last["created_at"], last["id"]) if last else None,
    )
    # Each view keeps only the keys of its job's state, as a single job's GET does.
    return Response(listed.model_dump_json(exclude_unset=True), media_type="application/json")


def _moment(name: str, text: str | None) -> datetime | None:
    """An ISO 8601 time (no Unix seconds: a number is more likely a mistake); UTC unless it
    says otherwise."""
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise invalid_field(("query", name), "must be an ISO 8601 date-time") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _encode_cursor(created_at: str, job_id: int) -> str:
    raw = json.dumps([created_at, job_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[str, int]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, job_id = json.loads(raw)
        datetime.fromisoformat(created_at)
        if not isinstance(job_id, int) or isinstance(job_id, bool):
            raise ValueError("bad id")
    except (ValueError, TypeError, binascii.Error):
        raise invalid_field(("query", "cursor"), "not a cursor this API gave out") from None
    return created_at, job_id


@router.put(
    "/{job_id}/storyboard",
    response_model=JobView,
    response_model_exclude_unset=True,
    responses=error_responses(*_COMMON, 404, 409, 413),
    summary="Set the storyboard; resets the approval",
)
async def put_storyboard(
    job: OwnedJob,
    store: StoreDep,
    signer: SignerDep,
    storyboard: Annotated[StoryboardInput, Body(description="The storyboard, in any of its forms")],
) -> Any:
    updated = await asyncio.to_thread(store.set_storyboard, job["id"], storyboard)
    return job_view(updated, signer)


@router.put(
    "/{job_id}/budget",
    response_model=JobView,
    response_model_exclude_unset=True,
    responses=error_responses(*_COMMON, 404, 409, 413),
    summary="Set or clear (null) the job's max_cost while no run is going",
)
async def put_budget(job: OwnedJob, store: StoreDep, signer: SignerDep, body: Budget) -> Any:
    updated = await asyncio.to_thread(store.set_budget, job["id"], body.max_cost)
    return job_view(updated, signer)


@router.post(
    "/{job_id}/approve",
    response_model=RenderStarted,
    responses=error_responses(*_COMMON, 404, 409, 413, 429),
    summary="Approve and render: signals the run waiting in review, or starts one",
)
async def approve(
    job: OwnedJob,
    store: StoreDep,
    temporal: TemporalDep,
    settings: SettingsDep,
    progress: ProgressDep,
    body: ApproveBody | None = None,
) -> RenderStarted:
    job_id = job["id"]
    approved = await asyncio.to_thread(store.approve, job_id)
    approved_by = body.approved_by if body else None
    rerender = body.rerender if body else False
    try:
        workflow_id = await start_render(
            temporal, store, settings, job_id, approved_by=approved_by, rerender=rerender
        )
    finally:
        progress.forget(job_id)
    # A completed job is not rendered (or billed) again, unless fresh takes were asked for.
    status = (
        "completed"
        if approved["status"] == JobStatus.COMPLETED and not rerender
        else "rendering_started"
    )
    return RenderStarted(status=status, job_id=job_id, workflow_id=workflow_id)


@router.post(
    "/{job_id}/review",
    response_model=RenderStarted,
    responses=error_responses(*_COMMON, 404, 409, 429),
    summary="Start a run that validates the storyboard, then waits for an approval",
)
async def submit_for_review(
    job: OwnedJob,
    store: StoreDep,
    temporal: TemporalDep,
    settings: SettingsDep,
    progress: ProgressDep,
) -> RenderStarted:
    job_id = job["id"]
    if job["status"] == JobStatus.COMPLETED:
        raise JobConflict(f"Job {job_id} is already completed")
    try:
        workflow_id = await start_render(temporal, store, settings, job_id, review=True)
    finally:
        progress.forget(job_id)
    return RenderStarted(status="in_review", job_id=job_id, workflow_id=workflow_id)


@router.post(
    "/{job_id}/cancel",
    status_code=202,
    response_model=CancelAnswer,
    responses=error_responses(*_COMMON, 404, 409),
    summary="Cancel the job's run",
)
async def cancel(
    job: OwnedJob,
    store: StoreDep,
    temporal: TemporalDep,
    provider: ProviderDep,
    progress: ProgressDep,
) -> CancelAnswer:
    """The run cancels its prediction and cleans up; the job reads `cancelled` once it has."""
    try:
        return CancelAnswer(**await cancel_render(temporal, store, job["id"], provider))
    finally:
        progress.forget(job["id"])


@router.post(
    "/{job_id}/callbacks/redeliver",
    status_code=202,
    response_model=RedeliveryStarted,
    responses=error_responses(*_COMMON, 404, 409),
    summary="Send the job's last event to its callback again (same webhook-id)",
)
async def redeliver(
    job: OwnedJob, store: StoreDep, temporal: TemporalDep, settings: SettingsDep
) -> RedeliveryStarted:
    """The event the job ended with, again, under its webhook-id: a receiver that took it
    already can tell it is a repeat."""
    started = await redeliver_event(temporal, store, settings, job)
    return RedeliveryStarted(job_id=job["id"], **started)


@router.get(
    "/{job_id}",
    response_model=JobView,
    response_model_exclude_unset=True,
    responses=error_responses(401, 404, 422, 503),
    summary="The job's status",
)
async def get_job_status(
    job: OwnedJob, progress: ProgressDep, temporal: TemporalDep, signer: SignerDep
) -> Any:
    view = job_view(job, signer, await progress.get(temporal, job))
    return Response(view_bytes(view), media_type="application/json")


class EventStream(StreamingResponse):
    media_type = "text/event-stream"


_VIEW_SCHEMAS = [
    {"$ref": f"#/components/schemas/{name}"} for name in ("PendingJob", "CompletedJob", "ClosedJob")
]
_END_REASONS = ["finished", "idle", "max_duration", "deleted", "unavailable"]
# One event, as Open API (before 3.2's itemSchema) describes a text/event-stream: its `data` is
# JSON text of the job's view; `end` adds why the stream ends.
_EVENT_SCHEMA = {
    "oneOf": [
        {
            "type": "object",
            "required": ["event", "data"],
            "properties": {
                "event": {"const": "progress"},
                "data": {
                    "type": "string",
                    "contentMediaType": "application/json",
                    "contentSchema": {"oneOf": _VIEW_SCHEMAS},
                },
            },
        },
        {
            "type": "object",
            "required": ["event", "data"],
            "properties": {
                "event": {"const": "end"},
                "data": {
                    "type": "string",
                    "contentMediaType": "application/json",
                    "contentSchema": {
                        "allOf": [{"oneOf": _VIEW_SCHEMAS}],
                        "required": ["reason"],
                        "properties": {"reason": {"enum": _END_REASONS}},
                    },
                },
            },
        },
    ]
}


@router.get(
    "/{job_id}/events",
    # The error answers are JSON; only the 200 is an event stream.
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "Server-Sent Events: `event: progress` with the job's view (as "
            "`GET /api/v2/jobs/{id}` answers) whenever it changes, then `event: end` with the "
            "view and a `reason`: `finished`, `idle` (no run is going: nothing changes until "
            "someone acts), `max_duration` (the stream reached EVENTS_MAX_SECONDS: reconnect), "
            "`deleted` or `unavailable`",
            "content": {"text/event-stream": {"schema": _EVENT_SCHEMA}},
        },
        **error_responses(401, 404, 422, 503),
    },
    summary="Follow the job live",
)
async def job_events(
    job: OwnedJob,
    request: Request,
    reads: ReadsDep,
    temporal: TemporalDep,
    progress: ProgressDep,
    signer: SignerDep,
    settings: SettingsDep,
) -> EventStream:
    return EventStream(
        _event_stream(job, request, reads, temporal, progress, signer, settings),
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _event_stream(
    job: dict[str, Any],
    request: Request,
    reads: JobReads,
    temporal: Client,
    progress: ProgressCache,
    signer: VideoSigner,
    settings: Settings,
) -> AsyncIterator[str]:
    # A cadence, not a retry: each tick reads the job and its run's shared progress answer
    # (one query per job for all its streams and GETs) and sends what changed.
    job_id = job["id"]
    deadline = time.monotonic() + settings.events_max_seconds
    interval = settings.events_interval_seconds
    last: dict[str, Any] | None = None
    quiet = 0.0
    while True:
        live = await progress.get(temporal, job) if job["status"] in ACTIVE else None
        view = view_json(job_view(job, signer, live))
        if view != last:
            yield _sse("progress", view)
            last, quiet = view, 0.0
        elif quiet >= 15:
            yield ": keep-alive\n\n"  # proxies drop connections that stay silent
            quiet = 0.0
        if job["status"] in FINISHED:
            yield _sse("end", {**view, "reason": "finished"})
            return
        if job["status"] not in ACTIVE:
            yield _sse("end", {**view, "reason": "idle"})
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            yield _sse("end", {**view, "reason": "max_duration"})
            return
        await asyncio.sleep(min(interval, remaining))
        quiet += interval
        if await request.is_disconnected():
            return
        try:
            job = await reads.get(job_id)
        except JobNotFound:
            yield _sse("end", {**view, "reason": "deleted"})
            return
        except OperationalError:
            yield _sse("end", {**view, "reason": "unavailable"})
            return


def _sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"
