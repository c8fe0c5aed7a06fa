"""Crash and restart survival with real parts only: the worker is a subprocess killed with
SIGKILL at a random point of a render and replaced by a new one, and the Temporal dev server
(persisting to a SQLite file) is killed and started again mid-render.

Whatever dies, each job must complete with exactly one prediction created (and billed) at the
provider, no partial download left behind, and the job store agreeing with Temporal.

The kill points are drawn from a seeded `random.Random`: the seed is printed with every test
(shown on failure); set CRASH_SEED to replay a run.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import av
import pytest
from processes import TemporalDevServer, Workers, wait_until
from support import Stack, running_stack
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.testing import WorkflowEnvironment

from local_replicate.testing import RunningServer
from workflows.payloads import RenderVideoResult, workflow_id_for
from workflows.render_video import RENDER_STAGE

SEED = int(os.environ.get("CRASH_SEED", random.SystemRandom().randrange(2**32)))


# -- helpers: waiting and checking ------------------------------------------------------------


async def assert_moves_within(
    stack: Stack, job_id: int, since: float, within: float = 30.0
) -> float:
    """The job's run goes on within `within` seconds of `since` (a worker being back): an
    activity starts, or the run closes. Returns how long it took."""
    handle = stack.temporal.get_workflow_handle(workflow_id_for(job_id))

    async def moved() -> bool:
        description = await handle.describe()
        if description.status != WorkflowExecutionStatus.RUNNING:
            return True
        for pending in description.raw_description.pending_activities:
            started = pending.last_started_time
            if pending.HasField("last_started_time") and started.seconds + 1 >= since:
                return True
        changed = stack.store.get(job_id)["updated_at"]
        return changed > datetime.fromtimestamp(since, UTC).isoformat()

    while not await moved():
        took = time.time() - since
        assert took < within, f"job {job_id} did not move for {took:.1f} s after a worker was back"
        await asyncio.sleep(0.2)
    return time.time() - since


def crash_rng(name: str) -> random.Random:
    # One stream per test, so adding a test does not move the others' kill points.
    print(f"crash seed: CRASH_SEED={SEED} ({name})")
    return random.Random(f"{SEED}:{name}")


async def approve(stack: Stack, scenes: list[dict[str, Any]]) -> int:
    job_id = await stack.create_job(scenes)
    response = await stack.api.post(f"/api/v2/jobs/{job_id}/approve")
    assert response.status_code == 200, response.text
    return job_id


async def wait_result(stack: Stack, job_id: int, within: float) -> RenderVideoResult:
    handle = stack.temporal.get_workflow_handle(
        workflow_id_for(job_id), result_type=RenderVideoResult
    )
    return await asyncio.wait_for(handle.result(), within)


def partial_files(stack: Stack, job_id: int) -> list[Path]:
    """Downloads under way, or left by a worker that died mid-download."""
    folder = stack.settings.scenes_dir(job_id)
    return sorted(folder.glob(".*.part")) if folder.is_dir() else []


def prediction_status(stack: Stack, prediction_id: str | None) -> str | None:
    if not prediction_id:
        return None
    return stack.renderer.stats()["predictions"].get(prediction_id)


async def assert_db_agrees_with_temporal(
    stack: Stack, job_id: int, result: RenderVideoResult
) -> dict[str, Any]:
    """Both sides say completed, with the same prediction, video and cost."""
    description = await stack.temporal.get_workflow_handle(workflow_id_for(job_id)).describe()
    assert description.status == WorkflowExecutionStatus.COMPLETED
    assert description.typed_search_attributes.get(RENDER_STAGE) == "completed"
    job = stack.store.get(job_id)
    assert job["status"] == "completed", job["error_message"]
    assert result.status == "completed"
    assert job["workflow_id"] == workflow_id_for(job_id)
    assert job["prediction_id"] == result.prediction_id
    assert job["video_url"] == result.video_url == f"/api/videos/{job_id}/data"
    assert result.actual_cost is not None
    assert Decimal(str(job["actual_cost"])) == Decimal(result.actual_cost)
    # The API reads the same row.
    view = (await stack.api.get(f"/api/v2/jobs/{job_id}")).json()
    assert view["status"] == "completed"
    return job


def assert_one_prediction(stack: Stack, job_id: int, state: str) -> str:
    """One prediction ever created at the provider for the job, and the ledger holds it."""
    stats = stack.renderer.stats()
    job = stack.store.get(job_id)
    assert stats["creates"] == 1, stats
    assert stats["predictions"] == {job["prediction_id"]: "succeeded"}, stats
    assert stats["cancels"] == 0, stats
    rows = stack.store.ledger(job_id)
    ledger = [(row["prediction_id"], row["state"]) for row in rows]
    assert ledger == [(job["prediction_id"], state)]
    return job["prediction_id"]


def assert_clean_video(stack: Stack, job_id: int, seconds: float) -> None:
    """final.mp4 is a whole, decodable H.264 file, and no partial download is left."""
    assert partial_files(stack, job_id) == []
    folder = stack.settings.video_dir(job_id)
    assert sorted(path.name for path in folder.iterdir()) == [
        "final.mp4",
        "poster.jpg",
        "preview.mp4",
        "scenes",
    ]
    # Only verified clips are kept: nothing partial, unverified or half-stitched.
    clips = sorted(path.name for path in stack.settings.scenes_dir(job_id).iterdir())
    assert clips and not any(name.startswith(".") for name in clips), clips
    with av.open(str(folder / "final.mp4")) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        frames = sum(1 for _ in container.decode(stream))
        duration = container.duration / 1_000_000
    assert frames > 0
    assert abs(duration - seconds) <= 0.1


# -- the tests --------------------------------------------------------------------------------


@pytest.mark.parametrize("crash_stack", ["polling", "webhook"], indirect=True)
async def test_worker_killed_while_waiting_for_the_prediction_restarts_to_one_prediction(
    crash_stack: Stack, workers: Workers
) -> None:
    stack = crash_stack
    webhook = stack.settings.public_base_url is not None
    rng = crash_rng("waiting-webhook" if webhook else "waiting")
    # The kill lands within 3.5 s of the render's start; the render lasts 8 s, leaving the
    # rest for a busy machine's lag between the start and the test seeing it.
    render_seconds = 8.0
    stack.renderer.add_fault("slow_render", times=1, delay=render_seconds)
    first = await workers.start()
    job_id = await approve(stack, stack.sample_scenes(count=2, seconds=1.0))

    # The wait starts once the prediction exists and renders; kill somewhere inside it.
    prediction_id = await wait_until(
        lambda: stack.store.get(job_id)["prediction_id"], 60, "the prediction to be created"
    )
    await wait_until(
        lambda: prediction_status(stack, prediction_id) == "processing", 30, "the render to start"
    )
    kill_after = rng.uniform(0.0, 3.5)
    print(f"killing the worker {kill_after:.2f} s into the render")
    await asyncio.sleep(kill_after)
    # Still waiting: the kill lands before the provider is done.
    assert prediction_status(stack, prediction_id) == "processing"
    first.kill()

    await workers.start()
    await assert_moves_within(stack, job_id, time.time())
    result = await wait_result(stack, job_id, within=90)

    job = await assert_db_agrees_with_temporal(stack, job_id, result)
    assert assert_one_prediction(stack, job_id, "created") == prediction_id == result.prediction_id
    assert_clean_video(stack, job_id, seconds=2.0)
    assert job["download_retries"] == 0
    if webhook:
        # The render finished with no worker alive or none caught up yet: the API took the
        # webhook and the new worker's run went on from it.
        assert stack.renderer.stats()["webhook_deliveries"]


async def test_worker_killed_while_downloading_restarts_without_partial_files(
    crash_stack: Stack, workers: Workers
) -> None:
    stack = crash_stack
    rng = crash_rng("downloading")
    download_seconds = 8.0
    stack.renderer.add_fault("slow_download", times=1, delay=download_seconds)
    first = await workers.start()
    job_id = await approve(stack, stack.sample_scenes(count=3, seconds=1.0))

    # The partial file appears with the response headers; httpx hands over 1 MiB chunks, so
    # a small video's bytes may all still be in flight. The provider tells that it is.
    def downloading() -> Path | None:
        parts = partial_files(stack, job_id)
        stats = stack.renderer.stats()
        in_flight = stats["file_gets"] == 1 and stats["download_completes"] == 0
        return parts[0] if parts and in_flight else None

    part = await wait_until(downloading, 60, "the download to be under way")
    kill_after = rng.uniform(0.2, download_seconds / 2)
    print(f"killing the worker {kill_after:.2f} s into the download")
    await asyncio.sleep(kill_after)
    assert stack.renderer.stats()["download_completes"] == 0
    first.kill()
    # Killed mid-download: the dead worker left its partial file and no final video.
    assert part.exists()
    assert not stack.settings.video_path(job_id).exists()

    # An attempt lost with its worker is retried at once, not after the 30 s backoff of a
    # failed transfer.
    await workers.start()
    await assert_moves_within(stack, job_id, time.time())
    result = await wait_result(stack, job_id, within=120)

    job = await assert_db_agrees_with_temporal(stack, job_id, result)
    assert_one_prediction(stack, job_id, "created")
    assert_clean_video(stack, job_id, seconds=3.0)
    # The second attempt did the download, and the job row says so.
    assert job["download_retries"] == 1
    stats = stack.renderer.stats()
    assert stats["download_aborts"] == 1, stats
    assert stats["download_completes"] == 1, stats
    served = (await stack.api.get(f"/api/videos/{job_id}/data")).content
    assert served == stack.settings.video_path(job_id).read_bytes()


async def test_worker_killed_during_create_call_adopts_the_prediction_instead_of_a_second(
    crash_stack: Stack, workers: Workers
) -> None:
    stack = crash_stack
    rng = crash_rng("create")
    # The provider creates the prediction at once but holds the response far past the kill.
    stack.renderer.add_fault("slow_create", times=1, delay=60)
    first = await workers.start()
    job_id = await approve(stack, stack.sample_scenes(count=2, seconds=1.0))

    await wait_until(lambda: stack.renderer.stats()["creates"] == 1, 60, "the create call")
    await wait_until(lambda: stack.store.ledger(job_id), 10, "the ledger's intent")
    kill_after = rng.uniform(0.0, 2.0)
    print(f"killing the worker {kill_after:.2f} s into the create call")
    await asyncio.sleep(kill_after)
    # The create went through at the provider, but its answer never reached the worker.
    [intent] = stack.store.ledger(job_id)
    assert (intent["state"], intent["prediction_id"]) == ("intent", None)
    assert stack.store.get(job_id)["prediction_id"] is None
    first.kill()
    [created] = stack.renderer.stats()["predictions"]

    await workers.start()
    await assert_moves_within(stack, job_id, time.time())
    result = await wait_result(stack, job_id, within=90)

    await assert_db_agrees_with_temporal(stack, job_id, result)
    # The retried start_prediction adopted the unrecorded prediction: no second create.
    assert assert_one_prediction(stack, job_id, "adopted") == created == result.prediction_id
    assert_clean_video(stack, job_id, seconds=2.0)


async def test_identical_storyboards_killed_during_create_bill_one_prediction_each(
    crash_stack: Stack, workers: Workers
) -> None:
    """Two jobs with the same storyboard, so the same prediction input. Job A's create goes
    through at the provider but its worker is killed before the answer; then job B is
    approved. B must not create while A's prediction is unrecorded (it could be taken for
    B's), and A must adopt its own: two predictions for two jobs, none cancelled."""
    stack = crash_stack
    rng = crash_rng("identical")
    scenes = stack.sample_scenes(count=2, seconds=1.0)
    # Both creates answer slowly, so B's prediction (if B were let create) would still be
    # unrecorded when A's retry searches for its own.
    stack.renderer.add_fault("slow_create", times=2, delay=15)
    first = await workers.start()
    job_a = await approve(stack, scenes)
    await wait_until(lambda: stack.renderer.stats()["creates"] == 1, 60, "A's create call")
    await asyncio.sleep(rng.uniform(0.5, 2.5))
    first.kill()
    [created_for_a] = stack.renderer.stats()["predictions"]
    job_b = await approve(stack, scenes)

    await workers.start()
    await assert_moves_within(stack, job_a, time.time())
    result_a = await wait_result(stack, job_a, within=120)
    result_b = await wait_result(stack, job_b, within=120)

    await assert_db_agrees_with_temporal(stack, job_a, result_a)
    await assert_db_agrees_with_temporal(stack, job_b, result_b)
    assert result_a.prediction_id == created_for_a
    assert result_b.prediction_id != created_for_a
    stats = stack.renderer.stats()
    assert stats["creates"] == 2, stats
    assert stats["cancels"] == 0, stats
    assert set(stats["predictions"].values()) == {"succeeded"}, stats
    ledger_a = [(row["prediction_id"], row["state"]) for row in stack.store.ledger(job_a)]
    ledger_b = [(row["prediction_id"], row["state"]) for row in stack.store.ledger(job_b)]
    assert ledger_a == [(created_for_a, "adopted")]
    assert ledger_b == [(result_b.prediction_id, "created")]
    assert_clean_video(stack, job_a, seconds=2.0)
    assert_clean_video(stack, job_b, seconds=2.0)


async def test_worker_killed_while_verifying_goes_on_within_seconds(
    temporal_env: WorkflowEnvironment,
    renderer: RunningServer,
    tmp_path: Path,
    jobs_db: str,
) -> None:
    """verify_video decodes every frame; a worker killed in the middle must not leave the job
    waiting for the step's whole start-to-close timeout (10 minutes)."""
    # A minute of 1080p at 60 fps: seconds of decoding, a window the kill can land in.
    big = {"width": 1920, "height": 1080, "fps": 60}
    async with running_stack(
        temporal_env,
        renderer,
        tmp_path,
        worker=False,
        database_url=jobs_db,
        model_extra_input=big,
    ) as stack:
        pool = Workers(stack.settings, tmp_path)
        try:
            first = await pool.start()
            job_id = await approve(stack, stack.sample_scenes(count=6, seconds=10.0))
            await wait_until(
                lambda: stack.store.get(job_id)["progress"]["current_stage"] == "verifying",
                180,
                "verification to start",
                every=0.02,
            )
            first.kill()
            handle = stack.temporal.get_workflow_handle(workflow_id_for(job_id))
            pending = (await handle.describe()).raw_description.pending_activities
            # The kill landed inside the step.
            assert [p.activity_type.name for p in pending] == ["verify_video"]

            await pool.start()
            took = await assert_moves_within(stack, job_id, time.time())
            print(f"the job moved {took:.1f} s after the new worker was up")
            result = await wait_result(stack, job_id, within=120)
            await assert_db_agrees_with_temporal(stack, job_id, result)
            assert_clean_video(stack, job_id, seconds=60.0)
        finally:
            pool.stop_all()


async def test_worker_killed_during_a_six_scene_render_completes_with_six_predictions(
    temporal_env: WorkflowEnvironment,
    renderer: RunningServer,
    tmp_path: Path,
    jobs_db: str,
) -> None:
    """Six scenes rendered at once on an image-to-video model; the worker is killed at a
    random point while they render (creates going, predictions running, clips downloading)."""
    rng = crash_rng("six-scenes")
    async with running_stack(
        temporal_env,
        renderer,
        tmp_path,
        worker=False,
        database_url=jobs_db,
        webhooks=True,
        replicate_model="local/i2v",
    ) as stack:
        pool = Workers(stack.settings, tmp_path)
        try:
            stack.renderer.add_fault("slow_render", times=6, delay=3.0)
            first = await pool.start()
            scenes = stack.sample_scenes(count=6, seconds=1.0)
            for number, scene in enumerate(scenes, start=1):
                scene["prompt"] = f"scene {number}"
            job_id = await approve(stack, scenes)
            await wait_until(lambda: stack.renderer.stats()["creates"] >= 1, 60, "the first create")
            kill_after = rng.uniform(0.0, 4.0)
            print(f"killing the worker {kill_after:.2f} s after the first create")
            await asyncio.sleep(kill_after)
            first.kill()

            await pool.start()
            await assert_moves_within(stack, job_id, time.time())
            result = await wait_result(stack, job_id, within=180)
            job = await assert_db_agrees_with_temporal(stack, job_id, result)
            stats = stack.renderer.stats()
            assert stats["creates"] == 6, stats
            assert set(stats["predictions"].values()) == {"succeeded"}, stats
            assert stats["cancels"] == 0, stats
            # One ledger entry per scene, each holding that scene's one prediction.
            ledger = stack.store.ledger(job_id)
            assert sorted(row["scene"] for row in ledger) == [1, 2, 3, 4, 5, 6]
            assert {row["state"] for row in ledger} <= {"created", "adopted"}
            assert {row["prediction_id"] for row in ledger} == set(stats["predictions"])
            assert [s["status"] for s in job["scenes"]] == ["completed"] * 6
            assert_clean_video(stack, job_id, seconds=6.0)
        finally:
            pool.stop_all()


async def test_temporal_server_restarted_mid_render_job_completes_and_clients_reconnect(
    renderer: RunningServer, tmp_path: Path
) -> None:
    rng = crash_rng("temporal")
    server = TemporalDevServer(tmp_path)
    await server.start_and_wait()
    pool: Workers | None = None
    try:
        client = await Client.connect(server.address)
        # A fresh server and a fresh job store: job ids cannot collide with other tests'.
        async with running_stack(
            WorkflowEnvironment.from_client(client), renderer, tmp_path, worker=False
        ) as stack:
            pool = Workers(stack.settings, tmp_path)
            await pool.start()
            render_seconds = 8.0
            stack.renderer.add_fault("slow_render", times=1, delay=render_seconds)
            job_id = await approve(stack, stack.sample_scenes(count=2, seconds=1.0))
            prediction_id = await wait_until(
                lambda: stack.store.get(job_id)["prediction_id"], 60, "the prediction"
            )
            await wait_until(
                lambda: prediction_status(stack, prediction_id) == "processing",
                30,
                "the render to start",
            )
            await asyncio.sleep(rng.uniform(0.0, 2.0))

            server.kill()
            down_for = rng.uniform(1.0, 3.0)
            print(f"Temporal down for {down_for:.2f} s")
            await asyncio.sleep(down_for)
            await server.start_and_wait()

            # The worker's and the test's clients reconnect on their own.
            result = await wait_result(stack, job_id, within=90)
            await assert_db_agrees_with_temporal(stack, job_id, result)
            assert assert_one_prediction(stack, job_id, "created") == prediction_id
            assert_clean_video(stack, job_id, seconds=2.0)

            # So does the API's: a job approved after the restart starts and completes.
            second = await approve(stack, stack.sample_scenes(count=1, seconds=1.0))
            second_result = await wait_result(stack, second, within=60)
            await assert_db_agrees_with_temporal(stack, second, second_result)
            assert stack.renderer.stats()["creates"] == 2
            assert [row["state"] for row in stack.store.ledger(second)] == ["created"]
            assert_clean_video(stack, second, seconds=1.0)
    finally:
        if pool is not None:
            pool.stop_all()
        server.stop()
        print(f"--- temporal log ---\n{server.output()[-6000:]}")


async def test_job_status_answers_within_the_query_timeout_while_temporal_is_down(
    renderer: RunningServer, tmp_path: Path
) -> None:
    """GET /api/v2/jobs/{id} of a rendering job asks the run for live progress with a 2 s
    rpc_timeout and falls back to the job row: a Temporal outage must not stall the read."""
    server = TemporalDevServer(tmp_path)
    await server.start_and_wait()
    try:
        client = await Client.connect(server.address)
        # No worker: the run stays queued, and the job row says rendering.
        async with running_stack(
            WorkflowEnvironment.from_client(client), renderer, tmp_path, worker=False
        ) as stack:
            job_id = await approve(stack, stack.sample_scenes(count=1, seconds=1.0))
            server.kill()
            asked = time.monotonic()
            view = await stack.api.get(f"/api/v2/jobs/{job_id}")
            took = time.monotonic() - asked
            assert view.status_code == 200
            assert view.json()["status"] == "rendering"
            assert view.json()["live"] is None
            # 2 s of rpc_timeout plus slack; the client's own retries must not add to it.
            assert took < 4.0, f"GET /api/v2/jobs/{job_id} took {took:.1f} s with Temporal down"
    finally:
        server.stop()
