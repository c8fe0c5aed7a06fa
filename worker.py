"""Runs the RenderVideo worker on the task queue until SIGTERM or Ctrl-C."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta

import httpx
from temporalio.client import Client
from temporalio.worker import Worker

from activities.render import RenderActivities
from backend.database import JobStore, make_engine
from backend.orchestration import connect, ensure_search_attributes
from backend.provider import ProviderClient
from backend.settings import Settings, get_settings
from workflows.render_video import RenderVideo

log = logging.getLogger("worker")


@asynccontextmanager
async def running_worker(client: Client, settings: Settings) -> AsyncIterator[Worker]:
    """A started worker with real activities; shut down gracefully on exit."""
    store = JobStore(make_engine(settings.resolved_database_url))
    # Follows redirects because CDNs serve outputs that way; the token never rides along
    # (download_video only attaches it for the provider's own origin).
    async with httpx.AsyncClient(
        timeout=httpx.Timeout(60.0, connect=10.0), follow_redirects=True
    ) as http:
        activities = RenderActivities(store, ProviderClient(settings), settings, http)
        worker = Worker(
            client,
            task_queue=settings.task_queue,
            workflows=[RenderVideo],
            activities=activities.all(),
            graceful_shutdown_timeout=timedelta(seconds=10),
        )
        async with worker:
            yield worker


async def serve(settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    client = await connect(settings)
    await ensure_search_attributes(client, settings)
    async with running_worker(client, settings):
        log.info(
            "worker running on task queue %r at %s", settings.task_queue, settings.temporal_address
        )
        await stop.wait()
        log.info("stopping worker")
    log.info("worker stopped")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(serve(get_settings()))


if __name__ == "__main__":
    main()
