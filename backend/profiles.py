"""Model profiles: how a storyboard maps onto one video model's input, and what it costs.

An image-to-video model takes one image and a prompt per prediction and returns one MP4, so a
storyboard of N scenes becomes N predictions (`per_scene`); the local slideshow takes the whole
storyboard in one (today's mode). A profile says which input fields take the image, the prompt
and the duration, how a scene's seconds become a duration the model accepts (and is billed for),
which inputs are fixed, and the price per second of video. `REPLICATE_MODEL` selects the profile;
`MODEL_PROFILES_FILE` adds or overrides profiles without code.

Everything here is pure: no I/O beyond reading the profile file and the stored schemas.
"""

from __future__ import annotations

import hashlib
import json
import math
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from backend.cost import render_cost
from backend.model_schemas import UnknownSchema, load_schema
from backend.settings import Settings
from backend.storyboard import missing_image

__all__ = [
    "BUILTIN_PROFILES",
    "ChoicesDuration",
    "FramesDuration",
    "InputRejected",
    "ModelProfile",
    "ProfileError",
    "RangeDuration",
    "SceneTooLong",
    "UnknownModel",
    "UnknownSchema",
    "billed_cost",
    "billed_seconds",
    "duration_value",
    "estimate_cost",
    "input_digest",
    "known_profiles",
    "load_profile_file",
    "load_schema",
    "max_scene_seconds",
    "price_per_second",
    "profile_for",
    "scene_input",
    "schema_for",
    "storyboard_billed_seconds",
    "storyboard_input",
    "validate_input",
]

# A whole-storyboard model takes any positive length up to the storyboard's own limit.
WHOLE_STORYBOARD_MAX_SECONDS = 600
# Scene prompts are joined like this for a whole-storyboard model (today's behaviour).
PROMPT_SEPARATOR = " / "
_LEGACY_FIELDS = frozenset({"model_images_field", "model_durations_field", "model_prompt_field"})


class ProfileError(ValueError):
    """A profile, a profile file or a scene cannot be used; the message says why."""


class UnknownModel(ProfileError):
    """REPLICATE_MODEL names a model with no profile."""


class SceneTooLong(ProfileError):
    """A scene lasts longer than the model renders in one prediction."""

    def __init__(self, model: str, seconds: Decimal, maximum: Decimal, scene: int | None = None):
        self.model, self.seconds, self.maximum, self.scene = model, seconds, maximum, scene
        who = f"Scene {scene}" if scene is not None else "The scene"
        super().__init__(
            f"{who} lasts {_fmt(seconds)} s, longer than the {_fmt(maximum)} s that "
            f"{model} renders in one prediction"
        )


class InputRejected(ProfileError):
    """The model's stored input schema refuses an input the profile built."""


def _fmt(value: Decimal) -> str:
    text = format(value, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def _decimal(value: float | int | Decimal) -> Decimal:
    # str() first: Decimal(float) would carry the float's binary error into the rounding.
    number = value if isinstance(value, Decimal) else Decimal(str(value))
    if not number.is_finite() or number <= 0:
        raise ProfileError(f"A scene must last a positive number of seconds, not {value}")
    return number


def _ceil_to_step(value: Decimal, start: Decimal, step: Decimal) -> Decimal:
    """The smallest start + k*step (k >= 0) that is >= value."""
    if value <= start:
        return start
    return start + math.ceil((value - start) / step) * step


def _number(value: Decimal) -> int | float:
    """What goes into the model input: an int when whole (most schemas say integer)."""
    return int(value) if value == value.to_integral_value() else float(value)


class ChoicesDuration(BaseModel):
    """The model takes one of a few lengths, e.g. `duration` 5 or 10."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["choices"]
    field: str = "duration"
    seconds: list[Annotated[Decimal, Field(gt=0)]] = Field(min_length=1)

    @field_validator("seconds")
    @classmethod
    def _sorted(cls, value: list[Decimal]) -> list[Decimal]:
        return sorted(set(value))

    def plan(self, seconds: Decimal) -> tuple[Decimal, Any] | None:
        choice = next((c for c in self.seconds if c >= seconds), None)
        return None if choice is None else (choice, _number(choice))

    def maximum(self) -> Decimal:
        return self.seconds[-1]


class RangeDuration(BaseModel):
    """The model takes any length from min to max, in steps of `step` (none: any length)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["range"]
    field: str = "duration"
    min: Decimal = Field(ge=0)
    max: Decimal = Field(gt=0)
    step: Decimal | None = Field(default=Decimal(1), gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> RangeDuration:
        if self.min > self.max:
            raise ValueError("min must not exceed max")
        return self

    def plan(self, seconds: Decimal) -> tuple[Decimal, Any] | None:
        if self.step is None:
            billed = max(seconds, self.min)
        else:
            billed = _ceil_to_step(seconds, self.min, self.step)
        return None if billed > self.max else (billed, _number(billed))

    def maximum(self) -> Decimal:
        if self.step is None:
            return self.max
        return self.min + ((self.max - self.min) // self.step) * self.step


class FramesDuration(BaseModel):
    """The model takes a frame count (e.g. `num_frames` 81..121) and renders at `fps`.

    `fps_field`, when set, sends the fps too, so the model renders at the rate the frame count
    was computed for. `frame_step` is for models that take only min + k*step frames (4n+1).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["frames"]
    field: str = "num_frames"
    fps: int = Field(gt=0)
    min: int = Field(gt=0)
    max: int = Field(gt=0)
    frame_step: int = Field(default=1, gt=0)
    fps_field: str | None = None

    @model_validator(mode="after")
    def _ordered(self) -> FramesDuration:
        if self.min > self.max:
            raise ValueError("min must not exceed max")
        return self

    def plan(self, seconds: Decimal) -> tuple[Decimal, Any] | None:
        frames = _ceil_to_step(
            Decimal(math.ceil(seconds * self.fps)), Decimal(self.min), Decimal(self.frame_step)
        )
        if frames > self.max:
            return None
        return frames / self.fps, int(frames)

    def maximum(self) -> Decimal:
        frames = self.min + ((self.max - self.min) // self.frame_step) * self.frame_step
        return Decimal(frames) / self.fps


DurationRule = Annotated[
    ChoicesDuration | RangeDuration | FramesDuration, Field(discriminator="kind")
]


class ModelProfile(BaseModel):
    """How one model takes a scene (or, `per_scene: false`, a whole storyboard)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="owner/name, optionally :version")
    per_scene: bool = True
    # per_scene: the field for the scene's image URL; whole storyboard: for the list of URLs.
    image_field: str
    prompt_field: str | None = "prompt"
    # Sent when a scene has no prompt and the model requires one.
    default_prompt: str | None = None
    negative_prompt_field: str | None = None
    last_frame_field: str | None = None
    duration: DurationRule
    fixed_input: dict[str, Any] = Field(default_factory=dict)
    # Dollars per second of billed video; None: PRICE_PER_VIDEO_SECOND.
    price_per_second: Decimal | None = Field(default=None, ge=0)
    # The video is a still image held on screen (the frozen-frame check must not apply).
    still_image: bool = False
    audio: bool = False
    # What the output should be, for verifying a downloaded clip; None: not checked.
    fps: int | None = Field(default=None, gt=0)
    resolution: str | None = None
    # For models without a stored schema (or to replace it): the Input schema, inline.
    input_schema: dict[str, Any] | None = None

    @field_validator("model")
    @classmethod
    def _model_ref(cls, value: str) -> str:
        name, colon, version = value.partition(":")
        owner, slash, rest = name.partition("/")
        if not (owner and slash and rest) or "/" in rest or (colon and not version):
            raise ValueError("must be 'owner/name' or 'owner/name:version'")
        return value

    @field_validator("input_schema")
    @classmethod
    def _valid_schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            try:
                Draft202012Validator.check_schema(value)
            except SchemaError as exc:
                message = f"input_schema is not a valid JSON Schema: {exc.message}"
                raise ValueError(message) from None
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ModelProfile:
        if not self.per_scene and not isinstance(self.duration, RangeDuration):
            raise ValueError("a whole-storyboard profile (per_scene: false) needs a range duration")
        filled = {self.image_field, self.duration.field}
        for name in (self.prompt_field, self.negative_prompt_field, self.last_frame_field):
            if name:
                filled.add(name)
        if isinstance(self.duration, FramesDuration) and self.duration.fps_field:
            filled.add(self.duration.fps_field)
        clash = sorted(filled & set(self.fixed_input))
        if clash:
            raise ValueError(f"fixed_input sets {', '.join(clash)}, which the profile fills itself")
        return self

    @property
    def name(self) -> str:
        """owner/name, without the version."""
        return self.model.partition(":")[0]


def _builtin(data: dict[str, Any]) -> ModelProfile:
    return ModelProfile.model_validate(data)


# Prices: Replicate's per-second prices for these models were not in the reference material
# this was built from, so each uses PRICE_PER_VIDEO_SECOND until a profile file sets one.
_MOTION_PROMPT = "Animate this image with subtle, natural motion."
BUILTIN_PROFILES: tuple[ModelProfile, ...] = tuple(
    _builtin(item)
    for item in (
        {
            "model": "kwaivgi/kling-v2.1",
            "image_field": "start_image",
            "default_prompt": _MOTION_PROMPT,
            "negative_prompt_field": "negative_prompt",
            # end_image needs mode "pro", so last frames are not offered in standard mode.
            "duration": {"kind": "choices", "field": "duration", "seconds": [5, 10]},
            "fixed_input": {"mode": "standard"},
            "fps": 24,
            "resolution": "720p",
        },
        {
            "model": "minimax/hailuo-02",
            "image_field": "first_frame_image",
            "default_prompt": _MOTION_PROMPT,
            "last_frame_field": "last_frame_image",
            "duration": {"kind": "choices", "field": "duration", "seconds": [6, 10]},
            # 10-second clips exist only at 768p; the model's default is 1080p.
            "fixed_input": {"resolution": "768p"},
            "resolution": "768p",
        },
        {
            "model": "bytedance/seedance-1-lite",
            "image_field": "image",
            "default_prompt": _MOTION_PROMPT,
            "last_frame_field": "last_frame_image",
            "duration": {"kind": "range", "field": "duration", "min": 2, "max": 12, "step": 1},
            "fixed_input": {"resolution": "720p", "fps": 24},
            "fps": 24,
            "resolution": "720p",
        },
        {
            "model": "wan-video/wan-2.2-i2v-fast",
            "image_field": "image",
            "default_prompt": _MOTION_PROMPT,
            "last_frame_field": "last_image",
            "duration": {
                "kind": "frames",
                "field": "num_frames",
                "fps": 16,
                "min": 81,
                "max": 121,
                "fps_field": "frames_per_second",
            },
            "fixed_input": {"resolution": "480p"},
            "fps": 16,
            "resolution": "480p",
        },
        {
            "model": "luma/ray-flash-2-720p",
            "image_field": "start_image",
            "default_prompt": _MOTION_PROMPT,
            "last_frame_field": "end_image",
            "duration": {"kind": "choices", "field": "duration", "seconds": [5, 9]},
            "resolution": "720p",
        },
        {
            "model": "local/i2v",
            "image_field": "image",
            "duration": {"kind": "range", "field": "duration", "min": 1, "max": 10, "step": 1},
            "fps": 24,
        },
        {
            "model": "local/slideshow",
            "per_scene": False,
            "image_field": "images",
            "duration": {
                "kind": "range",
                "field": "durations",
                "min": 0,
                "max": WHOLE_STORYBOARD_MAX_SECONDS,
                "step": None,
            },
            "still_image": True,
            "fps": 24,
        },
    )
)


def _describe(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "profile"
        parts.append(f"{where}: {error['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)


def _profile_items(data: Any) -> list[Any]:
    if isinstance(data, list):
        return data
    if isinstance(data, dict) and "profiles" in data:
        items = data["profiles"]
        if not isinstance(items, list):
            raise ProfileError("MODEL_PROFILES_FILE: 'profiles' must be a list of profiles")
        return items
    if isinstance(data, dict):
        return [data]
    raise ProfileError("MODEL_PROFILES_FILE must hold a profile, a list of profiles, or {profiles}")


def load_profile_file(path: Path) -> list[ModelProfile]:
    """The profiles in a JSON or TOML file: one profile, a list, or `profiles = [...]`.

    An `input_schema` given as a string is a path to a JSON schema file, relative to the
    profile file.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProfileError(f"MODEL_PROFILES_FILE {path} does not exist") from None
    except OSError as exc:
        raise ProfileError(f"MODEL_PROFILES_FILE {path} cannot be read: {exc.strerror}") from None
    try:
        if path.suffix.lower() == ".toml":
            data: Any = tomllib.loads(text)
        else:
            data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProfileError(
            f"MODEL_PROFILES_FILE {path} is not valid JSON: {exc.msg} "
            f"(line {exc.lineno}, column {exc.colno})"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"MODEL_PROFILES_FILE {path} is not valid TOML: {exc}") from None

    profiles: list[ModelProfile] = []
    seen: set[str] = set()
    for number, item in enumerate(_profile_items(data), start=1):
        label = f"profile {number}"
        if isinstance(item, dict):
            label += f" ({item.get('model', 'no model')})"
            schema_ref = item.get("input_schema")
            if isinstance(schema_ref, str):
                item = {**item, "input_schema": _read_schema_file(path.parent / schema_ref, label)}
        try:
            profile = ModelProfile.model_validate(item)
        except ValidationError as exc:
            raise ProfileError(f"MODEL_PROFILES_FILE {path}, {label}: {_describe(exc)}") from None
        if profile.name in seen:
            raise ProfileError(f"MODEL_PROFILES_FILE {path} has two profiles for {profile.name}")
        seen.add(profile.name)
        profiles.append(profile)
    return profiles


def _read_schema_file(path: Path, label: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ProfileError(
            f"MODEL_PROFILES_FILE, {label}: input_schema {path} does not exist"
        ) from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ProfileError(
            f"MODEL_PROFILES_FILE, {label}: input_schema {path} is not readable JSON: {exc}"
        ) from None


def known_profiles(settings: Settings) -> dict[str, ModelProfile]:
    """Built-in profiles, overridden and extended by MODEL_PROFILES_FILE; keyed by owner/name."""
    profiles = {profile.name: profile for profile in BUILTIN_PROFILES}
    if settings.model_profiles_file is not None:
        for profile in load_profile_file(settings.model_profiles_file):
            profiles[profile.name] = profile
    return profiles


def _legacy_profile(settings: Settings) -> ModelProfile:
    # Before profiles, MODEL_*_FIELD mapped the whole storyboard onto one prediction.
    return ModelProfile(
        model=settings.replicate_model,
        per_scene=False,
        image_field=settings.model_images_field,
        prompt_field=settings.model_prompt_field or None,
        duration=RangeDuration(
            kind="range",
            field=settings.model_durations_field,
            min=Decimal(0),
            max=Decimal(WHOLE_STORYBOARD_MAX_SECONDS),
            step=None,
        ),
    )


def profile_for(settings: Settings) -> ModelProfile:
    """The profile for REPLICATE_MODEL; call it at startup so a bad setting stops the process.

    A model with no profile is served the old way (the whole storyboard in one prediction,
    fields from MODEL_IMAGES_FIELD, MODEL_DURATIONS_FIELD, MODEL_PROMPT_FIELD) only if one of
    those settings is set explicitly; otherwise it is an error naming the known models.
    """
    requested = settings.replicate_model
    name, _, version = requested.partition(":")
    profiles = known_profiles(settings)
    profile = profiles.get(name)
    if profile is not None:
        return profile.model_copy(update={"model": requested}) if version else profile
    if _LEGACY_FIELDS & settings.model_fields_set:
        return _legacy_profile(settings)
    raise UnknownModel(
        f"REPLICATE_MODEL {requested} has no model profile. Known models: "
        f"{', '.join(sorted(profiles))}. Describe it in a profile file named by "
        "MODEL_PROFILES_FILE (see README, Models)."
    )


def _plan(profile: ModelProfile, seconds: float | Decimal) -> tuple[Decimal, Any]:
    wanted = _decimal(seconds)
    planned = profile.duration.plan(wanted)
    if planned is None:
        raise SceneTooLong(profile.name, wanted, profile.duration.maximum())
    return planned


def billed_seconds(profile: ModelProfile, scene_seconds: float | Decimal) -> Decimal:
    """Seconds the model renders (and bills) for a scene: the shortest allowed length covering it.

    Raises SceneTooLong above the model's maximum, so a storyboard can be refused before any
    prediction is created.
    """
    return _plan(profile, scene_seconds)[0]


def duration_value(profile: ModelProfile, scene_seconds: float | Decimal) -> int | float:
    """The value of the profile's duration field for a scene (seconds, or a frame count)."""
    return _plan(profile, scene_seconds)[1]


def max_scene_seconds(profile: ModelProfile) -> Decimal:
    """The longest scene the model renders in one prediction."""
    return profile.duration.maximum()


def storyboard_billed_seconds(
    profile: ModelProfile, scene_seconds: Sequence[float | Decimal]
) -> list[Decimal]:
    """billed_seconds of each scene; a SceneTooLong names the (1-based) scene."""
    billed = []
    for number, seconds in enumerate(scene_seconds, start=1):
        try:
            billed.append(billed_seconds(profile, seconds))
        except SceneTooLong as exc:
            raise SceneTooLong(exc.model, exc.seconds, exc.maximum, scene=number) from None
    return billed


def scene_input(
    profile: ModelProfile,
    *,
    image_url: str,
    prompt: str | None,
    scene_seconds: float | Decimal,
    extra: Mapping[str, Any] | None = None,
    negative_prompt: str | None = None,
    last_frame_url: str | None = None,
) -> dict[str, Any]:
    """The prediction input for one scene.

    Fixed inputs first, then `extra` (MODEL_EXTRA_INPUT), then the scene's own fields, so the
    storyboard wins over both.
    """
    if not profile.per_scene:
        raise ProfileError(
            f"{profile.name} renders the whole storyboard in one prediction; use storyboard_input"
        )
    rule = profile.duration
    model_input: dict[str, Any] = {**profile.fixed_input, **(extra or {})}
    model_input[profile.image_field] = image_url
    text = prompt or profile.default_prompt
    if text and profile.prompt_field:
        model_input[profile.prompt_field] = text
    model_input[rule.field] = duration_value(profile, scene_seconds)
    if isinstance(rule, FramesDuration) and rule.fps_field:
        model_input[rule.fps_field] = rule.fps
    for value, field, what in (
        (negative_prompt, profile.negative_prompt_field, "a negative prompt"),
        (last_frame_url, profile.last_frame_field, "a last frame"),
    ):
        if value:
            if not field:
                raise ProfileError(f"The profile of {profile.name} has no field for {what}")
            model_input[field] = value
    return model_input


class SceneLike(Protocol):
    @property
    def image_url(self) -> str | None: ...
    @property
    def prompt(self) -> str | None: ...
    @property
    def duration_seconds(self) -> float: ...


def storyboard_input(
    profile: ModelProfile,
    scenes: Sequence[SceneLike],
    *,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The one prediction input for a whole-storyboard model (today's local/slideshow input)."""
    if profile.per_scene:
        raise ProfileError(f"{profile.name} renders one scene per prediction; use scene_input")
    if not scenes:
        raise ProfileError("The storyboard has no scenes")
    urls: list[str] = []
    for number, scene in enumerate(scenes, start=1):
        if not scene.image_url:
            raise ProfileError(missing_image(number))
        urls.append(scene.image_url)
    storyboard_billed_seconds(profile, [scene.duration_seconds for scene in scenes])
    model_input: dict[str, Any] = {**profile.fixed_input, **(extra or {})}
    model_input[profile.image_field] = urls
    model_input[profile.duration.field] = [scene.duration_seconds for scene in scenes]
    prompts = [scene.prompt for scene in scenes if scene.prompt]
    if prompts and profile.prompt_field:
        model_input[profile.prompt_field] = PROMPT_SEPARATOR.join(prompts)
    return model_input


def input_digest(profile: ModelProfile, model_input: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of {model without version, input}.

    The same as RenderActivities._digest, so ledger rows written before profiles still match.
    """
    canonical = json.dumps({"model": profile.name, "input": dict(model_input)}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def schema_for(profile: ModelProfile) -> dict[str, Any] | None:
    """The profile's input schema: its own, else the stored one, else None (not validated)."""
    if profile.input_schema is not None:
        return profile.input_schema
    try:
        return load_schema(profile.model)
    except UnknownSchema:
        return None


def _short(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def validate_input(profile: ModelProfile, model_input: Mapping[str, Any]) -> None:
    """Raise InputRejected if the model's schema refuses the input (types, enums, min/max,
    required fields). A profile with no schema is not checked."""
    schema = schema_for(profile)
    if schema is None:
        return
    validator = Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(dict(model_input)), key=lambda e: list(e.path))
    if errors:
        details = "; ".join(
            f"{'.'.join(str(p) for p in error.path) or 'input'}: {_short(error.message)}"
            for error in errors
        )
        raise InputRejected(f"{profile.name} would refuse this input: {details}")


def price_per_second(profile: ModelProfile, settings: Settings) -> Decimal:
    """Dollars per billed second: the profile's price, else PRICE_PER_VIDEO_SECOND."""
    if profile.price_per_second is not None:
        return profile.price_per_second
    return settings.price_per_video_second


def billed_cost(
    profile: ModelProfile, images: int, billed: Iterable[Decimal] | Decimal, settings: Settings
) -> Decimal:
    """images x PRICE_PER_IMAGE + billed seconds x the profile's price, half-up to cents."""
    total = billed if isinstance(billed, Decimal) else sum(billed, Decimal(0))
    return render_cost(
        images,
        total,
        price_per_image=settings.price_per_image,
        price_per_second=price_per_second(profile, settings),
    )


def estimate_cost(
    profile: ModelProfile, scene_seconds: Sequence[float | Decimal], settings: Settings
) -> Decimal:
    """The cost of a storyboard before rendering: one image per scene, billed seconds summed.

    Raises SceneTooLong (naming the scene) if a scene is longer than the model renders.
    """
    billed = storyboard_billed_seconds(profile, scene_seconds)
    return billed_cost(profile, len(scene_seconds), billed, settings)
