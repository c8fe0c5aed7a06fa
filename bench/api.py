"""GET /api/v2/jobs/{id} of the real API under a bounded load, against a bare FastAPI endpoint.

Both are served by the same `python -m uvicorn APP --host 127.0.0.1 --port P
--timeout-keep-alive 75 --log-level warning` command (how `render-video dev` runs the API).
The jobs are real, on one stack: one rendered to `completed`, then one held in `rendering` (a
600 s `slow_render` fault queued on the render server), whose GET carries the run's answer to
its `progress` query, asked through Temporal. The load comes from bench/api_load.py in its own
process, one target at a time.
BENCH_API_SECONDS sets each round's window (3 s; three rounds per target).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx

from backend.cli import API_KEEP_ALIVE_SECONDS, SAMPLE_SCENES

from .common import (
    ROOT,
    Figure,
    Result,
    free_port,
    median,
    percentile,
    python,
    run_bench,
    send_sync,
)
from .stack import Stack, _spawn, _stop, product_stack, temporal_server, workdir

CONNECTIONS = 16
WARMUP = 1.0
# Interleaved rounds per target, each its own warm-up and window: a drift in background load
# hits ours and the baseline alike, and the median round drops one disturbed window.
ROUNDS = 3
SECONDS = float(os.environ.get("BENCH_API_SECONDS", "3"))


def _uvicorn(app: str, port: int) -> list[str]:
    return [python(), "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port),
            "--timeout-keep-alive", str(API_KEEP_ALIVE_SECONDS),
            "--log-level", "warning"]  # fmt: skip


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _load(
    port: int, paths: list[str], seconds: float, server_pid: int, key: str = ""
) -> dict[str, Any]:
    cpu0 = _cpu_seconds(server_pid)
    auth = ["--header", f"Authorization: Bearer {key}"] if key else []
    out = subprocess.run(
        [python(), "-m", "bench.api_load", "--port", str(port), *auth,
         *(arg for path in paths for arg in ("--path", path)),
         "--connections", str(CONNECTIONS), "--warmup", str(WARMUP), "--seconds", str(seconds)],
        capture_output=True, check=True, cwd=ROOT, text=True, timeout=WARMUP + seconds + 60,
    )  # fmt: skip
    run: dict[str, Any] = json.loads(out.stdout)
    cpu = _cpu_seconds(server_pid) - cpu0
    # Near 1.0: the server's event loop was the bottleneck; well below: it waited for a core.
    run["server_cpu"] = cpu / (WARMUP + seconds)
    # Responses per CPU-second of the server, warm-up included: what the server costs per
    # request, which background load on the machine disturbs far less than req/s.
    run["per_cpu_s"] = run["all"] / cpu if cpu else 0.0
    return run


def _pooled(runs: list[dict[str, Any]]) -> dict[str, Any]:
    lat = [x for r in runs for x in r["latencies_ms"]]
    return {
        "rps": median([r["rps"] for r in runs]),
        "per_cpu_s": median([r["per_cpu_s"] for r in runs]),
        "rps_rounds": [round(r["rps"]) for r in runs],
        "p50_ms": percentile(lat, 50),
        "p99_ms": percentile(lat, 99),
        "max_ms": max(lat),
        "completed": len(lat),
        "bad": sum(r["non_200"] + r["warmup_non_200"] + r["errors"] for r in runs),
        "generator_cpu": [round(r["generator_cpu"], 2) for r in runs],
        "server_cpu": [round(r["server_cpu"], 2) for r in runs],
    }


def _create(stack: Stack) -> str:
    """A job with the demo's storyboard (so `ready`), as `render-video demo` makes it."""
    scenes = [
        {"image_url": f"{stack.api}/samples/{name}", "prompt": prompt, "duration_seconds": 2}
        for name, prompt in SAMPLE_SCENES
    ]
    with httpx.Client(base_url=stack.api, headers=stack.headers, timeout=30) as api:
        created = send_sync(api, "POST", "/api/v2/jobs", json={"storyboard": {"scenes": scenes}})
    return f"/api/v2/jobs/{created.raise_for_status().json()['job_id']}"


def _job(stack: Stack, want: str, timeout: float = 120) -> tuple[str, dict[str, Any]]:
    """Creates and approves a job; returns its path once GET shows `want` (for `rendering`:
    the run answers `progress`, and waits for the render server)."""
    base, path = stack.api, _create(stack)
    with httpx.Client(base_url=base, headers=stack.headers, timeout=30) as api:
        send_sync(api, "POST", f"{path}/approve").raise_for_status()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        view = httpx.get(f"{base}{path}", timeout=10, headers=stack.headers)
        view = view.raise_for_status().json()
        live = view.get("live") or {}
        if view["status"] == want and (want != "rendering" or live.get("stage") == "rendering"):
            return path, view
        if view["status"] in ("failed", "cancelled", "expired", "completed"):
            break
        time.sleep(0.2)
    raise RuntimeError(f"job {path} did not reach {want}: {view}; logs in {stack.dir}")


def body(result: Result) -> None:
    with workdir("api") as dir, temporal_server(dir) as address, ExitStack() as stop:
        stack = stop.enter_context(product_stack(dir / "stack", address))
        done_path, done_view = _job(stack, "completed")
        fault = {"kind": "slow_render", "delay": 600, "times": 1}
        httpx.post(f"{stack.render_server}/_admin/faults", json=fault).raise_for_status()
        slow_path, slow_view = _job(stack, "rendering")
        # One job per connection: concurrent GETs of one job could share a read.
        many = [done_path] + [_create(stack) for _ in range(CONNECTIONS - 1)]

        trivial_port, bare_port = free_port(), free_port()
        serve = [python(), "-m", "bench.api_load", "--serve", str(trivial_port)]
        trivial = _spawn("trivial", serve, dict(os.environ), dir, trivial_port)
        stop.callback(_stop, trivial)
        bare = _spawn("bare", _uvicorn("bench.api_bare:app", bare_port), dict(os.environ), dir,
                      bare_port)  # fmt: skip
        stop.callback(_stop, bare)
        bare_view = httpx.get(f"http://127.0.0.1:{bare_port}{done_path}").json()

        ceiling = _load(trivial_port, ["/"], 3, trivial.pid)
        _stop(trivial)
        api_pid = stack.procs["api"].pid
        targets = {
            "bare": (bare_port, [done_path], bare.pid),
            "completed": (stack.api_port, [done_path], api_pid),
            "rendering": (stack.api_port, [slow_path], api_pid),
            "distinct": (stack.api_port, many, api_pid),
        }
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
        # The worker and the render server should stay idle: GET must not put load on them.
        others = {name: p.pid for name, p in stack.procs.items() if name != "api"}
        others_cpu = {name: _cpu_seconds(pid) for name, pid in others.items()}
        for _ in range(ROUNDS):
            for name, (port, paths, pid) in targets.items():
                # The same request, key included, to ours and to the bare endpoint.
                runs[name].append(_load(port, paths, SECONDS, pid, stack.key))
        others_cpu = {n: round(_cpu_seconds(pid) - others_cpu[n], 2) for n, pid in others.items()}
        after = httpx.get(f"{stack.api}{slow_path}", timeout=10, headers=stack.headers).json()
        if after["status"] != "rendering" or not after.get("live"):
            raise RuntimeError(f"the rendering job changed under the load: {after}")

    stats = {name: _pooled(r) for name, r in runs.items()}
    base, bad = stats["bare"], sum(s["bad"] for s in stats.values())
    lat_note = f"{CONNECTIONS} connections, closed loop"
    result.add(
        Figure("GET completed job: throughput", "req/s", stats["completed"]["rps"], base["rps"],
               "ratio>=0.5", f"{CONNECTIONS} keep-alive connections, median of {ROUNDS} rounds"),
        Figure("GET completed job: p50 latency", "ms", stats["completed"]["p50_ms"],
               base["p50_ms"], note=lat_note),
        Figure("GET completed job: p99 latency", "ms", stats["completed"]["p99_ms"],
               base["p99_ms"], note=lat_note),
        Figure("GET rendering job: throughput", "req/s", stats["rendering"]["rps"], base["rps"],
               "ratio>=0.5", "with the run's live `progress` answer"),
        Figure("GET rendering job: p50 latency", "ms", stats["rendering"]["p50_ms"],
               base["p50_ms"], note=lat_note),
        Figure("GET rendering job: p99 latency", "ms", stats["rendering"]["p99_ms"],
               base["p99_ms"], note=lat_note),
        Figure(f"GET {CONNECTIONS} different jobs: throughput", "req/s",
               stats["distinct"]["rps"], base["rps"],
               note=f"a job per connection: the completed one and {CONNECTIONS - 1} ready ones"),
        Figure("GET completed job: requests per server CPU-second", "req/CPU-s",
               stats["completed"]["per_cpu_s"], base["per_cpu_s"],
               note="cost per request, steadier than req/s on a busy machine"),
        Figure("GET rendering job: requests per server CPU-second", "req/CPU-s",
               stats["rendering"]["per_cpu_s"], base["per_cpu_s"]),
        Figure("load generator ceiling (trivial server)", "req/s", ceiling["rps"],
               note=f"generator at {ceiling['generator_cpu']:.2f} of a core"),
        Figure("non-200 or failed responses", "count", bad, target="ours==0",
               note="any other count makes the run invalid"),
    )  # fmt: skip
    ceiling.pop("latencies_ms")
    result.raw = {
        "connections": CONNECTIONS,
        "warmup_s": WARMUP,
        "window_s": SECONDS,
        "rounds": ROUNDS,
        "ceiling": ceiling,
        "other_processes_cpu_s": others_cpu,
        **stats,
        "responses": {"completed": done_view, "rendering": slow_view, "bare": bare_view},
    }
    if bad:
        print(f"   INVALID RUN: {bad} non-200 or failed responses", flush=True)


def main() -> None:
    run_bench("api", "GET /api/v2/jobs/{id} under load against a bare FastAPI endpoint", body)


if __name__ == "__main__":
    main()
