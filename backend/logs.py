"""Log lines for people (LOG_FORMAT=text) or for a log pipeline (LOG_FORMAT=json): one JSON
object a line, with the job, the workflow and the trace each line belongs to."""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

from backend import telemetry

TEXT_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
# The loggers uvicorn configures with handlers of its own (its access log among them).
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")
# render-video-{job}, and its scene children render-video-{job}-scene-{n}; a deployment may put
# a prefix in front.
_JOB_WORKFLOW = re.compile(r"(?:^|-)render-video-(\d+)(?:-scene-[0-9a-z]+)?$")
# What LogRecord carries on its own: everything else on a record came in as `extra`.
_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
# Extras shown another way: Temporal's details as fields above, uvicorn's message with colours.
_SKIPPED = frozenset({"temporal_activity", "temporal_workflow", "color_message"})


def job_id_of(workflow_id: str | None) -> int | None:
    """The job a RenderVideo or RenderScene run renders, from its workflow id."""
    if not workflow_id:
        return None
    match = _JOB_WORKFLOW.search(workflow_id)
    return int(match.group(1)) if match else None


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message; `job_id` and `workflow_id`
    from Temporal's activity or workflow details (temporalio's `activity.logger` and
    `workflow.logger` put them in `extra`) or from the caller's own `extra`; `trace_id` and
    `span_id` of the span current when the line was logged; `exception` with the traceback."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        temporal = getattr(record, "temporal_activity", None) or getattr(
            record, "temporal_workflow", None
        )
        if isinstance(temporal, dict):
            entry["workflow_id"] = temporal.get("workflow_id")
            entry["job_id"] = job_id_of(temporal.get("workflow_id"))
            for key in ("workflow_type", "activity_type", "attempt", "run_id", "workflow_run_id"):
                if temporal.get(key) is not None:
                    entry[key] = temporal[key]
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in _SKIPPED and not key.startswith("_"):
                entry[key] = value if _plain(value) else str(value)
        if entry.get("job_id") is None and entry.get("workflow_id"):
            entry["job_id"] = job_id_of(str(entry["workflow_id"]))
        ids = telemetry.current_trace_ids()
        if ids is not None:
            entry["trace_id"], entry["span_id"] = ids
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def formatter(log_format: str) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)


def configure_logging(log_format: str, level: int = logging.INFO) -> None:
    """Sends this process's logs to stderr in `log_format`; uvicorn's own handlers (its error
    and access logs) get the same formatter. Safe to call more than once."""
    chosen = formatter(log_format)
    root = logging.getLogger()
    ours = [h for h in root.handlers if getattr(h, "_render_video", False)]
    if not ours:
        handler = logging.StreamHandler(sys.stderr)
        handler._render_video = True  # type: ignore[attr-defined]
        root.addHandler(handler)
        ours = [handler]
    for handler in ours:
        handler.setFormatter(chosen)
    root.setLevel(level)
    for name in UVICORN_LOGGERS:
        for handler in logging.getLogger(name).handlers:
            handler.setFormatter(chosen)
    if log_format == "json":
        # The details are fields of their own; appended to the message they would be twice.
        from temporalio import activity, workflow

        activity.logger.activity_info_on_message = False
        workflow.logger.workflow_info_on_message = False
