"""Every way a render can fail ends as a failed job with a readable message."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import Stack
from temporalio.api.enums.v1 import EventType

from backend.orchestration import start_render


async def render_and_wait(stack: Stack, storyboard: object, *, approve: bool = True) -> dict:
    job_id = await stack.create_job(storyboard)
    if approve:
        response = await stack.api.post(f"/api/v2/jobs/{job_id}/approve")
        assert response.status_code == 200, response.text
    else:
        await start_render(stack.temporal, stack.store, stack.settings, job_id)
    return await stack.wait_closed(job_id)


async def test_unapproved_storyboard_fails_with_seed_message(stack: Stack) -> None:
    job = await render_and_wait(stack, stack.sample_scenes(1), approve=False)
    assert job["status"] == "failed"
    assert job["error_message"] == "Storyboard must be approved"
    assert stack.renderer.stats()["creates"] == 0


async def test_empty_storyboard_fails_with_seed_message(stack: Stack) -> None:
    job = await render_and_wait(stack, {"scenes": []})
    assert job["status"] == "failed"
    assert job["error_message"] == "No storyboard data available"
    assert stack.renderer.stats()["creates"] == 0


async def test_scene_without_image_fails_with_seed_message(stack: Stack) -> None:
    scenes = stack.sample_scenes(3)
    scenes[1]["image_url"] = None
    job = await render_and_wait(stack, scenes)
    assert job["status"] == "failed"
    assert job["error_message"] == "Scene 2 is missing image"
    failed = (await stack.api.get(f"/api/v2/jobs/{job['id']}")).json()
    # The seed's shape for a failed job: its status and error (plus what every view has).
    assert {key: failed[key] for key in ("status", "job_id", "error", "workflow_id")} == {
        "status": "failed",
        "job_id": job["id"],
        "error": "Scene 2 is missing image",
        "workflow_id": f"render-video-{job['id']}",
    }
    assert "video_url" not in failed and "progress" not in failed


async def test_failed_prediction_fails_job_with_provider_error(stack: Stack) -> None:
    stack.renderer.add_fault("fail", times=1, detail="CUDA out of memory")
    job = await render_and_wait(stack, stack.sample_scenes(1))
    assert job["status"] == "failed"
    assert "CUDA out of memory" in job["error_message"]
    assert "failed" in job["error_message"]


async def test_aborted_prediction_fails_job(stack: Stack) -> None:
    stack.renderer.add_fault("abort", times=1)
    job = await render_and_wait(stack, stack.sample_scenes(1))
    assert job["status"] == "failed"
    assert "aborted" in job["error_message"]


@pytest.mark.parametrize(
    ("fault", "expected"),
    [("truncated", "is not a readable video"), ("not_mp4", "not an MP4")],
)
async def test_a_broken_clip_is_rendered_once_more_then_the_job_fails(
    stack: Stack, fault: str, expected: str
) -> None:
    stack.renderer.add_fault(fault, times=2)
    job = await render_and_wait(stack, stack.sample_scenes(2))
    assert job["status"] == "failed"
    assert expected in job["error_message"]
    assert_user_facing(job["error_message"], stack)
    # Two takes, both billed and recorded; neither became a video.
    assert stack.renderer.stats()["creates"] == 2
    assert [e["take"] for e in stack.store.ledger(job["id"])] == [1, 2]
    assert job["billed_seconds"] == 4.0
    assert not stack.settings.video_path(job["id"]).exists()
    served = await stack.api.get(f"/api/videos/{job['id']}/data")
    assert served.status_code == 404
    assert "detail" in served.json()


async def test_a_clip_that_fails_its_checks_once_is_retaken_and_both_takes_are_billed(
    stack: Stack,
) -> None:
    stack.renderer.add_fault("truncated", times=1)
    job = await render_and_wait(stack, stack.sample_scenes(2, seconds=1))
    assert job["status"] == "completed", job["error_message"]
    assert stack.renderer.stats()["creates"] == 2
    # 2 images x $0.003 + (2 s + 2 s billed) x $0.10 = $0.406 -> $0.41
    assert (job["billed_seconds"], job["duration_seconds"], job["actual_cost"]) == (4.0, 2.0, 0.41)


async def test_oversized_video_fails_without_retry(stack: Stack) -> None:
    stack.settings.max_video_bytes = 1000
    job = await render_and_wait(stack, stack.sample_scenes(1))
    assert job["status"] == "failed"
    assert "1000-byte limit" in job["error_message"]
    assert job["download_retries"] == 0
    leftovers = list(Path(stack.settings.data_dir, "videos", str(job["id"])).glob("*"))
    assert leftovers == []


async def test_rate_limited_create_waits_for_the_reset_it_names(stack: Stack) -> None:
    detail = "Request was throttled. Your rate limit resets in ~8s."
    stack.renderer.add_fault("rate_limit", times=1, detail=detail)
    job = await render_and_wait(stack, stack.sample_scenes(1))
    assert job["status"] == "completed", job["error_message"]
    assert stack.renderer.stats()["creates"] == 2
    scene_run = f"render-video-{job['id']}-scene-all"
    history = await stack.temporal.get_workflow_handle(scene_run).fetch_history()
    [scheduled] = [
        e
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
        and e.activity_task_scheduled_event_attributes.activity_type.name == "start_prediction"
    ]
    [started] = [
        e
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED
        and e.activity_task_started_event_attributes.scheduled_event_id == scheduled.event_id
    ]
    assert started.activity_task_started_event_attributes.attempt == 2
    assert "HTTP 429" in started.activity_task_started_event_attributes.last_failure.message
    # The second attempt came no sooner than the provider said the limit resets.
    gap = started.event_time.ToDatetime() - scheduled.event_time.ToDatetime()
    assert gap.total_seconds() >= 8


async def test_a_video_folder_that_cannot_be_written_fails_before_any_prediction(
    stack: Stack,
) -> None:
    job_id = await stack.create_job(stack.sample_scenes(1))
    # A directory where the video must go: the render would be paid for and then lost.
    stack.settings.video_path(job_id).mkdir(parents=True)
    await stack.api.post(f"/api/v2/jobs/{job_id}/approve")
    job = await stack.wait_closed(job_id)
    assert job["status"] == "failed"
    assert job["error_message"].startswith(
        "The job's video cannot be stored: its final.mp4 is not a file; no prediction was created"
    )
    # Cleanup could not remove it either: said, not retried for a day.
    assert "cleanup failed: could not remove final.mp4" in job["error_message"]
    assert_user_facing(job["error_message"], stack)
    assert stack.renderer.stats()["creates"] == 0


def assert_user_facing(message: str, stack: Stack) -> None:
    """A job's error names no file on the server and no Python object."""
    assert str(stack.settings.data_dir) not in message
    assert "/tmp" not in message and " object at 0x" not in message
    assert "Errno" not in message and "Traceback" not in message


async def test_failed_job_can_be_rendered_again(stack: Stack) -> None:
    stack.renderer.add_fault("fail", times=1)
    job = await render_and_wait(stack, stack.sample_scenes(1))
    assert job["status"] == "failed"
    again = await stack.api.post(f"/api/v2/jobs/{job['id']}/approve")
    assert again.status_code == 200
    job = await stack.wait_closed(job["id"])
    assert job["status"] == "completed", job["error_message"]
    assert job["error_message"] is None
