"""The seed's entry point, kept for code written against the thread-based renderer:
`render_video_task(job_id)` (blocking) and `render_video_task_async(job_id)` (for async code).
`backend.services.video_renderer` has the seed's `download_video`."""

from __future__ import annotations

import asyncio
from typing import Any

from backend.database import default_store
from backend.orchestration import (
    TemporalUnavailable,
    connect,
    start_render,
    wait_for_render,
)
from backend.settings import get_settings

__all__ = ["TemporalUnavailable", "render_video_task", "render_video_task_async"]


async def render_video_task_async(job_id: int) -> dict[str, Any]:
    """Starts the job's RenderVideo run (or joins the one going), waits until it closes and
    returns the job as `get_job` would. Raises TemporalUnavailable when Temporal cannot be
    reached (nothing was started)."""
    settings = get_settings()
    store = default_store()
    try:
        client = await connect(settings)
    except RuntimeError:
        raise TemporalUnavailable(
            f"Temporal at {settings.temporal_address} is unavailable: start it (python3 dev.py "
            "dev runs the whole stack) or set TEMPORAL_ADDRESS"
        ) from None
    await start_render(client, store, settings, job_id)
    await wait_for_render(client, job_id, settings.workflow_id_prefix)
    return await asyncio.to_thread(store.get, job_id)


def render_video_task(job_id: int) -> dict[str, Any]:
    """Starts the job's RenderVideo run (or joins the one going) and returns once it closes.

    Blocking, like the seed's function; the durable work happens on a worker, so a crash
    of this caller loses nothing. Returns the job as `get_job` would. From async code (a
    FastAPI route, a notebook), await `render_video_task_async(job_id)` instead.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(render_video_task_async(job_id))
    raise RuntimeError(
        "render_video_task() blocks until the render ends and cannot run inside an event "
        "loop; from async code, await backend.services.render_video_task_async(job_id) instead"
    )
