"""The work of a render without the orchestration: the same activities, called one after the
other in one process through `temporalio.testing.ActivityEnvironment` (no Temporal server,
no workflow, no signals), against the same API, job store and render server.

`python -m bench.orchestration_direct JOB_ID...` (the jobs approved, environment as the
worker's) renders each job in turn and prints the seconds it took as JSON. What this costs in
CPU is the floor under any orchestration of it."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass

from temporalio.testing import ActivityEnvironment

from activities.jobs import JobActivities
from activities.media import MediaActivities
from activities.predictions import PredictionActivities
from backend.database import JobStore, make_engine
from backend.provider import ProviderClient
from backend.settings import Settings
from worker import download_client
from workflows.payloads import (
    DownloadVideoInput,
    JobRef,
    PollPredictionInput,
    RecordCostInput,
    StartPredictionInput,
    ValidateStoryboardInput,
    VerifyVideoInput,
)

TERMINAL = {"succeeded", "failed", "canceled", "aborted"}


@dataclass
class Acts:
    jobs: JobActivities
    predictions: PredictionActivities
    media: MediaActivities


async def render(env: ActivityEnvironment, acts: Acts, job_id: int) -> float:
    t0 = time.perf_counter()
    summary = await env.run(acts.jobs.validate_storyboard, ValidateStoryboardInput(job_id=job_id))
    images = await env.run(acts.jobs.extract_images, JobRef(job_id))
    ref = await env.run(
        acts.predictions.start_prediction,
        StartPredictionInput(
            job_id=job_id,
            image_urls=images.image_urls,
            durations=images.durations,
            prompt=images.prompt,
        ),
    )
    # No webhook here: read the prediction until it is done (the render takes milliseconds).
    while True:
        state = await acts.predictions.provider.get(ref.prediction_id)
        if state.status in TERMINAL:
            break
        await asyncio.sleep(0.002)
    outcome = await env.run(
        acts.predictions.poll_prediction,
        PollPredictionInput(job_id=job_id, prediction_id=ref.prediction_id),
    )
    downloaded = await env.run(
        acts.media.download_video, DownloadVideoInput(job_id=job_id, url=outcome.output_url or "")
    )
    video = await env.run(
        acts.media.verify_video, VerifyVideoInput(job_id=job_id, path=downloaded.path)
    )
    await env.run(
        acts.jobs.record_cost,
        RecordCostInput(
            job_id=job_id,
            image_count=summary.scenes_total,
            duration_seconds=video.duration_seconds,
        ),
    )
    return time.perf_counter() - t0


async def main(job_ids: list[int]) -> None:
    settings = Settings(public_base_url=None)
    store = JobStore(make_engine(settings.resolved_database_url))
    async with download_client() as http:
        provider = ProviderClient(settings)
        acts = Acts(
            JobActivities(store, settings),
            PredictionActivities(store, provider, settings),
            MediaActivities(store, provider, settings, http),
        )
        env = ActivityEnvironment()
        print("ready", flush=True)
        sys.stdin.readline()  # the caller starts its CPU meter, then says go
        seconds = [await render(env, acts, job_id) for job_id in job_ids]
    print(json.dumps({"seconds": seconds}), flush=True)


if __name__ == "__main__":
    asyncio.run(main([int(a) for a in sys.argv[1:]]))
