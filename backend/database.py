"""The SQL job store (SQLModel), with the seed's function names.

`JobStore` is what activities and the API use, given an engine. The module-level functions
(`create_video_job`, `get_job`, ...) keep the seed's call signatures for code written against
the old renderer; they use the engine configured by `Settings`.
"""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Index,
    Integer,
    LargeBinary,
    Numeric,
    String,
    Text,
    and_,
    bindparam,
    cast,
    event,
    false,
    or_,
    text,
)
from sqlalchemy import select as sa_select
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Engine, Row, make_url
from sqlalchemy.exc import IntegrityError
from sqlmodel import Field, Session, SQLModel, create_engine, func, select

# Imported for its table: api_keys is part of the store's schema.
from backend import auth as _auth  # noqa: F401
from backend.auth import DEFAULT_TENANT
from backend.schema import Migration, StoreState, check_store, prepare_store
from backend.settings import get_settings
from backend.storyboard import NO_STORYBOARD, Storyboard
from workflows.payloads import workflow_id_for


class JobStatus(StrEnum):
    DRAFT = "draft"
    READY = "ready"
    RENDERING = "rendering"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    # Submitted for review: validated, waiting for an approve signal.
    IN_REVIEW = "in_review"
    # Review timed out without an approval; nothing was billed.
    EXPIRED = "expired"


FINISHED = {JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.EXPIRED}
# A run is (or may be) going for jobs in these states.
ACTIVE = {JobStatus.RENDERING, JobStatus.IN_REVIEW}


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
    max_cost: Decimal | None = Field(default=None, sa_column=Column(Numeric(12, 2)))
    estimated_cost: Decimal | None = Field(default=None, sa_column=Column(Numeric(12, 2)))
    over_budget: bool = Field(
        default=False, sa_column=Column(Boolean, nullable=False, server_default=false())
    )
    approved_by: str | None = Field(default=None, max_length=200)
    # Every second of video the provider billed for this job, over all its runs.
    billed_seconds: Decimal | None = Field(default=None, sa_column=Column(Numeric(12, 3)))
    # The length of the finished video.
    duration_seconds: float | None = None
    created_at: datetime = Field(default_factory=_now)
    updated_at: datetime = Field(default_factory=_now)
    # Where the caller hears that the job ended (job.completed, ...); None: the tenant's default.
    callback_url: str | None = Field(default=None, max_length=2048)
    # The caller's own JSON object (at most 1 KB), passed through untouched.
    job_metadata: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    # The poster, preview and scene thumbnails of the current video exist.
    media_ready: bool = Field(
        default=False, sa_column=Column(Boolean, nullable=False, server_default=false())
    )
    # The tenant of the API key that created the job: no other tenant can see or change it.
    tenant: str = Field(
        default=DEFAULT_TENANT,
        sa_column=Column(String(64), nullable=False, server_default=text(f"'{DEFAULT_TENANT}'")),
    )


class Tenant(SQLModel, table=True):
    """What a tenant set for itself, and the secret its callbacks are signed with. A row is
    made the first time a tenant needs one."""

    __tablename__ = "tenants"

    name: str = Field(primary_key=True, max_length=64)
    # whsec_...: Standard Webhooks' secret for the job events sent to the tenant's callbacks.
    webhook_secret: str = Field(max_length=200)
    # Jobs without a callback_url of their own call this one.
    callback_url: str | None = Field(default=None, max_length=2048)
    # Overrides of the settings' caps (None: the setting's value).
    max_active_jobs: int | None = None
    spend_cap: Decimal | None = Field(default=None, sa_column=Column(Numeric(12, 2)))
    created_at: datetime = Field(default_factory=_now)


class CallbackAttempt(SQLModel, table=True):
    """One delivery attempt of a job event to the caller's callback URL."""

    __tablename__ = "callback_attempts"

    id: int | None = Field(default=None, primary_key=True)
    job_id: int = Field(index=True)
    event: str = Field(max_length=32)
    # The same for every attempt (and redelivery) of one event: receivers deduplicate on it.
    webhook_id: str = Field(max_length=100)
    attempt: int
    status_code: int | None = None
    error: str | None = Field(default=None, max_length=500)
    delivered: bool = False
    at: datetime = Field(default_factory=_now)


class SceneRecord(SQLModel, table=True):
    """One storyboard scene of a job: the input digest of its current clip (or of the render
    going for it), and where that render stands."""

    __tablename__ = "job_scenes"

    job_id: int = Field(primary_key=True)
    number: int = Field(primary_key=True)
    digest: str = Field(max_length=64)
    # pending -> rendering -> completed | failed | cancelled
    status: str = Field(default="pending", max_length=16)
    prediction_id: str | None = Field(default=None, max_length=128)
    # What the provider said of that prediction last (starting, processing, succeeded, ...).
    prediction_status: str | None = Field(default=None, max_length=16)
    # Seconds the provider billed for this scene, over every take of every run.
    billed_seconds: Decimal = Field(
        default=Decimal(0), sa_column=Column(Numeric(12, 3), nullable=False, server_default="0")
    )
    # The verified clip's file name under videos/{job}/scenes/.
    clip: str | None = Field(default=None, max_length=200)
    error: str | None = Field(default=None, sa_column=Column(Text))
    updated_at: datetime = Field(default_factory=_now)


class PredictionLedger(SQLModel, table=True):
    """Every prediction a run meant to create, written before the create call.

    Replicate has no idempotency key: an intent without a prediction id means a create may
    have gone through unseen, and the provider's list is searched before creating another.
    """

    __tablename__ = "prediction_ledger"
    # One open intent per input: see JobStore.claim_intent.
    __table_args__ = (
        Index(
            "uq_prediction_ledger_open_intent",
            "input_digest",
            unique=True,
            sqlite_where=text("state = 'intent'"),
            postgresql_where=text("state = 'intent'"),
        ),
    )

    id: int | None = Field(default=None, primary_key=True)
    job_id: int = Field(index=True)
    # The workflow that waits on the prediction: its webhook is relayed there.
    workflow_id: str | None = Field(default=None, max_length=200)
    # The storyboard scene it renders (1-based); 0 or None when one prediction renders them all.
    scene: int | None = None
    # A retake after a clip failed its checks is a second prediction of the same scene.
    take: int = Field(default=1, sa_column=Column(Integer, nullable=False, server_default="1"))
    run_id: str = Field(index=True, max_length=64)
    input_digest: str = Field(max_length=64)
    # intent -> created | adopted | not_created | abandoned; orphan_cancelled for extra ones
    # found and cancelled.
    state: str = Field(default="intent", max_length=24)
    prediction_id: str | None = Field(default=None, unique=True, max_length=128)
    intent_at: datetime = Field(default_factory=_now)
    updated_at: datetime = Field(default_factory=_now)


class WebhookReceipt(SQLModel, table=True):
    """Webhook deliveries already acted on: Replicate retries a delivery with the same id.

    Keyed by the webhook id and the prediction the signed body named, so that a delivery
    replayed with another prediction cannot mark the real one as seen. (It replaces
    `webhook_deliveries`, keyed by the webhook id alone, which older stores still hold.)
    """

    __tablename__ = "webhook_receipts"

    webhook_id: str = Field(primary_key=True, max_length=200)
    prediction_id: str = Field(primary_key=True, max_length=128)
    received_at: datetime = Field(default_factory=_now)


class IdempotencyRecord(SQLModel, table=True):
    """A POST sent with an `Idempotency-Key`, and the answer it got (backend/idempotency.py).

    The primary key makes the claim atomic: the first insert of a (tenant, key) wins, and
    every other request with that key finds this row.
    """

    __tablename__ = "idempotency_keys"

    tenant: str = Field(primary_key=True, max_length=64)
    idempotency_key: str = Field(primary_key=True, max_length=255)
    # sha256 of the method, path, query and body: the same key must come with the same request.
    fingerprint: str = Field(max_length=64)
    # "POST /api/v2/jobs": named in the answer to a key reused for another request.
    request: str = Field(sa_column=Column(Text, nullable=False))
    # in_progress -> done; a request that ends without a storable answer removes its row.
    state: str = Field(default="in_progress", max_length=16)
    # Set by each claim: only the request holding the claim may settle it.
    token: str = Field(max_length=32)
    status_code: int | None = None
    # The replayed headers, a JSON list of [name, value] pairs.
    headers: str | None = Field(default=None, sa_column=Column(Text))
    body: bytes | None = Field(default=None, sa_column=Column(LargeBinary))
    created_at: datetime = Field(default_factory=_now, index=True)


@dataclass(frozen=True)
class PredictionOwner:
    """Who a prediction belongs to, as the ledger recorded it when it was created."""

    job_id: int
    workflow_id: str
    scene: int | None = None


class JobNotFound(LookupError):
    def __init__(self, job_id: int) -> None:
        super().__init__(f"Job {job_id} not found")
        self.job_id = job_id


class JobConflict(RuntimeError):
    """The job is in a state that does not allow the request."""


def make_engine(url: str, *, lock_timeout: float = 30.0, upgrade: bool = False) -> Engine:
    """An engine on a job store that is ready for this release's models.

    A new, empty database is created at the newest revision. A store already there is used as
    it is. A store that is behind (an older release's, with or without `alembic_version`) is
    upgraded in place when `upgrade` is True (`render-video migrate`, and `dev`/`demo`, which
    own their local store) and refused otherwise with `StoreBehind`, whose message names
    `render-video migrate`: the API and the worker never change a shared store's schema.
    Raises StoreNotReady for a store a newer release migrated or one that matches no release.

    lock_timeout: how long a SQLite connection waits for another's lock before it fails
    with "database is locked" (the API waits less than the worker: its client can retry)."""
    engine = _engine(url, lock_timeout)
    try:
        prepare_store(engine, SQLModel.metadata, upgrade=upgrade, lock_timeout=lock_timeout)
    except BaseException:
        engine.dispose()
        raise
    return engine


def migrate_store(url: str) -> Migration:
    """Brings the store at `url` to this release's revision (creating it if it is empty) and
    says what it found and did: `render-video migrate`."""
    engine = _engine(url, 30.0)
    try:
        return prepare_store(engine, SQLModel.metadata, upgrade=True)
    finally:
        engine.dispose()


def store_status(url: str) -> tuple[StoreState, str]:
    """The store's revision and this release's head, changing nothing."""
    engine = _engine(url, 30.0)
    try:
        return check_store(engine)
    finally:
        engine.dispose()


def _engine(url: str, lock_timeout: float) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        # The API, the worker and the CLI may share one SQLite file: wait for locks
        # instead of failing, and let readers run beside the writer.
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": lock_timeout}
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA busy_timeout={int(lock_timeout * 1000)}")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


def _utc_iso(moment: datetime) -> str:
    # SQLite hands datetimes back without their zone; they were written in UTC.
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).isoformat()


def job_to_dict(job: Job | Row[Any]) -> dict[str, Any]:
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
        "max_cost": float(job.max_cost) if job.max_cost is not None else None,
        "estimated_cost": float(job.estimated_cost) if job.estimated_cost is not None else None,
        "over_budget": bool(job.over_budget),
        "approved_by": job.approved_by,
        "billed_seconds": float(job.billed_seconds) if job.billed_seconds is not None else None,
        "callback_url": job.callback_url,
        "metadata": job.job_metadata,
        "media_ready": bool(job.media_ready),
        "duration_seconds": job.duration_seconds,
        "created_at": _utc_iso(job.created_at),
        "updated_at": _utc_iso(job.updated_at),
        "tenant": job.tenant,
    }


_JOBS = Job.__table__  # type: ignore[attr-defined]
_GET_JOB = sa_select(_JOBS).where(_JOBS.c.id == bindparam("job_id"))
_GET_JOBS = sa_select(_JOBS).where(_JOBS.c.id.in_(bindparam("job_ids", expanding=True)))
_SCENES = SceneRecord.__table__  # type: ignore[attr-defined]
_CALLBACKS = CallbackAttempt.__table__  # type: ignore[attr-defined]
_GET_CALLBACKS = (
    sa_select(_CALLBACKS)
    .where(_CALLBACKS.c.job_id.in_(bindparam("job_ids", expanding=True)))
    .order_by(_CALLBACKS.c.id)
)
_GET_SCENES = (
    sa_select(_SCENES)
    .where(_SCENES.c.job_id.in_(bindparam("job_ids", expanding=True)))
    .order_by(_SCENES.c.job_id, _SCENES.c.number)
)


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

    def create(
        self,
        storyboard: Any = None,
        *,
        max_cost: Decimal | None = None,
        tenant: str = DEFAULT_TENANT,
        callback_url: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> int:
        job = Job(
            max_cost=max_cost, tenant=tenant, callback_url=callback_url, job_metadata=metadata
        )
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
        """The job, with its scenes (`scenes`: number, status, prediction id, billed seconds,
        error), as the seed's get_job returned it plus what was added since."""
        # Core selects: a read needs no ORM session, identity map or instance, and this is
        # every GET's path. The rows have the models' attribute names and column types.
        with self.engine.connect() as conn:
            row = conn.execute(_GET_JOB, {"job_id": job_id}).first()
            if row is None:
                raise JobNotFound(job_id)
            return _with_details(conn, [row])[0]

    def count_by_status(self) -> dict[str, int]:
        """How many jobs have each status, every tenant's together: one GROUP BY on the
        status index (for the API's metrics)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa_select(Job.status, func.count()).group_by(Job.status)  # type: ignore[arg-type]
            ).all()
        return {str(status): int(count) for status, count in rows}

    def get_many(self, job_ids: Collection[int]) -> dict[int, dict[str, Any]]:
        """The jobs among `job_ids` that exist, by id, with their scenes, in two queries."""
        with self.engine.connect() as conn:
            rows = conn.execute(_GET_JOBS, {"job_ids": list(job_ids)}).all()
            return {job["id"]: job for job in _with_details(conn, rows)}

    def set_storyboard(self, job_id: int, storyboard: Any) -> dict[str, Any]:
        parsed = Storyboard.parse(storyboard)
        with self._job(job_id) as job:
            if job.status in ACTIVE:
                raise JobConflict(
                    f"Job {job_id} is {job.status}; its storyboard can no longer change"
                )
            # A completed job may be changed: it goes back to ready, keeps serving its video
            # until the new one is verified, and renders only the scenes that changed.
            job.storyboard_data = parsed.to_json()
            # A changed storyboard needs a fresh approval before it costs money.
            job.approved = False
            job.status = JobStatus.READY
            job.current_stage = "storyboard"
            job.progress_message = "Storyboard ready for approval"
            job.error_message = None
            return job_to_dict(job)

    def set_budget(self, job_id: int, max_cost: Decimal | None) -> dict[str, Any]:
        with self._job(job_id) as job:
            if job.status in ACTIVE or job.status == JobStatus.COMPLETED:
                raise JobConflict(f"Job {job_id} is {job.status}; its budget can no longer change")
            job.max_cost = max_cost
            return job_to_dict(job)

    def approve(self, job_id: int) -> dict[str, Any]:
        with self._job(job_id) as job:
            if not job.storyboard_data:
                raise JobConflict(NO_STORYBOARD)
            job.approved = True
            return job_to_dict(job)

    def mark_rendering(
        self, job_id: int, workflow_id: str, *, review: bool = False, again: bool = False
    ) -> dict[str, Any]:
        """Marks the job as having a run (in review, or rendering) before that run starts.

        A job that completed meanwhile is left as it is (its row is returned unchanged),
        unless `again` asks for it to be rendered anew.
        """
        with self._job(job_id) as job:
            if job.status == JobStatus.COMPLETED and not again:
                return job_to_dict(job)
            if job.status == JobStatus.IN_REVIEW and not review:
                # Approving a job in review: the waiting run goes on.
                job.status = JobStatus.RENDERING
                job.current_stage = "approved"
                job.progress_message = "Approved; rendering will start"
            elif job.status not in ACTIVE:
                job.status = JobStatus.IN_REVIEW if review else JobStatus.RENDERING
                job.current_stage = "queued"
                job.progress_message = (
                    "Waiting for a worker to validate the storyboard for review"
                    if review
                    else "Waiting for a worker"
                )
                job.error_message = None
                # video_url stays: a job rendered again serves its last verified video until
                # the new one replaces it.
                job.actual_cost = None
                job.estimated_cost = None
                job.over_budget = False
                job.download_retries = 0
                job.prediction_id = None
                job.scenes_completed = 0
                if review:
                    job.approved = False
                    job.approved_by = None
            job.workflow_id = workflow_id
            return job_to_dict(job)

    def record_approval(self, job_id: int, approved_by: str | None) -> dict[str, Any]:
        """The run was approved (over HTTP or by a signal from the CLI)."""
        with self._job(job_id) as job:
            job.approved = True
            job.approved_by = approved_by or job.approved_by
            if job.status not in FINISHED:
                job.status = JobStatus.RENDERING
            job.current_stage = "approved"
            job.progress_message = f"Approved{f' by {approved_by}' if approved_by else ''}"
            return job_to_dict(job)

    def set_estimate(self, job_id: int, estimate: Decimal) -> dict[str, Any]:
        with self._job(job_id) as job:
            job.estimated_cost = estimate
            return job_to_dict(job)

    def revert_rendering(
        self,
        job_id: int,
        status: str,
        message: str,
        workflow_id: str | None,
        approved: bool | None = None,
    ) -> None:
        """Undo `mark_rendering` when the workflow could not be started."""
        with self._job(job_id) as job:
            if job.status in ACTIVE:
                if approved is not None:
                    job.approved = approved
                job.status = status
                job.current_stage = {
                    JobStatus.READY: "storyboard",
                    JobStatus.IN_REVIEW: "awaiting_approval",
                }.get(JobStatus(status), status)
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
            # A job in review stays there until approved; finished jobs stay finished.
            if job.status not in FINISHED and job.status != JobStatus.IN_REVIEW:
                job.status = JobStatus.RENDERING
            if scenes_total is not None:
                job.scenes_total = scenes_total
            if scenes_completed is not None:
                job.scenes_completed = scenes_completed

    def active_jobs(self, changed_before: datetime, limit: int) -> list[dict[str, Any]]:
        """Jobs that say a run is going and have not changed since `changed_before`, oldest
        change first."""
        query = (
            sa_select(_JOBS)
            .where(_JOBS.c.status.in_([s.value for s in ACTIVE]))
            .where(_JOBS.c.updated_at < changed_before)
            .order_by(_JOBS.c.updated_at)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [job_to_dict(row) for row in conn.execute(query)]

    def repair(
        self,
        job_id: int,
        seen_updated_at: str,
        *,
        status: str,
        message: str | None = None,
        video_url: str | None = None,
        actual_cost: Decimal | None = None,
        over_budget: bool = False,
    ) -> bool:
        """Sets a job that still says a run is going to what its closed run ended as; False
        (nothing written) when the job changed since it was read as `seen_updated_at`."""
        with Session(self.engine) as session:
            job = session.get(Job, job_id, with_for_update=True)
            if job is None:
                raise JobNotFound(job_id)
            if job.status not in ACTIVE or _utc_iso(job.updated_at) != seen_updated_at:
                return False
            job.status = status
            job.current_stage = status
            if status == JobStatus.COMPLETED:
                job.video_url = video_url
                job.actual_cost = actual_cost
                job.over_budget = over_budget
                job.scenes_completed = job.scenes_total
                job.error_message = None
                job.progress_message = "Video ready"
            else:
                job.error_message = message
                job.progress_message = message or status
            job.updated_at = _now()
            session.add(job)
            session.commit()
            return True

    def note_download_retries(self, job_id: int, retries: int) -> None:
        """The most retries any of the job's downloads needed."""
        with self._job(job_id) as job:
            job.download_retries = max(job.download_retries, retries)

    def complete(
        self,
        job_id: int,
        *,
        video_url: str,
        actual_cost: Decimal,
        over_budget: bool = False,
        duration_seconds: float | None = None,
    ) -> dict[str, Any]:
        with self._job(job_id) as job:
            job.status = JobStatus.COMPLETED
            job.duration_seconds = duration_seconds
            job.video_url = video_url
            job.actual_cost = actual_cost
            job.over_budget = over_budget
            job.current_stage = "completed"
            job.progress_message = (
                f"Video ready; it cost ${actual_cost:.2f}, over the job's budget of "
                f"${job.max_cost:.2f}"
                if over_budget and job.max_cost is not None
                else "Video ready"
            )
            job.scenes_completed = job.scenes_total
            job.error_message = None
            return job_to_dict(job)

    def fail(self, job_id: int, message: str, *, status: str = JobStatus.FAILED) -> None:
        with self._job(job_id) as job:
            if job.status == JobStatus.COMPLETED:
                # A late cleanup must never take a finished, billed video away from the job.
                return
            job.status = status
            job.error_message = message
            job.current_stage = status
            job.progress_message = message

    # -- tenants, callbacks, listing --

    def tenant(self, name: str) -> dict[str, Any]:
        """The tenant's row, made (with a fresh webhook secret) the first time it is needed."""
        with Session(self.engine) as session:
            row = session.get(Tenant, name)
            if row is None:
                session.add(Tenant(name=name, webhook_secret=new_webhook_secret()))
                _commit_unless_duplicate(session)  # made at once elsewhere: that one stands
                row = session.get(Tenant, name)
            assert row is not None
            return row.model_dump()

    def update_tenant(self, name: str, **changes: Any) -> dict[str, Any]:
        """Changes a tenant's own settings (callback_url, max_active_jobs, spend_cap) or its
        webhook secret (`webhook_secret=new_webhook_secret()` rotates it)."""
        self.tenant(name)
        with Session(self.engine) as session:
            row = session.get(Tenant, name, with_for_update=True)
            assert row is not None
            for field, value in changes.items():
                setattr(row, field, value)
            session.add(row)
            session.commit()
            session.refresh(row)
            return row.model_dump()

    def active_jobs_of(self, tenant: str, *, besides: int | None = None) -> int:
        """How many of the tenant's jobs have a run going (rendering or in review)."""
        query = (
            sa_select(func.count())
            .select_from(_JOBS)
            .where(_JOBS.c.tenant == tenant, _JOBS.c.status.in_([s.value for s in ACTIVE]))
        )
        if besides is not None:
            query = query.where(_JOBS.c.id != besides)
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    def spent_since(self, tenant: str, since: datetime) -> Decimal:
        """What the tenant's jobs cost that completed since `since`, and what the ones going
        now are estimated to cost."""
        completed = sa_select(func.coalesce(func.sum(_JOBS.c.actual_cost), 0)).where(
            _JOBS.c.tenant == tenant,
            _JOBS.c.status == JobStatus.COMPLETED,
            _JOBS.c.updated_at >= since,
        )
        going = sa_select(func.coalesce(func.sum(_JOBS.c.estimated_cost), 0)).where(
            _JOBS.c.tenant == tenant, _JOBS.c.status == JobStatus.RENDERING
        )
        with self.engine.connect() as conn:
            return Decimal(str(conn.execute(completed).scalar_one())) + Decimal(
                str(conn.execute(going).scalar_one())
            )

    def record_callback_attempt(
        self,
        job_id: int,
        event: str,
        webhook_id: str,
        attempt: int,
        *,
        status_code: int | None,
        error: str | None,
        delivered: bool,
    ) -> None:
        with Session(self.engine) as session:
            session.add(
                CallbackAttempt(
                    job_id=job_id,
                    event=event,
                    webhook_id=webhook_id,
                    attempt=attempt,
                    status_code=status_code,
                    error=error[:500] if error else None,
                    delivered=delivered,
                )
            )
            session.commit()

    def list_jobs(
        self,
        tenant: str,
        *,
        limit: int,
        after: tuple[str, int] | None = None,
        status: str | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        metadata_key: str | None = None,
        metadata_value: str | None = None,
    ) -> list[dict[str, Any]]:
        """The tenant's jobs, newest first, after the (created_at, id) of the last one seen:
        keyset pages, so jobs created meanwhile never shift a later page."""
        query = sa_select(_JOBS).where(_JOBS.c.tenant == tenant)
        if status is not None:
            query = query.where(_JOBS.c.status == status)
        if created_after is not None:
            query = query.where(_JOBS.c.created_at >= created_after)
        if created_before is not None:
            query = query.where(_JOBS.c.created_at < created_before)
        if metadata_key is not None:
            query = query.where(_has_metadata(self.engine, metadata_key, metadata_value))
        if after is not None:
            stamp = datetime.fromisoformat(after[0])
            query = query.where(
                or_(
                    _JOBS.c.created_at < stamp,
                    and_(_JOBS.c.created_at == stamp, _JOBS.c.id < after[1]),
                )
            )
        query = query.order_by(_JOBS.c.created_at.desc(), _JOBS.c.id.desc()).limit(limit)
        with self.engine.connect() as conn:
            return _with_details(conn, conn.execute(query).all())

    # -- scenes --

    def scenes(self, job_id: int) -> list[dict[str, Any]]:
        """The job's scene records, by number."""
        with Session(self.engine) as session:
            rows = session.exec(
                select(SceneRecord).where(SceneRecord.job_id == job_id).order_by(SceneRecord.number)  # type: ignore[arg-type]
            ).all()
            return [_scene_dict(row) for row in rows]

    def plan_scenes(self, job_id: int, digests: dict[int, str], keep: set[int]) -> None:
        """Sets the job's scenes to a new plan: scene number -> input digest. Scenes in `keep`
        hold a verified clip of that digest and stay as they are; the others wait to render.
        Scenes past the storyboard's end are dropped."""
        with Session(self.engine) as session:
            rows = {
                row.number: row
                for row in session.exec(select(SceneRecord).where(SceneRecord.job_id == job_id))
            }
            for number, row in rows.items():
                if number not in digests:
                    session.delete(row)
            for number, digest in digests.items():
                if number in keep:
                    continue
                row = rows.get(number) or SceneRecord(job_id=job_id, number=number, digest=digest)
                row.digest = digest
                row.status = "pending"
                row.prediction_id = None
                row.clip = None
                row.error = None
                row.updated_at = _now()
                session.add(row)
            session.commit()

    def record_scene(
        self,
        job_id: int,
        covers: Collection[int],
        status: str,
        *,
        prediction_id: str | None = None,
        billed_seconds: Decimal | None = None,
        clip: str | None = None,
        error: str | None = None,
        prediction_status: str | None = None,
    ) -> None:
        """A scene's render moved on. A billed take adds its seconds to the scene and the job
        (shared evenly by the scenes one whole-storyboard prediction covers)."""
        covered = list(covers)
        changes: dict[str, Any] = {"status": status, "error": error, "updated_at": _now()}
        if prediction_id:
            changes["prediction_id"] = prediction_id
        if prediction_status:
            changes["prediction_status"] = prediction_status
        if status == "completed":
            changes["clip"] = clip
        if billed_seconds:
            # Added in the database, not read and written back: scenes finish together.
            share = billed_seconds / len(covered)
            changes["billed_seconds"] = _SCENES.c.billed_seconds + share
        with self.engine.begin() as conn:
            conn.execute(
                _SCENES.update()
                .where(_SCENES.c.job_id == job_id, _SCENES.c.number.in_(covered))
                .values(**changes)
            )
            job: dict[str, Any] = {"updated_at": _now()}
            if billed_seconds:
                job["billed_seconds"] = func.coalesce(_JOBS.c.billed_seconds, 0) + billed_seconds
            if status == "completed":
                job["scenes_completed"] = (
                    sa_select(func.count())
                    .select_from(_SCENES)
                    .where(_SCENES.c.job_id == job_id, _SCENES.c.status == "completed")
                    .scalar_subquery()
                )
            updated = conn.execute(_JOBS.update().where(_JOBS.c.id == job_id).values(**job))
            if updated.rowcount == 0:
                raise JobNotFound(job_id)

    def set_media_ready(self, job_id: int, ready: bool) -> None:
        """The poster, preview and thumbnails of the job's current video exist (or not)."""
        with self.engine.begin() as conn:
            conn.execute(_JOBS.update().where(_JOBS.c.id == job_id).values(media_ready=ready))

    def note_prediction_status(self, job_id: int, scene: int, status: str) -> None:
        """What the provider says of a scene's prediction now (scene 0: a whole-storyboard
        prediction, which every scene shares)."""
        query = _SCENES.update().where(_SCENES.c.job_id == job_id)
        if scene:
            query = query.where(_SCENES.c.number == scene)
        with self.engine.begin() as conn:
            conn.execute(query.values(prediction_status=status, updated_at=_now()))

    # -- the prediction ledger --

    def ledger(self, job_id: int, run_id: str | None = None) -> list[dict[str, Any]]:
        """The job's ledger entries in order: one run's, or (run_id None) every run's."""
        query = select(PredictionLedger).where(PredictionLedger.job_id == job_id)
        if run_id is not None:
            query = query.where(PredictionLedger.run_id == run_id)
        with Session(self.engine) as session:
            rows = session.exec(query.order_by(PredictionLedger.id)).all()  # type: ignore[arg-type]
            return [row.model_dump() for row in rows]

    def record_intent(
        self,
        job_id: int,
        run_id: str,
        input_digest: str,
        *,
        workflow_id: str | None = None,
        scene: int | None = None,
        take: int = 1,
    ) -> int:
        """Writes an open intent; raises IntegrityError if another intent for the same input is
        still open (`claim_intent` is the way to wait for it)."""
        with Session(self.engine) as session:
            row = PredictionLedger(
                job_id=job_id,
                run_id=run_id,
                input_digest=input_digest,
                workflow_id=workflow_id,
                scene=scene,
                take=take,
            )
            session.add(row)
            session.commit()
            session.refresh(row)
            assert row.id is not None
            return row.id

    def claim_intent(
        self,
        job_id: int,
        run_id: str,
        input_digest: str,
        *,
        workflow_id: str | None = None,
        scene: int | None = None,
        take: int = 1,
    ) -> dict[str, Any]:
        """The one open intent for this input: this run's own (made now if there is none), or
        another run's, which this run must wait for (compare `run_id`).

        At most one intent per input digest is open at a time (a partial unique index): while
        it is, only its run can have created a prediction with that input that the ledger does
        not hold yet, so such a prediction has exactly one possible owner.
        """
        for _ in range(3):
            held = self._open_intent(input_digest)
            if held is not None:
                return held
            with Session(self.engine) as session:
                session.add(
                    PredictionLedger(
                        job_id=job_id,
                        run_id=run_id,
                        input_digest=input_digest,
                        workflow_id=workflow_id,
                        scene=scene,
                        take=take,
                    )
                )
                if _commit_unless_duplicate(session):
                    continue  # read back what was written (or what won a race)
        raise RuntimeError(f"Could not claim the intent for input {input_digest[:12]}")

    def _open_intent(self, input_digest: str) -> dict[str, Any] | None:
        with Session(self.engine) as session:
            row = session.exec(
                select(PredictionLedger).where(
                    PredictionLedger.input_digest == input_digest,
                    PredictionLedger.state == "intent",
                )
            ).first()
            return row.model_dump() if row is not None else None

    def touch_intent(self, entry_id: int) -> None:
        """Marks an open intent as in use by an attempt about to call the provider."""
        with Session(self.engine) as session:
            row = session.get(PredictionLedger, entry_id, with_for_update=True)
            if row is not None:
                row.updated_at = _now()
                session.add(row)
                session.commit()

    def close_intent(self, entry_id: int, state: str) -> None:
        """Closes an intent that holds no prediction: `not_created` (the provider refused the
        create) or `abandoned` (its run is gone and the provider shows nothing it made)."""
        with Session(self.engine) as session:
            row = session.get(PredictionLedger, entry_id, with_for_update=True)
            if row is None or row.state != "intent":
                return
            row.state = state
            row.updated_at = _now()
            session.add(row)
            session.commit()

    def record_prediction(self, entry_id: int, prediction_id: str, state: str) -> bool:
        """Ties a created or adopted prediction to its intent (and to the job), closing it.

        False (and nothing written) when another entry already holds that prediction.
        """
        with Session(self.engine) as session, session.no_autoflush:
            row = session.get(PredictionLedger, entry_id, with_for_update=True)
            if row is None:
                raise LookupError(f"Ledger entry {entry_id} not found")
            job = session.get(Job, row.job_id, with_for_update=True)
            row.prediction_id = prediction_id
            row.state = state
            row.updated_at = _now()
            session.add(row)
            if job is not None and not row.scene:
                job.prediction_id = prediction_id
                job.updated_at = _now()
                session.add(job)
            return _commit_unless_duplicate(session)

    def earlier_prediction(
        self, job_id: int, scene: int, input_digest: str, run_id: str
    ) -> dict[str, Any] | None:
        """The newest prediction an earlier run made for this scene of the job with exactly
        this input, if any."""
        with Session(self.engine) as session:
            row = session.exec(
                select(PredictionLedger)
                .where(
                    PredictionLedger.job_id == job_id,
                    PredictionLedger.input_digest == input_digest,
                    PredictionLedger.run_id != run_id,
                    PredictionLedger.state.in_(("created", "adopted")),  # type: ignore[attr-defined]
                    (PredictionLedger.scene == scene)
                    if scene
                    else or_(PredictionLedger.scene.is_(None), PredictionLedger.scene == 0),  # type: ignore[union-attr]
                )
                .order_by(PredictionLedger.id.desc())  # type: ignore[union-attr]
            ).first()
            return row.model_dump() if row is not None else None

    def move_to_run(self, job_id: int, prediction_id: str, run_id: str) -> bool:
        """Hands a job's prediction from an earlier run (one that was terminated) to this one."""
        with Session(self.engine) as session:
            row = session.exec(
                select(PredictionLedger).where(
                    PredictionLedger.prediction_id == prediction_id,
                    PredictionLedger.job_id == job_id,
                )
            ).first()
            if row is None:
                return False
            row.run_id = run_id
            row.state = "adopted"
            row.updated_at = _now()
            session.add(row)
            job = session.get(Job, job_id)
            if job is not None and not row.scene:
                job.prediction_id = prediction_id
                session.add(job)
            session.commit()
            return True

    def record_orphan(
        self,
        job_id: int,
        run_id: str,
        prediction_id: str,
        digest: str,
        *,
        state: str = "orphan_cancelled",
        scene: int | None = None,
    ) -> None:
        """An extra prediction a run made unseen: `orphan_cancelled` when it was cancelled,
        `orphan_finished` when it had already ended."""
        with Session(self.engine) as session:
            session.add(
                PredictionLedger(
                    job_id=job_id,
                    run_id=run_id,
                    input_digest=digest,
                    state=state,
                    prediction_id=prediction_id,
                    scene=scene,
                )
            )
            _commit_unless_duplicate(session)  # already recorded: nothing to add

    def claimed(self, prediction_ids: list[str]) -> set[str]:
        if not prediction_ids:
            return set()
        with Session(self.engine) as session:
            rows = session.exec(
                select(PredictionLedger.prediction_id).where(
                    PredictionLedger.prediction_id.in_(prediction_ids)  # type: ignore[union-attr]
                )
            ).all()
            return {row for row in rows if row}

    def prediction_owner(self, prediction_id: str) -> PredictionOwner | None:
        """The job and workflow the ledger gave this prediction to; None if it knows none.

        Only what was written when the prediction was created or adopted counts: a webhook
        names a prediction, and this says whose it is.
        """
        with Session(self.engine) as session:
            row = session.exec(
                select(PredictionLedger).where(
                    PredictionLedger.prediction_id == prediction_id,
                    PredictionLedger.state.in_(("created", "adopted")),  # type: ignore[attr-defined]
                )
            ).first()
            if row is None:
                return None
            return PredictionOwner(
                job_id=row.job_id,
                workflow_id=row.workflow_id or workflow_id_for(row.job_id),
                scene=row.scene,
            )

    # -- webhooks --

    def remember_webhook(self, webhook_id: str, prediction_id: str) -> bool:
        """True the first time this delivery (webhook id and prediction) is seen; False for
        a repeat."""
        with Session(self.engine) as session:
            session.add(WebhookReceipt(webhook_id=webhook_id, prediction_id=prediction_id))
            return _commit_unless_duplicate(session)

    def seen_webhook(self, webhook_id: str, prediction_id: str) -> bool:
        with Session(self.engine) as session:
            return session.get(WebhookReceipt, (webhook_id, prediction_id)) is not None


def _with_details(conn: Any, rows: Sequence[Row[Any]]) -> list[dict[str, Any]]:
    """Jobs as dicts with their scenes and callback attempts, read in two more queries."""
    jobs = [job_to_dict(row) | {"scenes": [], "callbacks": []} for row in rows]
    if not jobs:
        return jobs
    by_id = {job["id"]: job for job in jobs}
    ids = {"job_ids": list(by_id)}
    for scene in conn.execute(_GET_SCENES, ids):
        by_id[scene.job_id]["scenes"].append(_scene_dict(scene))
    for attempt in conn.execute(_GET_CALLBACKS, ids):
        by_id[attempt.job_id]["callbacks"].append(
            {
                "event": attempt.event,
                "webhook_id": attempt.webhook_id,
                "attempt": attempt.attempt,
                "status_code": attempt.status_code,
                "error": attempt.error,
                "delivered": attempt.delivered,
                "at": _utc_iso(attempt.at),
            }
        )
    return jobs


def new_webhook_secret() -> str:
    """A Standard Webhooks signing secret: whsec_ and 24 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def _has_metadata(engine: Engine, key: str, value: str | None) -> Any:
    """A filter on a key of the job's metadata: present, or (value given) equal to it as text."""
    column = _JOBS.c.job_metadata
    if engine.dialect.name == "postgresql":
        document = cast(column, JSONB)
        if value is None:
            return document.has_key(key)
        return document[key].astext == value
    path = "$." + json.dumps(key)  # a quoted key: any characters are taken as they are
    if value is None:
        return func.json_type(column, path).isnot(None)
    return cast(func.json_extract(column, path), String) == value


def _scene_dict(row: SceneRecord | Row[Any]) -> dict[str, Any]:
    return {
        "number": row.number,
        "digest": row.digest,
        "status": row.status,
        "prediction_id": row.prediction_id,
        "prediction_status": row.prediction_status,
        "billed_seconds": float(row.billed_seconds or 0),
        "clip": row.clip,
        "error": row.error,
    }


def _commit_unless_duplicate(session: Session) -> bool:
    """Commits; False (and nothing written) when a unique key says it is already there."""
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        return False
    return True


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
