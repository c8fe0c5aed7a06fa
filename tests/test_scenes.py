"""Per-scene rendering on image-to-video models: one RenderScene run and one prediction per
scene, clips stitched into one MP4, and only what changed rendered again. Real parts only:
the local render server renders each scene as `local/i2v` does, or poses as a real model."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import av
import pytest
from support import Stack, eventually, listed_runs, running_stack
from temporalio.api.enums.v1 import EventType
from temporalio.testing import WorkflowEnvironment

from backend.model_schemas import available_models
from local_replicate.testing import RunningServer
from workflows.payloads import scene_workflow_id, workflow_id_for


@pytest.fixture
async def scenes_stack(
    temporal_env: WorkflowEnvironment, renderer: RunningServer, tmp_path: Path, jobs_db: str
) -> AsyncIterator[Stack]:
    async with running_stack(
        temporal_env,
        renderer,
        tmp_path,
        database_url=jobs_db,
        webhooks=True,
        replicate_model="local/i2v",
        webhook_wait_seconds=60.0,
    ) as stack:
        yield stack


def storyboard(stack: Stack, count: int, seconds: float = 1.0) -> list[dict[str, Any]]:
    scenes = stack.sample_scenes(count=count, seconds=seconds)
    for number, scene in enumerate(scenes, start=1):
        scene["prompt"] = f"scene {number}: a slow pan"
    return scenes


def video_seconds(path: Path) -> tuple[float, int]:
    """The duration and frame count of an MP4, counted by decoding it."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        rate = float(stream.average_rate or 24)
    return frames / rate, frames


async def render(stack: Stack, job_id: int, **body: Any) -> dict[str, Any]:
    response = await stack.api.post(f"/api/v2/jobs/{job_id}/approve", json=body or None)
    assert response.status_code == 200, response.text
    return await stack.wait_closed(job_id)


async def test_a_four_scene_job_is_four_predictions_four_scene_runs_and_one_video(
    scenes_stack: Stack,
) -> None:
    stack = scenes_stack
    job_id = await stack.create_job(storyboard(stack, 4))
    job = await render(stack, job_id)
    assert job["status"] == "completed", job["error_message"]

    stats = stack.renderer.stats()
    assert stats["creates"] == 4
    assert len(set(stats["predictions"])) == 4
    assert job["progress"]["scenes_completed"] == 4
    view = (await stack.api.get(f"/api/v2/jobs/{job_id}")).json()
    assert [scene["number"] for scene in view["scenes"]] == [1, 2, 3, 4]
    assert {scene["status"] for scene in view["scenes"]} == {"completed"}
    assert {scene["prediction_id"] for scene in view["scenes"]} == set(stats["predictions"])
    assert [scene["billed_seconds"] for scene in view["scenes"]] == [1.0] * 4
    # The seed's formula on billed seconds: 4 images x $0.003 + 4 s x $0.10 = $0.412.
    assert (view["actual_cost"], view["billed_seconds"], view["duration_seconds"]) == (
        0.41,
        4.0,
        4.0,
    )

    seconds, frames = video_seconds(stack.settings.video_path(job_id))
    assert abs(seconds - 4.0) <= 1 / 24
    kept = sorted(p.name for p in stack.settings.scenes_dir(job_id).iterdir())
    clips = [name for name in kept if name.endswith(".mp4")]
    assert len(clips) == 4 and all(not name.startswith(".") for name in kept)

    # Every scene ran as a child of the job's run, found under the job's id; other
    # deployments on the same server (a WORKFLOW_ID_PREFIX) have job ids of their own.
    query = f"JobId = '{job_id}' AND WorkflowId STARTS_WITH '{workflow_id_for(job_id)}'"
    runs = await eventually(
        lambda: listed_runs(stack, query, 5), what="the job's and its scenes' runs in visibility"
    )
    assert sorted(runs) == sorted(
        [workflow_id_for(job_id)] + [scene_workflow_id(job_id, n) for n in range(1, 5)]
    )
    scene = await stack.temporal.get_workflow_handle(scene_workflow_id(job_id, 3)).describe()
    assert await scene.static_summary() == f"Scene 3 of job {job_id}"


async def test_editing_one_scene_renders_one_prediction_and_unchanged_renders_none(
    scenes_stack: Stack,
) -> None:
    stack = scenes_stack
    scenes = storyboard(stack, 4)
    job_id = await stack.create_job(scenes)
    assert (await render(stack, job_id))["status"] == "completed"
    first_video = stack.settings.video_path(job_id).read_bytes()
    assert stack.renderer.stats()["creates"] == 4

    # Unchanged: approving again renders (and bills) nothing.
    again = await stack.api.post(f"/api/v2/jobs/{job_id}/approve")
    assert again.json()["status"] == "completed"
    assert stack.renderer.stats()["creates"] == 4

    # Scene 2 edited: the job is ready again, its video still served until the new one is in.
    scenes[1]["prompt"] = "scene 2: a different take"
    scenes[1]["image_url"] = scenes[1]["image_url"].replace("scene-2", "scene-5")
    put = await stack.api.put(f"/api/v2/jobs/{job_id}/storyboard", json=scenes)
    assert put.status_code == 200, put.text
    assert put.json()["status"] == "ready"
    served = await stack.api.get(f"/api/videos/{job_id}/data")
    assert served.status_code == 200 and served.content == first_video
    job = await render(stack, job_id)
    assert job["status"] == "completed", job["error_message"]
    assert stack.renderer.stats()["creates"] == 5
    changed = [s for s in job["scenes"] if s["number"] == 2]
    assert changed[0]["billed_seconds"] == 2.0  # both takes of scene 2 were billed
    assert stack.settings.video_path(job_id).read_bytes() != first_video
    # What the job cost in all: 4 images + 5 billed seconds.
    assert (job["billed_seconds"], job["actual_cost"]) == (5.0, 0.51)

    # Fresh takes of every scene, asked for.
    job = await render(stack, job_id, rerender=True)
    assert job["status"] == "completed", job["error_message"]
    assert stack.renderer.stats()["creates"] == 9


async def test_a_failed_scene_fails_the_job_in_its_words_and_cancels_the_others(
    scenes_stack: Stack,
) -> None:
    stack = scenes_stack
    stack.renderer.add_fault("fail", detail="NSFW content detected", match={"prompt": "scene 3:"})
    # Scene 3 fails a few seconds in, so scene 4's prediction is surely created and recorded
    # by then (creates are paced, and the run learns each id one activity later).
    stack.renderer.add_fault("slow_start", delay=5.0, match={"prompt": "scene 3:"})
    # Scene 4 is still rendering when scene 3 fails: it must be cancelled, not paid to the end.
    stack.renderer.add_fault("slow_render", delay=60.0, match={"prompt": "scene 4:"})
    job_id = await stack.create_job(storyboard(stack, 4))
    job = await render(stack, job_id)
    assert job["status"] == "failed"
    assert job["error_message"] == "Scene 3 failed: NSFW content detected"
    by_number = {scene["number"]: scene for scene in job["scenes"]}
    assert by_number[3]["status"] == "failed"
    assert by_number[3]["error"] == "Scene 3 failed: NSFW content detected"
    assert by_number[4]["status"] == "cancelled"
    stats = stack.renderer.stats()
    assert by_number[4]["prediction_id"] in stats["cancelled_ids"]
    assert stats["predictions"][by_number[4]["prediction_id"]] == "canceled"


async def test_a_failed_job_approved_again_renders_only_the_scenes_it_lacks(
    temporal_env: WorkflowEnvironment, renderer: RunningServer, tmp_path: Path, jobs_db: str
) -> None:
    # One scene at a time: scenes 1 and 2 are surely done when scene 3 fails.
    async with running_stack(
        temporal_env,
        renderer,
        tmp_path,
        database_url=jobs_db,
        replicate_model="local/i2v",
        scene_concurrency=1,
    ) as stack:
        stack.renderer.add_fault("fail", detail="model overloaded", match={"prompt": "scene 3:"})
        job_id = await stack.create_job(storyboard(stack, 4))
        job = await render(stack, job_id)
        assert job["status"] == "failed"
        assert job["error_message"] == "Scene 3 failed: model overloaded"
        statuses = [scene["status"] for scene in job["scenes"]]
        assert statuses == ["completed", "completed", "failed", "pending"]
        # The finished clips are kept for the next run.
        assert len(list(stack.settings.scenes_dir(job_id).glob("00[12]-*.mp4"))) == 2

        again = await render(stack, job_id)
        assert again["status"] == "completed", again["error_message"]
        # Scenes 3 and 4 only: 3 predictions before, 2 now.
        assert stack.renderer.stats()["creates"] == 5
        assert [scene["status"] for scene in again["scenes"]] == ["completed"] * 4


async def test_cancel_mid_render_cancels_every_unfinished_scene_prediction(
    scenes_stack: Stack,
) -> None:
    stack = scenes_stack
    stack.renderer.add_fault("slow_render", times=3, delay=60.0)
    job_id = await stack.create_job(storyboard(stack, 3))
    await stack.api.post(f"/api/v2/jobs/{job_id}/approve")
    await eventually(
        lambda: sum(1 for s in stack.store.get(job_id)["scenes"] if s["prediction_id"]) == 3,
        what="three predictions",
    )
    assert (await stack.api.post(f"/api/v2/jobs/{job_id}/cancel")).status_code == 202
    job = await stack.wait_closed(job_id)
    assert job["status"] == "cancelled"
    stats = stack.renderer.stats()
    predictions = [scene["prediction_id"] for scene in job["scenes"]]
    assert sorted(stats["cancelled_ids"]) == sorted(predictions)
    assert {stats["predictions"][p] for p in predictions} == {"canceled"}
    assert {scene["status"] for scene in job["scenes"]} == {"cancelled"}


async def test_scenes_render_at_most_scene_concurrency_at_once(
    temporal_env: WorkflowEnvironment, renderer: RunningServer, tmp_path: Path, jobs_db: str
) -> None:
    async with running_stack(
        temporal_env,
        renderer,
        tmp_path,
        database_url=jobs_db,
        replicate_model="local/i2v",
        scene_concurrency=2,
    ) as stack:
        job_id = await stack.create_job(storyboard(stack, 5))
        assert (await render(stack, job_id))["status"] == "completed"
        history = await stack.temporal.get_workflow_handle(workflow_id_for(job_id)).fetch_history()
        running = most = 0
        for event in history.events:
            if event.event_type == EventType.EVENT_TYPE_START_CHILD_WORKFLOW_EXECUTION_INITIATED:
                running += 1
                most = max(most, running)
            elif event.event_type == EventType.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_COMPLETED:
                running -= 1
        assert most == 2
        assert stack.renderer.stats()["creates"] == 5


async def test_an_expired_output_is_rendered_once_more_and_recorded(scenes_stack: Stack) -> None:
    stack = scenes_stack
    # The provider deleted the output before the download started (its hour ran out).
    stack.renderer.add_fault("output_gone", times=1)
    job_id = await stack.create_job(storyboard(stack, 1))
    job = await render(stack, job_id)
    assert job["status"] == "completed", job["error_message"]
    assert stack.renderer.stats()["creates"] == 2
    assert [entry["take"] for entry in stack.store.ledger(job_id)] == [1, 2]
    assert job["billed_seconds"] == 2.0  # both renders were paid for


REAL_MODELS = [model for model in available_models() if not model.startswith("local/")]


@pytest.mark.parametrize("model", REAL_MODELS)
async def test_each_built_in_model_renders_a_storyboard_against_the_server_posing_as_it(
    model: str,
    temporal_env: WorkflowEnvironment,
    renderer: RunningServer,
    tmp_path: Path,
    jobs_db: str,
) -> None:
    async with running_stack(
        temporal_env, renderer, tmp_path, database_url=jobs_db, replicate_model=model
    ) as stack:
        # 2 s scenes: each model is asked for its smallest duration that covers them (Kling
        # renders 5 s) and the clip is trimmed back to 2 s.
        job_id = await stack.create_job(storyboard(stack, 2, seconds=2))
        job = await render(stack, job_id)
        assert job["status"] == "completed", job["error_message"]
        assert stack.renderer.stats()["creates"] == 2
        seconds, _ = video_seconds(stack.settings.video_path(job_id))
        assert abs(seconds - 4.0) <= 0.1
        for prediction_id in stack.renderer.stats()["predictions"]:
            record = stack.renderer.prediction(prediction_id)
            assert record["model"] == model
        # Billed as the model renders: at least the scenes' 4 s (Kling: 2 x 5 s).
        assert job["billed_seconds"] >= 4.0


async def test_render_timeout_is_sent_to_the_provider_as_cancel_after(
    scenes_stack: Stack,
) -> None:
    stack = scenes_stack
    job_id = await stack.create_job(storyboard(stack, 1))
    assert (await render(stack, job_id))["status"] == "completed"
    [prediction_id] = stack.renderer.stats()["predictions"]
    record = stack.renderer.prediction(prediction_id)
    deadline = datetime.fromisoformat(record["deadline"])
    created = datetime.fromisoformat(record["created_at"])
    timeout = stack.settings.render_timeout_seconds
    assert abs((deadline - created).total_seconds() - timeout) <= 1
