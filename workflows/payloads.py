"""Plain payload types shared by the workflow and its activities (standard library only)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RenderVideoInput:
    job_id: int
    # Taken from Settings when the run starts, so a run keeps the timing it began with.
    poll_interval_seconds: float = 5.0
    render_timeout_seconds: float = 600.0


@dataclass
class RenderVideoResult:
    job_id: int
    status: str
    video_url: str | None = None
    actual_cost: str | None = None
    duration_seconds: float | None = None
    prediction_id: str | None = None


@dataclass
class JobRef:
    job_id: int


@dataclass
class StoryboardSummary:
    scenes_total: int
    planned_seconds: float


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
    prediction_id: str


@dataclass
class CancelPredictionResult:
    prediction_id: str
    status: str


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


@dataclass
class CostRecord:
    actual_cost: str
    video_url: str


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
