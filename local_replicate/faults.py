"""Queued fault injection, consumed by creates, renders and output downloads.

Faults are queued with `POST /_admin/faults` ({"kind", "times", "delay", "detail", "match"}) or
given to a single prediction as `input._fault` (prediction kinds only). Each queued fault applies
to the next `times` operations it concerns (null: until cleared). Faults are not persisted: a
prediction resumed after a restart of the server runs without them.

`match` (create and prediction kinds) limits a queued fault to creates whose input matches, so a
test can fail one scene of a job: an object of input field -> expected value, all of which must
hold. A string matches a string field that contains it, or a list field (the slideshow's
`images`) with an item that contains it; any other value must equal the field's. A fault that
does not match is left queued, its `times` untouched. Examples:
  {"kind": "fail", "match": {"prompt": "scene 3"}}
  {"kind": "fail", "times": null, "match": {"start_image": "/scene-3.jpg"}}

The kinds:

Create calls (one at most per call, oldest first):
  rate_limit        429 problem with Retry-After: 30; nothing is created.
  server_error      500 problem; nothing is created.

Predictions (taken when a prediction is created; every queued kind can apply at once):
  fail              fails after processing starts (`detail` is the error).
  abort             ends as `aborted` before it starts (`detail` is the error).
  slow_start        stays `starting` `delay` seconds longer.
  slow_render       stays `processing` at least `delay` seconds.
  truncated         succeeds with the second half of the MP4 cut off.
  not_mp4           succeeds with a PNG as the output.
  slow_create       created and started at once, but the create response is held back `delay`
                    seconds (ending early if the client goes away); the prediction runs anyway.
  lose_webhook      no webhook at all is sent for it (counted in `webhooks_dropped`).
  duplicate_webhook its `completed` webhook, once acknowledged, is delivered again after `delay`
                    seconds with the same webhook-id, as Replicate's retries do.
  output_gone       succeeds, but its output file answers 410 Gone from `delay` seconds after
                    it succeeded (0: at once), as an expired or lost output would; the
                    prediction itself still shows the output URL.

Output downloads (one at most per request, oldest first):
  download_error    500 problem instead of the file (also on HEAD and Range requests).
  slow_download     a full GET is streamed in small chunks spread evenly over `delay` seconds;
                    the transfer stops as soon as the client disconnects.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from typing import Any

CREATE_KINDS = frozenset({"rate_limit", "server_error"})
PREDICTION_KINDS = frozenset(
    {
        "fail",
        "abort",
        "slow_start",
        "slow_render",
        "truncated",
        "not_mp4",
        "slow_create",
        "lose_webhook",
        "duplicate_webhook",
        "output_gone",
    }
)
DOWNLOAD_KINDS = frozenset({"download_error", "slow_download"})
ALL_KINDS = CREATE_KINDS | PREDICTION_KINDS | DOWNLOAD_KINDS

_ids = itertools.count(1)


class FaultSpecError(ValueError):
    pass


@dataclass
class Fault:
    kind: str
    times: int | None = 1  # None: applies until the faults are cleared
    delay: float = 0.0
    detail: str | None = None
    match: dict[str, Any] | None = None
    id: int = field(default_factory=lambda: next(_ids))

    def matches(self, inp: dict[str, Any] | None) -> bool:
        if not self.match:
            return True
        if inp is None:
            return False
        return all(_field_matches(inp.get(k), v) for k, v in self.match.items())

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_fault(body: Any, allowed: frozenset[str] = ALL_KINDS) -> Fault:
    if not isinstance(body, dict):
        raise FaultSpecError("fault must be a JSON object")
    unknown = set(body) - {"kind", "times", "delay", "detail", "match"}
    if unknown:
        raise FaultSpecError(f"unknown fault fields: {', '.join(sorted(unknown))}")
    kind = body.get("kind")
    if kind not in allowed:
        raise FaultSpecError(f"kind: must be one of {', '.join(sorted(allowed))}")
    # an absent `times` means once; an explicit null means until reset
    times = body.get("times", 1)
    if times is not None and (isinstance(times, bool) or not isinstance(times, int) or times < 1):
        raise FaultSpecError("times: must be a positive integer or null")
    delay = body.get("delay", 0.0)
    if isinstance(delay, bool) or not isinstance(delay, int | float) or delay < 0:
        raise FaultSpecError("delay: must be a non-negative number of seconds")
    detail = body.get("detail")
    if detail is not None and not isinstance(detail, str):
        raise FaultSpecError("detail: must be a string")
    match = body.get("match")
    if match is not None:
        if not isinstance(match, dict) or not match:
            raise FaultSpecError("match: must be a non-empty object of input field -> value")
        if kind in DOWNLOAD_KINDS:
            raise FaultSpecError(f"match: {kind} concerns downloads, which have no input")
    return Fault(kind=kind, times=times, delay=float(delay), detail=detail, match=match)


def _field_matches(value: Any, expected: Any) -> bool:
    if isinstance(expected, str):
        if isinstance(value, str):
            return expected in value
        if isinstance(value, list):
            return any(isinstance(item, str) and expected in item for item in value)
        return False
    return bool(value == expected)


class FaultQueue:
    """Faults in arrival order; each kind is consumed independently of the others."""

    def __init__(self) -> None:
        self._faults: list[Fault] = []

    def add(self, fault: Fault) -> None:
        self._faults.append(fault)

    def clear(self) -> int:
        n = len(self._faults)
        self._faults.clear()
        return n

    def list(self) -> list[dict[str, Any]]:
        return [f.as_dict() for f in self._faults]

    def take(self, kinds: frozenset[str], inp: dict[str, Any] | None = None) -> list[Fault]:
        """Consume one use of the oldest queued fault of each kind in `kinds` that matches
        `inp` (the create's input)."""
        taken: list[Fault] = []
        seen: set[str] = set()
        for fault in list(self._faults):
            if fault.kind not in kinds or fault.kind in seen or not fault.matches(inp):
                continue
            seen.add(fault.kind)
            taken.append(fault)
            if fault.times is not None:
                fault.times -= 1
                if fault.times <= 0:
                    self._faults.remove(fault)
        return taken

    def take_one(self, kinds: frozenset[str], inp: dict[str, Any] | None = None) -> Fault | None:
        """Consume the oldest fault among `kinds` that matches `inp` (for kinds that exclude
        each other)."""
        for fault in self._faults:
            if fault.kind in kinds and fault.matches(inp):
                return self.take(frozenset({fault.kind}), inp)[0]
        return None
