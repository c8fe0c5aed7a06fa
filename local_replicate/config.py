"""Server configuration, and the webhook signing secret kept in the data dir."""

from __future__ import annotations

import base64
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from .store import DataDirError

# the file under the data dir that holds the generated signing secret
SECRET_FILE = "webhook-secret"


class ConfigError(ValueError):
    """The configuration cannot work (a malformed secret, a model schema); raised when the app
    is created."""


@dataclass
class ServerConfig:
    # output MP4s, predictions/{id}.json and the webhook secret (kept across restarts); must be
    # a writable directory
    data_dir: Path
    public_url: str | None = None
    token: str | None = None
    # None: a random whsec_... secret generated once per data dir (DATA/webhook-secret)
    webhook_secret: str | None = None
    start_delay: float = 0.5
    # a prediction stays `processing` at least this long; the wait is a timer on the event loop,
    # not a render thread, so a fixed render time (e.g. 20 s for benchmarks) costs no thread
    min_processing: float = 0.0
    retention_seconds: float = 3600
    webhook_retry_delays: tuple[float, ...] = (1, 2, 4, 8, 16, 30)
    render_workers: int = 2
    # `model` reported for creates by version id that do not name one ("owner/name:version")
    model_name: str = "local-replicate/slideshow"
    # serve /_admin/* (faults, stats, reset, health); off unless started for tests
    admin: bool = False
    # accepted creates allowed in any rolling 60 s; beyond it a 429 as Replicate's. None: no limit
    create_limit_per_minute: int | None = None
    # real models to pose as ("owner/name"); None: every stored schema in schemas_dir
    pose: tuple[str, ...] | None = None
    # where the stored input schemas are (<owner>__<name>.json); None: backend/model_schemas
    schemas_dir: Path | None = None
    # clips (local/i2v, posed models) are scaled down to at most this height, keeping their
    # aspect: quicker renders for tests and benchmarks. None: the size the input asks for
    clip_max_height: int | None = None


def load_or_create_secret(data_dir: Path) -> str:
    """The data dir's webhook secret, generated (mode 0600) the first time.

    Two servers starting on one data dir at once agree on one secret: the file appears whole,
    through a hard link that fails when another process linked its own first.
    """
    path = Path(data_dir) / SECRET_FILE
    if not path.exists():
        secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
        tmp = path.with_name(f".{SECRET_FILE}.{os.getpid()}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secret + "\n")
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
        except OSError as exc:
            raise DataDirError(
                f"local_replicate cannot keep its webhook secret in {path} ({exc.strerror})"
            ) from exc
        finally:
            tmp.unlink(missing_ok=True)
    try:
        secret = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeError) as exc:
        raise DataDirError(f"local_replicate cannot read its webhook secret {path}") from exc
    if not _valid_secret(secret):
        raise DataDirError(
            f"{path} does not hold a whsec_<base64> webhook secret; delete it to generate one"
        )
    return secret


def _valid_secret(secret: str) -> bool:
    prefix, sep, b64 = secret.partition("_")
    if prefix != "whsec" or not sep:
        return False
    try:
        return len(base64.b64decode(b64, validate=True)) >= 16
    except ValueError:
        return False
