"""The SQL job store (SQLModel), with the seed's function names.

`JobStore` is what activities and the API use, given an engine. The module-level functions
(`create_video_job`, `get_job`, ...) keep the seed's call signatures for code written against
the old renderer; they use the engine configured by `Settings`.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    Numeric,
    String,
    Text,
    bindparam,
    event,
    false,
    inspect,
    text,
)
from sqlalchemy import select as sa_select
from sqlalchemy.engine import Engine, Row, make_url
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError
from sqlmodel import Field, Session, SQLModel, create_engine, select

# Imported for its table: api_keys is part of the store's schema.
from backend import auth as _auth  # noqa: F401
from backend.auth import DEFAULT_TENANT
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
    created_at: datetime = Field(default_factory=_now)
    updated_at: datetime = Field(default_factory=_now)
    # The tenant of the API key that created the job: no other tenant can see or change it.
    tenant: str = Field(
        default=DEFAULT_TENANT,
        sa_column=Column(String(64), nullable=False, server_default=text(f"'{DEFAULT_TENANT}'")),
    )


class PredictionLedger(SQLModel, table=True):
    """Every prediction a run meant to create, written before the create call.

    Replicate has no idempotency key: an intent without a prediction id means a create may
    have gone through unseen, and the provider's list is searched before creating another.
    """

    __tablename__ = "prediction_ledger"

    id: int | None = Field(default=None, primary_key=True)
    job_id: int = Field(index=True)
    # The workflow that waits on the prediction: its webhook is relayed there.
    workflow_id: str | None = Field(default=None, max_length=200)
    # The storyboard scene it renders (1-based); None when one prediction renders them all.
    scene: int | None = None
    run_id: str = Field(index=True, max_length=64)
    input_digest: str = Field(max_length=64)
    # intent -> created | adopted; orphan_cancelled for extra ones found and cancelled.
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


def make_engine(url: str, *, lock_timeout: float = 30.0) -> Engine:
    """lock_timeout: how long a SQLite connection waits for another's lock before it fails
    with "database is locked" (the API waits less than the worker: its client can retry)."""
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

    else:
        engine = create_engine(url, pool_pre_ping=True)
    _create_schema(engine)
    return engine


def _create_schema(engine: Engine) -> None:
    # The API and the worker start together on a fresh database: both check for a table,
    # both try to create it, and one loses. The loser's second look finds it in place.
    for attempt in range(3):
        try:
            SQLModel.metadata.create_all(engine)
            _add_missing_columns(engine)
            return
        except (OperationalError, ProgrammingError, IntegrityError):
            if attempt == 2:
                raise


def _add_missing_columns(engine: Engine) -> None:
    # create_all never alters a table: a job store made by an older release lacks the
    # columns added since. All of them are nullable or have a server default.
    inspector = inspect(engine)
    with engine.begin() as conn:
        for table in SQLModel.metadata.sorted_tables:
            present = {col["name"] for col in inspector.get_columns(table.name)}
            for column in table.columns:
                if column.name in present:
                    continue
                kind = column.type.compile(dialect=engine.dialect)
                default = ""
                if column.server_default is not None:
                    value = column.server_default.arg  # type: ignore[attr-defined]
                    compiled = value if isinstance(value, str) else value.compile(engine)
                    default = f" NOT NULL DEFAULT {compiled}"
                conn.execute(
                    text(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}{default}')
                )


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
        "created_at": _utc_iso(job.created_at),
        "updated_at": _utc_iso(job.updated_at),
        "tenant": job.tenant,
    }


_JOBS = Job.__table__  # type: ignore[attr-defined]
_GET_JOB = sa_select(_JOBS).where(_JOBS.c.id == bindparam("job_id"))
_GET_JOBS = sa_select(_JOBS).where(_JOBS.c.id.in_(bindparam("job_ids", expanding=True)))


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
    ) -> int:
        job = Job(max_cost=max_cost, tenant=tenant)
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
        # A Core select: a read needs no ORM session, identity map or instance, and this is
        # every GET's path. The row has the model's attribute names and column types.
        with self.engine.connect() as conn:
            row = conn.execute(_GET_JOB, {"job_id": job_id}).first()
        if row is None:
            raise JobNotFound(job_id)
        return job_to_dict(row)

    def get_many(self, job_ids: Collection[int]) -> dict[int, dict[str, Any]]:
        """The jobs among `job_ids` that exist, by id, read in one query."""
        with self.engine.connect() as conn:
            rows = conn.execute(_GET_JOBS, {"job_ids": list(job_ids)}).all()
        return {row.id: job_to_dict(row) for row in rows}

    def set_storyboard(self, job_id: int, storyboard: Any) -> dict[str, Any]:
        parsed = Storyboard.parse(storyboard)
        with self._job(job_id) as job:
            if job.status in (JobStatus.RENDERING, JobStatus.COMPLETED, JobStatus.IN_REVIEW):
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
        self, job_id: int, workflow_id: str, *, review: bool = False
    ) -> dict[str, Any]:
        """Marks the job as having a run (in review, or rendering) before that run starts."""
        with self._job(job_id) as job:
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
                job.video_url = None
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

    def set_download_retries(self, job_id: int, retries: int) -> None:
        with self._job(job_id) as job:
            job.download_retries = retries

    def complete(
        self, job_id: int, *, video_url: str, actual_cost: Decimal, over_budget: bool = False
    ) -> dict[str, Any]:
        with self._job(job_id) as job:
            job.status = JobStatus.COMPLETED
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
    ) -> int:
        with Session(self.engine) as session:
            row = PredictionLedger(
                job_id=job_id,
                run_id=run_id,
                input_digest=input_digest,
                workflow_id=workflow_id,
                scene=scene,
            )
            session.add(row)
            session.commit()
            session.refresh(row)
            assert row.id is not None
            return row.id

    def record_prediction(self, entry_id: int, prediction_id: str, state: str) -> bool:
        """Ties a created or adopted prediction to its intent (and to the job).

        False when another intent already claimed that prediction.
        """
        with Session(self.engine) as session:
            row = session.get(PredictionLedger, entry_id, with_for_update=True)
            if row is None:
                raise LookupError(f"Ledger entry {entry_id} not found")
            row.prediction_id = prediction_id
            row.state = state
            row.updated_at = _now()
            session.add(row)
            job = session.get(Job, row.job_id, with_for_update=True)
            if job is not None:
                job.prediction_id = prediction_id
                job.updated_at = _now()
                session.add(job)
            return _commit_unless_duplicate(session)

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
            session.commit()
            return True

    def record_orphan(self, job_id: int, run_id: str, prediction_id: str, digest: str) -> None:
        with Session(self.engine) as session:
            session.add(
                PredictionLedger(
                    job_id=job_id,
                    run_id=run_id,
                    input_digest=digest,
                    state="orphan_cancelled",
                    prediction_id=prediction_id,
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
