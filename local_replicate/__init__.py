"""A local, Replicate-compatible render server (slideshow and image-to-video MP4s, models posed
from stored input schemas), with fault injection."""

from .config import ConfigError, ServerConfig
from .models import ModelConfigError
from .server import create_app
from .store import DataDirError
from .testing import RunningServer, run_in_thread

__all__ = [
    "ConfigError",
    "DataDirError",
    "ModelConfigError",
    "RunningServer",
    "ServerConfig",
    "create_app",
    "run_in_thread",
]
