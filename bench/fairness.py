"""Fair shares: one tenant's backlog must not hold back another tenant's one job.

The product runs as `render-video dev` runs it (API, local render server, worker as separate
processes, an in-memory Temporal dev server started with task queue fairness on), with
`local/i2v` as the model and prediction creates held at PROVIDER_CREATES_PER_MINUTE (600 a
minute) by Temporal. Tenant B's one ten-scene job is timed alone (the baseline), then again
right after tenant A has approved 200 ten-scene jobs (2,000 predictions: over three minutes of
creates at 600 a minute). Target: B's job takes about as long as a lone job (<= 2x), not the
length of A's backlog.
"""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from typing import Any

import httpx

from backend.auth import KeyStore
from backend.database import make_engine

from .common import Figure, Result, run_bench
from .stack import Stack, product_stack, temporal_server, workdir

A_JOBS = int(os.environ.get("BENCH_FAIRNESS_JOBS", "200"))
SCENES = 10


def _storyboard(stack: Stack, tag: str) -> list[dict[str, Any]]:
    return [
        {
            "image_url": f"{stack.api}/samples/scene-{n % 5 + 1}.jpg",
            "prompt": f"{tag} scene {n + 1}",
            "duration_seconds": 1,
        }
        for n in range(SCENES)
    ]


def _client(stack: Stack, key: str) -> httpx.Client:
    return httpx.Client(base_url=stack.api, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def _create(api: httpx.Client, scenes: list[dict[str, Any]]) -> int:
    response = api.post("/api/v2/jobs", json={"storyboard": scenes})
    response.raise_for_status()
    job_id: int = response.json()["job_id"]
    return job_id


def _wait(api: httpx.Client, job_id: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status: str = api.get(f"/api/v2/jobs/{job_id}").json()["status"]
        if status in ("completed", "failed", "cancelled"):
            return status
        time.sleep(0.1)
    raise TimeoutError(f"job {job_id} did not finish in {timeout:g}s")


def _timed_job(stack: Stack, api: httpx.Client, tag: str) -> tuple[float, dict[str, float]]:
    """How long the job takes from approve to completed, and where its scenes waited: the
    latest of its predictions' creates, starts and completions at the provider, in seconds
    after the approve."""
    job_id = _create(api, _storyboard(stack, tag))
    started = time.monotonic()
    approved_at = datetime.now(UTC)
    api.post(f"/api/v2/jobs/{job_id}/approve").raise_for_status()
    status = _wait(api, job_id, timeout=1800)
    assert status == "completed", f"job {job_id} {status}"
    took = time.monotonic() - started
    timeline: dict[str, float] = {}
    view = api.get(f"/api/v2/jobs/{job_id}").json()
    with httpx.Client(base_url=stack.render_server, timeout=30) as provider:
        for scene in view["scenes"]:
            prediction = provider.get(
                f"/v1/predictions/{scene['prediction_id']}",
                headers={"Authorization": "Bearer local"},
            ).json()
            for field in ("created_at", "started_at", "completed_at"):
                if prediction.get(field):
                    at = datetime.fromisoformat(prediction[field].replace("Z", "+00:00"))
                    seconds = (at - approved_at).total_seconds()
                    timeline[field] = round(max(timeline.get(field, 0.0), seconds), 2)
    return took, timeline


def bench(result: Result) -> None:
    with workdir("fairness") as work, temporal_server(work / "temporal") as address:
        with product_stack(
            work / "stack",
            address,
            min_processing=1.0,
            task_queue="fairness",
            extra_env={"REPLICATE_MODEL": "local/i2v", "SCENE_CONCURRENCY": str(SCENES)},
            render_args=["--clip-max-height", "64", "--render-workers", "2"],
        ) as stack:
            keys = KeyStore(make_engine(f"sqlite:///{(work / 'stack' / 'data' / 'jobs.db')}"))
            key_a = keys.create("tenant-a").key
            key_b = keys.create("tenant-b").key
            with _client(stack, key_a) as a, _client(stack, key_b) as b:
                lone, lone_timeline = _timed_job(stack, b, "lone")
                print(f"  tenant B alone: {lone:.1f} s {lone_timeline}", flush=True)
                backlog = [_create(a, _storyboard(stack, f"a{n}")) for n in range(A_JOBS)]
                started = time.monotonic()
                for job_id in backlog:
                    a.post(f"/api/v2/jobs/{job_id}/approve").raise_for_status()
                approved_in = time.monotonic() - started
                behind, behind_timeline = _timed_job(stack, b, "behind")
                print(
                    f"  tenant B behind A's {A_JOBS} jobs: {behind:.1f} s {behind_timeline}",
                    flush=True,
                )
                done = [_wait(a, job_id, timeout=3600) for job_id in backlog]
                backlog_seconds = time.monotonic() - started
    failed = sum(1 for status in done if status != "completed")
    result.raw.update(
        lone_seconds=lone,
        behind_seconds=behind,
        # The latest create, start and completion of B's predictions at the provider, in
        # seconds after B's approve: where B's scenes waited.
        lone_provider_timeline=lone_timeline,
        behind_provider_timeline=behind_timeline,
        a_approved_in_seconds=approved_in,
        a_backlog_seconds=backlog_seconds,
        a_failed=failed,
    )
    result.add(
        Figure(
            f"Tenant B's 10-scene job behind tenant A's {A_JOBS} (ours) vs alone (baseline)",
            "s",
            round(behind, 1),
            round(lone, 1),
            "ratio<=2",
            f"A's {A_JOBS * SCENES} scenes took {backlog_seconds:.0f} s in all",
        ),
        Figure("Tenant A's jobs that failed", "jobs", failed, target="ours==0"),
    )


def main() -> None:
    run_bench("fairness", "Fair shares: one tenant's backlog against another's job", bench)


if __name__ == "__main__":
    main()
