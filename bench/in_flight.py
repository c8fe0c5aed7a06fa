"""Many renders in flight: 1,000 renders whose predictions take 120 s, in webhook mode and in
polling mode, against the original design (a thread per job polling through `replicate.run`).

Figures: the worker's peak RSS (the kernel's VmHWM for the whole run), provider API calls per
render (creates, reads, lists and cancels the provider counted; output downloads apart), and
activity slots held while the renders wait (the SDK's own `temporal_worker_task_slots_used`
gauge, sampled every 0.5 s while every prediction is running; and the worker-side time spent
in `poll_prediction` calls, from the SDK's activity execution latency histogram)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from temporalio.client import Client

from .common import Figure, Result, RssSampler, mib, run_bench, send
from .orchestration import TINY_OUTPUT
from .stack import Stack, _spawn, _stop, product_stack, temporal_server, workdir

RENDERS = int(os.environ.get("BENCH_RENDERS", "1000"))
PREDICT_SECONDS = float(os.environ.get("BENCH_PREDICT_SECONDS", "120"))
API_CALLS = ("creates", "gets", "lists", "cancels")
METRIC = re.compile(r"^(\w+)(?:\{(.*)\})? ([0-9.eE+-]+|NaN)$")


def scrape(url: str) -> dict[tuple[str, str], float]:
    """Prometheus text to {(name, labels): value}."""
    values: dict[tuple[str, str], float] = {}
    for line in httpx.get(url, timeout=5).text.splitlines():
        if match := METRIC.match(line):
            values[(match.group(1), match.group(2) or "")] = float(match.group(3))
    return values


def metric(values: dict[tuple[str, str], float], name: str, **labels: str) -> float:
    return sum(
        v
        for (n, lbl), v in values.items()
        if n == name and all(f'{k}="{want}"' in lbl for k, want in labels.items())
    )


def api_calls(stats: dict[str, Any]) -> int:
    return sum(int(stats.get(k, 0)) for k in API_CALLS)


async def drive(stack: Stack, address: str, samples: list[dict[str, float]]) -> dict[str, Any]:
    client = await Client.connect(address)
    api = stack.api
    metrics_url = f"http://127.0.0.1:{stack.metrics_port}/metrics"
    storyboard = {
        "scenes": [
            {"image_url": f"{api}/samples/scene-1.jpg", "prompt": "x", "duration_seconds": 0.5}
        ]
    }
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
    async with httpx.AsyncClient(timeout=120, limits=limits, headers=stack.headers) as http:
        sem = asyncio.Semaphore(50)

        async def create_and_approve() -> int:
            async with sem:
                r = await send(http, "POST", f"{api}/api/v2/jobs", json={"storyboard": storyboard})
                r.raise_for_status()
                job_id: int = r.json()["job_id"]
                r = await send(http, "POST", f"{api}/api/v2/jobs/{job_id}/approve")
                if r.status_code != 200:
                    raise RuntimeError(f"approve {job_id}: {r.status_code} {r.text}")
                return job_id

        t0 = time.monotonic()
        job_ids = await asyncio.gather(*(create_and_approve() for _ in range(RENDERS)))
        approved_s = time.monotonic() - t0
        print(f"   {RENDERS} approved in {approved_s:.0f} s", flush=True)

        query = f"WorkflowType = 'RenderVideo' AND TaskQueue = '{stack.env['TASK_QUEUE']}'"
        running = RENDERS
        while running:
            await asyncio.sleep(0.5)
            stats = (await http.get(f"{stack.render_server}/_admin/stats")).json()
            statuses = list(stats["predictions"].values())
            values = await asyncio.to_thread(scrape, metrics_url)
            samples.append(
                {
                    "t": time.monotonic() - t0,
                    "predictions": len(statuses),
                    "predictions_running": sum(s in ("starting", "processing") for s in statuses),
                    "activity_slots_used": metric(
                        values, "temporal_worker_task_slots_used", worker_type="ActivityWorker"
                    ),
                }
            )
            count = await client.count_workflows(f"{query} AND ExecutionStatus = 'Running'")
            running = count.count
        finished_s = time.monotonic() - t0
        completed = await client.count_workflows(f"{query} AND ExecutionStatus = 'Completed'")
        stats = (await http.get(f"{stack.render_server}/_admin/stats")).json()
        values = await asyncio.to_thread(scrape, metrics_url)
        return {
            "renders": RENDERS,
            "completed": completed.count,
            "approved_s": approved_s,
            "finished_s": finished_s,
            "job_ids": [job_ids[0], job_ids[-1]],
            "provider": {k: v for k, v in stats.items() if isinstance(v, int)},
            # The SDK reports this histogram in milliseconds.
            "poll_seconds": metric(
                values, "temporal_activity_execution_latency_sum", activity_type="poll_prediction"
            )
            / 1000,
            "polls": metric(
                values,
                "temporal_activity_execution_latency_count",
                activity_type="poll_prediction",
            ),
        }


def waiting_window(samples: list[dict[str, float]]) -> list[dict[str, float]]:
    """The samples taken while every prediction existed and none had finished."""
    return [
        s for s in samples if s["predictions"] == RENDERS and s["predictions_running"] == RENDERS
    ]


def run_mode(dir: Path, webhooks: bool) -> dict[str, Any]:
    mode = "webhooks" if webhooks else "polling"
    extra = {"MODEL_EXTRA_INPUT": json.dumps(TINY_OUTPUT)}
    # A Temporal server per mode: each stack's job ids, and so its workflow ids, start at 1.
    with (
        temporal_server(dir / f"{mode}-temporal") as address,
        product_stack(
            dir / mode,
            address,
            webhooks=webhooks,
            start_delay=0,
            min_processing=PREDICT_SECONDS,
            metrics=True,
            task_queue=f"render-{mode}",
            extra_env=extra,
        ) as stack,
    ):
        samples: list[dict[str, float]] = []
        with RssSampler(stack.worker.pid, every=0.5) as rss:
            raw = asyncio.run(drive(stack, address, samples))
    window = waiting_window(samples)
    raw |= {
        "mode": mode,
        "worker_peak_rss_mib": mib(rss.hwm_kib),
        "worker_start_rss_mib": mib(rss.start_kib),
        "wait_window_samples": len(window),
        "slots_used_while_waiting_max": max(
            (s["activity_slots_used"] for s in window), default=None
        ),
        "slots_used_while_waiting_mean": (
            sum(s["activity_slots_used"] for s in window) / len(window) if window else None
        ),
        "samples": samples,
    }
    print(
        f"   {mode}: {raw['completed']}/{RENDERS} completed in {raw['finished_s']:.0f} s, "
        f"worker peak {raw['worker_peak_rss_mib']:.0f} MiB, "
        f"{api_calls(raw['provider']) / RENDERS:.2f} provider calls per render",
        flush=True,
    )
    return raw


def run_baseline(dir: Path) -> dict[str, Any]:
    from .common import free_port

    port = free_port()
    base = dir / "baseline"
    base.mkdir(parents=True, exist_ok=True)
    server = _spawn(
        "render-server",
        [
            sys.executable,
            "-m",
            "local_replicate",
            "--port",
            str(port),
            "--data-dir",
            str(base / "render-server"),
            "--start-delay",
            "0",
            "--min-processing",
            str(PREDICT_SECONDS),
            "--admin",
        ],
        dict(os.environ),
        base,
        port,
    )
    try:
        provider = f"http://127.0.0.1:{port}"
        out = base / "out"
        proc = _spawn_baseline(provider, out, base)
        with RssSampler(proc.pid, every=0.5) as rss:
            stdout, _ = proc.communicate()
        summary = json.loads(stdout.decode().strip().splitlines()[-1])
        stats = httpx.get(f"{provider}/_admin/stats", timeout=30).json()
    finally:
        _stop(server)
    summary |= {
        "peak_rss_mib": mib(rss.hwm_kib),
        "provider": {k: v for k, v in stats.items() if isinstance(v, int)},
    }
    print(
        f"   baseline: {summary['jobs'] - summary['failed']}/{RENDERS} completed in "
        f"{summary['seconds']:.0f} s, peak {summary['peak_rss_mib']:.0f} MiB, "
        f"{api_calls(summary['provider']) / RENDERS:.2f} provider calls per render",
        flush=True,
    )
    return summary


def _spawn_baseline(provider: str, out: Path, log_dir: Path) -> Any:
    import subprocess

    return subprocess.Popen(
        [sys.executable, "-m", "bench.in_flight_baseline", provider, str(RENDERS), str(out)],
        stdout=subprocess.PIPE,
        stderr=(log_dir / "baseline.log").open("ab"),
    )


def body(result: Result) -> None:
    with workdir("in_flight") as dir:
        modes = {webhooks: run_mode(dir, webhooks) for webhooks in (True, False)}
    baseline = run_baseline(dir)
    result.raw |= {"webhooks": modes[True], "polling": modes[False], "baseline": baseline}
    base_calls = api_calls(baseline["provider"]) / RENDERS
    for webhooks, raw in modes.items():
        mode = "webhooks" if webhooks else "polling"
        if raw["completed"] != RENDERS:
            print(f"   WARNING: only {raw['completed']} of {RENDERS} completed ({mode})")
        result.add(
            Figure(
                f"worker peak RSS, {mode}",
                "MB",
                raw["worker_peak_rss_mib"] * 1.048576,
                baseline["peak_rss_mib"] * 1.048576,
                "ours<=300",
                note="baseline: the thread-per-job process",
            ),
            Figure(
                f"provider API calls per render, {mode}",
                "calls",
                api_calls(raw["provider"]) / RENDERS,
                base_calls,
                "ours<=3" if webhooks else "",
            ),
            # With webhooks nothing runs while a render waits; when polling, a slot is taken
            # only for each poll call itself, so that mode reports the mean.
            Figure(
                f"activity slots held while all renders wait, {mode} "
                + ("(max sampled)" if webhooks else "(mean sampled)"),
                "slots",
                _or_nan(
                    raw["slots_used_while_waiting_max"]
                    if webhooks
                    else raw["slots_used_while_waiting_mean"]
                ),
                RENDERS,
                "ours==0" if webhooks else "",
                note="baseline: a thread held per waiting job"
                + ("" if webhooks else "; ours: only during poll calls"),
            ),
        )
        if not webhooks:
            result.add(
                Figure(
                    "activity slot time per render spent in poll calls, polling",
                    "s",
                    raw["poll_seconds"] / RENDERS,
                    PREDICT_SECONDS,
                    "",
                    note="baseline: a thread for the whole prediction",
                )
            )


def _or_nan(value: float | None) -> float:
    # No sample fell in the window (the ramp outlasted the predictions): shown as nan.
    return float("nan") if value is None else value


def main() -> None:
    run_bench(
        "in_flight",
        f"{RENDERS:,} renders in flight ({PREDICT_SECONDS:g} s predictions) against a "
        "thread-per-job poller",
        body,
    )


if __name__ == "__main__":
    main()
