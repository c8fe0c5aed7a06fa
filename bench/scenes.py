"""Per-scene rendering: scenes in parallel against one after another, creates held under the
provider's limit by Temporal, and editing one scene of ten.

The product runs as `render-video dev` runs it (API, local render server, worker as separate
processes, an in-memory Temporal dev server), with `local/i2v` as the model: one prediction
per scene, clips stitched into one MP4.

- parallel: a job of 10 scenes whose predictions each take 20 s at the provider, with
  SCENE_CONCURRENCY=10 (ours) against the same job rendered one scene after another
  (SCENE_CONCURRENCY=1, the baseline). Wall time from approve to completed; target <= 0.12x
  (one scene plus the stitch, not ten).
- edit: then scene 5's prompt is changed and the job approved again: predictions created.
- throttled: 50 jobs x 20 scenes (1,000 predictions) against a render server that enforces
  600 creates in any 60 s (as Replicate does) and answers 429 past it. The worker's creates run
  on a task queue whose rate Temporal holds at PROVIDER_CREATES_PER_MINUTE (600). Creates in the
  busiest minute, 429s, failed jobs, and the worker's peak RSS.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import httpx

from .common import Figure, Result, RssSampler, run_bench, send_sync
from .stack import Stack, product_stack, temporal_server, workdir

SCENES = 10
PREDICT_SECONDS = float(os.environ.get("BENCH_SCENE_SECONDS", "20"))
THROTTLED_JOBS = int(os.environ.get("BENCH_THROTTLED_JOBS", "50"))
THROTTLED_SCENES = 20
CREATE_LIMIT = 600


def _storyboard(stack: Stack, count: int, tag: str) -> list[dict[str, Any]]:
    return [
        {
            "image_url": f"{stack.api}/samples/scene-{n % 5 + 1}.jpg",
            "prompt": f"{tag} scene {n + 1}",
            "duration_seconds": 1,
        }
        for n in range(count)
    ]


def _create(api: httpx.Client, scenes: list[dict[str, Any]]) -> int:
    response = send_sync(api, "POST", "/api/v2/jobs", json={"storyboard": scenes})
    response.raise_for_status()
    job_id: int = response.json()["job_id"]
    return job_id


def _wait(api: httpx.Client, job_ids: list[int], timeout: float) -> dict[int, str]:
    deadline = time.monotonic() + timeout
    statuses: dict[int, str] = {}
    while time.monotonic() < deadline:
        for job_id in job_ids:
            if job_id not in statuses:
                status = api.get(f"/api/v2/jobs/{job_id}").json()["status"]
                if status in ("completed", "failed", "cancelled"):
                    statuses[job_id] = status
        if len(statuses) == len(job_ids):
            return statuses
        time.sleep(0.2)
    raise TimeoutError(f"{len(job_ids) - len(statuses)} jobs did not finish in {timeout:g}s")


def _render_once(stack: Stack, scenes: list[dict[str, Any]]) -> tuple[float, int]:
    with httpx.Client(base_url=stack.api, headers=stack.headers, timeout=60) as api:
        job_id = _create(api, scenes)
        started = time.monotonic()
        send_sync(api, "POST", f"/api/v2/jobs/{job_id}/approve").raise_for_status()
        status = _wait(api, [job_id], timeout=SCENES * PREDICT_SECONDS * 3)[job_id]
        took = time.monotonic() - started
    assert status == "completed", f"job {job_id} {status}"
    return took, job_id


def _stats(stack: Stack) -> dict[str, Any]:
    response = httpx.get(f"{stack.render_server}/_admin/stats", timeout=30)
    response.raise_for_status()
    stats: dict[str, Any] = response.json()
    return stats


def _i2v_env(concurrency: int, stack: str) -> dict[str, str]:
    # The stacks share one Temporal server but each has its own job store (job 1 in each):
    # a workflow id prefix apiece keeps their runs apart.
    return {
        "REPLICATE_MODEL": "local/i2v",
        "SCENE_CONCURRENCY": str(concurrency),
        "WORKFLOW_ID_PREFIX": f"{stack}-",
    }


def bench_parallel(result: Result, work: Path, address: str) -> None:
    times: dict[str, float] = {}
    for name, concurrency in (("sequential", 1), ("parallel", SCENES)):
        with product_stack(
            work / name,
            address,
            min_processing=PREDICT_SECONDS,
            task_queue=f"scenes-{name}",
            extra_env=_i2v_env(concurrency, name),
            render_args=["--clip-max-height", "144"],
        ) as stack:
            scenes = _storyboard(stack, SCENES, name)
            took, job_id = _render_once(stack, scenes)
            times[name] = took
            print(f"  {name}: {SCENES} scenes in {took:.1f} s", flush=True)
            if name == "parallel":
                before = _stats(stack)["creates"]
                scenes[4]["prompt"] = "an edited fifth scene"
                with httpx.Client(base_url=stack.api, headers=stack.headers, timeout=60) as api:
                    send_sync(
                        api, "PUT", f"/api/v2/jobs/{job_id}/storyboard", json=scenes
                    ).raise_for_status()
                    send_sync(api, "POST", f"/api/v2/jobs/{job_id}/approve").raise_for_status()
                    status = _wait(api, [job_id], timeout=PREDICT_SECONDS * 4)[job_id]
                assert status == "completed", status
                edited = _stats(stack)["creates"] - before
    result.raw["wall_seconds"] = times
    result.add(
        Figure(
            f"{SCENES} scenes of {PREDICT_SECONDS:g} s each: approve to completed",
            "s",
            times["parallel"],
            times["sequential"],
            "ratio<=0.12",
            "baseline: the same job rendered one scene after another",
        ),
        Figure(
            "Edit one scene of ten, approve again: predictions created",
            "predictions",
            edited,
            target="ours==1",
        ),
    )


def bench_throttled(result: Result, work: Path, address: str) -> None:
    with product_stack(
        work / "throttled",
        address,
        min_processing=1.0,
        task_queue="scenes-throttled",
        extra_env={
            **_i2v_env(THROTTLED_SCENES, "throttled"),
            "PROVIDER_CREATES_PER_MINUTE": str(CREATE_LIMIT),
            "WORKER_MAX_CACHED_WORKFLOWS": "250",
        },
        render_args=[
            "--clip-max-height",
            "64",
            "--create-limit-per-minute",
            str(CREATE_LIMIT),
            "--render-workers",
            "2",
        ],
    ) as stack:
        with (
            httpx.Client(base_url=stack.api, headers=stack.headers, timeout=60) as api,
            RssSampler(stack.worker.pid) as rss,
        ):
            job_ids = [
                _create(api, _storyboard(stack, THROTTLED_SCENES, f"job {n}"))
                for n in range(THROTTLED_JOBS)
            ]
            started = time.monotonic()
            for job_id in job_ids:
                send_sync(api, "POST", f"/api/v2/jobs/{job_id}/approve").raise_for_status()
            statuses = _wait(api, job_ids, timeout=3600)
            took = time.monotonic() - started
        stats = _stats(stack)
    failed = sum(1 for status in statuses.values() if status != "completed")
    predictions = THROTTLED_JOBS * THROTTLED_SCENES
    result.raw["throttled"] = {
        "seconds": took,
        "creates": stats["creates"],
        "throttled": stats["throttled"],
        "max_creates_per_minute": stats["max_creates_per_minute"],
        "statuses": sorted(set(statuses.values())),
        "rss_samples_kib": rss.samples[::10],
    }
    print(f"  throttled: {predictions} predictions in {took:.0f} s", flush=True)
    result.add(
        Figure(
            f"{THROTTLED_JOBS} jobs x {THROTTLED_SCENES} scenes: creates in the busiest minute",
            "creates",
            stats["max_creates_per_minute"],
            target=f"ours<={CREATE_LIMIT}",
            note=f"{stats['creates']} creates accepted for {predictions} scenes in {took:.0f} s",
        ),
        Figure("Creates refused with 429", "creates", stats["throttled"], target="ours==0"),
        Figure("Jobs that failed", "jobs", failed, target="ours==0"),
        # The unit: MB (10^6 bytes), as the in-flight benchmark reports it.
        Figure("Worker peak RSS", "MB", round(rss.hwm_kib * 1024 / 1e6, 1), target="ours<=300"),
    )


def main() -> None:
    def body(result: Result) -> None:
        with workdir("scenes") as work, temporal_server(work / "temporal") as address:
            bench_parallel(result, work, address)
            bench_throttled(result, work, address)

    run_bench("scenes", "Per-scene rendering: parallel scenes, held-down creates, edits", body)


if __name__ == "__main__":
    main()
