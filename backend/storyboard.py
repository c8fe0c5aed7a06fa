"""Storyboard parsing and the seed's validation rules."""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

DEFAULT_SCENE_SECONDS = 2.0
# Shorter scenes are not a video anyone pays for; providers refuse them, mid-render.
MIN_SCENE_SECONDS = 0.5
# Bounds that keep a storyboard well inside Temporal's 2 MiB payload limit and within what a
# video model renders in one prediction: refused when the storyboard is set, not mid-render.
MAX_SCENES = 200
MAX_URL_LENGTH = 2048
MAX_PROMPT_LENGTH = 1000
MAX_SCENE_SECONDS = 600
MAX_TOTAL_SECONDS = 3600

# What `image_url` accepts, published as the field's pattern in the API's schema: an http(s)
# URL with a host, without spaces or control characters (or "" for a scene with no image yet).
IMAGE_URL_PATTERN = (
    r"^$|^[Hh][Tt][Tt][Pp][Ss]?://[^\s\x00-\x1f\x7f/?#@:][^\s\x00-\x1f\x7f/?#@]*"
    r"(?:[/?#][^\s\x00-\x1f\x7f]*)?$"
)
_IMAGE_URL = re.compile(IMAGE_URL_PATTERN)

# The seed's messages, verbatim: clients match on them.
NOT_APPROVED = "Storyboard must be approved"
NO_STORYBOARD = "No storyboard data available"


def missing_image(scene_number: int) -> str:
    return f"Scene {scene_number} is missing image"


class StoryboardError(ValueError):
    """The storyboard cannot be rendered; the message is shown to the user as is."""


class Scene(BaseModel):
    # Strict where a typo costs money: an unknown field or a duration given as text is
    # refused instead of silently rendering something else.
    model_config = ConfigDict(extra="forbid")

    # None is allowed while a scene's image is still being generated; rendering refuses it.
    image_url: str | None = Field(
        default=None, max_length=MAX_URL_LENGTH, json_schema_extra={"pattern": IMAGE_URL_PATTERN}
    )
    prompt: str | None = Field(default=None, max_length=MAX_PROMPT_LENGTH)
    duration_seconds: float = Field(
        default=DEFAULT_SCENE_SECONDS,
        ge=MIN_SCENE_SECONDS,
        le=MAX_SCENE_SECONDS,
        allow_inf_nan=False,
        strict=True,
    )

    @field_validator("image_url")
    @classmethod
    def _http_only(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
            raise ValueError("image_url must not contain spaces or control characters")
        try:
            host = urlsplit(value).hostname
        except ValueError:  # e.g. an unclosed IPv6 bracket
            host = None
        if not _IMAGE_URL.match(value) or not host:
            raise ValueError("image_url must be an http or https URL with a host")
        return value


class Storyboard(BaseModel):
    model_config = ConfigDict(extra="forbid")

    scenes: list[Scene] = Field(max_length=MAX_SCENES)

    @model_validator(mode="after")
    def _total_length(self) -> Storyboard:
        if self.total_seconds > MAX_TOTAL_SECONDS:
            raise ValueError(
                f"The video would last {self.total_seconds:g} seconds; "
                f"at most {MAX_TOTAL_SECONDS} are allowed"
            )
        return self

    @classmethod
    def parse(cls, data: Any) -> Storyboard:
        """Accepts a list of scenes, `{"scenes": [...]}`, or either as JSON text."""
        if isinstance(data, Storyboard):
            return data
        if isinstance(data, (str, bytes)):
            try:
                data = json.loads(data)
            except json.JSONDecodeError as exc:
                raise StoryboardError(f"Storyboard is not valid JSON: {exc.msg}") from exc
            except RecursionError as exc:
                raise StoryboardError("Storyboard is not valid JSON: nested too deeply") from exc
            except ValueError as exc:  # bytes that are not UTF-8
                raise StoryboardError("Storyboard is not valid JSON text") from exc
        if isinstance(data, list):
            data = {"scenes": data}
        if not isinstance(data, dict) or "scenes" not in data:
            raise StoryboardError('Storyboard must be a list of scenes or {"scenes": [...]}')
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise StoryboardError(_describe(exc)) from exc

    def to_json(self) -> str:
        return self.model_dump_json()

    def require_images(self) -> list[str]:
        """The image URLs in scene order, or the seed's error for the first scene without one."""
        if not self.scenes:
            raise StoryboardError(NO_STORYBOARD)
        urls: list[str] = []
        for number, scene in enumerate(self.scenes, start=1):
            if not scene.image_url:
                raise StoryboardError(missing_image(number))
            urls.append(scene.image_url)
        return urls

    @property
    def total_seconds(self) -> float:
        return sum(scene.duration_seconds for scene in self.scenes)


def _describe(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        loc = list(error["loc"])
        if len(loc) >= 2 and loc[0] == "scenes" and isinstance(loc[1], int):
            where = f"Scene {loc[1] + 1}" + (f" {'.'.join(map(str, loc[2:]))}" if loc[2:] else "")
        else:
            where = ".".join(map(str, loc)) or "storyboard"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = (
                "unknown field; a scene has image_url, prompt and duration_seconds"
                if where.startswith("Scene")
                else 'unknown field; a storyboard is a list of scenes or {"scenes": [...]}'
            )
        elif error["type"] == "float_type":
            message = "must be a number of seconds (a JSON number, not text or true/false)"
        parts.append(message if where == "storyboard" else f"{where}: {message}")
    return "Invalid storyboard: " + "; ".join(parts)
