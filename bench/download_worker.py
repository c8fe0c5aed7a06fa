"""The worker process of the download benchmark: the product's `download_video` activity, built
as worker.py builds it, hosted beside a workflow that calls it with RenderVideo's options.

`python -m bench.download_worker` with the product's environment (TEMPORAL_ADDRESS, TASK_QUEUE,
DATA_DIR, ...) and BENCH_TIMINGS, a file that gets one JSON line per finished activity: its time
and this process's RSS before it and at its peak, both read here so nothing else is counted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import signal
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from temporalio import workflow
from temporalio.worker import (
    ActivityInboundInterceptor,
    ExecuteActivityInput,
    Interceptor,
    Worker,
)
from temporalio.workflow import ActivityCancellationType

with workflow.unsafe.imports_passed_through():
    from activities.media import MediaActivities
    from backend.database import JobStore, make_engine
    from backend.orchestration import connect
    from backend.provider import ProviderClient
    from backend.settings import Settings
    from bench.common import rss_kib
    from worker import download_client, worker_options
    from workflows.payloads import DownloadedVideo, DownloadVideoInput
    from workflows.render_video import DOWNLOAD_RETRY, HEARTBEAT

WORKFLOW = "BenchDownload"
log = logging.getLogger("download_worker")


@workflow.defn(name=WORKFLOW)
class BenchDownload:
    @workflow.run
    async def run(self, input: DownloadVideoInput) -> DownloadedVideo:
        # The options RenderVideo's download step uses.
        return await workflow.execute_activity_method(
            MediaActivities.download_video,
            input,
            start_to_close_timeout=timedelta(minutes=30),
            heartbeat_timeout=HEARTBEAT,
            retry_policy=DOWNLOAD_RETRY,
            cancellation_type=ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
        )


class _Timed(ActivityInboundInterceptor):
    def __init__(self, next: ActivityInboundInterceptor, out: Path) -> None:
        super().__init__(next)
        self.out = out

    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        pid = os.getpid()
        # "5" resets VmHWM to the current RSS, so the peak read after is this download's own.
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        before = rss_kib(pid)
        faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0, cpu0 = time.perf_counter(), time.process_time()
        result = await super().execute_activity(input)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
        line = {
            "job_id": input.args[0].job_id,
            "seconds": seconds,
            "cpu_seconds": cpu,
            "minor_faults": faults,
            "rss_before_kib": before,
            "hwm_kib": rss_kib(pid, "VmHWM"),
            "size": result.size_bytes,
        }
        with self.out.open("a") as f:
            f.write(json.dumps(line) + "\n")
        return result


class _Timing(Interceptor):
    def __init__(self, out: Path) -> None:
        self.out = out

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _Timed(next, self.out)


async def serve() -> None:
    settings = Settings()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    client = await connect(settings)
    store = JobStore(make_engine(settings.resolved_database_url))
    async with download_client() as http:
        acts = MediaActivities(store, ProviderClient(settings), settings, http)
        async with Worker(
            client,
            task_queue=settings.task_queue,
            workflows=[BenchDownload],
            activities=[acts.download_video],
            interceptors=[_Timing(Path(os.environ["BENCH_TIMINGS"]))],
            **worker_options(settings),
        ):
            log.info("worker running on task queue %r", settings.task_queue)
            await stop.wait()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(serve())
