"""What the API takes and answers, as pydantic models: the OpenAPI document is made from these,
so they say exactly what is accepted and sent."""

from __future__ import annotations

import math
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, WithJsonSchema
from pydantic.json_schema import SkipJsonSchema
from pydantic_core import PydanticCustomError

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


class CreateJob(BaseModel):
    model_config = ConfigDict(extra="forbid")

    storyboard: StoryboardInput | None = None
    max_cost: MaxCost = None


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


class Progress(BaseModel):
    current_stage: str
    message: str
    scenes_total: int
    scenes_completed: int


class PendingJob(BaseModel):
    """A job without a result yet: draft, ready, in review or rendering."""

    status: Literal["draft", "ready", "in_review", "rendering"]
    job_id: int
    approved: bool
    progress: Progress
    live: RenderProgress | None = Field(
        description="The run's own answer to its `progress` query; null when no run answers "
        "within 2 s"
    )
    max_cost: float | SkipJsonSchema[None] = Field(
        default=None, description="Only when the job has a budget"
    )
    workflow_id: str | None
    scenes: list[SceneView]


class CompletedJob(BaseModel):
    status: Literal["completed"]
    job_id: int
    video_url: str = Field(description="The MP4; needs the API key, like every other path")
    signed_video_url: str = Field(
        description="The same MP4 through a signed link that expires after "
        "SIGNED_URL_TTL_SECONDS, for a <video> tag, which cannot send a key"
    )
    actual_cost: float
    max_cost: float | SkipJsonSchema[None] = Field(
        default=None, description="Only when the job has a budget"
    )
    over_budget: bool | SkipJsonSchema[None] = Field(
        default=None, description="Only when the job has a budget"
    )
    workflow_id: str | None
    billed_seconds: float = Field(
        description="Seconds of video the provider billed for the job (every take, every run)"
    )
    duration_seconds: float = Field(description="The finished video's length")
    scenes: list[SceneView]


class ClosedJob(BaseModel):
    """A job that ended without a video: failed, cancelled or expired."""

    status: Literal["failed", "cancelled", "expired"]
    job_id: int
    error: str | None
    workflow_id: str | None
    scenes: list[SceneView]


JobView = Annotated[PendingJob | CompletedJob | ClosedJob, Field(discriminator="status")]


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
