"""Runs the RenderVideo worker on the task queue until SIGTERM or Ctrl-C."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import httpx
from temporalio.client import Client
from temporalio.worker import Worker

from activities import all_activities
from activities.callbacks import callback_client
from backend import telemetry
from backend.database import JobStore, make_engine
from backend.logs import configure_logging
from backend.orchestration import (
    connect,
    ensure_reconcile_schedule,
    ensure_search_attributes,
    metrics_runtime,
)
from backend.provider import ProviderClient
from backend.schema import StoreNotReady
from backend.settings import Settings, get_settings
from backend.storage import S3Storage, storage_for
from workflows.deliver_event import DeliverJobEvent
from workflows.reconcile import ReconcileJobs
from workflows.render_scene import RenderScene
from workflows.render_video import RenderVideo

log = logging.getLogger("worker")

# mallopt's parameter number for the arena cap (glibc's malloc.h).
M_ARENA_MAX = -8


def worker_options(settings: Settings) -> dict[str, Any]:
    """Shared with the benchmarks' bare worker, so both run on the same settings."""
    return {
        # On SIGTERM the worker polls no more and lets what it holds finish for this long;
        # what has not finished by then is cancelled and its attempt failed at once as
        # "WorkerShutdown" (the SDK does it; retryable), so another worker retries it without
        # waiting for a heartbeat timeout (tests/test_scale_out.py).
        "graceful_shutdown_timeout": timedelta(seconds=settings.worker_shutdown_grace_seconds),
        "max_cached_workflows": settings.worker_max_cached_workflows,
        "sticky_queue_schedule_to_start_timeout": timedelta(seconds=settings.worker_sticky_seconds),
    }


def limit_malloc_arenas(arenas: int) -> bool:
    """Caps glibc's malloc arenas, as MALLOC_ARENA_MAX would; False where it does not apply
    (turned off, MALLOC_ARENA_MAX already set, not glibc). glibc fixes the cap when a second
    thread first needs an arena, so this runs before any thread starts."""
    if arenas <= 0 or "MALLOC_ARENA_MAX" in os.environ or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_ARENA_MAX, arenas))


def creates_per_second(settings: Settings) -> float:
    """The creates queue's rate. Temporal's limiter lets a second's worth through at once on
    top of its rate, so a sliding minute can see 61 seconds' worth: a 61st of the provider's
    limit per second keeps every minute within it (at 60ths, a benchmark run saw 600 creates in
    a minute and 9 refused with 429)."""
    return settings.provider_creates_per_minute / 61


def download_client() -> httpx.AsyncClient:
    """The activities' HTTP client. It follows redirects because CDNs serve outputs that way;
    the token never rides along (download_video only attaches it for the provider's origin)."""
    return httpx.AsyncClient(timeout=httpx.Timeout(60.0, connect=10.0), follow_redirects=True)


@asynccontextmanager
async def running_worker(
    client: Client, settings: Settings, store: JobStore | None = None
) -> AsyncIterator[Worker]:
    """A started worker with real activities; shut down gracefully on exit.

    Two pollers: the render queue (workflows and most activities) and the creates queue,
    whose rate limit Temporal holds across every worker polling it, so all of them together
    stay under the provider's limit on creates. Without `store`, it opens the settings' one,
    which must be at this release's schema (StoreBehind otherwise).
    """
    store = store or JobStore(make_engine(settings.resolved_database_url))
    storage = storage_for(settings)
    if isinstance(storage, S3Storage):
        storage.clean_scratch()
    async with download_client() as http, callback_client() as callbacks:
        video_threads = ThreadPoolExecutor(settings.media_threads, thread_name_prefix="media")
        activities = all_activities(
            store,
            ProviderClient(settings),
            settings,
            http,
            client,
            callbacks,
            storage,
            video_threads,
        )
        creates = [fn for fn in activities if fn.__name__ == "start_prediction"]
        worker = Worker(
            client,
            task_queue=settings.task_queue,
            workflows=[RenderVideo, RenderScene, ReconcileJobs, DeliverJobEvent],
            activities=[fn for fn in activities if fn not in creates],
            **worker_options(settings),
        )
        creator = Worker(
            client,
            task_queue=settings.create_task_queue,
            activities=creates,
            max_task_queue_activities_per_second=creates_per_second(settings),
            graceful_shutdown_timeout=worker_options(settings)["graceful_shutdown_timeout"],
        )
        try:
            async with worker, creator:
                # Once something runs its workflow: the safety net for job/workflow agreement.
                await ensure_reconcile_schedule(client, settings)
                yield worker
        finally:
            # After the graceful shutdown: what is still decoding was cancelled and is not
            # waited for.
            video_threads.shutdown(wait=False, cancel_futures=True)
            store.engine.dispose()


async def serve(settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    # The store first: a store that is behind stops the worker before it takes any task.
    store = JobStore(make_engine(settings.resolved_database_url))
    client = await connect(settings, runtime=metrics_runtime(settings))
    await ensure_search_attributes(client, settings)
    async with running_worker(client, settings, store):
        log.info(
            "worker running on task queue %r at %s", settings.task_queue, settings.temporal_address
        )
        if settings.worker_metrics_address:
            log.info("metrics at http://%s/metrics", settings.worker_metrics_address)
        await stop.wait()
        log.info("stopping worker")
    log.info("worker stopped")


def main() -> None:
    settings = get_settings()
    limit_malloc_arenas(settings.worker_malloc_arenas)
    configure_logging(settings.log_format)
    # Before the client connects: its plugin is only added with tracing on.
    telemetry.setup_tracing(telemetry.WORKER_SERVICE)
    try:
        asyncio.run(serve(settings))
    except StoreNotReady as exc:
        log.error("%s", exc)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
