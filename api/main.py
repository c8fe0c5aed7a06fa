"""The HTTP front: create jobs, set storyboards, approve (which starts the render), read
status, and serve the finished videos."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal
from importlib import resources
from typing import Annotated, Any

import replicate
from fastapi import Body, FastAPI, Path, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from replicate.webhook import WebhookSigningSecret
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from api.deps import ProgressDep, ProviderDep, ReadsDep, SettingsDep, StoreDep, TemporalDep
from api.reads import JobReads, ProgressCache, live_progress
from backend.database import (
    FINISHED,
    JobConflict,
    JobNotFound,
    JobStatus,
    JobStore,
    make_engine,
)
from backend.orchestration import (
    TemporalUnavailable,
    cancel_render,
    connect,
    start_render,
)
from backend.provider import TERMINAL, PredictionState, ProviderClient
from backend.settings import Settings, get_settings
from backend.storyboard import StoryboardError
from workflows.payloads import PredictionWebhook
from workflows.render_video import RenderVideo

log = logging.getLogger("api")


# Job ids are 32-bit database keys: anything else is a malformed request, not a lookup.
JobId = Annotated[int, Path(ge=1, le=2**31 - 1, description="The job's id")]


MaxCost = Annotated[
    Decimal | None,
    Field(
        default=None,
        gt=0,
        le=1_000_000,
        decimal_places=2,
        description="Budget in dollars: a render estimated to cost more is refused",
    ),
]


class CreateJob(BaseModel):
    storyboard: Any = None
    max_cost: MaxCost = None


class Budget(BaseModel):
    max_cost: MaxCost = None


class ApproveBody(BaseModel):
    approved_by: str | None = Field(default=None, max_length=200)


class JobCreated(BaseModel):
    job_id: int
    status: str


class RenderStarted(BaseModel):
    status: str
    job_id: int
    workflow_id: str


def job_view(job: dict[str, Any], live: dict[str, Any] | None = None) -> dict[str, Any]:
    """The seed's response shapes, plus the job and workflow ids, the budget, and (while a
    run goes) the run's own progress from its `progress` query."""
    status = job["status"]
    view: dict[str, Any] = {"status": status, "job_id": job["id"]}
    if status == JobStatus.COMPLETED:
        view |= {"video_url": job["video_url"], "actual_cost": job["actual_cost"]}
        if job["max_cost"] is not None:
            view |= {"max_cost": job["max_cost"], "over_budget": job["over_budget"]}
    elif status in FINISHED:
        view["error"] = job["error_message"]
    else:
        # `progress` keeps the seed's four keys; `live` is the run's whole answer.
        progress = dict(job["progress"])
        if live is not None:
            progress |= {
                "current_stage": live["stage"],
                "message": live["message"],
                "scenes_total": live["scenes_total"] or progress["scenes_total"],
                "scenes_completed": live["scenes_completed"],
            }
        view |= {
            "approved": job["approved"],
            "progress": progress,
            "live": live,
        }
        if job["max_cost"] is not None:
            view["max_cost"] = job["max_cost"]
    view["workflow_id"] = job["workflow_id"]
    return view


def _forget_progress(request: Request, job_id: int) -> None:
    request.app.state.progress.forget(job_id)


def _json_safe(value: Any) -> Any:
    value = jsonable_encoder(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    return value


def _error(status: int, detail: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": detail})


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.settings = settings
        app.state.store = JobStore(make_engine(settings.resolved_database_url))
        app.state.temporal = await connect(settings, lazy=True)
        app.state.provider = ProviderClient(settings)
        app.state.webhook_secret = settings.replicate_webhook_secret
        # Per lifespan: their tasks and futures belong to this event loop.
        app.state.reads = JobReads(app.state.store)
        app.state.progress = ProgressCache()
        # What startup made (modules, models, the engine, the client) lives as long as the
        # process. Frozen, full collections stop walking it: under load they came every second
        # or two and each one stalled every request in flight for about 100 ms.
        gc.freeze()
        try:
            yield
        finally:
            gc.unfreeze()

    app = FastAPI(
        title="Storyboard video renderer",
        version="2.0",
        lifespan=lifespan,
        description="Turns an approved storyboard into a video, durably, on Temporal.",
    )

    @app.exception_handler(JobNotFound)
    async def _not_found(_: Request, exc: JobNotFound) -> JSONResponse:
        return _error(404, str(exc))

    @app.exception_handler(JobConflict)
    async def _conflict(_: Request, exc: JobConflict) -> JSONResponse:
        return _error(409, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI echoes the offending input; a number like 1e400 arrives as inf, which
        # JSON cannot carry, and the echo itself would fail with a 500.
        return JSONResponse(status_code=422, content={"detail": _json_safe(exc.errors())})

    @app.exception_handler(StoryboardError)
    async def _bad_storyboard(_: Request, exc: StoryboardError) -> JSONResponse:
        return _error(422, str(exc))

    @app.exception_handler(ProviderUnreachable)
    async def _provider_down(_: Request, exc: ProviderUnreachable) -> JSONResponse:
        log.warning("%s", exc)
        return _error(503, str(exc))

    @app.exception_handler(TemporalUnavailable)
    async def _temporal_down(_: Request, exc: TemporalUnavailable) -> JSONResponse:
        log.warning("%s", exc)
        return _error(503, str(exc))

    @app.post("/api/v2/jobs", status_code=201, response_model=JobCreated)
    async def create_job(store: StoreDep, body: CreateJob | None = None) -> JobCreated:
        storyboard = body.storyboard if body else None
        max_cost = body.max_cost if body else None
        job_id = await asyncio.to_thread(store.create, storyboard, max_cost=max_cost)
        job = await asyncio.to_thread(store.get, job_id)
        return JobCreated(job_id=job_id, status=job["status"])

    @app.put("/api/v2/jobs/{job_id}/storyboard")
    async def put_storyboard(
        job_id: JobId, store: StoreDep, storyboard: Any = Body(...)
    ) -> dict[str, Any]:
        job = await asyncio.to_thread(store.set_storyboard, job_id, storyboard)
        return job_view(job)

    @app.put("/api/v2/jobs/{job_id}/budget")
    async def put_budget(job_id: JobId, store: StoreDep, body: Budget) -> dict[str, Any]:
        """Sets or clears (`null`) the job's `max_cost` while no run is going."""
        job = await asyncio.to_thread(store.set_budget, job_id, body.max_cost)
        return job_view(job)

    @app.post("/api/v2/jobs/{job_id}/approve", response_model=RenderStarted)
    async def approve(
        job_id: JobId,
        request: Request,
        store: StoreDep,
        temporal: TemporalDep,
        settings: SettingsDep,
        body: ApproveBody | None = None,
    ) -> RenderStarted:
        """Approves and renders: signals the run waiting in review, or starts one."""
        job = await asyncio.to_thread(store.approve, job_id)
        approved_by = body.approved_by if body else None
        try:
            workflow_id = await start_render(
                temporal, store, settings, job_id, approved_by=approved_by
            )
        finally:
            _forget_progress(request, job_id)
        # A completed job is never rendered (or billed) again.
        status = "completed" if job["status"] == JobStatus.COMPLETED else "rendering_started"
        return RenderStarted(status=status, job_id=job_id, workflow_id=workflow_id)

    @app.post("/api/v2/jobs/{job_id}/review", response_model=RenderStarted)
    async def submit_for_review(
        job_id: JobId,
        request: Request,
        store: StoreDep,
        temporal: TemporalDep,
        settings: SettingsDep,
    ) -> RenderStarted:
        """Starts a run that validates the storyboard, then waits for an approval."""
        job = await asyncio.to_thread(store.get, job_id)
        if job["status"] == JobStatus.COMPLETED:
            raise JobConflict(f"Job {job_id} is already completed")
        try:
            workflow_id = await start_render(temporal, store, settings, job_id, review=True)
        finally:
            _forget_progress(request, job_id)
        return RenderStarted(status="in_review", job_id=job_id, workflow_id=workflow_id)

    @app.post("/api/v2/jobs/{job_id}/cancel", status_code=202)
    async def cancel(
        job_id: JobId,
        request: Request,
        store: StoreDep,
        temporal: TemporalDep,
        provider: ProviderDep,
    ) -> dict[str, Any]:
        """Cancels the job's run; the job reads `cancelled` once the run has cleaned up."""
        try:
            return await cancel_render(temporal, store, job_id, provider)
        finally:
            _forget_progress(request, job_id)

    @app.get("/api/v2/jobs/{job_id}")
    async def get_job_status(
        job_id: JobId, reads: ReadsDep, progress: ProgressDep, temporal: TemporalDep
    ) -> dict[str, Any]:
        job = await reads.get(job_id)
        return job_view(job, await progress.get(temporal, job))

    @app.get("/api/v2/jobs/{job_id}/events")
    async def job_events(
        job_id: JobId,
        request: Request,
        store: StoreDep,
        temporal: TemporalDep,
        settings: SettingsDep,
    ) -> StreamingResponse:
        """Server-Sent Events: `progress` whenever the job's view changes, then `end`."""
        await asyncio.to_thread(store.get, job_id)  # a 404 now, not inside the stream
        return StreamingResponse(
            _event_stream(job_id, request, store, temporal, settings),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.post("/api/v2/webhooks/replicate")
    async def replicate_webhook(
        request: Request,
        store: StoreDep,
        temporal: TemporalDep,
        settings: SettingsDep,
        job_id: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
    ) -> JSONResponse:
        """Replicate's signed `completed` webhook, relayed to the job's run as a signal."""
        raw = await request.body()
        secret = await _webhook_secret(request.app, settings)
        try:
            replicate.webhooks.validate(
                headers=dict(request.headers),
                body=raw.decode("utf-8"),
                secret=WebhookSigningSecret(key=secret),
                tolerance=settings.webhook_tolerance_seconds,
            )
        except (ValueError, TypeError) as exc:
            # ValueError covers replicate's WebhookValidationError, bad base64 and bad UTF-8.
            reason = str(exc) or type(exc).__name__
            return _error(401, f"Webhook signature rejected: {reason}")
        webhook_id = request.headers["webhook-id"]
        if await asyncio.to_thread(store.seen_webhook, webhook_id):
            return JSONResponse({"status": "duplicate", "webhook_id": webhook_id})
        try:
            payload = json.loads(raw)
            state = PredictionState.from_json(payload)
        except (ValueError, KeyError, TypeError) as exc:
            return _error(400, f"Webhook body is not a prediction: {exc}")
        if state.status not in TERMINAL:
            # Only the final event matters to a run; earlier ones are acknowledged.
            return JSONResponse({"status": "ignored", "prediction_status": state.status})
        owner = await asyncio.to_thread(store.prediction_owner, state.id)
        if owner is None:
            # 404 makes Replicate retry: the run may not have recorded the prediction yet.
            return _error(404, f"No job knows prediction {state.id}")
        target = owner.job_id
        handle = temporal.get_workflow_handle(owner.workflow_id)
        signal = PredictionWebhook(
            prediction_id=state.id, status=state.status, webhook_id=webhook_id
        )
        outcome = "signalled"
        try:
            await handle.signal(RenderVideo.prediction_finished, signal)
            _forget_progress(request, target)
        except RPCError as exc:
            if exc.status != RPCStatusCode.NOT_FOUND:
                log.warning("Could not relay webhook %s: %s", webhook_id, exc)
                return _error(503, "Temporal is unavailable; retry the webhook")
            outcome = "run_closed"  # a late webhook after the run ended: nothing to do
        except RuntimeError:
            return _error(503, "Temporal is unavailable; retry the webhook")
        await asyncio.to_thread(store.remember_webhook, webhook_id, state.id)
        return JSONResponse({"status": outcome, "job_id": target, "prediction_id": state.id})

    # HEAD too: players and download tools ask for the size before they fetch.
    @app.api_route(
        "/api/videos/{job_id}/data", methods=["GET", "HEAD"], response_class=FileResponse
    )
    async def video_data(job_id: JobId, store: StoreDep, settings: SettingsDep) -> Any:
        job = await asyncio.to_thread(store.get, job_id)
        path = settings.video_path(job_id)
        if job["status"] != JobStatus.COMPLETED or not path.is_file():
            return _error(404, f"Job {job_id} has no video yet (status {job['status']})")
        return FileResponse(
            path,
            media_type="video/mp4",
            filename=f"job-{job_id}.mp4",
            content_disposition_type="inline",
        )

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    # Sample scene images for the demo storyboard, served so the renderer can fetch them.
    samples = resources.files("backend") / "samples"
    app.mount("/samples", StaticFiles(directory=str(samples)), name="samples")
    return app


class ProviderUnreachable(RuntimeError):
    """The webhook secret could not be fetched from Replicate."""


async def _webhook_secret(app: FastAPI, settings: Settings) -> str:
    # Fetched once: Replicate's default signing secret does not change under a running API.
    if app.state.webhook_secret is None:
        try:
            app.state.webhook_secret = await app.state.provider.webhook_secret()
        except Exception as exc:  # noqa: BLE001 - any failure means: cannot verify now
            raise ProviderUnreachable(
                f"Could not fetch the webhook signing secret from {settings.provider_base_url}"
            ) from exc
    secret: str = app.state.webhook_secret
    return secret


async def _event_stream(
    job_id: int, request: Request, store: JobStore, temporal: Client, settings: Settings
) -> AsyncIterator[str]:
    # A cadence, not a retry: each tick reads the run's progress and sends what changed.
    last: dict[str, Any] | None = None
    quiet = 0.0
    while not await request.is_disconnected():
        try:
            job = await asyncio.to_thread(store.get, job_id)
        except JobNotFound:
            yield _sse("end", {"job_id": job_id, "status": "deleted"})
            return
        view = job_view(job, await live_progress(temporal, job))
        if view != last:
            yield _sse("progress", view)
            last, quiet = view, 0.0
        elif quiet >= 15:
            yield ": keep-alive\n\n"  # proxies drop connections that stay silent
            quiet = 0.0
        if job["status"] in FINISHED:
            yield _sse("end", view)
            return
        await asyncio.sleep(settings.events_interval_seconds)
        quiet += settings.events_interval_seconds


def _sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


app = create_app()
