"""The seed's entry point, kept for code written against the thread-based renderer."""

from __future__ import annotations

import asyncio
from typing import Any

from backend.database import default_store
from backend.orchestration import connect, start_render, wait_for_render
from backend.settings import get_settings


async def render_video_task_async(job_id: int) -> dict[str, Any]:
    settings = get_settings()
    store = default_store()
    client = await connect(settings)
    await start_render(client, store, settings, job_id)
    await wait_for_render(client, job_id)
    return await asyncio.to_thread(store.get, job_id)


def render_video_task(job_id: int) -> dict[str, Any]:
    """Starts the job's RenderVideo run (or joins the one going) and returns once it closes.

    Blocking, like the seed's function; the durable work happens on a worker, so a crash
    of this caller loses nothing. Returns the job as `get_job` would.
    """
    return asyncio.run(render_video_task_async(job_id))
