"""What RenderVideo and RenderScene share: retry policies, search attributes, and failures in
words fit for a job's `error_message` (standard library and temporalio only)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from datetime import timedelta
from typing import TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy, SearchAttributeKey
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    ChildWorkflowError,
    RetryState,
    TimeoutType,
)
from temporalio.exceptions import (
    TimeoutError as TemporalTimeoutError,
)

T = TypeVar("T")

# Find a job's runs (the job's and its scenes') with `temporal workflow list -q "JobId = '12'"`,
# or by stage.
JOB_ID = SearchAttributeKey.for_keyword("JobId")
RENDER_STAGE = SearchAttributeKey.for_keyword("RenderStage")
SEARCH_ATTRIBUTES = (JOB_ID, RENDER_STAGE)

TERMINAL = frozenset({"succeeded", "failed", "canceled", "aborted"})

# Validation and bad-input errors carry these types; retrying them cannot help.
NON_RETRYABLE = [
    "StoryboardInvalid",
    "JobNotFound",
    "InvalidVideo",
    "InvalidClip",
    "VideoTooLarge",
    "VideoGone",
    "BadRequest",
    "OutputNotWritable",
    "LedgerConflict",
]
# Failures our activities and workflows word for users; anything else is described by its step.
OUR_ERRORS = frozenset(
    [
        *NON_RETRYABLE,
        "ProviderUnavailable",
        "ProviderThrottled",
        "DownloadFailed",
        "StorageError",
        "SameInputInFlight",
        "RenderFailed",
        "ReviewExpired",
        "SceneFailed",
    ]
)

QUICK = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=30),
    maximum_attempts=5,
    non_retryable_error_types=NON_RETRYABLE,
)
# Throttling (429, waited out as long as the provider says), provider outages and another
# job's create of the same input pass within minutes (bounded by CREATE_WINDOW); a bad request
# fails at once.
PROVIDER_CREATE = RetryPolicy(
    initial_interval=timedelta(seconds=5),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=60),
    non_retryable_error_types=NON_RETRYABLE,
)
CREATE_WINDOW = timedelta(minutes=15)
# The seed's download retries: 3 attempts. A failed transfer waits 30 s, then 90 s (the
# activity asks for those delays with its error); an attempt lost with its worker (a heartbeat
# timeout) is retried at once, so a crash does not wait out a backoff meant for a flaky CDN.
DOWNLOAD_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=1.0,
    maximum_attempts=3,
    non_retryable_error_types=NON_RETRYABLE,
)
# Closing a job must not be lost to a database blip: keep trying for a day.
PERSISTENT = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=1),
)
# Long calls heartbeat every second: a dead worker or a cancel is noticed this fast.
HEARTBEAT = timedelta(seconds=5)


class RenderFailed(Exception):
    """A failure already explained in words fit for the job's `error_message`."""


class ReviewExpired(RenderFailed):
    """Nobody approved the job within its review window."""


def set_stage(stage: str, message: str, previous: str) -> None:
    """Shows the stage in the Web UI and, where the run carries JobId, in RenderStage."""
    workflow.set_current_details(f"**{stage}**: {message}")
    # Only where the starter set JobId: a namespace without the attributes still renders.
    if stage != previous and workflow.info().typed_search_attributes.get(JOB_ID) is not None:
        workflow.upsert_search_attributes([RENDER_STAGE.value_set(stage)])


async def uncancellable(work: Awaitable[T]) -> T:
    """Awaits `work` to its end even if the run is cancelled meanwhile."""
    task = asyncio.ensure_future(work)
    while True:
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done():
                return task.result()


def is_schedule_to_close_timeout(err: ActivityError) -> bool:
    # When the next retry would pass the deadline, the server ends the activity with the
    # last attempt's failure and retry state TIMEOUT, not with a TimeoutError.
    cause = err.cause
    if isinstance(cause, TemporalTimeoutError) and cause.type == TimeoutType.SCHEDULE_TO_CLOSE:
        return True
    return err.retry_state == RetryState.TIMEOUT


def error_type(err: BaseException) -> str | None:
    """The ApplicationError type an activity or child failed with, if any."""
    if isinstance(err, ActivityError | ChildWorkflowError) and isinstance(
        err.cause, ApplicationError
    ):
        return err.cause.type
    return None


def explain(err: BaseException) -> str:
    """The most specific human message in a failure chain."""
    if isinstance(err, RenderFailed):
        return str(err)
    if isinstance(err, ActivityError | ChildWorkflowError):
        step = err.activity_type if isinstance(err, ActivityError) else err.workflow_type
        cause = err.cause
        if isinstance(cause, ApplicationError):
            if cause.type in OUR_ERRORS:
                return cause.message
            # An unexpected error's text may name files or objects on a server: the step and
            # the kind of error are what a user can act on (the worker's log has the rest).
            return f"Step {step} failed ({cause.type or 'unexpected error'})"
        if isinstance(cause, TemporalTimeoutError):
            kind = cause.type.name.lower() if cause.type else "timeout"
            return f"Step {step} timed out ({kind})"
        if cause is not None:
            return f"Step {step} failed ({type(cause).__name__})"
        return f"Step {step} failed"
    if isinstance(err, ApplicationError):
        return err.message
    return f"Render failed ({type(err).__name__})"


def duration_words(seconds: float) -> str:
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            count = int(seconds // size)
            return f"{count} {unit}{'s' if count != 1 else ''}"
    return f"{seconds:g} second{'s' if seconds != 1 else ''}"
