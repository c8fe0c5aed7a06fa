"""What the API takes and answers, as pydantic models: the OpenAPI document is made from these,
so they say exactly what is accepted and sent."""

from __future__ import annotations

import math
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, WithJsonSchema
from pydantic.json_schema import SkipJsonSchema
from pydantic_core import PydanticCustomError

from backend.callbacks import MAX_URL_LENGTH as MAX_CALLBACK_URL
from backend.callbacks import check_metadata
from backend.storyboard import MAX_SCENES, Scene, Storyboard, StoryboardError
from workflows.payloads import RenderProgress

MAX_COST_DOLLARS = 1_000_000


def _max_cost(value: Any) -> Decimal | None:
    # A JSON number of dollars in whole cents: text ("2.50") and true/false are refused, as a
    # typo in a budget costs money.
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal):
        raise PydanticCustomError("max_cost", "must be a JSON number of dollars")
    if isinstance(value, float) and not math.isfinite(value):
        raise PydanticCustomError("max_cost", "must be a finite number of dollars")
    cents = Decimal(str(value)) * 100
    whole = cents.to_integral_value()
    # Binary floats: 0.57 arrives as 0.5700000000000001, still a whole number of cents.
    if abs(cents - whole) > Decimal("0.000001"):
        raise PydanticCustomError("max_cost", "must be whole cents (2 decimal places)")
    if whole <= 0 or whole > MAX_COST_DOLLARS * 100:
        raise PydanticCustomError(
            "max_cost", f"must be more than 0 and at most {MAX_COST_DOLLARS} dollars"
        )
    return (whole / 100).quantize(Decimal("0.01"))


MaxCost = Annotated[
    Decimal | None,
    PlainValidator(_max_cost),
    WithJsonSchema(
        {
            "anyOf": [
                {
                    "type": "number",
                    "exclusiveMinimum": 0,
                    "maximum": MAX_COST_DOLLARS,
                    "multipleOf": 0.01,
                },
                {"type": "null"},
            ],
            "description": "Budget in dollars (whole cents): a render estimated to cost more is "
            "refused; null: no budget",
        },
        mode="validation",
    ),
]


def _storyboard(value: Any) -> Storyboard:
    try:
        return Storyboard.parse(value)
    except StoryboardError as exc:
        raise PydanticCustomError("storyboard", "{reason}", {"reason": str(exc)}) from None


SceneList = Annotated[list[Scene], Field(max_length=MAX_SCENES, title="Scenes")]
StoryboardText = Annotated[
    str,
    Field(
        title="Storyboard as JSON text",
        description='A list of scenes or {"scenes": [...]}, as JSON text',
        json_schema_extra={"contentMediaType": "application/json"},
    ),
]
# Validated by the storyboard's own rules, so that every error names its scene; documented as
# the three forms it accepts. The total length (at most 3600 s) is beyond a JSON schema: 422.
StoryboardInput = Annotated[
    Storyboard,
    PlainValidator(_storyboard, json_schema_input_type=SceneList | Storyboard | StoryboardText),
]


def _metadata(value: Any) -> dict[str, Any] | None:
    try:
        return check_metadata(value)
    except ValueError as exc:
        raise PydanticCustomError("metadata", "{reason}", {"reason": str(exc)}) from None


Metadata = Annotated[
    dict[str, Any] | None,
    PlainValidator(_metadata),
    WithJsonSchema(
        {
            "anyOf": [{"type": "object"}, {"type": "null"}],
            "description": "Your own JSON object (at most 1 KB as JSON), passed through "
            "untouched: in every view of the job and in its callback events",
        },
        mode="validation",
    ),
]
CallbackUrl = Annotated[
    str | None,
    Field(
        default=None,
        max_length=MAX_CALLBACK_URL,
        pattern=r"^https?://[^\s/]+",
        description="Where the job's end (job.completed, job.failed, job.cancelled, "
        "job.expired) is sent, signed the Standard Webhooks way; default: the tenant's. A "
        "private, loopback or link-local address is refused unless ALLOW_PRIVATE_CALLBACKS",
    ),
]


class CreateJob(BaseModel):
    model_config = ConfigDict(extra="forbid")

    storyboard: StoryboardInput | None = None
    max_cost: MaxCost = None
    callback_url: CallbackUrl = None
    metadata: Metadata = None


class Budget(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_cost: MaxCost = None


class ApproveBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    approved_by: str | None = Field(default=None, max_length=200)
    rerender: bool = Field(
        default=False,
        description="Fresh takes of every scene, even those whose clip is still good (a "
        "completed job is rendered again); otherwise only scenes without a clip of their "
        "current input are rendered",
    )


# -- answers --


class JobCreated(BaseModel):
    job_id: int
    status: Literal["draft", "ready"]


class RenderStarted(BaseModel):
    status: Literal["rendering_started", "completed", "in_review"]
    job_id: int
    workflow_id: str


class CancelAnswer(BaseModel):
    status: Literal["cancelling", "cancelled"] = Field(
        description="cancelling: the run is cleaning up and the job reads `cancelled` once it "
        "has; cancelled: no run was going and the job is closed now"
    )
    job_id: int
    workflow_id: str


class CallbackAttemptView(BaseModel):
    event: Literal["completed", "failed", "cancelled", "expired"]
    webhook_id: str = Field(description="The same for every attempt of one event")
    attempt: int
    status_code: int | None = Field(description="What the callback answered; null: no answer")
    error: str | None
    delivered: bool
    at: str


class SceneView(BaseModel):
    """One storyboard scene: where its render stands."""

    number: int
    status: Literal["pending", "rendering", "rendered", "completed", "failed", "cancelled"]
    prediction_id: str | None
    prediction_status: str | None = Field(
        description="What the provider said of the prediction last (starting, processing, "
        "succeeded, failed, canceled, aborted)"
    )
    billed_seconds: float = Field(description="Seconds the provider billed for it, all takes")
    error: str | None
    thumbnail_url: str | None = Field(
        default=None, description="A frame of its clip, once the job's video is made"
    )


class Progress(BaseModel):
    current_stage: str
    message: str
    scenes_total: int
    scenes_completed: int


class JobBase(BaseModel):
    """What every view of a job has."""

    job_id: int
    workflow_id: str | None
    created_at: str
    updated_at: str
    approved_by: str | None
    scenes_total: int = Field(description="Scenes in the storyboard")
    metadata: dict[str, Any] | None = Field(description="Yours, untouched")
    callback_url: str | None = Field(description="The job's own callback URL, if it has one")
    scenes: list[SceneView]
    callbacks: list[CallbackAttemptView] = Field(
        description="Every attempt to send the job's events to its callback, oldest first"
    )


class PendingJob(JobBase):
    """A job without a result yet: draft, ready, in review or rendering."""

    status: Literal["draft", "ready", "in_review", "rendering"]
    approved: bool
    progress: Progress
    live: RenderProgress | None = Field(
        description="The run's own answer to its `progress` query; null when no run answers "
        "within 2 s, or none is going"
    )
    estimated_cost: float | None = Field(
        description="Dollars, once validated: its images and the seconds it will have billed"
    )
    max_cost: float | SkipJsonSchema[None] = Field(
        default=None, description="Only when the job has a budget"
    )


class CompletedJob(JobBase):
    status: Literal["completed"]
    video_url: str = Field(description="The MP4; needs the API key, like every other path")
    signed_video_url: str = Field(
        description="The same MP4 through a signed link that expires after "
        "SIGNED_URL_TTL_SECONDS, for a <video> tag, which cannot send a key"
    )
    poster_url: str | None = Field(description="A JPEG of a representative frame")
    preview_url: str | None = Field(description="A short MP4 of at most 360p and about 1 MB")
    signed_poster_url: str | None
    signed_preview_url: str | None
    actual_cost: float = Field(description="Dollars (a number, like every money field)")
    max_cost: float | SkipJsonSchema[None] = Field(
        default=None, description="Only when the job has a budget"
    )
    over_budget: bool | SkipJsonSchema[None] = Field(
        default=None, description="Only when the job has a budget"
    )
    billed_seconds: float = Field(
        description="Seconds of video the provider billed for the job (every take, every run)"
    )
    duration_seconds: float = Field(description="The finished video's length")


class ClosedJob(JobBase):
    """A job that ended without a video: failed, cancelled or expired."""

    status: Literal["failed", "cancelled", "expired"]
    error: str | None


JobView = Annotated[PendingJob | CompletedJob | ClosedJob, Field(discriminator="status")]


class JobPage(BaseModel):
    """A page of the tenant's jobs, newest first."""

    jobs: list[JobView]
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next (older) page; null on the last page"
    )


class TenantView(BaseModel):
    tenant: str
    callback_url: str | None = Field(description="For jobs without a callback_url of their own")
    max_active_jobs: int = Field(description="Jobs it may have rendering or in review at once")
    spend_cap: float | None = Field(description="Dollars per spend_period_days; null: none")
    spend_period_days: float


class TenantUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    callback_url: CallbackUrl = None


class WebhookSecret(BaseModel):
    secret: str = Field(description="whsec_...: verify the job events with it")


class RedeliveryStarted(BaseModel):
    job_id: int
    event: Literal["completed", "failed", "cancelled", "expired"]
    webhook_id: str


class Readiness(BaseModel):
    status: Literal["ready", "not_ready"]
    checks: dict[str, str] = Field(
        description="database, temporal, storage: `ok`, or `failed (...)` naming the kind of "
        "failure"
    )


class Health(BaseModel):
    status: Literal["ok"]
    # Tells this API apart from whatever else might answer on its port.
    service: Literal["storyboard-video-renderer"] = "storyboard-video-renderer"


class WebhookRelayed(BaseModel):
    status: Literal["signalled", "run_closed"] = Field(
        description="signalled: the run was told; run_closed: its run had already ended"
    )
    job_id: int
    prediction_id: str


class WebhookDuplicate(BaseModel):
    status: Literal["duplicate"]
    webhook_id: str
    prediction_id: str


class WebhookIgnored(BaseModel):
    status: Literal["ignored"]
    prediction_status: str = Field(description="Only a final status is relayed to the run")


WebhookAnswer = Annotated[
    WebhookRelayed | WebhookDuplicate | WebhookIgnored, Field(discriminator="status")
]


class PredictionBody(BaseModel):
    """The part of Replicate's prediction object that the receiver reads (it is signed whole)."""

    model_config = ConfigDict(extra="allow")

    id: str
    status: str
