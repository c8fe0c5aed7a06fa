"""The HTTP front: create jobs, set storyboards, approve (which starts the render), read
status, and serve the finished videos."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from typing import Annotated, Any

from fastapi import Body, FastAPI, Path, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

from api.deps import SettingsDep, StoreDep, TemporalDep
from backend.database import JobConflict, JobNotFound, JobStatus, JobStore, make_engine
from backend.orchestration import TemporalUnavailable, connect, start_render
from backend.settings import Settings, get_settings
from backend.storyboard import StoryboardError

log = logging.getLogger("api")


# Job ids are 32-bit database keys: anything else is a malformed request, not a lookup.
JobId = Annotated[int, Path(ge=1, le=2**31 - 1, description="The job's id")]


class CreateJob(BaseModel):
    storyboard: Any = None


class JobCreated(BaseModel):
    job_id: int
    status: str


class RenderStarted(BaseModel):
    status: str
    job_id: int
    workflow_id: str


def job_view(job: dict[str, Any]) -> dict[str, Any]:
    """The seed's response shapes, plus the job and workflow ids."""
    status = job["status"]
    view: dict[str, Any] = {"status": status, "job_id": job["id"]}
    if status == JobStatus.COMPLETED:
        view |= {"video_url": job["video_url"], "actual_cost": job["actual_cost"]}
    elif status in (JobStatus.FAILED, JobStatus.CANCELLED):
        view["error"] = job["error_message"]
    else:
        view |= {"approved": job["approved"], "progress": job["progress"]}
    view["workflow_id"] = job["workflow_id"]
    return view


def _error(status: int, detail: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": detail})


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.settings = settings
        app.state.store = JobStore(make_engine(settings.resolved_database_url))
        app.state.temporal = await connect(settings, lazy=True)
        yield

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

    @app.exception_handler(StoryboardError)
    async def _bad_storyboard(_: Request, exc: StoryboardError) -> JSONResponse:
        return _error(422, str(exc))

    @app.exception_handler(TemporalUnavailable)
    async def _temporal_down(_: Request, exc: TemporalUnavailable) -> JSONResponse:
        log.warning("%s", exc)
        return _error(503, str(exc))

    @app.post("/api/v2/jobs", status_code=201, response_model=JobCreated)
    async def create_job(store: StoreDep, body: CreateJob | None = None) -> JobCreated:
        storyboard = body.storyboard if body else None
        job_id = await asyncio.to_thread(store.create, storyboard)
        job = await asyncio.to_thread(store.get, job_id)
        return JobCreated(job_id=job_id, status=job["status"])

    @app.put("/api/v2/jobs/{job_id}/storyboard")
    async def put_storyboard(
        job_id: JobId, store: StoreDep, storyboard: Any = Body(...)
    ) -> dict[str, Any]:
        job = await asyncio.to_thread(store.set_storyboard, job_id, storyboard)
        return job_view(job)

    @app.post("/api/v2/jobs/{job_id}/approve", response_model=RenderStarted)
    async def approve(
        job_id: JobId, store: StoreDep, temporal: TemporalDep, settings: SettingsDep
    ) -> RenderStarted:
        job = await asyncio.to_thread(store.approve, job_id)
        workflow_id = await start_render(temporal, store, settings, job_id)
        # A completed job is never rendered (or billed) again.
        status = "completed" if job["status"] == JobStatus.COMPLETED else "rendering_started"
        return RenderStarted(status=status, job_id=job_id, workflow_id=workflow_id)

    @app.get("/api/v2/jobs/{job_id}")
    async def get_job_status(job_id: JobId, store: StoreDep) -> dict[str, Any]:
        return job_view(await asyncio.to_thread(store.get, job_id))

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


app = create_app()
