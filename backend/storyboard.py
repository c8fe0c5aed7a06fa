"""Storyboard parsing and the seed's validation rules."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, Field, ValidationError, field_validator

DEFAULT_SCENE_SECONDS = 2.0

# The seed's messages, verbatim: clients match on them.
NOT_APPROVED = "Storyboard must be approved"
NO_STORYBOARD = "No storyboard data available"


def missing_image(scene_number: int) -> str:
    return f"Scene {scene_number} is missing image"


class StoryboardError(ValueError):
    """The storyboard cannot be rendered; the message is shown to the user as is."""


class Scene(BaseModel):
    # None is allowed while a scene's image is still being generated; rendering refuses it.
    image_url: str | None = None
    prompt: str | None = None
    duration_seconds: float = Field(default=DEFAULT_SCENE_SECONDS, gt=0, le=600)

    @field_validator("image_url")
    @classmethod
    def _http_only(cls, value: str | None) -> str | None:
        if value is None or value.strip() == "":
            return None
        if not value.lower().startswith(("http://", "https://")):
            raise ValueError("image_url must be an http or https URL")
        return value


class Storyboard(BaseModel):
    scenes: list[Scene]

    @classmethod
    def parse(cls, data: Any) -> Storyboard:
        """Accepts a list of scenes, `{"scenes": [...]}`, or either as JSON text."""
        if isinstance(data, (str, bytes)):
            try:
                data = json.loads(data)
            except json.JSONDecodeError as exc:
                raise StoryboardError(f"Storyboard is not valid JSON: {exc.msg}") from exc
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
        parts.append(f"{where}: {error['msg']}")
    return "Invalid storyboard: " + "; ".join(parts)
