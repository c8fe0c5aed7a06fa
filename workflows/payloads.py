"""Plain payload types shared by the workflow and its activities (standard library only)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# The RenderVideo workflow's type name, as the history and visibility queries show it.
RENDER_WORKFLOW = "RenderVideo"


def workflow_id_for(job_id: int) -> str:
    """The id of a job's RenderVideo run: one per job, so a second approve joins the first."""
    return f"render-video-{job_id}"


@dataclass
class RenderVideoInput:
    job_id: int
    # Taken from Settings when the run starts, so a run keeps the timing it began with.
    poll_interval_seconds: float = 5.0
    render_timeout_seconds: float = 600.0
    # review: validate, then wait for an `approve` signal before anything is billed.
    review: bool = False
    review_timeout_seconds: float = 7 * 24 * 3600.0
    # How long to wait for Replicate's webhook before falling back to polling.
    webhook_wait_seconds: float = 300.0


@dataclass
class ApproveSignal:
    # Who approved, for the job's progress message; the CLI may send no input at all.
    # Any JSON value is taken (and shown as text): a signal whose input cannot be decoded
    # is dropped by the SDK, and a mistyped name must not swallow a human's approval.
    approved_by: Any = None


@dataclass
class ApproveRenderInput:
    approved_by: str | None = None


@dataclass
class ApprovalResult:
    job_id: int
    accepted: bool
    stage: str
    errors: list[str] = field(default_factory=list)


@dataclass
class PredictionWebhook:
    """A verified webhook from Replicate, relayed by the API as a signal. It only wakes the
    run: the run reads the prediction's status and output from the provider itself."""

    prediction_id: str
    # What the webhook said; a hint, never acted on.
    status: str | None = None
    webhook_id: str | None = None


@dataclass
class RenderProgress:
    """What the `progress` query answers while the run is going."""

    job_id: int
    stage: str
    message: str
    scenes_total: int = 0
    scenes_completed: int = 0
    prediction_id: str | None = None
    prediction_status: str | None = None
    estimated_cost: str | None = None
    max_cost: str | None = None
    awaiting_approval: bool = False
    updated_at: str | None = None


@dataclass
class RenderVideoResult:
    job_id: int
    status: str
    video_url: str | None = None
    actual_cost: str | None = None
    duration_seconds: float | None = None
    prediction_id: str | None = None
    over_budget: bool = False


@dataclass
class JobRef:
    job_id: int


@dataclass
class ValidateStoryboardInput:
    job_id: int
    # False while a job in review is validated before anyone approved it.
    require_approval: bool = True


@dataclass
class StoryboardSummary:
    scenes_total: int
    planned_seconds: float
    # Decimal strings: images x price per image + planned seconds x price per second.
    estimated_cost: str | None = None
    max_cost: str | None = None


@dataclass
class RecordApprovalInput:
    job_id: int
    approved_by: str | None = None


@dataclass
class ApprovalRecorded:
    job_id: int
    status: str


@dataclass
class ExtractedImages:
    image_urls: list[str]
    durations: list[float]
    prompt: str | None = None


@dataclass
class StartPredictionInput:
    job_id: int
    image_urls: list[str]
    durations: list[float]
    prompt: str | None = None


@dataclass
class PredictionRef:
    prediction_id: str
    status: str
    # True when a retried start found the prediction an earlier attempt created.
    adopted: bool = False
    # True when Replicate was given our webhook URL, so the run can wait for the call.
    webhook: bool = False
    # A prediction that finished before this answer came back (adopted ones can have).
    output_url: str | None = None
    error: str | None = None


@dataclass
class PollPredictionInput:
    job_id: int
    prediction_id: str


@dataclass
class PredictionOutcome:
    prediction_id: str
    status: str
    output_url: str | None = None
    error: str | None = None


@dataclass
class CancelPredictionInput:
    job_id: int
    # None: no id came back to the run; cancel whatever its ledger shows was created.
    prediction_id: str | None = None


@dataclass
class CancelPredictionResult:
    cancelled: list[str] = field(default_factory=list)
    status: str | None = None


@dataclass
class DownloadVideoInput:
    job_id: int
    url: str


@dataclass
class DownloadedVideo:
    path: str
    size_bytes: int
    attempt: int


@dataclass
class VerifyVideoInput:
    job_id: int
    path: str


@dataclass
class VideoInfo:
    duration_seconds: float
    width: int
    height: int
    codec: str
    frames: int = 0


@dataclass
class RecordCostInput:
    job_id: int
    image_count: int
    duration_seconds: float
    max_cost: str | None = None


@dataclass
class CostRecord:
    actual_cost: str
    video_url: str
    over_budget: bool = False


@dataclass
class MarkJobFailedInput:
    job_id: int
    message: str
    status: str = "failed"


@dataclass
class JobClosed:
    job_id: int
    status: str
    notes: list[str] = field(default_factory=list)


@dataclass
class ReviewSignal:
    """Sent when a job is submitted for review; the run that is starting (or already going)
    counts it, so it can tell that the job store was changed for it."""

    requested_by: str | None = None


@dataclass
class ReconcileInput:
    # Jobs changed more recently than this may still have a run on its way: left alone.
    grace_seconds: float = 60.0
    # At most this many jobs are looked at per pass.
    limit: int = 500


@dataclass
class ReconcileResult:
    checked: int
    repaired: list[str] = field(default_factory=list)
