"""A local, Replicate-compatible render server (slideshow MP4s), with fault injection."""

from .config import DEFAULT_WEBHOOK_SECRET, ServerConfig
from .server import create_app
from .store import DataDirError
from .testing import RunningServer, run_in_thread

__all__ = [
    "DEFAULT_WEBHOOK_SECRET",
    "DataDirError",
    "RunningServer",
    "ServerConfig",
    "create_app",
    "run_in_thread",
]
