"""The SQL job store (SQLModel), with the seed's function names.

`JobStore` is what activities and the API use, given an engine. The module-level functions
(`create_video_job`, `get_job`, ...) keep the seed's call signatures for code written against
the old renderer; they use the engine configured by `Settings`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import Column, Numeric, Text, event
from sqlalchemy.engine import Engine, make_url
from sqlmodel import Field, Session, SQLModel, create_engine

from backend.settings import get_settings
from backend.storyboard import NO_STORYBOARD, Storyboard


class JobStatus(StrEnum):
    DRAFT = "draft"
    READY = "ready"
    RENDERING = "rendering"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINISHED = {JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED}


def _now() -> datetime:
    return datetime.now(UTC)


class Job(SQLModel, table=True):
    __tablename__ = "video_jobs"

    id: int | None = Field(default=None, primary_key=True)
    status: str = Field(default=JobStatus.DRAFT, index=True, max_length=16)
    approved: bool = False
    storyboard_data: str | None = Field(default=None, sa_column=Column(Text))
    video_url: str | None = None
    actual_cost: Decimal | None = Field(default=None, sa_column=Column(Numeric(12, 2)))
    current_stage: str = "created"
    progress_message: str = "Job created"
    scenes_total: int = 0
    scenes_completed: int = 0
    error_message: str | None = Field(default=None, sa_column=Column(Text))
    download_retries: int = 0
    prediction_id: str | None = Field(default=None, max_length=128)
    workflow_id: str | None = Field(default=None, max_length=128)
    created_at: datetime = Field(default_factory=_now)
    updated_at: datetime = Field(default_factory=_now)


class JobNotFound(LookupError):
    def __init__(self, job_id: int) -> None:
        super().__init__(f"Job {job_id} not found")
        self.job_id = job_id


class JobConflict(RuntimeError):
    """The job is in a state that does not allow the request."""


def make_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        # The API, the worker and the CLI may share one SQLite file: wait for locks
        # instead of failing, and let readers run beside the writer.
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

    else:
        engine = create_engine(url, pool_pre_ping=True)
    SQLModel.metadata.create_all(engine)
    return engine


def _utc_iso(moment: datetime) -> str:
    # SQLite hands datetimes back without their zone; they were written in UTC.
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).isoformat()


def job_to_dict(job: Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "status": job.status,
        "approved": job.approved,
        "storyboard_data": job.storyboard_data,
        "video_url": job.video_url,
        "actual_cost": float(job.actual_cost) if job.actual_cost is not None else None,
        "progress": {
            "current_stage": job.current_stage,
            "message": job.progress_message,
            "scenes_total": job.scenes_total,
            "scenes_completed": job.scenes_completed,
        },
        "error_message": job.error_message,
        "download_retries": job.download_retries,
        "prediction_id": job.prediction_id,
        "workflow_id": job.workflow_id,
        "created_at": _utc_iso(job.created_at),
        "updated_at": _utc_iso(job.updated_at),
    }


class JobStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @contextmanager
    def _job(self, job_id: int) -> Iterator[Job]:
        """Yields the job for a change and commits it, bumping `updated_at`."""
        with Session(self.engine) as session:
            job = session.get(Job, job_id, with_for_update=True)
            if job is None:
                raise JobNotFound(job_id)
            yield job
            job.updated_at = _now()
            session.add(job)
            session.commit()

    def create(self, storyboard: Any = None) -> int:
        job = Job()
        if storyboard is not None:
            job.storyboard_data = Storyboard.parse(storyboard).to_json()
            job.status = JobStatus.READY
            job.progress_message = "Storyboard ready for approval"
        with Session(self.engine) as session:
            session.add(job)
            session.commit()
            session.refresh(job)
            assert job.id is not None
            return job.id

    def get(self, job_id: int) -> dict[str, Any]:
        with Session(self.engine) as session:
            job = session.get(Job, job_id)
            if job is None:
                raise JobNotFound(job_id)
            return job_to_dict(job)

    def set_storyboard(self, job_id: int, storyboard: Any) -> dict[str, Any]:
        parsed = Storyboard.parse(storyboard)
        with self._job(job_id) as job:
            if job.status in (JobStatus.RENDERING, JobStatus.COMPLETED):
                raise JobConflict(
                    f"Job {job_id} is {job.status}; its storyboard can no longer change"
                )
            job.storyboard_data = parsed.to_json()
            # A changed storyboard needs a fresh approval before it costs money.
            job.approved = False
            job.status = JobStatus.READY
            job.current_stage = "storyboard"
            job.progress_message = "Storyboard ready for approval"
            job.error_message = None
            return job_to_dict(job)

    def approve(self, job_id: int) -> dict[str, Any]:
        with self._job(job_id) as job:
            if not job.storyboard_data:
                raise JobConflict(NO_STORYBOARD)
            job.approved = True
            return job_to_dict(job)

    def mark_rendering(self, job_id: int, workflow_id: str) -> dict[str, Any]:
        with self._job(job_id) as job:
            if job.status != JobStatus.RENDERING:
                job.status = JobStatus.RENDERING
                job.current_stage = "queued"
                job.progress_message = "Waiting for a worker"
                job.error_message = None
                job.video_url = None
                job.actual_cost = None
                job.download_retries = 0
                job.prediction_id = None
                job.scenes_completed = 0
            job.workflow_id = workflow_id
            return job_to_dict(job)

    def revert_rendering(
        self, job_id: int, status: str, message: str, workflow_id: str | None
    ) -> None:
        """Undo `mark_rendering` when the workflow could not be started."""
        with self._job(job_id) as job:
            if job.status == JobStatus.RENDERING:
                job.status = status
                job.current_stage = "storyboard" if status == JobStatus.READY else status
                job.progress_message = message
                job.workflow_id = workflow_id

    def progress(
        self,
        job_id: int,
        stage: str,
        message: str,
        *,
        scenes_total: int | None = None,
        scenes_completed: int | None = None,
    ) -> None:
        with self._job(job_id) as job:
            job.current_stage = stage
            job.progress_message = message
            if job.status not in FINISHED:
                job.status = JobStatus.RENDERING
            if scenes_total is not None:
                job.scenes_total = scenes_total
            if scenes_completed is not None:
                job.scenes_completed = scenes_completed

    def set_prediction(self, job_id: int, prediction_id: str) -> None:
        with self._job(job_id) as job:
            job.prediction_id = prediction_id

    def set_download_retries(self, job_id: int, retries: int) -> None:
        with self._job(job_id) as job:
            job.download_retries = retries

    def complete(self, job_id: int, *, video_url: str, actual_cost: Decimal) -> dict[str, Any]:
        with self._job(job_id) as job:
            job.status = JobStatus.COMPLETED
            job.video_url = video_url
            job.actual_cost = actual_cost
            job.current_stage = "completed"
            job.progress_message = "Video ready"
            job.scenes_completed = job.scenes_total
            job.error_message = None
            return job_to_dict(job)

    def fail(self, job_id: int, message: str, *, status: str = JobStatus.FAILED) -> None:
        with self._job(job_id) as job:
            job.status = status
            job.error_message = message
            job.current_stage = status
            job.progress_message = message


@lru_cache
def default_store() -> JobStore:
    return JobStore(make_engine(get_settings().resolved_database_url))


# The seed's API. Kept as plain functions so code written against the old renderer still runs.


def create_video_job(storyboard_data: Any = None) -> int:
    return default_store().create(storyboard_data)


def update_storyboard_data(job_id: int, storyboard_data: Any) -> dict[str, Any]:
    return default_store().set_storyboard(job_id, storyboard_data)


def approve_storyboard(job_id: int) -> dict[str, Any]:
    return default_store().approve(job_id)


def get_job(job_id: int) -> dict[str, Any]:
    return default_store().get(job_id)
