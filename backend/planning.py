"""What a render of a storyboard will do: one prediction per scene (or one for the whole
storyboard), each keyed by a digest of what produces it, and which of them a clip already
kept makes unnecessary."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import Any

from backend.profiles import (
    ModelProfile,
    ProfileError,
    SceneTooLong,
    billed_seconds,
    input_digest,
    scene_input,
    storyboard_billed_seconds,
    storyboard_input,
    validate_input,
)
from backend.settings import Settings
from backend.storyboard import Storyboard
from workflows.payloads import ScenePlan


class PlanError(ValueError):
    """The storyboard cannot be rendered with this model; the message says why."""


# The job's video and what is made from it, under videos/{job}/ (thumbnails under scenes/).
FINAL = "final.mp4"
POSTER = "poster.jpg"
PREVIEW = "preview.mp4"


def thumbnail_name(number: int) -> str:
    return f"{number:03d}.jpg" if number else "all.jpg"


def clip_name(number: int, digest: str) -> str:
    """A verified clip's file name under videos/{job}/scenes/: the scene and what made it."""
    return f"{number:03d}-{digest[:16]}.mp4" if number else f"all-{digest[:16]}.mp4"


def plan_units(
    storyboard: Storyboard,
    profile: ModelProfile,
    settings: Settings,
    records: list[dict[str, Any]],
    clip_exists: Callable[[str], bool],
    *,
    rerender: bool = False,
) -> list[ScenePlan]:
    """Every prediction the storyboard needs, in order. A unit whose exact input already made
    a verified clip that is still on disk carries that clip (nothing to render), unless
    `rerender` asks for fresh takes."""
    by_number = {record["number"]: record for record in records}
    extra = settings.model_extra_input
    try:
        if not profile.per_scene:
            model_input = storyboard_input(profile, storyboard.scenes, extra=extra)
            validate_input(profile, model_input)
            digest = input_digest(profile, model_input)
            seconds = storyboard.total_seconds
            billed = sum(
                storyboard_billed_seconds(profile, [s.duration_seconds for s in storyboard.scenes]),
                Decimal(0),
            )
            covers = list(range(1, len(storyboard.scenes) + 1))
            kept = _kept(covers, digest, by_number, clip_exists, rerender)
            return [ScenePlan(0, model_input, digest, seconds, str(billed), covers, kept)]
        units = []
        for number, scene in enumerate(storyboard.scenes, start=1):
            if not scene.image_url:
                raise PlanError(f"Scene {number} is missing image")
            try:
                model_input = scene_input(
                    profile,
                    image_url=scene.image_url,
                    prompt=scene.prompt,
                    scene_seconds=scene.duration_seconds,
                    extra=extra,
                )
                validate_input(profile, model_input)
                billed = billed_seconds(profile, scene.duration_seconds)
            except SceneTooLong as exc:
                raise PlanError(
                    str(SceneTooLong(exc.model, exc.seconds, exc.maximum, scene=number))
                ) from exc
            except ProfileError as exc:
                raise PlanError(f"Scene {number}: {exc}") from exc
            digest = input_digest(profile, model_input)
            kept = _kept([number], digest, by_number, clip_exists, rerender)
            units.append(
                ScenePlan(
                    number, model_input, digest, scene.duration_seconds, str(billed), [number], kept
                )
            )
        return units
    except ProfileError as exc:
        raise PlanError(str(exc)) from exc


def _kept(
    covers: list[int],
    digest: str,
    records: dict[int, dict[str, Any]],
    clip_exists: Callable[[str], bool],
    rerender: bool,
) -> str | None:
    if rerender:
        return None
    clips = set()
    for number in covers:
        record = records.get(number)
        if not record or record["digest"] != digest or record["status"] != "completed":
            return None
        clips.add(record["clip"])
    if len(clips) != 1:
        return None
    (clip,) = clips
    return clip if clip and clip_exists(clip) else None
