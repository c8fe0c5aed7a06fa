"""Orchestration overhead: whole renders whose provider answers at once, against a bare chain of
seven no-op activities, on one Temporal dev server with the same worker options.

Ours is timed from `POST /api/v2/jobs/{id}/approve` until the run has completed (the job is
`completed` in the store by then); the bare chain from its start until its result. Jobs are
created before the clock starts. Each level runs a closed loop: `concurrency` renders always in
flight until `total` have finished."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from typing import Any

import httpx
from temporalio.client import Client

from backend.database import JobStore, make_engine
from backend.settings import Settings

from .bare_chain import BareChain, ChainInput
from .common import CpuMeter, Figure, Result, median, percentile, run_bench, send
from .stack import Stack, _spawn, _stop, product_stack, temporal_pid, temporal_server, workdir

# (concurrency, renders timed at that level)
LEVELS = [
    (int(c), int(n))
    for c, n in (
        level.split(":")
        for level in os.environ.get("BENCH_ORCH_LEVELS", "1:20,10:60,100:300").split(",")
    )
]
DIRECT_RENDERS = 40
WARMUP = 5
# The tiniest real video: one 64x64 frame. The provider starts at once (start delay 0).
TINY_OUTPUT = {"width": 64, "height": 64, "fps": 4}
BARE_QUEUE = "bare-chain"


async def closed_loop(
    one: Callable[[int], Awaitable[float]], concurrency: int, total: int
) -> tuple[list[float], float]:
    latencies: list[float] = []
    next_index = 0

    async def runner() -> None:
        nonlocal next_index
        while next_index < total:
            i = next_index
            next_index += 1
            latencies.append(await one(i))

    t0 = time.perf_counter()
    await asyncio.gather(*(runner() for _ in range(concurrency)))
    return latencies, time.perf_counter() - t0


async def measure(
    api: str, temporal_address: str, pids: dict[str, int], headers: dict[str, str]
) -> dict[str, Any]:
    client = await Client.connect(temporal_address)
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(timeout=120, limits=limits, headers=headers) as http:
        storyboard = {
            "scenes": [
                {"image_url": f"{api}/samples/scene-1.jpg", "prompt": "x", "duration_seconds": 0.5}
            ]
        }

        async def new_jobs(n: int) -> list[int]:
            ids = []
            for _ in range(n):
                r = await send(http, "POST", f"{api}/api/v2/jobs", json={"storyboard": storyboard})
                r.raise_for_status()
                ids.append(r.json()["job_id"])
            return ids

        async def ours(job_ids: list[int]) -> Callable[[int], Awaitable[float]]:
            async def one(i: int) -> float:
                t0 = time.perf_counter()
                r = await send(http, "POST", f"{api}/api/v2/jobs/{job_ids[i]}/approve")
                r.raise_for_status()
                result = await client.get_workflow_handle(r.json()["workflow_id"]).result()
                elapsed = time.perf_counter() - t0
                if result["status"] != "completed":
                    raise RuntimeError(f"job {job_ids[i]} ended {result['status']}")
                return elapsed

            return one

        async def bare(i: int) -> float:
            t0 = time.perf_counter()
            handle = await client.start_workflow(
                BareChain.run,
                ChainInput(job_id=i),
                id=f"bare-{uuid.uuid4().hex}",
                task_queue=BARE_QUEUE,
            )
            await handle.result()
            return time.perf_counter() - t0

        # Warm both paths (connections, caches, first workflow tasks) before any clock runs.
        await closed_loop(await ours(await new_jobs(WARMUP)), 1, WARMUP)
        await closed_loop(bare, 1, WARMUP)
        levels = []
        for concurrency, total in LEVELS:
            job_ids = await new_jobs(total)
            meter = CpuMeter(pids)
            meter.start()
            lat_ours, wall_ours = await closed_loop(await ours(job_ids), concurrency, total)
            cpu_ours = meter.stop()
            meter.start()
            lat_bare, wall_bare = await closed_loop(bare, concurrency, total)
            cpu_bare = meter.stop()
            # A render is done when its job is; check the store agrees for the last one.
            last = (await http.get(f"{api}/api/v2/jobs/{job_ids[-1]}")).json()
            if last["status"] != "completed":
                raise RuntimeError(f"job {job_ids[-1]} is {last['status']} after its run completed")
            levels.append(
                {
                    "concurrency": concurrency,
                    "renders": total,
                    "ours": {"latencies_s": lat_ours, "wall_s": wall_ours, "cpu_s": cpu_ours},
                    "bare": {"latencies_s": lat_bare, "wall_s": wall_bare, "cpu_s": cpu_bare},
                }
            )
            print(
                f"   concurrency {concurrency}: ours p50 {median(lat_ours) * 1000:.0f} ms, "
                f"{total / wall_ours:.1f}/s; bare p50 {median(lat_bare) * 1000:.0f} ms, "
                f"{total / wall_bare:.1f}/s",
                flush=True,
            )
            print(f"   CPU s per render, ours: {_per(cpu_ours, total)}", flush=True)
            print(f"   CPU s per render, bare: {_per(cpu_bare, total)}", flush=True)
        # The floor: the same renders' work with no orchestration at all.
        job_ids = await new_jobs(DIRECT_RENDERS)
        return {"levels": levels, "direct_job_ids": job_ids}


def measure_direct(stack: Stack, job_ids: list[int], pids: dict[str, int]) -> dict[str, Any]:
    store = JobStore(make_engine(Settings(data_dir=stack.dir / "data").resolved_database_url))
    for job_id in job_ids:
        store.approve(job_id)
    env = dict(stack.env)
    env.pop("PUBLIC_BASE_URL", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.orchestration_direct", *map(str, job_ids)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    assert proc.stdin and proc.stdout
    if proc.stdout.readline().strip() != "ready":
        raise RuntimeError("bench.orchestration_direct did not start")
    meter = CpuMeter({**pids, "direct": proc.pid})
    meter.start()
    t0 = time.perf_counter()
    proc.stdin.write("go\n")
    proc.stdin.flush()
    line = proc.stdout.readline()
    wall = time.perf_counter() - t0
    cpu = meter.stop()
    if proc.wait() != 0:
        raise RuntimeError("bench.orchestration_direct failed")
    done = [store.get(j)["status"] for j in job_ids]
    if set(done) != {"completed"}:
        raise RuntimeError(f"direct renders ended {sorted(set(done))}")
    print(f"   CPU s per render, direct: {_per(cpu, len(job_ids))}", flush=True)
    return {
        "renders": len(job_ids),
        "latencies_s": json.loads(line)["seconds"],
        "wall_s": wall,
        "cpu_s": cpu,
    }


def _per(cpu: dict[str, float], n: int) -> str:
    return ", ".join(f"{name} {seconds / n * 1000:.0f} ms" for name, seconds in cpu.items())


def body(result: Result) -> None:
    with workdir("orchestration") as dir, temporal_server(dir) as address, ExitStack() as stack:
        extra = {"MODEL_EXTRA_INPUT": json.dumps(TINY_OUTPUT)}
        ours = stack.enter_context(
            product_stack(dir / "ours", address, webhooks=True, start_delay=0, extra_env=extra)
        )
        bare_env = dict(os.environ, TEMPORAL_ADDRESS=address, TASK_QUEUE=BARE_QUEUE)
        bare = _spawn(
            "bare-worker", [sys.executable, "-m", "bench.bare_chain"], bare_env, dir, None
        )
        stack.callback(_stop, bare)
        pids = {name: proc.pid for name, proc in ours.procs.items()}
        pids |= {"temporal": temporal_pid(dir), "bare-worker": bare.pid, "bench": os.getpid()}
        raw = asyncio.run(measure(ours.api, address, pids, ours.headers))
        raw["direct"] = measure_direct(ours, raw.pop("direct_job_ids"), pids)
    result.raw.update(raw)
    for level in raw["levels"]:
        c = level["concurrency"]
        ours_l, bare_l = level["ours"]["latencies_s"], level["bare"]["latencies_s"]
        for p in (50, 95):
            result.add(
                Figure(
                    f"p{p} latency, concurrency {c}",
                    "ms",
                    percentile(ours_l, p) * 1000,
                    percentile(bare_l, p) * 1000,
                    "ratio<=1.3",
                )
            )
        result.add(
            Figure(
                f"throughput, concurrency {c}",
                "renders/s",
                level["renders"] / level["ours"]["wall_s"],
                level["renders"] / level["bare"]["wall_s"],
                "ratio>=0.75",
            )
        )

    # On two cores the provider, API, worker and Temporal share the CPU, so throughput at
    # saturation is CPU per render. Ours can do no better than bare orchestration plus the
    # render's own work, measured without any orchestration.
    direct = raw["direct"]
    work = sum(direct["cpu_s"].values()) / direct["renders"]
    top = raw["levels"][-1]
    bare_cpu = sum(top["bare"]["cpu_s"].values()) / top["renders"]
    ours_cpu = sum(top["ours"]["cpu_s"].values()) / top["renders"]
    result.add(
        Figure(
            f"CPU per render, all processes, concurrency {top['concurrency']}",
            "ms",
            ours_cpu * 1000,
            bare_cpu * 1000,
            "",
        ),
        Figure(
            "CPU per render of the render's own work, no orchestration",
            "ms",
            work * 1000,
            None,
            "",
            note="same activities via ActivityEnvironment; provider, API, job store included",
        ),
        Figure(
            "best throughput ratio the CPU allows: bare / (bare + own work)",
            "x",
            bare_cpu / (bare_cpu + work),
            None,
            "",
        ),
    )


def main() -> None:
    run_bench(
        "orchestration",
        "Orchestration overhead against a bare chain of seven no-op activities",
        body,
    )


if __name__ == "__main__":
    main()
