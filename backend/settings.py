"""The one configuration object, read from the environment and an optional `.env`."""

from __future__ import annotations

from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# With no REPLICATE_API_TOKEN the embedded local render server stands in for Replicate;
# it accepts any bearer token, so this one only marks requests as ours.
LOCAL_TOKEN = "local-render-server"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    data_dir: Path = Path("./DATA")
    database_url: str | None = Field(
        default=None, description="Any SQLAlchemy URL; default: SQLite file under DATA_DIR"
    )

    temporal_address: str = "127.0.0.1:7233"
    temporal_namespace: str = "default"
    task_queue: str = "render-video"

    replicate_api_token: str | None = None
    replicate_base_url: str | None = Field(
        default=None,
        description="Replicate API origin (no /v1); default: the local render server when "
        "no token is set, https://api.replicate.com otherwise",
    )
    replicate_model: str = Field(
        default="local/slideshow", description="owner/name or owner/name:version"
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
    render_timeout_seconds: float = Field(default=600.0, gt=0)
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

    # Runs kept in the worker's memory between their tasks; a run that is not is replayed
    # from its history when its next task comes. Each costs about 0.2 MB, so the default
    # keeps a worker with 1,000 renders waiting on their predictions near 150 MB.
    worker_max_cached_workflows: int = Field(default=250, ge=0)
    # host:port where the worker serves Prometheus metrics (task slots, activity latencies);
    # off when unset.
    worker_metrics_address: str | None = None

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

    @field_validator("model_profiles_file", mode="before")
    @classmethod
    def _no_empty_path(cls, value: Any) -> Any:
        # MODEL_PROFILES_FILE= (empty) means no file, not the current directory.
        return None if isinstance(value, str) and not value.strip() else value

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
    def videos_dir(self) -> Path:
        return self.data_dir / "videos"

    def video_dir(self, job_id: int) -> Path:
        return self.videos_dir / str(job_id)

    def video_path(self, job_id: int) -> Path:
        return self.video_dir(job_id) / "final.mp4"


@lru_cache
def get_settings() -> Settings:
    return Settings()
