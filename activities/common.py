"""What every activity class shares: store calls off the event loop, heartbeats during long
awaits, and failures worded for a job's `error_message`."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from temporalio import activity
from temporalio.exceptions import ApplicationError

from backend.database import JobNotFound

T = TypeVar("T")

# Heartbeats go out this often during long calls, so a cancel or a dead worker is noticed
# within the activity's heartbeat timeout rather than its whole run time.
HEARTBEAT_EVERY = 1.0


def fatal(message: str, kind: str) -> ApplicationError:
    """A failure that retrying cannot mend (bad input, a broken file)."""
    return ApplicationError(message, type=kind, non_retryable=True)


async def in_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """A blocking call (SQLModel sessions, PyAV) off the worker's event loop; an unknown job
    is a failure no retry can mend."""
    try:
        return await asyncio.to_thread(fn, *args, **kwargs)
    except JobNotFound as exc:
        raise fatal(str(exc), "JobNotFound") from exc


async def heartbeating(call: Awaitable[T]) -> T:
    """Awaits `call`, heartbeating meanwhile; a cancel of the activity cancels the call (a
    call running on a thread is left to finish, unseen)."""
    task = asyncio.ensure_future(call)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=HEARTBEAT_EVERY)
            if done:
                return task.result()
            activity.heartbeat()
    finally:
        task.cancel()


def short_reason(exc: BaseException) -> str:
    """An exception in a few words for a user: its own message when it has one, never a repr,
    an address or a file path (OSError's filename is left out)."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip()
    if not text or "/" in text or "\\" in text:
        # Messages that name files or URLs on our side are not for users.
        return _words(type(exc).__name__)
    return text[:200]


def _words(name: str) -> str:
    # ReadTimeout -> "read timeout"
    out = "".join(f" {ch.lower()}" if ch.isupper() else ch for ch in name).strip()
    return out or "unknown error"
