"""The models the server runs, each with the input schema Replicate would publish for it.

- `local/slideshow` (also under the old default name `local-replicate/slideshow`, and for creates
  by any version id it does not know): a list of images with a duration each; its input is
  checked when it renders, and bad input fails the prediction, as before.
- `local/i2v`: one image and a prompt make one clip, a slow zoom and pan over the image.
- Posed models: real image-to-video models (`kwaivgi/kling-v2.1`, ...) served from their stored
  input schemas (`<owner>__<name>.json`). A create is checked against the schema as Replicate
  checks it (422 "Input validation failed"); the clip takes its image from the model's image
  field and its length from its duration field (or a frame count at the model's fps).

`local/i2v` and posed models check input when the prediction is created.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import jsonschema
from jsonschema.exceptions import SchemaError

from .config import ConfigError
from .render import (
    DEFAULT_FPS,
    ClipJob,
    InputError,
    RenderJob,
    is_image_url,
    parse_input,
)

SLIDESHOW = "local/slideshow"
I2V = "local/i2v"
# what creates by version id reported before models were routed by name
LEGACY_SLIDESHOW = "local-replicate/slideshow"
VERSION_CREATED_AT = "2025-01-01T00:00:00.000000Z"
COG_VERSION = "0.16.8"
# a posed model's clip size when its input names none (Kling `standard`, Luma 720p, ...)
DEFAULT_CLIP_HEIGHT = 720
DEFAULT_CLIP_SECONDS = 5
# a bound for schemas that set none: a minute at 120 fps
MAX_CLIP_FRAMES = 7200

# where the pipeline keeps the stored schemas of the models it can use
SCHEMA_FILE = re.compile(r"^([A-Za-z0-9_.-]+?)__([A-Za-z0-9_.-]+)\.json$")

# Input field names, in order of preference, that image-to-video models use for their parts
IMAGE_FIELDS = ("start_image", "first_frame_image", "image", "input_image", "init_image")
DURATION_FIELDS = ("duration", "duration_seconds", "seconds")
FRAME_FIELDS = ("num_frames", "frames", "frame_count")
FPS_FIELDS = ("fps", "frames_per_second", "frame_rate")

# The built-in models' input schemas; backend/model_schemas/local__*.json hold the same (a test
# keeps them equal), as the pipeline's stored copies of what this server publishes.
SLIDESHOW_SCHEMA: dict[str, Any] = {
    "type": "object",
    "title": "Input",
    "required": ["images"],
    "properties": {
        "images": {
            "type": "array",
            "title": "Images",
            "items": {"type": "string", "format": "uri"},
            "minItems": 1,
            "x-order": 0,
            "description": "Scene images in order (http(s) or data: URLs).",
        },
        "durations": {
            "type": "array",
            "title": "Durations",
            "items": {"type": "number", "exclusiveMinimum": 0},
            "x-order": 1,
            "description": "Seconds each image is shown, one per image; default 2 each.",
        },
        "prompt": {
            "type": "string",
            "title": "Prompt",
            "x-order": 2,
            "description": "The scenes' prompts, joined with ' / '.",
        },
        "width": {
            "type": "integer",
            "title": "Width",
            "default": 1280,
            "minimum": 16,
            "maximum": 3840,
            "multipleOf": 2,
            "x-order": 3,
            "description": "Video width in pixels (even).",
        },
        "height": {
            "type": "integer",
            "title": "Height",
            "default": 720,
            "minimum": 16,
            "maximum": 3840,
            "multipleOf": 2,
            "x-order": 4,
            "description": "Video height in pixels (even).",
        },
        "fps": {
            "type": "integer",
            "title": "Fps",
            "default": 24,
            "minimum": 1,
            "maximum": 120,
            "x-order": 5,
            "description": "Frames per second.",
        },
    },
}

I2V_SCHEMA: dict[str, Any] = {
    "type": "object",
    "title": "Input",
    "required": ["image"],
    "properties": {
        "image": {
            "type": "string",
            "title": "Image",
            "format": "uri",
            "x-order": 0,
            "description": "The scene's image (http(s) or data: URL); the video starts on it.",
        },
        "prompt": {
            "type": "string",
            "title": "Prompt",
            "x-order": 1,
            "description": "Text prompt for the scene.",
        },
        "duration": {
            "type": "integer",
            "title": "Duration",
            "default": 5,
            "minimum": 1,
            "maximum": 10,
            "x-order": 2,
            "description": "Length of the video in whole seconds.",
        },
        "fps": {
            "type": "integer",
            "title": "Fps",
            "default": 24,
            "minimum": 1,
            "maximum": 120,
            "x-order": 3,
            "description": "Frames per second.",
        },
        "width": {
            "type": "integer",
            "title": "Width",
            "default": 1280,
            "minimum": 16,
            "maximum": 3840,
            "multipleOf": 2,
            "x-order": 4,
            "description": "Video width in pixels (even: H.264 with yuv420p needs it).",
        },
        "height": {
            "type": "integer",
            "title": "Height",
            "default": 720,
            "minimum": 16,
            "maximum": 3840,
            "multipleOf": 2,
            "x-order": 5,
            "description": "Video height in pixels (even).",
        },
    },
}


class ModelConfigError(ConfigError):
    """A stored schema is missing or unusable; raised when the app is created."""


@dataclass(frozen=True)
class InvalidField:
    """One reason a create's input was refused, in the shape of Replicate's `invalid_fields`."""

    type: str
    field: str
    description: str


class InputInvalid(Exception):
    def __init__(self, fields: list[InvalidField]) -> None:
        super().__init__("; ".join(f"{f.field}: {f.description}" for f in fields))
        self.fields = fields


@dataclass(frozen=True)
class ClipFields:
    """Which input fields of an image-to-video model carry the parts of the clip."""

    image: str
    duration: str | None = None
    frames: str | None = None
    fps: str | None = None
    width: str | None = None
    height: str | None = None
    resolution: str | None = None
    aspect_ratio: str | None = None
    mode: str | None = None

    @classmethod
    def infer(cls, name: str, properties: dict[str, Any], components: dict[str, Any]) -> ClipFields:
        def first(names: Iterable[str]) -> str | None:
            return next((n for n in names if n in properties), None)

        image = first(IMAGE_FIELDS)
        if image is None:
            raise ModelConfigError(f"{name}: its input schema has no image field")
        mode = _resolve(properties.get("mode"), components)
        return cls(
            image=image,
            duration=first(DURATION_FIELDS),
            frames=first(FRAME_FIELDS),
            fps=first(FPS_FIELDS),
            width="width" if "width" in properties else None,
            height="height" if "height" in properties else None,
            resolution="resolution" if "resolution" in properties else None,
            aspect_ratio="aspect_ratio" if "aspect_ratio" in properties else None,
            mode="mode" if {"standard", "pro"} <= set(mode.get("enum", [])) else None,
        )


@dataclass
class Model:
    name: str  # owner/name
    description: str
    schema: dict[str, Any]  # Replicate's components.schemas.Input
    kind: Literal["slideshow", "i2v"]
    # components the schema's $refs point into (cog puts enums there)
    components: dict[str, Any]
    clip: ClipFields | None = None
    # clips are scaled down to at most this height (ServerConfig.clip_max_height)
    max_height: int | None = None

    def __post_init__(self) -> None:
        root = {**_jsonschema(self.schema), "components": {"schemas": _jsonschema(self.components)}}
        try:
            jsonschema.Draft7Validator.check_schema(root)
        except SchemaError as exc:
            problem = f"{self.name}: not a usable input schema ({exc.message})"
            raise ModelConfigError(problem) from exc
        _check_refs(self.name, self.schema, self.components)
        self._validator = jsonschema.Draft7Validator(root)
        canonical = json.dumps([self.name, self.schema, self.components], sort_keys=True)
        # stable across restarts, and the 64 hex digits of Replicate's version ids
        self.version = hashlib.sha256(canonical.encode()).hexdigest()

    @property
    def owner(self) -> str:
        return self.name.partition("/")[0]

    @property
    def short_name(self) -> str:
        return self.name.partition("/")[2]

    @property
    def validates_on_create(self) -> bool:
        return self.kind == "i2v"

    def properties(self) -> dict[str, Any]:
        props: dict[str, Any] = self.schema.get("properties", {})
        return props

    def validate(self, inp: dict[str, Any]) -> None:
        """Raise InputInvalid, listing every problem, unless `inp` fits the schema.

        `_fault` (a test device) is not part of any model's input and is not checked.
        """
        data = {k: v for k, v in inp.items() if k != "_fault"}
        props = self.properties()
        problems = [
            InvalidField("required", "input", f"{name} is required")
            for name in self.schema.get("required", [])
            if name not in data
        ]
        problems += [
            InvalidField(
                "additional_property_not_allowed",
                "input",
                f"Additional property {k} is not allowed",
            )
            for k in sorted(set(data) - set(props))
        ]
        for error in sorted(self._validator.iter_errors(data), key=lambda e: list(e.path)):
            if not error.path and error.validator in ("required", "additionalProperties"):
                continue  # reported above, by name
            problems.append(_describe(error))
        for name, prop in props.items():
            value = data.get(name)
            if _resolve(prop, self.components).get("format") == "uri" and value is not None:
                if isinstance(value, str) and not is_image_url(value):
                    problems.append(
                        InvalidField("format", f"input.{name}", "Must be an http(s) or data: URL")
                    )
        if problems:
            raise InputInvalid(problems)

    def plan(self, inp: dict[str, Any]) -> RenderJob | ClipJob:
        """The render this input asks for; raises InputError."""
        if self.kind == "slideshow":
            return parse_input(inp)
        assert self.clip is not None
        values = {**self.defaults(), **{k: v for k, v in inp.items() if v is not None}}
        # models that also make video from text alone take no image; checked at create
        image = values.get(self.clip.image)
        if image is not None and not is_image_url(image):
            raise InputError(f"{self.clip.image}: must be an http(s) or data: URL")
        fps = _whole(values.get(self.clip.fps), DEFAULT_FPS) if self.clip.fps else DEFAULT_FPS
        fps = max(1, min(fps, 120))
        if self.clip.frames and values.get(self.clip.frames) is not None:
            frames = _whole(values[self.clip.frames], fps * DEFAULT_CLIP_SECONDS)
        elif self.clip.duration and values.get(self.clip.duration) is not None:
            frames = round(_seconds(values[self.clip.duration]) * fps)
        else:
            frames = fps * DEFAULT_CLIP_SECONDS
        if not 1 <= frames <= MAX_CLIP_FRAMES:
            raise InputError(f"the clip must have 1 to {MAX_CLIP_FRAMES} frames, not {frames}")
        width, height = self._size(values)
        prompt = values.get("prompt")
        return ClipJob(
            image=image,
            frames=frames,
            width=width,
            height=height,
            fps=fps,
            field=self.clip.image,
            prompt=prompt if isinstance(prompt, str) else "",
        )

    def _size(self, values: dict[str, Any]) -> tuple[int, int]:
        assert self.clip is not None
        if self.clip.width and self.clip.height:
            width = _whole(values.get(self.clip.width), 1280)
            height = _whole(values.get(self.clip.height), 720)
        else:
            lines = DEFAULT_CLIP_HEIGHT
            named = re.search(r"(\d{3,4})p\b", self.name)
            if named:
                lines = int(named.group(1))
            if self.clip.mode:
                lines = 1080 if values.get(self.clip.mode) == "pro" else 720
            if self.clip.resolution:
                found = re.search(r"(\d{3,4})p", str(values.get(self.clip.resolution, "")), re.I)
                if found:
                    lines = int(found.group(1))
            aspect = (16, 9)
            if self.clip.aspect_ratio:
                parts = re.fullmatch(r"(\d+):(\d+)", str(values.get(self.clip.aspect_ratio, "")))
                if parts and int(parts.group(1)) and int(parts.group(2)):
                    aspect = (int(parts.group(1)), int(parts.group(2)))
            # the "p" figure is the short side, as for 9:16 clips
            if aspect[0] >= aspect[1]:
                width, height = lines * aspect[0] / aspect[1], float(lines)
            else:
                width, height = float(lines), lines * aspect[1] / aspect[0]
            width, height = round(width), round(height)
        if self.max_height and height > self.max_height:
            width, height = width * self.max_height / height, self.max_height
        # yuv420p needs even sides
        return max(2, 2 * round(width / 2)), max(2, 2 * round(height / 2))

    def defaults(self) -> dict[str, Any]:
        return {
            name: prop["default"]
            for name, prop in self.properties().items()
            if isinstance(prop, dict) and "default" in prop
        }

    def to_json(self, base_url: str, run_count: int) -> dict[str, Any]:
        """The answer of GET /v1/models/{owner}/{name}."""
        schemas: dict[str, Any] = {
            "Input": self.schema,
            "Output": {"type": "string", "format": "uri", "title": "Output"},
            **self.components,
        }
        return {
            "url": f"{base_url}/{self.name}",
            "owner": self.owner,
            "name": self.short_name,
            "description": self.description,
            "visibility": "public",
            "is_official": True,
            "github_url": None,
            "paper_url": None,
            "license_url": None,
            "run_count": run_count,
            "cover_image_url": None,
            "default_example": None,
            "latest_version": {
                "id": self.version,
                "created_at": VERSION_CREATED_AT,
                # a string, as Replicate sends (the replicate client refuses null)
                "cog_version": COG_VERSION,
                "openapi_schema": {
                    "openapi": "3.0.2",
                    "info": {"title": "Cog", "version": "0.1.0"},
                    "paths": {},
                    "components": {"schemas": schemas},
                },
            },
        }


def _whole(value: Any, default: int) -> int:
    if isinstance(value, bool) or value is None:
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        return default
    return round(number) if math.isfinite(number) else default


def _seconds(value: Any) -> float:
    """A duration field's value in seconds: 5, 5.0, "5" or "5s"."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*s?\s*", str(value))
    if not match:
        raise InputError(f"duration: cannot read {str(value)[:20]!r} as seconds")
    return float(match.group(1))


def _jsonschema(node: Any) -> Any:
    """OpenAPI 3.0 schema to JSON Schema: `nullable` becomes a type union, a boolean
    exclusiveMinimum/Maximum (draft 4) becomes the draft 7 number."""
    if isinstance(node, list):
        return [_jsonschema(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _jsonschema(v) for k, v in node.items() if k != "nullable"}
    if node.get("nullable") and isinstance(node.get("type"), str):
        out["type"] = [node["type"], "null"]
    for key, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(node.get(key), bool):
            if node[key] and bound in node:
                out[key] = node[bound]
                out.pop(bound, None)
            else:
                out.pop(key, None)
    return out


def _check_refs(name: str, node: Any, components: dict[str, Any]) -> None:
    if isinstance(node, list):
        for item in node:
            _check_refs(name, item, components)
    elif isinstance(node, dict):
        ref = node.get("$ref")
        if ref is not None:
            prefix = "#/components/schemas/"
            if not (isinstance(ref, str) and ref.startswith(prefix)):
                raise ModelConfigError(f"{name}: unsupported $ref {ref!r}")
            if ref[len(prefix) :] not in components:
                raise ModelConfigError(f"{name}: $ref {ref!r} points at nothing")
        for value in node.values():
            _check_refs(name, value, components)


def _resolve(prop: Any, components: dict[str, Any]) -> dict[str, Any]:
    """A property with cog's `allOf: [{$ref}]` enums merged in, for reading its format."""
    if not isinstance(prop, dict):
        return {}
    merged = dict(prop)
    for part in prop.get("allOf", []):
        ref = part.get("$ref", "") if isinstance(part, dict) else ""
        target = components.get(ref.rpartition("/")[2]) if ref else None
        if isinstance(target, dict):
            merged = {**target, **merged}
    return merged


_JSON_TYPES = (
    (bool, "boolean"),
    (int, "integer"),
    (float, "number"),
    (str, "string"),
    (list, "array"),
    (dict, "object"),
)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return next((name for kind, name in _JSON_TYPES if isinstance(value, kind)), "unknown")


def _describe(error: jsonschema.ValidationError) -> InvalidField:
    """One jsonschema error in the words of Replicate's validator (gojsonschema's)."""
    path = [str(p) for p in error.absolute_path]
    field = ".".join(["input", *path])
    name = path[-1] if path else "input"
    value = error.validator_value
    kind = str(error.validator)
    if kind == "type":
        expected = value if isinstance(value, str) else ", ".join(value)
        text = f"Invalid type. Expected: {expected}, given: {_json_type(error.instance)}"
        return InvalidField("invalid_type", field, text)
    if kind == "enum":
        allowed = ", ".join(json.dumps(v) for v in value)
        return InvalidField("enum", field, f"{name} must be one of the following: {allowed}")
    words = {
        "minimum": ("number_gte", "Must be greater than or equal to {}"),
        "maximum": ("number_lte", "Must be less than or equal to {}"),
        "exclusiveMinimum": ("number_gt", "Must be greater than {}"),
        "exclusiveMaximum": ("number_lt", "Must be less than {}"),
        "multipleOf": ("multiple_of", "Must be a multiple of {}"),
        "minLength": ("string_gte", "String length must be greater than or equal to {}"),
        "maxLength": ("string_lte", "String length must be less than or equal to {}"),
        "minItems": ("array_min_items", "Array must have at least {} items"),
        "maxItems": ("array_max_items", "Array must have at most {} items"),
        "pattern": ("pattern", "Does not match pattern {}"),
    }
    if kind in words:
        code, template = words[kind]
        return InvalidField(code, field, template.format(json.dumps(value)))
    return InvalidField(kind, field, error.message[:200])


class ModelRegistry:
    """The built-in models and the posed ones, by name and by version id."""

    def __init__(self, models: list[Model], aliases: dict[str, str]) -> None:
        self._by_name = {m.name: m for m in models}
        self._aliases = aliases
        self._by_version = {m.version: m for m in models}

    @property
    def slideshow(self) -> Model:
        return self._by_name[SLIDESHOW]

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def posed(self) -> list[str]:
        return [n for n in self.names() if n not in (SLIDESHOW, I2V)]

    def get(self, name: str) -> Model | None:
        return self._by_name.get(self._aliases.get(name, name))

    def for_version(self, version: str) -> Model | None:
        return self._by_version.get(version)

    def resolve(self, name: str, version: str) -> Model:
        """The model a stored prediction runs on; unknown names run the slideshow, as before."""
        return self.get(name) or self.for_version(version) or self.slideshow


def default_schemas_dir() -> Path | None:
    """backend/model_schemas of this project, where the pipeline keeps the models' schemas."""
    spec = importlib.util.find_spec("backend")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "model_schemas"


def stored_schemas(directory: Path | None) -> dict[str, Path]:
    """`owner/name` -> schema file, for every stored schema in `directory`."""
    if directory is None or not directory.is_dir():
        return {}
    found: dict[str, Path] = {}
    for path in sorted(directory.iterdir()):
        match = SCHEMA_FILE.match(path.name)
        if match:
            found[f"{match.group(1)}/{match.group(2)}"] = path
    return found


def load_posed(name: str, path: Path, max_height: int | None) -> Model:
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelConfigError(f"{name}: cannot read its stored schema {path.name}") from exc
    if not isinstance(stored, dict):
        raise ModelConfigError(f"{name}: {path.name} is not a JSON object")
    # either the Input schema itself (optionally with the components its $refs need), or a
    # whole openapi_schema as GET /v1/models answers
    holder = stored.get("components")
    components = holder.get("schemas") if isinstance(holder, dict) else None
    components = components if isinstance(components, dict) else {}
    schema = components.get("Input") if "properties" not in stored else stored
    if not isinstance(schema, dict) or not isinstance(schema.get("properties"), dict):
        raise ModelConfigError(f"{name}: {path.name} holds no input schema with properties")
    # x-source is the pipeline's note of where the schema was read, not part of it
    schema = {k: v for k, v in schema.items() if k not in ("components", "x-source")}
    components = {k: v for k, v in components.items() if k not in ("Input", "Output")}
    clip = ClipFields.infer(name, schema["properties"], components)
    description = str(schema.get("description") or f"{name}, posed by the local render server")
    return Model(name, description, schema, "i2v", components, clip, max_height)


def build_registry(
    pose: Iterable[str] | None,
    schemas_dir: Path | None,
    legacy_name: str,
    max_height: int | None = None,
) -> ModelRegistry:
    """The built-in models, and the posed ones (`pose` None: every stored non-local schema)."""
    models = [
        Model(
            SLIDESHOW,
            "A slideshow of the scene images, one prediction for a whole storyboard",
            SLIDESHOW_SCHEMA,
            "slideshow",
            {},
        ),
        Model(
            I2V,
            "One image and a prompt make one clip: a slow zoom and pan over the image",
            I2V_SCHEMA,
            "i2v",
            {},
            ClipFields("image", "duration", fps="fps", width="width", height="height"),
            max_height,
        ),
    ]
    stored = stored_schemas(schemas_dir)
    wanted = [n for n in stored if not n.startswith("local/")] if pose is None else list(pose)
    for name in wanted:
        if name in (SLIDESHOW, I2V):
            continue  # built in
        if name not in stored:
            where = schemas_dir if schemas_dir is not None else "the schemas folder"
            raise ModelConfigError(f"cannot pose as {name}: no stored schema for it in {where}")
        models.append(load_posed(name, stored[name], max_height))
    aliases = {legacy_name: SLIDESHOW, LEGACY_SLIDESHOW: SLIDESHOW}
    return ModelRegistry(models, aliases)
