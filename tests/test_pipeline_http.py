"""The whole pipeline over HTTP: API -> Temporal -> worker -> local render server -> MP4."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import av
from support import Stack, eventually
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowExecutionStatus

# The job's run: validate, plan, then (its scenes rendered by children) stitch and publish.
JOB_STEPS = [
    "validate_storyboard",
    "plan_render",
    "stitch_video",
    "verify_video",
    "publish_video",
    "make_previews",
    "record_cost",
]
# A scene's run: create, wait (here by polling), download, check, each step recorded.
SCENE_STEPS = [
    "start_prediction",
    "record_scene",
    "poll_prediction",
    "record_scene",
    "download_clip",
    "check_clip",
    "record_scene",
]


async def scheduled_activities(stack: Stack, workflow_id: str) -> list[str]:
    history = await stack.temporal.get_workflow_handle(workflow_id).fetch_history()
    return [
        event.activity_task_scheduled_event_attributes.activity_type.name
        for event in history.events
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
    ]


async def test_happy_path_renders_serves_and_costs_the_video(stack: Stack) -> None:
    scenes = stack.sample_scenes(count=3, seconds=1.5)
    job_id = await stack.create_job()
    put = await stack.api.put(f"/api/v2/jobs/{job_id}/storyboard", json={"scenes": scenes})
    assert put.status_code == 200, put.text
    assert put.json()["status"] == "ready"

    approved = await stack.api.post(f"/api/v2/jobs/{job_id}/approve")
    assert approved.status_code == 200, approved.text
    workflow_id = approved.json()["workflow_id"]
    assert workflow_id == f"render-video-{job_id}"
    assert approved.json()["status"] == "rendering_started"

    job = await stack.wait_closed(job_id)
    assert job["status"] == "completed", job["error_message"]

    status = (await stack.api.get(f"/api/v2/jobs/{job_id}")).json()
    assert status["status"] == "completed"
    assert status["video_url"] == f"/api/videos/{job_id}/data"

    video = await stack.api.get(status["video_url"])
    assert video.status_code == 200
    assert video.headers["content-type"] == "video/mp4"
    local = Path(stack.settings.data_dir, "videos", str(job_id), "final.mp4")
    assert video.content == local.read_bytes()
    with av.open(str(local)) as container:
        duration = container.duration / 1_000_000
        assert container.streams.video[0].codec_context.name == "h264"
    assert abs(duration - 4.5) <= 0.1

    # 3 images x $0.003 + 4.5 s x $0.10 = $0.459, half-up to cents.
    assert status["actual_cost"] == 0.46
    assert job["progress"]["scenes_total"] == 3
    assert job["progress"]["scenes_completed"] == 3
    assert job["download_retries"] == 0
    assert job["prediction_id"]


async def test_video_supports_range_requests(stack: Stack) -> None:
    job_id = await stack.create_job(stack.sample_scenes(count=1, seconds=1))
    await stack.api.post(f"/api/v2/jobs/{job_id}/approve")
    assert (await stack.wait_closed(job_id))["status"] == "completed"
    whole = (await stack.api.get(f"/api/videos/{job_id}/data")).content
    part = await stack.api.get(f"/api/videos/{job_id}/data", headers={"Range": "bytes=4-11"})
    assert part.status_code == 206
    assert part.content == whole[4:12]
    assert part.content[:4] == b"ftyp"
    head = await stack.api.head(f"/api/videos/{job_id}/data")
    assert head.status_code == 200
    assert head.headers["content-length"] == str(len(whole))
    assert head.content == b""
    assert part.headers["content-range"] == f"bytes 4-11/{len(whole)}"


async def test_history_shows_each_step_and_polling_as_retries(stack: Stack) -> None:
    # A slow render makes poll_prediction fail "still processing" many times over.
    # Long enough that polling surely starts before it ends, however late on a busy machine.
    stack.renderer.add_fault("slow_render", times=1, delay=6.0)
    job_id = await stack.create_job(stack.sample_scenes(count=2, seconds=1))
    approved = await stack.api.post(f"/api/v2/jobs/{job_id}/approve")
    job = await stack.wait_closed(job_id)
    assert job["status"] == "completed", job["error_message"]

    assert await scheduled_activities(stack, approved.json()["workflow_id"]) == JOB_STEPS
    scene_run = f"render-video-{job_id}-scene-all"
    assert await scheduled_activities(stack, scene_run) == SCENE_STEPS
    history = await stack.temporal.get_workflow_handle(scene_run).fetch_history()
    poll_attempts = [
        event.activity_task_started_event_attributes.attempt
        for event in history.events
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED
        and event.activity_task_started_event_attributes.attempt > 1
    ]
    # Several polls happened, yet the history holds one scheduled poll_prediction.
    assert poll_attempts and max(poll_attempts) >= 3
    assert stack.renderer.stats()["gets"] >= 3


async def test_second_approve_starts_no_second_render(stack: Stack) -> None:
    stack.renderer.add_fault("slow_render", times=1, delay=1.0)
    job_id = await stack.create_job(stack.sample_scenes(count=1))
    first = await stack.api.post(f"/api/v2/jobs/{job_id}/approve")
    second = await stack.api.post(f"/api/v2/jobs/{job_id}/approve")
    assert first.json()["workflow_id"] == second.json()["workflow_id"]
    assert (await stack.wait_closed(job_id))["status"] == "completed"
    third = await stack.api.post(f"/api/v2/jobs/{job_id}/approve")
    assert third.json()["workflow_id"] == first.json()["workflow_id"]
    assert third.json()["status"] == "completed"
    assert stack.renderer.stats()["creates"] == 1
    assert (await stack.api.get(f"/api/v2/jobs/{job_id}")).json()["status"] == "completed"


async def test_rendering_status_has_the_seed_shape(stack: Stack) -> None:
    stack.renderer.add_fault("slow_start", times=1, delay=2.0)
    job_id = await stack.create_job(stack.sample_scenes(count=1))
    await stack.api.post(f"/api/v2/jobs/{job_id}/approve")
    body = (await stack.api.get(f"/api/v2/jobs/{job_id}")).json()
    assert body["status"] == "rendering"
    assert set(body["progress"]) == {"current_stage", "message", "scenes_total", "scenes_completed"}
    await stack.wait_closed(job_id)


async def test_storyboard_as_json_text_is_accepted(stack: Stack) -> None:
    scenes = stack.sample_scenes(count=1)
    job_id = await stack.create_job()
    put = await stack.api.put(f"/api/v2/jobs/{job_id}/storyboard", json=json.dumps(scenes))
    assert put.status_code == 200, put.text
    stored = json.loads(stack.store.get(job_id)["storyboard_data"])
    assert stored["scenes"][0]["image_url"] == scenes[0]["image_url"]


async def test_seed_entry_point_render_video_task(stack: Stack) -> None:
    """Code written against the old renderer: the seed's functions, unchanged."""
    settings = stack.settings
    env = dict(
        os.environ,
        DATA_DIR=str(settings.data_dir),
        DATABASE_URL=settings.resolved_database_url,
        TEMPORAL_ADDRESS=settings.temporal_address,
        TASK_QUEUE=settings.task_queue,
        POLL_INTERVAL_SECONDS="0.2",
    )
    script = (
        "import json, sys\n"
        "from backend.database import create_video_job, approve_storyboard, get_job\n"
        "from backend.services import render_video_task\n"
        "job_id = create_video_job(json.loads(sys.argv[1]))\n"
        "approve_storyboard(job_id)\n"
        "render_video_task(job_id=job_id)\n"
        "job = get_job(job_id)\n"
        "print(json.dumps([job_id, job['status'], job['video_url'], job['actual_cost']]))\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        json.dumps(stack.sample_scenes(count=2, seconds=1)),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode == 0, err.decode()
    job_id, status, video_url, cost = json.loads(out.decode().strip().splitlines()[-1])
    assert status == "completed"
    assert video_url == f"/api/videos/{job_id}/data"
    # 2 images x $0.003 + 2 s x $0.10 = $0.206, half-up to cents.
    assert cost == 0.21


async def test_temporal_cancel_cancels_prediction_and_job(stack: Stack) -> None:
    stack.renderer.add_fault("slow_start", times=1, delay=30)
    job_id = await stack.create_job(stack.sample_scenes(count=1))
    await stack.api.post(f"/api/v2/jobs/{job_id}/approve")
    handle = stack.temporal.get_workflow_handle(f"render-video-{job_id}")
    await eventually(lambda: stack.store.get(job_id)["prediction_id"], what="the prediction")
    await handle.cancel()
    job = await stack.wait_closed(job_id)
    assert job["status"] == "cancelled"
    assert job["error_message"] == "Render cancelled"
    assert (await handle.describe()).status == WorkflowExecutionStatus.CANCELED
    assert stack.renderer.stats()["cancelled_ids"] == [job["prediction_id"]]
