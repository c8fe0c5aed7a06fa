"""The seed's `video_renderer` module: `download_video(url, job_id=...)`, as its Manual Download
Test calls it, plus the render entry point under the name the seed's code may import."""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path

import httpx

from backend.downloads import DownloadError, stream_to_file
from backend.provider import ProviderClient
from backend.services import render_video_task, render_video_task_async
from backend.settings import get_settings

__all__ = ["DownloadError", "download_video", "render_video_task", "render_video_task_async"]

TIMEOUT = httpx.Timeout(60.0, connect=10.0)


def download_video(url: str, job_id: int) -> str:
    """Downloads `url` to DATA_DIR/videos/{job_id}/final.mp4 and returns that path.

    Synchronous, as in the seed. The same rules as a render's own download: streamed to a
    partial file and renamed into place only when whole, refused past MAX_VIDEO_BYTES, and the
    Replicate token is sent only to Replicate's own API origin, never to a CDN. Raises
    DownloadError with a readable message. From async code, call `download_video_async`.
    """
    _refuse_running_loop("download_video", "download_video_async")
    return asyncio.run(download_video_async(url, job_id))


async def download_video_async(url: str, job_id: int) -> str:
    settings = get_settings()
    if not url.lower().startswith(("http://", "https://")):
        raise DownloadError("Refusing to download a URL that is not http(s)")
    folder = settings.video_dir(job_id)
    folder.mkdir(parents=True, exist_ok=True)
    final = settings.video_path(job_id)
    partial = folder / f".download-{uuid.uuid4().hex}.part"
    provider = ProviderClient(settings)
    headers = {"Authorization": f"Bearer {settings.api_token}"} if provider.owns(url) else {}
    try:
        async with httpx.AsyncClient(timeout=TIMEOUT, follow_redirects=True) as http:
            await stream_to_file(
                http, url, partial, headers=headers, limit=settings.max_video_bytes
            )
        os.replace(partial, final)
    finally:
        partial.unlink(missing_ok=True)
    return str(Path(final).resolve())


def _refuse_running_loop(name: str, instead: str) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise RuntimeError(
        f"{name}() blocks until it is done and cannot run inside an event loop; "
        f"from async code, await backend.services.video_renderer.{instead}(...) instead"
    )
