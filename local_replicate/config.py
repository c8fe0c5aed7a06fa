"""Server configuration."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path

# fixed so webhook receivers in tests can be configured before the server starts
DEFAULT_WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"local-replicate-webhook-secret-01").decode()


@dataclass
class ServerConfig:
    # output MP4s and predictions/{id}.json (kept across restarts); must be a writable directory
    data_dir: Path
    public_url: str | None = None
    token: str | None = None
    webhook_secret: str = DEFAULT_WEBHOOK_SECRET
    start_delay: float = 0.5
    min_processing: float = 0.0
    retention_seconds: float = 3600
    webhook_retry_delays: tuple[float, ...] = (1, 2, 4, 8, 16, 30)
    render_workers: int = 2
    # `model` reported for creates by version id that do not name one ("owner/name:version")
    model_name: str = "local-replicate/slideshow"
