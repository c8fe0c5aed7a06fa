"""Retry and timeout schedules, on a dev server whose clock skips idle waits."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path

import pytest
from support import Stack, running_stack
from temporalio import activity
from temporalio.api.enums.v1 import EventType
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.media import download_retry_delay
from backend.orchestration import start_render
from local_replicate.testing import RunningServer
from workflows.payloads import (
    CheckClipInput,
    ClipChecked,
    CostRecord,
    DownloadClipInput,
    DownloadedVideo,
    PollPredictionInput,
    PredictionOutcome,
    PredictionRef,
    PublishVideoInput,
    RecordCostInput,
    RecordSceneInput,
    RenderPlan,
    RenderPlanInput,
    ScenePlan,
    StartPredictionInput,
    StitchedVideo,
    StitchInput,
    StoryboardSummary,
    ValidateStoryboardInput,
    VerifyVideoInput,
    VideoInfo,
)
from workflows.render_scene import RenderScene
from workflows.render_video import RenderVideo, RenderVideoInput


@pytest.fixture
async def skipping_stack(
    skipping_env: WorkflowEnvironment, renderer: RunningServer, tmp_path: Path, jobs_db: str
) -> AsyncIterator[Stack]:
    async with running_stack(
        skipping_env,
        renderer,
        tmp_path,
        database_url=jobs_db,
        poll_interval_seconds=2.0,
        render_timeout_seconds=600,
    ) as value:
        yield value


async def approve_and_start(stack: Stack, job_id: int) -> None:
    # Time skipping is stamped on the start request by the env's own client, so these runs
    # start through it rather than through the API's client.
    stack.store.approve(job_id)
    await start_render(stack.temporal, stack.store, stack.settings, job_id)


async def test_download_is_retried_30s_then_90s_and_counted(skipping_stack: Stack) -> None:
    stack = skipping_stack
    stack.renderer.add_fault("download_error", times=2)
    job_id = await stack.create_job(stack.sample_scenes(1))
    await approve_and_start(stack, job_id)
    job = await stack.wait_closed(job_id)
    assert job["status"] == "completed", job["error_message"]
    assert job["download_retries"] == 2
    assert stack.renderer.stats()["file_gets"] == 3

    scene_run = f"render-video-{job_id}-scene-all"
    history = await stack.temporal.get_workflow_handle(scene_run).fetch_history()
    scheduled: datetime | None = None
    for event in history.events:
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            attrs = event.activity_task_scheduled_event_attributes
            if attrs.activity_type.name == "download_clip":
                scheduled = event.event_time.ToDatetime()
                download_event_id = event.event_id
        if (
            event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED
            and scheduled is not None
            and event.activity_task_started_event_attributes.scheduled_event_id == download_event_id
        ):
            started = event.event_time.ToDatetime()
            assert event.activity_task_started_event_attributes.attempt == 3
            # Two quick failures, then waits of 30 s and 90 s before the third attempt.
            assert 120 <= (started - scheduled).total_seconds() < 130
            break
    else:
        pytest.fail("download_clip never started")


async def test_render_timeout_cancels_the_prediction(skipping_stack: Stack) -> None:
    stack = skipping_stack
    # Each skipped poll still costs real round trips: a 1-minute budget keeps this quick.
    stack.settings.render_timeout_seconds = 60
    stack.settings.poll_interval_seconds = 5
    stack.renderer.add_fault("slow_start", times=1, delay=3600)
    job_id = await stack.create_job(stack.sample_scenes(1))
    await approve_and_start(stack, job_id)
    job = await stack.wait_closed(job_id)
    assert job["status"] == "failed"
    assert job["error_message"] == (
        f"Render timed out after 1 minute; prediction {job['prediction_id']} was cancelled"
    )
    stats = stack.renderer.stats()
    assert stats["cancelled_ids"] == [job["prediction_id"]]
    assert stats["predictions"][job["prediction_id"]] == "canceled"


# The workflow's own logic, with activity doubles: the retry policy honours the backoff a failed
# transfer asks for, and stops after the seed's three attempts.

download_attempts: list[datetime] = []


@activity.defn(name="validate_storyboard")
async def validate_double(input: ValidateStoryboardInput) -> StoryboardSummary:
    return StoryboardSummary(scenes_total=1, planned_seconds=2)


@activity.defn(name="plan_render")
async def plan_double(input: RenderPlanInput) -> RenderPlan:
    unit = ScenePlan(1, {"image": "http://example.invalid/a.png"}, "d1", 2.0, "2", [1])
    return RenderPlan(units=[unit], scenes_total=1)


@activity.defn(name="record_scene")
async def record_scene_double(input: RecordSceneInput) -> None:
    return None


@activity.defn(name="start_prediction")
async def start_double(input: StartPredictionInput) -> PredictionRef:
    return PredictionRef(prediction_id="p1", status="starting")


@activity.defn(name="poll_prediction")
async def poll_double(input: PollPredictionInput) -> PredictionOutcome:
    return PredictionOutcome(prediction_id="p1", status="succeeded", output_url="http://x/v.mp4")


@activity.defn(name="download_clip")
async def download_double(input: DownloadClipInput) -> DownloadedVideo:
    attempt = activity.info().attempt
    download_attempts.append(activity.info().current_attempt_scheduled_time)
    if attempt < 3:
        # As the real activity fails a transfer: asking for the seed's backoff.
        raise ApplicationError(
            "HTTP 500", type="DownloadFailed", next_retry_delay=download_retry_delay(attempt)
        )
    return DownloadedVideo(path="001-d1.mp4", size_bytes=1, attempt=3)


@activity.defn(name="check_clip")
async def check_double(input: CheckClipInput) -> ClipChecked:
    return ClipChecked(duration_seconds=2.0, frames=48, motion=1.0)


@activity.defn(name="stitch_video")
async def stitch_double(input: StitchInput) -> StitchedVideo:
    return StitchedVideo(path=".final.mp4", duration_seconds=2.0, mode="copy")


@activity.defn(name="verify_video")
async def verify_double(input: VerifyVideoInput) -> VideoInfo:
    return VideoInfo(duration_seconds=2.0, width=64, height=64, codec="h264")


@activity.defn(name="publish_video")
async def publish_double(input: PublishVideoInput) -> DownloadedVideo:
    return DownloadedVideo(path="final.mp4", size_bytes=1, attempt=1)


@activity.defn(name="record_cost")
async def cost_double(input: RecordCostInput) -> CostRecord:
    return CostRecord(actual_cost="0.20", video_url="/api/videos/1/data")


async def test_download_retry_policy_spacing(skipping_env: WorkflowEnvironment) -> None:
    download_attempts.clear()
    queue = f"logic-{uuid.uuid4().hex[:8]}"
    doubles = [
        validate_double,
        plan_double,
        record_scene_double,
        start_double,
        poll_double,
        download_double,
        check_double,
        stitch_double,
        verify_double,
        publish_double,
        cost_double,
    ]
    async with Worker(
        skipping_env.client,
        task_queue=queue,
        workflows=[RenderVideo, RenderScene],
        activities=doubles,
    ):
        result = await skipping_env.client.execute_workflow(
            RenderVideo.run,
            RenderVideoInput(job_id=1),
            id=f"render-video-logic-{uuid.uuid4().hex[:6]}",
            task_queue=queue,
        )
    assert result.status == "completed"
    assert len(download_attempts) == 3
    gaps = [
        (b - a).total_seconds()
        for a, b in zip(download_attempts, download_attempts[1:], strict=False)
    ]
    assert 30 <= gaps[0] < 32
    assert 90 <= gaps[1] < 92
