"""The baseline for bench/api.py: a bare FastAPI app with one route shaped like the real one.

Served by the same `python -m uvicorn ... --timeout-keep-alive 75 --log-level warning` command
as `api.main:app`, so the two differ only in what the endpoint does.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

app = FastAPI()

# What GET /api/v2/jobs/{id} answers for a completed job, with values of the same length.
JOB: dict[str, Any] = {
    "status": "completed",
    "job_id": 1,
    "video_url": "/api/videos/1/data",
    "actual_cost": 1.01,
    "workflow_id": "render-video-1",
}


@app.get("/api/v2/jobs/{job_id}")
async def get_job_status(job_id: int) -> dict[str, Any]:
    return {**JOB, "job_id": job_id}
