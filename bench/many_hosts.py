"""Many hosts: jobs per minute with 1, 2 and 3 worker processes behind 2 API processes.

The deployment the many-hosts test runs (tests/hosts.py: API processes and workers as
subprocesses, a PostgreSQL job store, shared video storage, webhooks from the local render
server, `local/i2v` clips of 64p) on an in-memory Temporal dev server. For each worker count a
fresh deployment (its own database and task queue) renders BENCH_MANY_HOSTS_JOBS jobs of 5
one-second scenes, all approved at once; the figure is scenes rendered per second from the
first create to the last job completed, against one worker's. The render server runs in this
process on 2 threads; on a 2-core machine more workers add little CPU to share, so the ratios
say how much orchestration overlaps, not how a cluster of machines scales.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from local_replicate.config import ServerConfig
from local_replicate.testing import RunningServer

from .common import ROOT, CpuMeter, Figure, Result, run_bench
from .stack import temporal_pid, temporal_server, workdir

# The deployment's process plumbing is the tests' (one module for both).
sys.path.insert(0, str(ROOT / "tests"))
from hosts import running_deployment, storage  # noqa: E402
from processes import throwaway_postgres, wait_until  # noqa: E402
from support import make_settings  # noqa: E402

JOBS = int(os.environ.get("BENCH_MANY_HOSTS_JOBS", "40"))
SCENES = 5
WORKER_COUNTS = (1, 2, 3)
DONE = ("completed", "failed", "cancelled", "expired")


async def _run(workers: int, address: str, renderer: RunningServer, work: Path) -> dict[str, Any]:
    renderer.reset()
    folder = work / f"workers-{workers}"
    with throwaway_postgres() as url, storage(folder) as storage_env:
        settings = make_settings(
            folder / "settings",
            address,
            renderer.base_url,
            database_url=url,
            replicate_model="local/i2v",
            workflow_id_prefix=f"bench-{uuid.uuid4().hex[:6]}-",
            scene_concurrency=SCENES,
            provider_creates_per_minute=60_000,
            webhook_wait_seconds=30,
            poll_interval_seconds=0.5,
        )
        async with running_deployment(
            settings, folder / "hosts", storage_env, apis=2, workers=workers
        ) as deployment:
            assert deployment.workers is not None
            pids = {
                "temporal": temporal_pid(work / "temporal"),
                "bench (render server)": os.getpid(),
                **{api.name: api.proc.pid for api in deployment.apis if api.proc},
                **{w.name: w.proc.pid for w in deployment.workers.started if w.proc},
            }
            meter = CpuMeter(pids)
            clients = [deployment.client(api) for api in deployment.apis]
            try:
                meter.start()
                started = time.monotonic()
                await deployment.submit(clients, JOBS, SCENES)
                submitted = time.monotonic() - started

                def finished() -> dict[str, int] | None:
                    counts = deployment.store.count_by_status()
                    return counts if sum(counts.get(s, 0) for s in DONE) >= JOBS else None

                counts = await wait_until(finished, 3600, f"{JOBS} jobs", every=0.25)
                seconds = time.monotonic() - started
                cpu = meter.stop()
            finally:
                for client in clients:
                    await client.aclose()
    creates = renderer.stats()["creates"]
    run = {
        "workers": workers,
        "seconds": round(seconds, 2),
        "submit_seconds": round(submitted, 2),
        "statuses": counts,
        "creates": creates,
        "scenes_per_second": round(JOBS * SCENES / seconds, 3),
        "jobs_per_minute": round(JOBS * 60 / seconds, 2),
        "cpu_seconds": cpu,
    }
    print(
        f"  {workers} worker(s): {JOBS} jobs in {seconds:.1f} s "
        f"({run['scenes_per_second']} scenes/s), cpu {cpu}",
        flush=True,
    )
    return run


async def _bench() -> list[dict[str, Any]]:
    with workdir("many-hosts") as work, temporal_server(work / "temporal") as address:
        config = ServerConfig(
            data_dir=work / "render-server", start_delay=0.0, render_workers=2, clip_max_height=64
        )
        async with RunningServer(config) as renderer:
            return [await _run(n, address, renderer, work) for n in WORKER_COUNTS]


def bench(result: Result) -> None:
    runs = asyncio.run(_bench())
    result.raw.update(jobs=JOBS, scenes=SCENES, runs=runs)
    base = runs[0]
    for run in runs:
        result.add(
            Figure(
                f"Scenes rendered per second, 2 APIs and {run['workers']} worker(s) "
                "(ours) vs 1 worker (baseline)",
                "scenes/s",
                run["scenes_per_second"],
                base["scenes_per_second"],
                note=f"{JOBS} jobs of {SCENES} scenes in {run['seconds']:.0f} s, "
                f"{run['jobs_per_minute']:.0f} jobs/min",
            )
        )
    failed = sum(JOBS - run["statuses"].get("completed", 0) for run in runs)
    extra = sum(run["creates"] - JOBS * SCENES for run in runs)
    result.add(
        Figure("Jobs that did not complete, all runs", "jobs", failed, target="ours==0"),
        Figure("Predictions beyond one per scene, all runs", "creates", extra, target="ours==0"),
    )


def main() -> None:
    run_bench("many_hosts", "Many hosts: throughput with 1, 2 and 3 workers behind 2 APIs", bench)


if __name__ == "__main__":
    main()
