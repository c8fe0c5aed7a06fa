"""Stored input schemas of the video models we know, one JSON file per model.

Each file is the model's `components.schemas.Input` as Replicate publishes it
(`GET /v1/models/{owner}/{name}` -> `latest_version.openapi_schema`), with the enum schemas
inlined so the file stands alone, and a top-level `x-source` naming where and when it was read.
The file name is `{owner}__{name}.json`. The local render server reads them to pose as each
model, so their content is part of the contract: change them only when the model changes.
"""

from __future__ import annotations

import copy
import json
from functools import lru_cache
from importlib import resources
from typing import Any


class UnknownSchema(LookupError):
    """No stored input schema for this model."""


def schema_filename(model: str) -> str:
    """`owner/name[:version]` -> `owner__name.json`."""
    name = model.partition(":")[0]
    owner, slash, rest = name.partition("/")
    if not (owner and slash and rest) or "/" in rest:
        raise UnknownSchema(f"{model!r} is not an 'owner/name' model reference")
    return f"{owner}__{rest}.json"


def available_models() -> list[str]:
    """Every model with a stored schema, as `owner/name`, sorted."""
    names = []
    for entry in resources.files(__name__).iterdir():
        if entry.name.endswith(".json") and "__" in entry.name:
            names.append(entry.name.removesuffix(".json").replace("__", "/", 1))
    return sorted(names)


@lru_cache
def _load(filename: str) -> dict[str, Any]:
    entry = resources.files(__name__) / filename
    if not entry.is_file():
        raise UnknownSchema(filename)
    return json.loads(entry.read_text(encoding="utf-8"))


def load_schema(model: str) -> dict[str, Any]:
    """The stored input schema of `owner/name` (a version suffix is ignored); a fresh copy."""
    try:
        schema = _load(schema_filename(model))
    except UnknownSchema:
        known = ", ".join(available_models())
        raise UnknownSchema(
            f"No stored input schema for {model.partition(':')[0]}; stored: {known}"
        ) from None
    return copy.deepcopy(schema)
