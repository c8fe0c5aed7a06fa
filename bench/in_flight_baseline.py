"""The original design, for the in-flight benchmark: a thread per job that renders through
`replicate.run`, polling the prediction every REPLICATE_POLL_INTERVAL (0.5 s by default),
then downloads with the seed's retries (3 attempts, 30 s then 90 s apart), checks the magic
bytes and writes the job row.

`python -m bench.in_flight_baseline PROVIDER_URL JOBS OUT_DIR` prints a JSON summary."""

from __future__ import annotations

import base64
import json
import sqlite3
import sys
import threading
import time
from pathlib import Path

import httpx
import replicate

from backend.cli import SAMPLE_SCENES

RETRY_DELAYS = (30, 90)


def main() -> None:
    provider, jobs, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    out.mkdir(parents=True, exist_ok=True)
    sample = Path(__file__).resolve().parents[1] / "backend" / "samples" / SAMPLE_SCENES[0][0]
    image = "data:image/jpeg;base64," + base64.b64encode(sample.read_bytes()).decode()
    # One client for all threads, as the seed's module-level `replicate.run` has, but with an
    # unbounded pool: with the default 100 connections most jobs fail with PoolTimeout
    # instead of being measured.
    client = replicate.Client(
        api_token="local-render-server",
        base_url=provider,
        timeout=httpx.Timeout(30.0, pool=None),
        transport=httpx.HTTPTransport(limits=httpx.Limits(max_connections=None)),
    )
    db_path = out / "jobs.db"
    with sqlite3.connect(db_path) as db:
        db.execute("CREATE TABLE IF NOT EXISTS jobs (id INTEGER PRIMARY KEY, status TEXT)")
    failures: list[str] = []

    def render_video_task(job_id: int) -> None:
        try:
            # wait=False: no `Prefer: wait` hold, so the thread polls from the start, as
            # `replicate.run` did before sync mode existed (and its 60.5 s read timeout for a
            # held create gives way when a server answers 1,000 held creates at once).
            output = client.run(
                "local/slideshow",
                input={"images": [image], "durations": [0.25], "width": 64, "height": 64, "fps": 4},
                wait=False,
            )
            url = str(output)
            for delay in (*RETRY_DELAYS, None):
                try:
                    data = httpx.get(url, timeout=60).content
                    break
                except httpx.HTTPError:
                    if delay is None:
                        raise
                    time.sleep(delay)
            if data[4:8] != b"ftyp":
                raise ValueError("not an MP4")
            (out / f"{job_id}.mp4").write_bytes(data)
            with sqlite3.connect(db_path, timeout=60) as db:
                db.execute("INSERT INTO jobs VALUES (?, 'completed')", (job_id,))
        except Exception as exc:  # a failed job is counted, as the seed marks it failed
            failures.append(f"{job_id}: {exc!r}")

    started = time.monotonic()
    threads = [
        threading.Thread(target=render_video_task, args=(i,), daemon=True) for i in range(jobs)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(
        json.dumps(
            {
                "jobs": jobs,
                "failed": len(failures),
                "failures": failures[:5],
                "seconds": time.monotonic() - started,
                "threads": jobs,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
