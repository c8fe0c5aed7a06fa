"""Durable control from outside: webhooks, review and approve, progress, cancel, search.

Everything runs on real parts: the dev server, the worker, the API over HTTP, the local
render server (which signs and sends webhooks the way Replicate does) and the `temporal` CLI.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import av
import pytest
from support import Stack, eventually, listed_runs, running_stack
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowExecutionStatus, WorkflowHandle
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment

from backend.cli import temporal_binary
from backend.provider import ProviderClient
from local_replicate.testing import RunningServer
from local_replicate.webhooks import sign
from workflows.payloads import (
    ApproveRenderInput,
    ApproveSignal,
    RenderProgress,
    SceneProgress,
    scene_workflow_id,
)
from workflows.render_scene import RenderScene
from workflows.render_video import JOB_ID, RenderVideo


@pytest.fixture
async def hooked(
    temporal_env: WorkflowEnvironment, renderer: RunningServer, tmp_path: Path, jobs_db: str
) -> AsyncIterator[Stack]:
    """A stack whose renders are reported back by webhook (PUBLIC_BASE_URL is the API)."""
    async with running_stack(
        temporal_env,
        renderer,
        tmp_path,
        webhooks=True,
        database_url=jobs_db,
        # Long enough that a slow render on a busy machine still ends by webhook.
        webhook_wait_seconds=60.0,
    ) as stack:
        yield stack


async def cli(env: WorkflowEnvironment, *args: str) -> subprocess.CompletedProcess[str]:
    """The `temporal` CLI, run off the event loop: the worker answering it lives on that loop."""
    address = env.client.service_client.config.target_host
    return await asyncio.to_thread(
        subprocess.run,
        [temporal_binary(), *args, "--address", address],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def handle_of(stack: Stack, job_id: int, scene: int | None = None) -> WorkflowHandle[Any, Any]:
    """The job's run, or (scene given) the run of one of its scenes; these stacks render with
    local/slideshow, whose one prediction for the whole storyboard is scene 0."""
    workflow_id = f"render-video-{job_id}" if scene is None else scene_workflow_id(job_id, scene)
    return stack.temporal.get_workflow_handle(workflow_id)


async def history_events(stack: Stack, job_id: int, scene: int | None = None) -> list[Any]:
    return list((await handle_of(stack, job_id, scene).fetch_history()).events)


async def scheduled(stack: Stack, job_id: int, scene: int | None = 0) -> list[str]:
    """The activities a run scheduled: by default the scene run's, where the predictions are."""
    return [
        e.activity_task_scheduled_event_attributes.activity_type.name
        for e in await history_events(stack, job_id, scene)
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
    ]


async def signals(stack: Stack, job_id: int, scene: int | None = None) -> list[str]:
    return [
        e.workflow_execution_signaled_event_attributes.signal_name
        for e in await history_events(stack, job_id, scene)
        if e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED
    ]


async def webhook_signals(stack: Stack, job_id: int) -> list[str]:
    """Signals that reached the scene run, where webhooks are relayed."""
    try:
        return await signals(stack, job_id, scene=0)
    except RPCError:
        return []  # no scene run was ever started


async def live_view(stack: Stack, job_id: int) -> dict[str, Any] | None:
    """The job's view once it carries the run's live progress (a query the API bounds in
    time, so a busy worker may leave it out of one answer)."""
    view: dict[str, Any] = (await stack.api.get(f"/api/v2/jobs/{job_id}")).json()
    return view if view.get("live") else None


async def progress_of(stack: Stack, job_id: int) -> RenderProgress:
    return await handle_of(stack, job_id).query(RenderVideo.progress)


async def stage_is(stack: Stack, job_id: int, stage: str) -> bool:
    try:
        return (await progress_of(stack, job_id)).stage == stage
    except Exception:  # noqa: BLE001 - the run may not have had its first task yet
        return False


async def in_review(stack: Stack, count: int = 1) -> int:
    """A new job submitted for review, once its run waits for approval."""
    job_id = await stack.create_job(stack.sample_scenes(count=count))
    response = await stack.api.post(f"/api/v2/jobs/{job_id}/review")
    assert response.status_code == 200, response.text
    await eventually(lambda: stage_is(stack, job_id, "awaiting_approval"), what="review")
    return job_id


def signed_headers(body: str, *, secret: str, age: int = 0) -> dict:
    """Headers of a webhook signed with `secret` (the render server's: renderer.webhook_secret)."""
    msg_id = f"msg_test_{time.monotonic_ns()}"
    stamp = int(time.time()) - age
    return {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(stamp),
        "webhook-signature": sign(secret, msg_id, stamp, body),
    }


# -- webhooks --


async def test_webhook_render_completes_with_at_most_one_get(hooked: Stack) -> None:
    job_id = await hooked.create_job(hooked.sample_scenes(count=2))
    assert (await hooked.api.post(f"/api/v2/jobs/{job_id}/approve")).status_code == 200
    job = await hooked.wait_closed(job_id)
    assert job["status"] == "completed", job["error_message"]

    stats = hooked.renderer.stats()
    assert stats["creates"] == 1
    assert stats["gets"] <= 1
    delivered = [
        d for d in stats["webhook_deliveries"] if d["prediction_id"] == job["prediction_id"]
    ]
    assert delivered, "the render server never called the webhook"
    assert await signals(hooked, job_id) == ["approve"]
    assert await webhook_signals(hooked, job_id) == ["prediction_finished"]
    # The webhook answered: no polling activity was ever scheduled.
    assert "poll_prediction" not in await scheduled(hooked, job_id)


async def test_lost_webhook_falls_back_to_polling(
    temporal_env: WorkflowEnvironment, renderer: RunningServer, tmp_path: Path, jobs_db: str
) -> None:
    renderer.add_fault("lose_webhook")
    async with running_stack(
        temporal_env,
        renderer,
        tmp_path,
        webhooks=True,
        database_url=jobs_db,
        webhook_wait_seconds=1.0,
    ) as hooked:
        job_id = await hooked.create_job(hooked.sample_scenes(count=1))
        await hooked.api.post(f"/api/v2/jobs/{job_id}/approve")
        job = await hooked.wait_closed(job_id)
        assert job["status"] == "completed", job["error_message"]
        assert "prediction_finished" not in await webhook_signals(hooked, job_id)
        assert "poll_prediction" in await scheduled(hooked, job_id)
        assert renderer.stats()["gets"] >= 1
        assert renderer.stats()["webhooks_dropped"] >= 1


async def test_forged_or_stale_webhooks_get_401_and_change_nothing(hooked: Stack) -> None:
    hooked.renderer.add_fault("slow_render", delay=3.0)
    job_id = await hooked.create_job(hooked.sample_scenes(count=1))
    await hooked.api.post(f"/api/v2/jobs/{job_id}/approve")
    prediction_id = await eventually(
        lambda: hooked.store.get(job_id)["prediction_id"], what="the prediction id"
    )
    forged = json.dumps(
        {"id": prediction_id, "status": "succeeded", "output": "http://evil.example/x.mp4"}
    )
    url = f"/api/v2/webhooks/replicate?job_id={job_id}"
    bad_secret = "whsec_" + "QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQQ=="
    attempts = {
        "wrong secret": signed_headers(forged, secret=bad_secret),
        "stale timestamp": signed_headers(forged, secret=hooked.renderer.webhook_secret, age=600),
        "no signature": {"content-type": "application/json"},
    }
    for name, headers in attempts.items():
        response = await hooked.api.post(url, content=forged, headers=headers)
        assert response.status_code == 401, (name, response.text)
        assert "detail" in response.json()
    # A body changed after signing is refused too.
    headers = signed_headers(forged, secret=hooked.renderer.webhook_secret)
    tampered = forged.replace("evil", "eviler")
    assert (await hooked.api.post(url, content=tampered, headers=headers)).status_code == 401

    job = await hooked.wait_closed(job_id)
    assert job["status"] == "completed"
    assert hooked.store.get(job_id)["video_url"] == f"/api/videos/{job_id}/data"
    # Only the render server's own delivery reached the run: none of the refused ones did.
    assert await webhook_signals(hooked, job_id) == ["prediction_finished"]


async def test_a_forged_webhook_signed_with_the_real_secret_cannot_finish_a_job(
    hooked: Stack,
) -> None:
    """Whoever holds the signing secret can send a `succeeded` webhook naming another job's
    video as the output. The run only wakes up: it reads the prediction from the provider,
    finds it still rendering, and later downloads what the provider itself returned."""
    donor = await hooked.create_job(hooked.sample_scenes(count=1, seconds=1))
    await hooked.api.post(f"/api/v2/jobs/{donor}/approve")
    assert (await hooked.wait_closed(donor))["status"] == "completed"

    # Rendering held long enough for the forged wake-up to be read while it still runs.
    hooked.renderer.add_fault("slow_render", delay=12.0)
    job_id = await hooked.create_job(hooked.sample_scenes(count=2, seconds=1))
    await hooked.api.post(f"/api/v2/jobs/{job_id}/approve")
    prediction_id = await eventually(
        lambda: hooked.store.get(job_id)["prediction_id"], what="the prediction id"
    )
    secret = await ProviderClient(hooked.settings).webhook_secret()
    base = str(hooked.api.base_url).rstrip("/")
    forged = json.dumps(
        {"id": prediction_id, "status": "succeeded", "output": f"{base}/api/videos/{donor}/data"}
    )
    response = await hooked.api.post(
        "/api/v2/webhooks/replicate", content=forged, headers=signed_headers(forged, secret=secret)
    )
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "signalled"

    job = await hooked.wait_closed(job_id)
    assert job["status"] == "completed", job["error_message"]
    own = hooked.settings.video_path(job_id).read_bytes()
    assert own != hooked.settings.video_path(donor).read_bytes()
    with av.open(str(hooked.settings.video_path(job_id))) as container:
        assert abs(container.duration / 1_000_000 - 2.0) <= 0.1  # its own 2 scenes, not 1
    stats = hooked.renderer.stats()
    assert stats["predictions"][prediction_id] == "succeeded"
    assert prediction_id not in stats["cancelled_ids"]
    # Each wake-up was checked with the provider: the forged one and the real one.
    assert (await scheduled(hooked, job_id)).count("get_prediction") == 2


async def test_repeated_or_late_webhook_is_harmless(hooked: Stack) -> None:
    job_id = await hooked.create_job(hooked.sample_scenes(count=1))
    await hooked.api.post(f"/api/v2/jobs/{job_id}/approve")
    job = await hooked.wait_closed(job_id)
    assert job["status"] == "completed"
    delivery = next(
        d
        for d in hooked.renderer.stats()["webhook_deliveries"]
        if d["prediction_id"] == job["prediction_id"]
    )
    body = json.dumps({"id": job["prediction_id"], "status": "failed", "error": "late and wrong"})
    url = f"/api/v2/webhooks/replicate?job_id={job_id}"

    # The same webhook id again (Replicate retrying) is acknowledged as already done.
    secret = hooked.renderer.webhook_secret
    again = signed_headers(body, secret=secret)
    again["webhook-id"] = delivery["webhook_id"]
    again["webhook-signature"] = sign(
        secret, delivery["webhook_id"], int(again["webhook-timestamp"]), body
    )
    response = await hooked.api.post(url, content=body, headers=again)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "duplicate"

    # A new, valid webhook after the run closed changes nothing either.
    late = await hooked.api.post(url, content=body, headers=signed_headers(body, secret=secret))
    assert late.status_code == 200, late.text
    assert late.json()["status"] == "run_closed"
    after = hooked.store.get(job_id)
    assert after["status"] == "completed" and after["error_message"] is None
    assert await webhook_signals(hooked, job_id) == ["prediction_finished"]


async def test_duplicate_webhook_delivery_signals_the_run_once(hooked: Stack) -> None:
    hooked.renderer.add_fault("duplicate_webhook")
    job_id = await hooked.create_job(hooked.sample_scenes(count=1))
    await hooked.api.post(f"/api/v2/jobs/{job_id}/approve")
    job = await hooked.wait_closed(job_id)
    assert job["status"] == "completed"

    def both_delivered() -> bool:
        stats = hooked.renderer.stats()
        mine = [
            d
            for d in stats["webhook_deliveries"]
            if d["prediction_id"] == job["prediction_id"] and d["ok"]
        ]
        return len(mine) == 2 and mine[0]["webhook_id"] == mine[1]["webhook_id"]

    await eventually(both_delivered, what="two deliveries of the same webhook")
    assert (await webhook_signals(hooked, job_id)).count("prediction_finished") == 1


# -- review, approve signal and update --


async def test_review_waits_for_the_cli_approve_signal(
    stack: Stack, temporal_env: WorkflowEnvironment
) -> None:
    job_id = await stack.create_job(stack.sample_scenes(count=2))
    response = await stack.api.post(f"/api/v2/jobs/{job_id}/review")
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "in_review"
    await eventually(lambda: stage_is(stack, job_id, "awaiting_approval"), what="review")
    job = await eventually(lambda: live_view(stack, job_id), what="the view's live progress")
    assert job["status"] == "in_review"
    assert job["live"]["awaiting_approval"] is True
    assert stack.renderer.stats()["creates"] == 0  # nothing billed before approval

    result = await cli(
        temporal_env, "workflow", "signal", "-w", f"render-video-{job_id}", "--name", "approve"
    )
    assert result.returncode == 0, result.stderr
    job = await stack.wait_closed(job_id)
    assert job["status"] == "completed", job["error_message"]
    assert job["approved"] is True
    assert stack.renderer.stats()["creates"] == 1


async def test_api_approve_signals_the_waiting_run_and_never_starts_two(
    stack: Stack, temporal_env: WorkflowEnvironment
) -> None:
    job_id = await in_review(stack, count=1)
    first_run = (await handle_of(stack, job_id).describe()).run_id

    approved = await stack.api.post(
        f"/api/v2/jobs/{job_id}/approve", json={"approved_by": "ana@example.com"}
    )
    assert approved.status_code == 200, approved.text
    again = await stack.api.post(f"/api/v2/jobs/{job_id}/approve")
    assert again.json()["workflow_id"] == approved.json()["workflow_id"]
    job = await stack.wait_closed(job_id)
    assert job["status"] == "completed"
    assert job["approved_by"] == "ana@example.com"
    assert (await handle_of(stack, job_id).describe()).run_id == first_run
    runs = await eventually(
        lambda: listed_runs(stack, f"WorkflowId = 'render-video-{job_id}'", 1),
        what="the run in the visibility store",
    )
    assert len(runs) == 1
    assert stack.renderer.stats()["creates"] == 1


async def test_an_approval_sent_before_validation_ends_is_recorded(stack: Stack) -> None:
    job_id = await stack.create_job(stack.sample_scenes(count=1))
    await stack.api.post(f"/api/v2/jobs/{job_id}/review")
    # At once, from the SDK: the run may not have validated the storyboard yet.
    await handle_of(stack, job_id).signal(RenderVideo.approve, ApproveSignal(approved_by="early"))
    job = await stack.wait_closed(job_id)
    assert job["status"] == "completed", job["error_message"]
    assert job["approved"] is True and job["approved_by"] == "early"
    assert "record_approval" in await scheduled(stack, job_id, scene=None)


async def test_approve_render_update_returns_validation_errors(stack: Stack) -> None:
    scenes = stack.sample_scenes(count=2)
    scenes[1]["image_url"] = None
    job_id = await stack.create_job(scenes)
    await stack.api.post(f"/api/v2/jobs/{job_id}/review")
    result = await handle_of(stack, job_id).execute_update(
        RenderVideo.approve_render, ApproveRenderInput(approved_by="cli")
    )
    assert result.accepted is False
    assert result.errors == ["Scene 2 is missing image"]
    job = await stack.wait_closed(job_id)
    assert job["status"] == "failed"
    assert job["error_message"] == "Scene 2 is missing image"
    assert stack.renderer.stats()["creates"] == 0


async def test_approve_render_update_approves_a_valid_storyboard(stack: Stack) -> None:
    job_id = await stack.create_job(stack.sample_scenes(count=1))
    await stack.api.post(f"/api/v2/jobs/{job_id}/review")
    result = await handle_of(stack, job_id).execute_update(
        RenderVideo.approve_render, ApproveRenderInput(approved_by="update")
    )
    assert result.accepted is True and result.errors == []
    job = await stack.wait_closed(job_id)
    assert job["status"] == "completed"
    assert job["approved_by"] == "update"


async def test_review_without_approval_expires(
    temporal_env: WorkflowEnvironment, renderer: RunningServer, tmp_path: Path, jobs_db: str
) -> None:
    async with running_stack(
        temporal_env, renderer, tmp_path, database_url=jobs_db, review_timeout_seconds=1.0
    ) as stack:
        job_id = await stack.create_job(stack.sample_scenes(count=1))
        await stack.api.post(f"/api/v2/jobs/{job_id}/review")
        job = await stack.wait_closed(job_id)
        assert job["status"] == "expired"
        assert (
            job["error_message"] == f"Review expired: job {job_id} was not approved within 1 second"
        )
        view = (await stack.api.get(f"/api/v2/jobs/{job_id}")).json()
        # The seed's shape for a job that ended without a video, and what every view has.
        assert {key: view[key] for key in ("status", "job_id", "error", "workflow_id")} == {
            "status": "expired",
            "job_id": job_id,
            "error": job["error_message"],
            "workflow_id": f"render-video-{job_id}",
        }
        assert "video_url" not in view and "progress" not in view
        described = await handle_of(stack, job_id).describe()
        assert described.status == WorkflowExecutionStatus.FAILED
        assert renderer.stats()["creates"] == 0
        # An expired job may be submitted again.
        again = await stack.api.post(f"/api/v2/jobs/{job_id}/review")
        assert again.status_code == 200, again.text


# -- progress: query, GET, CLI, SSE --


async def test_progress_query_from_the_sdk_the_api_and_the_cli(
    stack: Stack, temporal_env: WorkflowEnvironment
) -> None:
    # Held rendering far longer than the checks below take, however busy the machine.
    stack.renderer.add_fault("slow_render", delay=30.0)
    job_id = await stack.create_job(stack.sample_scenes(count=3))
    await stack.api.post(f"/api/v2/jobs/{job_id}/approve")
    await eventually(lambda: stage_is(stack, job_id, "rendering"), what="rendering")

    live = await progress_of(stack, job_id)
    assert live.job_id == job_id and live.scenes_total == 3
    assert live.estimated_cost == "0.31"  # 3 x $0.003 + 3 s x $0.10, rounded to the cent
    # The scene run knows its prediction (slideshow: one prediction for all three scenes).
    scene = await eventually(
        lambda: _prediction_of(handle_of(stack, job_id, 0)), what="the scene's prediction"
    )
    assert scene.prediction_status in ("starting", "processing")

    # The store records the prediction one activity after the scene run learns it: wait for
    # the view to carry it, then check it is the same one.
    async def recorded_view() -> dict[str, Any] | None:
        view = await live_view(stack, job_id)
        scenes = (view or {}).get("scenes") or [{"prediction_id": None}]
        return view if all(s["prediction_id"] for s in scenes) else None

    view = await eventually(recorded_view, what="the view's prediction ids")
    assert view["status"] == "rendering"
    assert set(view["progress"]) == {"current_stage", "message", "scenes_total", "scenes_completed"}
    assert view["progress"]["current_stage"] == "rendering"
    assert view["live"]["scenes_total"] == 3
    assert [s["prediction_id"] for s in view["scenes"]] == [scene.prediction_id] * 3

    result = await cli(
        temporal_env,
        "workflow",
        "query",
        "-w",
        f"render-video-{job_id}",
        "--type",
        "progress",
        "-o",
        "json",
    )
    assert result.returncode == 0, result.stderr
    assert '"scenes_total": 3' in result.stdout and '"stage"' in result.stdout
    scene_query = await cli(
        temporal_env,
        "workflow",
        "query",
        "-w",
        f"render-video-{job_id}-scene-all",
        "--type",
        "progress",
        "-o",
        "json",
    )
    assert scene_query.returncode == 0, scene_query.stderr
    assert scene.prediction_id in scene_query.stdout
    assert (await stack.wait_closed(job_id))["status"] == "completed"


async def test_events_stream_follows_a_render_to_its_end(stack: Stack) -> None:
    # Rendering held for several of the stream's one-second ticks, however busy the machine.
    stack.renderer.add_fault("slow_render", delay=5.0)
    job_id = await stack.create_job(stack.sample_scenes(count=1))
    await stack.api.post(f"/api/v2/jobs/{job_id}/approve")
    events: list[tuple[str, dict[str, Any]]] = []
    async with stack.api.stream("GET", f"/api/v2/jobs/{job_id}/events", timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        name = None
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: ") and name:
                events.append((name, json.loads(line.removeprefix("data: "))))
    assert events[-1][0] == "end"
    assert events[-1][1]["status"] == "completed"
    stages = [data["progress"]["current_stage"] for kind, data in events if "progress" in data]
    assert "rendering" in stages
    assert all(kind == "progress" for kind, _ in events[:-1])


async def test_events_of_an_unknown_job_are_404(stack: Stack) -> None:
    response = await stack.api.get("/api/v2/jobs/999999999/events")
    assert response.status_code == 404
    assert response.json() == {"detail": "Job 999999999 not found"}


# -- cancellation --


async def test_cancel_over_http_cancels_the_prediction_and_the_run(stack: Stack) -> None:
    stack.renderer.add_fault("slow_render", delay=30.0)
    job_id = await stack.create_job(stack.sample_scenes(count=1))
    await stack.api.post(f"/api/v2/jobs/{job_id}/approve")
    prediction_id = await eventually(
        lambda: stack.store.get(job_id)["prediction_id"], what="the prediction id"
    )
    response = await stack.api.post(f"/api/v2/jobs/{job_id}/cancel")
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "cancelling"

    job = await stack.wait_closed(job_id)
    assert job["status"] == "cancelled"
    assert job["error_message"] == "Render cancelled"
    assert prediction_id in stack.renderer.stats()["cancelled_ids"]
    assert stack.renderer.stats()["predictions"][prediction_id] == "canceled"
    described = await handle_of(stack, job_id).describe()
    assert described.status == WorkflowExecutionStatus.CANCELED

    again = await stack.api.post(f"/api/v2/jobs/{job_id}/cancel")
    assert again.status_code == 409
    assert again.json() == {
        "detail": f"Job {job_id} is already cancelled; there is nothing to cancel"
    }


async def test_cancel_mid_download_stops_it_and_leaves_no_partial_file(stack: Stack) -> None:
    stack.renderer.add_fault("slow_download", delay=60.0)
    job_id = await stack.create_job(stack.sample_scenes(count=1))
    await stack.api.post(f"/api/v2/jobs/{job_id}/approve")
    folder = stack.settings.scenes_dir(job_id)
    await eventually(lambda: list(folder.glob(".*.part")), what="a partial download")

    started = time.monotonic()
    assert (await stack.api.post(f"/api/v2/jobs/{job_id}/cancel")).status_code == 202
    job = await stack.wait_closed(job_id)
    # A 60-second download stopped within seconds: the heartbeat carried the cancel.
    assert time.monotonic() - started < 20
    assert job["status"] == "cancelled"
    # Nothing partial, nothing unverified (the folder itself goes once empty).
    assert not folder.exists() or list(folder.iterdir()) == []
    assert not stack.settings.video_path(job_id).exists()
    await eventually(
        lambda: stack.renderer.stats()["download_aborts"] >= 1, what="the download to be dropped"
    )
    described = await handle_of(stack, job_id).describe()
    assert described.status == WorkflowExecutionStatus.CANCELED


async def test_cli_cancel_of_a_run_in_review_bills_nothing(
    stack: Stack, temporal_env: WorkflowEnvironment
) -> None:
    job_id = await in_review(stack, count=1)
    result = await cli(temporal_env, "workflow", "cancel", "-w", f"render-video-{job_id}")
    assert result.returncode == 0, result.stderr
    job = await stack.wait_closed(job_id)
    assert job["status"] == "cancelled"
    assert stack.renderer.stats()["creates"] == 0
    assert (await handle_of(stack, job_id).describe()).status == WorkflowExecutionStatus.CANCELED


async def test_cancel_of_a_finished_or_unstarted_job_is_409(stack: Stack) -> None:
    done = await stack.create_job(stack.sample_scenes(count=1))
    await stack.api.post(f"/api/v2/jobs/{done}/approve")
    assert (await stack.wait_closed(done))["status"] == "completed"
    response = await stack.api.post(f"/api/v2/jobs/{done}/cancel")
    assert response.status_code == 409
    assert response.json() == {
        "detail": f"Job {done} is already completed; there is nothing to cancel"
    }
    assert (await stack.api.get(f"/api/v2/jobs/{done}")).json()["status"] == "completed"

    ready = await stack.create_job(stack.sample_scenes(count=1))
    response = await stack.api.post(f"/api/v2/jobs/{ready}/cancel")
    assert response.status_code == 409
    assert response.json() == {"detail": f"Job {ready} is ready: no render is running to cancel"}

    missing = await stack.api.post("/api/v2/jobs/999999999/cancel")
    assert missing.status_code == 404


async def test_cancel_of_a_terminated_run_closes_the_job(
    stack: Stack, temporal_env: WorkflowEnvironment
) -> None:
    stack.renderer.add_fault("slow_render", delay=30.0)
    job_id = await stack.create_job(stack.sample_scenes(count=1))
    await stack.api.post(f"/api/v2/jobs/{job_id}/approve")
    await eventually(lambda: stack.store.get(job_id)["prediction_id"], what="the prediction")
    await handle_of(stack, job_id).terminate("test: no cleanup")
    assert stack.store.get(job_id)["status"] == "rendering"  # terminate does no cleanup

    prediction_id = stack.store.get(job_id)["prediction_id"]

    response = await stack.api.post(f"/api/v2/jobs/{job_id}/cancel")
    assert response.status_code == 202
    assert response.json()["status"] == "cancelled"
    assert stack.store.get(job_id)["status"] == "cancelled"
    # Nobody else would stop the terminated run's prediction.
    assert prediction_id in stack.renderer.stats()["cancelled_ids"]


async def test_terminating_a_job_run_cancels_its_scenes_predictions(stack: Stack) -> None:
    """Terminate is the escape hatch with no cleanup of its own, but the scene runs are its
    children: they are asked to cancel, and cancel their predictions (nothing left billing)."""
    stack.renderer.add_fault("slow_render", delay=30.0)
    job_id = await stack.create_job(stack.sample_scenes(count=1))
    await stack.api.post(f"/api/v2/jobs/{job_id}/approve")
    prediction_id = await eventually(
        lambda: stack.store.get(job_id)["prediction_id"], what="the prediction"
    )
    await handle_of(stack, job_id).terminate("test: stuck")
    await eventually(
        lambda: prediction_id in stack.renderer.stats()["cancelled_ids"],
        what="the scene to cancel its prediction",
    )
    # The scene run closes once it has recorded the cancel.
    scene = handle_of(stack, job_id, 0)
    await eventually(
        lambda: _closed_as(scene, WorkflowExecutionStatus.CANCELED), what="the scene run cancelled"
    )


async def test_approve_after_a_terminated_scene_run_adopts_its_running_prediction(
    stack: Stack,
) -> None:
    # Slow enough that the prediction is surely still rendering when the new run starts.
    stack.renderer.add_fault("slow_render", delay=20.0)
    job_id = await stack.create_job(stack.sample_scenes(count=1))
    await stack.api.post(f"/api/v2/jobs/{job_id}/approve")
    prediction_id = await eventually(
        lambda: stack.store.get(job_id)["prediction_id"], what="the prediction"
    )
    # The scene's own run is terminated (no cleanup): the job fails, the prediction runs on.
    await handle_of(stack, job_id, 0).terminate("test: stuck")
    failed = await stack.wait_closed(job_id)
    assert failed["status"] == "failed"
    assert prediction_id not in stack.renderer.stats()["cancelled_ids"]
    again = await stack.api.post(f"/api/v2/jobs/{job_id}/approve")
    assert again.status_code == 200, again.text
    job = await stack.wait_closed(job_id)
    assert job["status"] == "completed", job["error_message"]
    assert job["prediction_id"] == prediction_id
    assert stack.renderer.stats()["creates"] == 1


# -- search attributes and the story in the UI --


async def test_runs_are_found_by_job_id_and_stage(
    stack: Stack, temporal_env: WorkflowEnvironment
) -> None:
    job_id = await stack.create_job(stack.sample_scenes(count=1))
    await stack.api.post(f"/api/v2/jobs/{job_id}/approve")
    assert (await stack.wait_closed(job_id))["status"] == "completed"

    # Other deployments on this Temporal server (a WORKFLOW_ID_PREFIX) have job ids of their
    # own: the workflow id names this one's.
    mine = f"JobId = '{job_id}' AND WorkflowId STARTS_WITH 'render-video-{job_id}'"

    async def listed() -> str:
        result = await cli(temporal_env, "workflow", "list", "-q", mine, "-o", "json")
        assert result.returncode == 0, result.stderr
        return result.stdout if f'"render-video-{job_id}"' in result.stdout else ""

    # Visibility is eventually consistent, and the scene run's last stage is indexed before
    # its parent's: wait for both.
    await eventually(listed, what="the run in the visibility store")
    query = f"{mine} AND RenderStage = 'completed'"
    runs = await eventually(
        lambda: listed_runs(stack, query, 2), what="RenderStage completed on both runs"
    )
    # The job's run and its scene's run (here one prediction for the whole storyboard).
    assert sorted(runs) == [
        f"render-video-{job_id}",
        f"render-video-{job_id}-scene-all",
    ]


async def _prediction_of(handle: WorkflowHandle[Any, Any]) -> SceneProgress | None:
    try:
        progress = await handle.query(RenderScene.progress)
    except Exception:  # noqa: BLE001 - the scene run may not exist or answer yet
        return None
    return progress if progress.prediction_id else None


async def _closed_as(handle: WorkflowHandle[Any, Any], status: WorkflowExecutionStatus) -> bool:
    return (await handle.describe()).status == status


async def test_every_activity_and_the_run_carry_a_summary(stack: Stack) -> None:
    job_id = await stack.create_job(stack.sample_scenes(count=1))
    await stack.api.post(f"/api/v2/jobs/{job_id}/approve")
    await stack.wait_closed(job_id)
    converter = stack.temporal.data_converter.payload_converter
    summaries = {}
    events = await history_events(stack, job_id) + await history_events(stack, job_id, 0)
    for event in events:
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            name = event.activity_task_scheduled_event_attributes.activity_type.name
            assert event.user_metadata.HasField("summary"), name
            summaries[name] = converter.from_payloads([event.user_metadata.summary])[0]
    assert summaries["validate_storyboard"] == f"Validate the storyboard of job {job_id}"
    assert summaries["download_clip"] == f"Download the clip of the video of job {job_id}"
    assert summaries["stitch_video"] == f"Stitch the scenes of job {job_id}"
    described = await handle_of(stack, job_id).describe()
    assert await described.static_summary() == f"Render job {job_id} into a video"
    scene = await handle_of(stack, job_id, 0).describe()
    assert await scene.static_summary() == f"Scene 1 of job {job_id}, in one prediction"


# -- budget --


async def test_over_budget_job_fails_before_any_prediction(stack: Stack) -> None:
    response = await stack.api.post(
        "/api/v2/jobs", json={"storyboard": stack.sample_scenes(count=3), "max_cost": 0.10}
    )
    assert response.status_code == 201, response.text
    job_id = response.json()["job_id"]
    await stack.api.post(f"/api/v2/jobs/{job_id}/approve")
    job = await stack.wait_closed(job_id)
    assert job["status"] == "failed"
    assert job["error_message"] == (
        "Estimated cost $0.31 exceeds the job's budget (max_cost) of $0.10; "
        "no prediction was created"
    )
    assert stack.renderer.stats()["creates"] == 0
    # Not even a scene run was started.
    assert await scheduled(stack, job_id, scene=None) == ["validate_storyboard", "mark_job_failed"]


async def test_job_within_budget_renders_and_reports_it(stack: Stack) -> None:
    response = await stack.api.post(
        "/api/v2/jobs", json={"storyboard": stack.sample_scenes(count=1), "max_cost": 5}
    )
    job_id = response.json()["job_id"]
    await stack.api.post(f"/api/v2/jobs/{job_id}/approve")
    assert (await stack.wait_closed(job_id))["status"] == "completed"
    view = (await stack.api.get(f"/api/v2/jobs/{job_id}")).json()
    assert view["max_cost"] == 5.0 and view["over_budget"] is False


async def test_a_cost_exactly_at_the_budget_renders_and_is_not_over_it(stack: Stack) -> None:
    # 5 images x 0.9 s: estimate 5 x $0.003 + 4.5 s x $0.10 = $0.465 -> $0.47 (half-up), and
    # the budget is exactly that: not exceeded, so it renders, and the cost is not "over".
    scenes = stack.sample_scenes(count=5, seconds=0.9)
    created = await stack.api.post("/api/v2/jobs", json={"storyboard": scenes, "max_cost": 0.47})
    job_id = created.json()["job_id"]
    await stack.api.post(f"/api/v2/jobs/{job_id}/approve")
    job = await stack.wait_closed(job_id)
    assert job["status"] == "completed", job["error_message"]
    assert job["estimated_cost"] == 0.47
    assert job["actual_cost"] == 0.47
    assert job["over_budget"] is False
    view = (await stack.api.get(f"/api/v2/jobs/{job_id}")).json()
    assert (view["actual_cost"], view["max_cost"], view["over_budget"]) == (0.47, 0.47, False)


@pytest.mark.parametrize("max_cost", [0, -1, "lots", 0.001, 10_000_000])
async def test_bad_budgets_are_422(stack: Stack, max_cost: Any) -> None:
    response = await stack.api.post("/api/v2/jobs", json={"max_cost": max_cost})
    assert response.status_code == 422
    assert "max_cost" in json.dumps(response.json()["detail"])


async def test_webhook_secret_unavailable_is_503_not_500(
    temporal_env: WorkflowEnvironment, renderer: RunningServer, tmp_path: Path, jobs_db: str
) -> None:
    # The provider is unreachable, so the signing secret cannot be fetched to check a webhook.
    async with running_stack(
        temporal_env,
        renderer,
        tmp_path,
        worker=False,
        database_url=jobs_db,
        replicate_base_url="http://127.0.0.1:9",
    ) as stack:
        body = json.dumps({"id": "x", "status": "succeeded"})
        response = await stack.api.post(
            "/api/v2/webhooks/replicate",
            content=body,
            headers=signed_headers(body, secret=renderer.webhook_secret),
        )
        assert response.status_code == 503
        assert "webhook signing secret" in response.json()["detail"]


async def test_review_of_an_over_budget_job_fails_at_validation(stack: Stack) -> None:
    response = await stack.api.post(
        "/api/v2/jobs", json={"storyboard": stack.sample_scenes(count=3), "max_cost": 0.10}
    )
    job_id = response.json()["job_id"]
    await stack.api.post(f"/api/v2/jobs/{job_id}/review")
    result = await handle_of(stack, job_id).execute_update(
        RenderVideo.approve_render, ApproveRenderInput()
    )
    expected = (
        "Estimated cost $0.31 exceeds the job's budget (max_cost) of $0.10; "
        "no prediction was created"
    )
    assert result.accepted is False and result.errors == [expected]
    assert result.stage == "failed"
    job = await stack.wait_closed(job_id)
    assert job["status"] == "failed" and job["error_message"] == expected
    assert "record_approval" not in await scheduled(stack, job_id, scene=None)

    # A bigger budget, and the same job renders.
    budget = await stack.api.put(f"/api/v2/jobs/{job_id}/budget", json={"max_cost": 1})
    assert budget.status_code == 200, budget.text
    await stack.api.post(f"/api/v2/jobs/{job_id}/approve")
    assert (await stack.wait_closed(job_id))["status"] == "completed"
    refused = await stack.api.put(f"/api/v2/jobs/{job_id}/budget", json={"max_cost": 2})
    assert refused.status_code == 409
    detail = f"Job {job_id} is completed; its budget can no longer change"
    assert refused.json() == {"detail": detail}


@pytest.mark.parametrize("raw", ['{"max_cost": 1e400}', '{"max_cost": -1e999}'])
async def test_numbers_beyond_json_are_422_not_500(stack: Stack, raw: str) -> None:
    response = await stack.api.post(
        "/api/v2/jobs", content=raw, headers={"content-type": "application/json"}
    )
    assert response.status_code == 422, response.text
    assert "max_cost" in json.dumps(response.json()["detail"])


@pytest.mark.parametrize(
    "body",
    [
        '{"id": "x", "status": ["succeeded"]}',
        '{"id": {"x": 1}, "status": "succeeded"}',
        "[1, 2]",
        '"just a string"',
    ],
)
async def test_signed_webhook_that_is_not_a_prediction_is_400(hooked: Stack, body: str) -> None:
    response = await hooked.api.post(
        "/api/v2/webhooks/replicate?job_id=1",
        content=body,
        headers=signed_headers(body, secret=hooked.renderer.webhook_secret),
    )
    assert response.status_code == 400, response.text
    assert response.json()["detail"].startswith("Webhook body is not a prediction")


async def test_an_approve_signal_with_an_odd_approver_still_approves(
    stack: Stack, temporal_env: WorkflowEnvironment
) -> None:
    job_id = await in_review(stack, count=1)
    result = await cli(
        temporal_env,
        "workflow",
        "signal",
        "-w",
        f"render-video-{job_id}",
        "--name",
        "approve",
        "--input",
        '{"approved_by": 5}',
    )
    assert result.returncode == 0, result.stderr
    job = await stack.wait_closed(job_id)
    assert job["status"] == "completed"
    assert job["approved_by"] == "5"


async def test_a_namespace_without_our_search_attributes_still_renders(
    renderer: RunningServer, tmp_path: Path
) -> None:
    # As on Temporal Cloud before JobId/RenderStage are added in its console.
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=temporal_binary(), ui=False, dev_server_log_level="error"
    )
    try:
        async with running_stack(env, renderer, tmp_path) as stack:
            job_id = await stack.create_job(stack.sample_scenes(count=1))
            approved = await stack.api.post(f"/api/v2/jobs/{job_id}/approve")
            assert approved.status_code == 200, approved.text
            job = await stack.wait_closed(job_id)
            assert job["status"] == "completed", job["error_message"]
            described = await handle_of(stack, job_id).describe()
            assert described.typed_search_attributes.get(JOB_ID) is None
            assert await described.static_summary() == f"Render job {job_id} into a video"
    finally:
        await env.shutdown()
