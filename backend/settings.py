"""The one configuration object, read from the environment and an optional `.env`."""

from __future__ import annotations

import json
import os
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# With no REPLICATE_API_TOKEN the embedded local render server stands in for Replicate;
# it accepts any bearer token, so this one only marks requests as ours.
LOCAL_TOKEN = "local-render-server"


def _checkout() -> Path | None:
    """The source checkout this code runs from, if it does (not an installed wheel)."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() else None


# Defaults belong to the project, not to wherever a script happens to be started: a seed-style
# script run from another directory must open the same job store and videos as the stack.
CHECKOUT = _checkout()


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, where the platform has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=CHECKOUT / ".env" if CHECKOUT else ".env", extra="ignore"
    )

    # Default: DATA in the checkout; an installed copy (the container image) must be told.
    data_dir: Path = Field(
        default_factory=lambda: _default_data_dir(),
        description="Videos, the default SQLite job store, logs; default: DATA in the checkout",
    )
    database_url: str | None = Field(
        default=None, description="Any SQLAlchemy URL; default: SQLite file under DATA_DIR"
    )
    # Where the videos, clips, posters and previews live: unset, under DATA_DIR/videos (one
    # host); `s3://bucket/prefix` for many hosts (credentials: the standard AWS_* variables).
    # With S3, DATA_DIR only holds a worker's scratch files.
    video_storage_url: str | None = Field(
        default=None, pattern=r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$"
    )
    # An S3-compatible server's address (MinIO, moto, ...); unset: AWS itself.
    s3_endpoint_url: str | None = None
    # With S3, the API answers a video, poster or preview request with a 307 to a presigned
    # URL (the bytes then skip the API) instead of streaming it.
    video_redirects: bool = False

    temporal_address: str = "127.0.0.1:7233"
    # Put before every workflow id (and the reconcile schedule's), so two deployments can
    # share one Temporal namespace. The task queue gets it too: a worker that took the other
    # deployment's tasks would run them against the wrong job store.
    workflow_id_prefix: str = Field(default="", pattern=r"^[A-Za-z0-9._-]{0,50}$")
    temporal_namespace: str = "default"
    task_queue: str = "render-video"

    @model_validator(mode="after")
    def _prefix_the_task_queue(self) -> Settings:
        if self.workflow_id_prefix and not self.task_queue.startswith(self.workflow_id_prefix):
            self.task_queue = self.workflow_id_prefix + self.task_queue
        return self

    replicate_api_token: str | None = None
    replicate_base_url: str | None = Field(
        default=None,
        description="Replicate API origin (no /v1); default: the local render server when "
        "no token is set, https://api.replicate.com otherwise",
    )
    replicate_model: str = Field(
        default="local/i2v", description="owner/name or owner/name:version"
    )
    # Profiles (backend/profiles.py) describe how each model takes a scene; this file (JSON or
    # TOML, one profile or a list) adds models or overrides the built-in profiles.
    model_profiles_file: Path | None = Field(
        default=None, description="JSON or TOML file of model profiles"
    )
    # Legacy: for a model with no profile, set explicitly, these map the whole storyboard onto
    # one prediction as before profiles existed.
    model_images_field: str = "images"
    model_durations_field: str = "durations"
    model_prompt_field: str = "prompt"
    # Fixed inputs sent with every prediction, over the profile's own fixed inputs (the
    # storyboard's fields win), as JSON: '{"fps": 24, "width": 1280}'.
    model_extra_input: dict[str, Any] = Field(default_factory=dict)

    poll_interval_seconds: float = Field(default=5.0, gt=0)
    # Per scene: how long one prediction may take; also sent to the provider as Cancel-After.
    render_timeout_seconds: float = Field(default=600.0, gt=0)
    # Scenes of one job rendered at once.
    scene_concurrency: int = Field(default=10, ge=1, le=200)
    # Creates across every worker stay under the provider's limit (Replicate: 600 a minute):
    # Temporal enforces it as the task-queue-wide rate of the queue the creates run on.
    provider_creates_per_minute: float = Field(default=600.0, gt=0)
    # Webhooks: when set, Replicate calls {PUBLIC_BASE_URL}/api/v2/webhooks/replicate and the
    # run waits for that call, polling only if it has not come after WEBHOOK_WAIT_SECONDS.
    public_base_url: str | None = Field(
        default=None, description="Our API's address as Replicate can reach it; enables webhooks"
    )
    replicate_webhook_secret: str | None = Field(
        default=None, description="whsec_... signing secret; default: fetched from Replicate"
    )
    webhook_wait_seconds: float = Field(default=300.0, gt=0)
    webhook_tolerance_seconds: int = Field(default=300, gt=0)
    # A job submitted for review waits this long for its approve signal, then expires.
    review_timeout_seconds: float = Field(default=7 * 24 * 3600.0, gt=0)
    # How often the Server-Sent Events stream looks at a running job's progress.
    events_interval_seconds: float = Field(default=1.0, gt=0)
    # A stream ends (event `end`, reason `max_duration`) after this long; clients reconnect.
    events_max_seconds: float = Field(default=3600.0, gt=0)

    # The API's security boundary.
    # HMAC key of the signed video links; default: a random key kept in
    # DATA_DIR/url-signing.key, made by the first API process that needs it.
    url_signing_secret: str | None = Field(default=None, min_length=16)
    signed_url_ttl_seconds: int = Field(default=3600, gt=0)
    # Browser origins allowed to call the API (CORS); none by default. Comma-separated or a
    # JSON list.
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Every request body is refused (413) past this size, before it is read in full.
    max_request_bytes: int = Field(default=1024 * 1024, gt=0)
    # How long the API waits for a locked SQLite database before it answers 503; the worker
    # waits longer (30 s): it has no client to tell to retry.
    db_lock_timeout_seconds: float = Field(default=10.0, gt=0)

    # Runs kept in the worker's memory between their tasks; a run that is not is replayed
    # from its history when its next task comes. Each costs about 0.2 MB, so the default
    # keeps a worker with 1,000 renders waiting on their predictions near 150 MB.
    worker_max_cached_workflows: int = Field(default=250, ge=0)
    # How long a cached run's next workflow task waits for this worker before any worker may
    # take it from the shared queue, where fairness keys apply. The SDK's default is 10 s;
    # at 1 s a small tenant gets past a saturated worker's backlog, and the backlog itself
    # finishes sooner (bench/FINDINGS.md "Fair shares").
    worker_sticky_seconds: float = Field(default=1.0, gt=0)
    # Video work (decode checks, stitches, posters, previews) a worker runs at once. Each
    # one holds its codecs' frame buffers, and PyAV's codecs use every core already, so more
    # than the cores only adds memory (bench/FINDINGS.md "Worker memory"); the rest wait.
    media_threads: int = Field(default_factory=usable_cores, ge=1)
    # glibc malloc arenas the worker may use (0: glibc's default, 8 per core; ignored when
    # MALLOC_ARENA_MAX is set). Threads that each keep an arena of freed memory add up to
    # tens of MB, for no speed the worker can measure (bench/FINDINGS.md "Worker memory").
    worker_malloc_arenas: int = Field(default=2, ge=0)
    # host:port where the worker serves Prometheus metrics (task slots, activity latencies);
    # off when unset.
    worker_metrics_address: str | None = None
    # On SIGTERM a worker takes no new tasks and gives the ones it holds this long to finish.
    worker_shutdown_grace_seconds: float = Field(default=30.0, ge=0)

    # Observability (traces are configured by the standard OTEL_* variables, see
    # backend/telemetry.py). Log lines as text for people or JSON objects for a pipeline.
    log_format: Literal["text", "json"] = "text"
    # The API's /metrics: with a token, it takes `Authorization: Bearer <METRICS_TOKEN>`;
    # without one it is public only if METRICS_PUBLIC says so, and off (404) otherwise. It
    # shows every tenant's job counts, so it is not for tenants' keys.
    metrics_token: str | None = Field(default=None, min_length=16)
    metrics_public: bool = False

    # The safety net: a Temporal Schedule runs ReconcileJobs this often (0: no schedule), and
    # it repairs jobs whose run closed but whose status was not changed for this long.
    reconcile_interval_seconds: float = Field(default=60.0, ge=0)
    reconcile_grace_seconds: float = Field(default=60.0, ge=0)

    # Callers' callbacks (job.completed, ...): private, loopback and link-local addresses are
    # refused unless this allows them (tests and the local dev stack call loopback).
    allow_private_callbacks: bool = False
    # The first retry of a failed callback waits this long, then twice as long each time (for
    # up to an hour between tries, a day in all).
    callback_retry_initial_seconds: float = Field(default=5.0, gt=0)
    # Fair shares: jobs a tenant may have going at once (rendering or in review), and what it
    # may spend in TENANT_SPEND_PERIOD_DAYS (unset: no cap); a tenant's own row may override
    # both (`render-video tenants set`).
    tenant_max_active_jobs: int = Field(default=500, ge=1)
    tenant_spend_cap: Decimal | None = Field(default=None, gt=0)
    tenant_spend_period_days: float = Field(default=30.0, gt=0)

    price_per_image: Decimal = Decimal("0.003")
    price_per_video_second: Decimal = Decimal("0.10")
    max_video_bytes: int = 2 * 1024**3

    temporal_ui_port: int = 8233
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    local_render_port: int = 5055

    @field_validator("replicate_model")
    @classmethod
    def _model_ref(cls, value: str) -> str:
        name, _, version = value.partition(":")
        owner, slash, model = name.partition("/")
        if not (owner and slash and model) or "/" in model or (":" in value and not version):
            raise ValueError("REPLICATE_MODEL must be 'owner/name' or 'owner/name:version'")
        return value

    @field_validator("log_format", mode="before")
    @classmethod
    def _log_format(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("metrics_token", "video_storage_url", "s3_endpoint_url", mode="before")
    @classmethod
    def _no_empty_token(cls, value: Any) -> Any:
        # METRICS_TOKEN= (empty, as compose passes an unset variable) means not set.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("model_profiles_file", mode="before")
    @classmethod
    def _no_empty_path(cls, value: Any) -> Any:
        # MODEL_PROFILES_FILE= (empty) means no file, not the current directory.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _origins(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [origin.strip() for origin in text.split(",") if origin.strip()]
        return value

    @field_validator("public_base_url")
    @classmethod
    def _public_url(cls, value: str | None) -> str | None:
        if not value:
            return None
        if not value.lower().startswith(("http://", "https://")):
            raise ValueError("PUBLIC_BASE_URL must be an http(s) URL")
        return value.rstrip("/")

    @property
    def webhook_url(self) -> str | None:
        """Where Replicate should report finished predictions; None: poll instead."""
        if not self.public_base_url:
            return None
        return f"{self.public_base_url}/api/v2/webhooks/replicate"

    @property
    def create_task_queue(self) -> str:
        """The task queue prediction creates run on, rate-limited across all workers."""
        return f"{self.task_queue}-creates"

    @property
    def uses_local_renderer(self) -> bool:
        return not self.replicate_api_token

    @property
    def provider_base_url(self) -> str:
        if self.replicate_base_url:
            return self.replicate_base_url.rstrip("/")
        if self.uses_local_renderer:
            return f"http://127.0.0.1:{self.local_render_port}"
        return "https://api.replicate.com"

    @property
    def api_token(self) -> str:
        return self.replicate_api_token or LOCAL_TOKEN

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'jobs.db').resolve()}"

    @property
    def url_signing_key_file(self) -> Path:
        return self.data_dir / "url-signing.key"

    @property
    def dev_api_key_file(self) -> Path:
        """The key `render-video dev` and `demo` use, kept between runs."""
        return self.data_dir / "dev-api-key"

    @property
    def videos_dir(self) -> Path:
        return self.data_dir / "videos"

    def video_dir(self, job_id: int) -> Path:
        return self.videos_dir / str(job_id)

    def video_path(self, job_id: int) -> Path:
        return self.video_dir(job_id) / "final.mp4"

    def scenes_dir(self, job_id: int) -> Path:
        """Each scene's verified clip, kept so a job approved again renders only what changed."""
        return self.video_dir(job_id) / "scenes"


@lru_cache
def get_settings() -> Settings:
    return Settings()


def _default_data_dir() -> Path:
    if CHECKOUT is None:
        raise ValueError(
            "DATA_DIR is not set, and this is an installed copy of the renderer with no "
            "checkout to keep its data in: set DATA_DIR to a writable directory"
        )
    return CHECKOUT / "DATA"
