"""Plain payload types shared by the workflow and its activities (standard library only)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# The RenderVideo workflow's type name, as the history and visibility queries show it.
RENDER_WORKFLOW = "RenderVideo"


def workflow_id_for(job_id: int, prefix: str = "") -> str:
    """The id of a job's RenderVideo run: one per job, so a second approve joins the first.
    `prefix` (WORKFLOW_ID_PREFIX) keeps two deployments apart in one namespace."""
    return f"{prefix}render-video-{job_id}"


def event_workflow_id(job_workflow_id: str, event: str, run_id: str) -> str:
    """The DeliverJobEvent run that tells the caller how one run of a job ended."""
    return f"{job_workflow_id}-event-{event}-{run_id.replace('-', '')[:12]}"


def webhook_id_for(job_id: int, event: str, run_id: str) -> str:
    """One id per event of one run: the same for every retry and redelivery of it, so the
    caller can tell a repeat from a new event."""
    return f"msg_job{job_id}_{event}_{run_id.replace('-', '')[:16]}"


def scene_workflow_id(job_id: int, number: int, prefix: str = "") -> str:
    """The id of the RenderScene child that renders one scene (0: a whole-storyboard model's
    one prediction)."""
    return scene_run_id(workflow_id_for(job_id, prefix), number)


def scene_run_id(job_workflow_id: str, number: int) -> str:
    return f"{job_workflow_id}-scene-{number if number else 'all'}"


@dataclass
class RenderVideoInput:
    job_id: int
    # Taken from Settings when the run starts, so a run keeps the timing it began with.
    poll_interval_seconds: float = 5.0
    # Per scene: how long one prediction may take (also sent to Replicate as Cancel-After).
    render_timeout_seconds: float = 600.0
    # review: validate, then wait for an `approve` signal before anything is billed.
    review: bool = False
    review_timeout_seconds: float = 7 * 24 * 3600.0
    # How long to wait for Replicate's webhook before falling back to polling.
    webhook_wait_seconds: float = 300.0
    # Scenes rendered at once.
    scene_concurrency: int = 10
    # Fresh takes of every scene, even those whose clip is still good.
    rerender: bool = False
    # The task queue whose activities create predictions (rate-limited across workers);
    # None: the run's own.
    create_task_queue: str | None = None
    # The job (or its tenant) has a callback URL: tell it how the run ended.
    notify: bool = False
    callback_retry_initial_seconds: float = 5.0


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
    rerender: bool = False


@dataclass
class StoryboardSummary:
    scenes_total: int
    planned_seconds: float
    # Decimal strings: what the job will have cost once rendered (images x price per image +
    # billed seconds, those already spent and those this run renders, x price per second).
    estimated_cost: str | None = None
    max_cost: str | None = None
    # Predictions this run plans to create, and the seconds they bill.
    renders: int = 0
    billed_seconds: str = "0"


@dataclass
class RecordApprovalInput:
    job_id: int
    approved_by: str | None = None


@dataclass
class ApprovalRecorded:
    job_id: int
    status: str


@dataclass
class StartPredictionInput:
    job_id: int
    model_input: dict[str, Any]
    digest: str
    # The scene it renders (0: the whole storyboard), and which take of it (a retake after a
    # clip failed its checks is a second, recorded prediction).
    scene: int = 0
    take: int = 1
    # Sent as Cancel-After: the provider ends the prediction itself past this.
    cancel_after_seconds: float | None = None


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
    scene: int = 0


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
    # The final video's length.
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


@dataclass
class ScenePlan:
    """One prediction's worth of the storyboard: a scene, or (number 0) all of them for a
    whole-storyboard model."""

    number: int
    model_input: dict[str, Any]
    digest: str
    # Seconds the scene lasts in the final video, and seconds the provider renders and bills.
    seconds: float
    billed_seconds: str
    # The storyboard scenes this prediction renders (1-based).
    covers: list[int]
    # A verified clip of exactly this input is already kept (file name): nothing to render.
    clip: str | None = None


@dataclass
class RenderPlanInput:
    job_id: int
    rerender: bool = False


@dataclass
class RenderPlan:
    units: list[ScenePlan]
    scenes_total: int
    # The clips are still images held on screen: the frozen-clip check is off.
    still_image: bool = False


@dataclass
class RenderSceneInput:
    job_id: int
    plan: ScenePlan
    poll_interval_seconds: float = 5.0
    render_timeout_seconds: float = 600.0
    webhook_wait_seconds: float = 300.0
    still_image: bool = False
    create_task_queue: str | None = None


@dataclass
class SceneResult:
    number: int
    clip: str
    prediction_id: str | None
    # Predictions this run created (or adopted) for the scene: 1, or 2 after a retake.
    takes: int = 1


@dataclass
class SceneProgress:
    """What a RenderScene run's `progress` query answers."""

    job_id: int
    number: int
    stage: str
    message: str
    prediction_id: str | None = None
    prediction_status: str | None = None
    take: int = 1


@dataclass
class RecordSceneInput:
    job_id: int
    number: int
    status: str
    covers: list[int] = field(default_factory=list)
    prediction_id: str | None = None
    # What the provider said of the prediction last.
    prediction_status: str | None = None
    # A take the provider billed: its seconds, added to the job's spend.
    billed_seconds: str | None = None
    clip: str | None = None
    error: str | None = None


@dataclass
class DownloadClipInput:
    job_id: int
    number: int
    digest: str
    url: str


@dataclass
class CheckClipInput:
    job_id: int
    number: int
    clip: str
    min_seconds: float
    still_image: bool = False


@dataclass
class ClipChecked:
    duration_seconds: float
    frames: int
    motion: float


@dataclass
class ClipCut:
    clip: str
    seconds: float


@dataclass
class StitchInput:
    job_id: int
    clips: list[ClipCut]


@dataclass
class StitchedVideo:
    # A file name in the job's folder, not yet the served video.
    path: str
    duration_seconds: float
    mode: str


@dataclass
class PublishVideoInput:
    job_id: int
    path: str


@dataclass
class DeliverEventInput:
    job_id: int
    # completed | failed | cancelled | expired
    event: str
    webhook_id: str
    retry_initial_seconds: float = 5.0


@dataclass
class EventDelivered:
    delivered: bool
    status_code: int | None = None
    reason: str | None = None


@dataclass
class PreviewsInput:
    job_id: int
    # (scene number, clip file name) of every clip, for their thumbnails.
    clips: list[tuple[int, str]] = field(default_factory=list)


@dataclass
class PreviewsMade:
    poster: str
    preview: str
    thumbnails: int
