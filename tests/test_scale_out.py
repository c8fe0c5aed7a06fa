"""Running more than one deployment, API process or worker: prefixes, graceful shutdown of a
worker (WORKER_SHUTDOWN_GRACE_SECONDS), readiness (/readyz)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from processes import LoggedProcess, TemporalDevServer, Workers, wait_until
from sqlalchemy.engine import make_url
from support import Stack, eventually, running_stack
from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.testing import WorkflowEnvironment

from api.routes.health import READY_TIMEOUT
from backend.settings import Settings
from local_replicate.testing import RunningServer
from worker import worker_options
from workflows.payloads import scene_workflow_id, workflow_id_for

GRACE = "WORKER_SHUTDOWN_GRACE_SECONDS"
ALL_OK = {"database": "ok", "temporal": "ok", "storage": "ok"}


async def test_two_deployments_share_a_namespace_through_their_prefixes(
    temporal_env: WorkflowEnvironment, renderer: RunningServer, tmp_path: Path
) -> None:
    """Two deployments with their own job stores (so the same job ids) and the same
    TASK_QUEUE render at once on one Temporal namespace, each its own storyboard."""

    def deployment(name: str):  # noqa: ANN202 - running_stack's context manager
        return running_stack(
            temporal_env,
            renderer,
            tmp_path / name,
            database_url=f"sqlite:///{tmp_path / f'{name}.db'}",
            workflow_id_prefix=f"{name}-",
            task_queue="render-video",
        )

    async with deployment("team-a") as a, deployment("team-b") as b:
        # The prefix keeps the task queues apart too: a worker that took the other
        # deployment's tasks would read the wrong job store.
        assert (a.settings.task_queue, b.settings.task_queue) == (
            "team-a-render-video",
            "team-b-render-video",
        )
        job_a = await a.create_job(a.sample_scenes(count=2, seconds=1.0))
        job_b = await b.create_job(b.sample_scenes(count=3, seconds=1.0))
        assert job_a == job_b
        approved = await asyncio.gather(
            a.api.post(f"/api/v2/jobs/{job_a}/approve"), b.api.post(f"/api/v2/jobs/{job_b}/approve")
        )
        assert [r.json()["workflow_id"] for r in approved] == [
            f"team-a-render-video-{job_a}",
            f"team-b-render-video-{job_b}",
        ]
        done_a, done_b = await asyncio.gather(a.wait_closed(job_a), b.wait_closed(job_b))
        assert (done_a["status"], done_b["status"]) == ("completed", "completed")
        # Each rendered its own storyboard: 2 s and 3 s of video, 2 and 3 scenes.
        views = [
            (await a.api.get(f"/api/v2/jobs/{job_a}")).json(),
            (await b.api.get(f"/api/v2/jobs/{job_b}")).json(),
        ]
        assert [v["scenes_total"] for v in views] == [2, 3]
        for stack, job_id, view in ((a, job_a, views[0]), (b, job_b, views[1])):
            handle = stack.temporal.get_workflow_handle(view["workflow_id"])
            described = await handle.describe()
            assert described.task_queue == stack.settings.task_queue
            video = await stack.api.get(f"/api/videos/{job_id}/data")
            assert video.status_code == 200
        videos = [
            (await a.api.get(f"/api/videos/{job_a}/data")).content,
            (await b.api.get(f"/api/videos/{job_b}/data")).content,
        ]
        assert videos[0] != videos[1]


# -- graceful shutdown of a worker ------------------------------------------------------------


def identity(worker: LoggedProcess) -> str:
    # The SDK's default worker identity; what the history records for each task it started.
    assert worker.proc is not None
    return f"{worker.proc.pid}@{socket.gethostname()}"


def downloads_in_flight(stats: dict[str, Any]) -> int:
    return stats["file_gets"] - stats["download_completes"] - stats["download_aborts"]


def slow_download_under_way(stack: Stack) -> bool:
    """The queued slow_download was taken by a GET that has not ended yet."""
    stats = stack.renderer.stats()
    return not stats["faults"] and downloads_in_flight(stats) >= 1


async def approve(stack: Stack, scenes: int) -> int:
    storyboard = stack.sample_scenes(count=scenes, seconds=1.0)
    for number, scene in enumerate(storyboard, start=1):
        scene["prompt"] = f"scene {number}"
    job_id = await stack.create_job(storyboard)
    response = await stack.api.post(f"/api/v2/jobs/{job_id}/approve")
    assert response.status_code == 200, response.text
    return job_id


def run_ids(job_id: int, scenes: int) -> list[str]:
    """The job's run and its scenes' (an image-to-video model renders each scene on its own)."""
    return [workflow_id_for(job_id)] + [
        scene_workflow_id(job_id, number) for number in range(1, scenes + 1)
    ]


async def events(stack: Stack, workflow_id: str) -> list[HistoryEvent]:
    history = await stack.temporal.get_workflow_handle(workflow_id).fetch_history()
    return list(history.events)


async def worker_identities(stack: Stack, workflow_ids: list[str]) -> set[str]:
    """Every worker that started a workflow or activity task of these runs."""
    found = set()
    for workflow_id in workflow_ids:
        for event in await events(stack, workflow_id):
            if event.HasField("workflow_task_started_event_attributes"):
                found.add(event.workflow_task_started_event_attributes.identity)
            elif event.HasField("activity_task_started_event_attributes"):
                found.add(event.activity_task_started_event_attributes.identity)
    return found


async def download_attempts(stack: Stack, job_id: int, scenes: int) -> list[tuple[int, str]]:
    """(attempt, worker identity) of each scene's download_clip that closed, by scene.
    The history records only the attempt that ended the activity."""
    found = []
    for workflow_id in run_ids(job_id, scenes)[1:]:
        scheduled: dict[int, str] = {}
        for event in await events(stack, workflow_id):
            if event.HasField("activity_task_scheduled_event_attributes"):
                attrs = event.activity_task_scheduled_event_attributes
                scheduled[event.event_id] = attrs.activity_type.name
            elif event.HasField("activity_task_started_event_attributes"):
                started = event.activity_task_started_event_attributes
                if scheduled.get(started.scheduled_event_id) == "download_clip":
                    found.append((started.attempt, started.identity))
    return found


async def wait_completed(stack: Stack, job_id: int, within: float) -> None:
    handle = stack.temporal.get_workflow_handle(workflow_id_for(job_id))
    await asyncio.wait_for(handle.result(), within)
    job = stack.store.get(job_id)
    assert job["status"] == "completed", job["error_message"]


def assert_one_prediction_per_scene(stack: Stack, scenes: int) -> None:
    stats = stack.renderer.stats()
    assert stats["creates"] == scenes, stats
    assert list(stats["predictions"].values()) == ["succeeded"] * scenes, stats
    assert stats["cancels"] == 0, stats


def test_worker_sticky_seconds_bounds_how_long_a_task_waits_for_its_busy_worker() -> None:
    # 1 s unless set (the SDK's own is 10 s); set, every worker the project runs passes it on.
    assert worker_options(Settings())["sticky_queue_schedule_to_start_timeout"] == timedelta(
        seconds=1
    )
    options = worker_options(Settings(worker_sticky_seconds=1.5))
    assert options["sticky_queue_schedule_to_start_timeout"] == timedelta(seconds=1.5)


@pytest.mark.stack_settings(replicate_model="local/i2v")
async def test_sigterm_lets_the_held_download_finish_and_takes_no_new_task(
    crash_stack: Stack, workers: Workers
) -> None:
    """Within the grace period a stopping worker finishes what it holds (here a download
    slowed to 10 s), polls no more (a job approved meanwhile waits for another worker), and
    exits cleanly."""
    stack = crash_stack
    workers.extra_env[GRACE] = "30"
    stack.renderer.add_fault("slow_download", times=1, delay=10.0)
    first = await workers.start()
    job_a = await approve(stack, scenes=2)
    await wait_until(lambda: slow_download_under_way(stack), 60, "the slow download")

    first.terminate()
    job_b = await approve(stack, scenes=2)
    # Held: worker 1 is still draining its download while job B waits on the queue.
    assert first.alive
    assert downloads_in_flight(stack.renderer.stats()) >= 1
    await wait_until(lambda: not first.alive, 30, "worker 1 to exit", every=0.1)
    assert first.proc is not None and first.proc.returncode == 0, first.output()
    stats = stack.renderer.stats()
    # It finished the download it held rather than dropping it.
    assert (downloads_in_flight(stats), stats["download_aborts"]) == (0, 0), stats
    # It took nothing of job B: B's run has not had a single workflow task.
    b_run = stack.temporal.get_workflow_handle(workflow_id_for(job_b))
    assert (await b_run.describe()).status == WorkflowExecutionStatus.RUNNING
    assert await worker_identities(stack, [workflow_id_for(job_b)]) == set()

    second = await workers.start()
    await asyncio.gather(wait_completed(stack, job_a, 60), wait_completed(stack, job_b, 60))
    assert_one_prediction_per_scene(stack, scenes=4)
    # Every download of job A went through on its first attempt; worker 1 did at least the
    # slow one.
    attempts_a = await download_attempts(stack, job_a, scenes=2)
    assert [attempt for attempt, _ in attempts_a] == [1, 1], attempts_a
    assert identity(first) in {who for _, who in attempts_a}, attempts_a
    assert stack.store.get(job_a)["download_retries"] == 0
    # Job B was rendered by worker 2 alone.
    assert await worker_identities(stack, run_ids(job_b, scenes=2)) == {identity(second)}


@pytest.mark.stack_settings(replicate_model="local/i2v")
async def test_sigterm_past_the_grace_period_hands_the_download_back_at_once(
    crash_stack: Stack, workers: Workers
) -> None:
    """A download longer than the grace period is cancelled when it runs out, and its attempt
    is failed at once, not left to time out: the next worker retries it. The SDK (temporalio
    1.35) fails it as a retryable ApplicationError of type "WorkerShutdown"; no retry policy
    here lists that type as non-retryable."""
    stack = crash_stack
    workers.extra_env[GRACE] = "1"
    stack.renderer.add_fault("slow_download", times=1, delay=60.0)
    first = await workers.start()
    job_id = await approve(stack, scenes=2)
    await wait_until(lambda: slow_download_under_way(stack), 60, "the slow download")

    first.terminate()
    stopping = time.monotonic()
    await wait_until(lambda: not first.alive, 15, "worker 1 to exit", every=0.1)
    print(f"worker 1 exited {time.monotonic() - stopping:.1f} s after SIGTERM")
    assert first.proc is not None and first.proc.returncode == 0, first.output()
    # The held download was dropped, not finished.
    await wait_until(
        lambda: stack.renderer.stats()["download_aborts"] == 1, 10, "the transfer to end"
    )
    assert stack.renderer.stats()["download_completes"] <= 1

    # Handed back before the worker exited: the attempt already failed, and the retry waits
    # for a worker (rather than for the 5 s heartbeat timeout to notice the worker is gone).
    # (The other scene's download may be pending too, scheduled but never taken.)
    [slow] = [
        pending
        for workflow_id in run_ids(job_id, scenes=2)[1:]
        for pending in (
            await stack.temporal.get_workflow_handle(workflow_id).describe()
        ).raw_description.pending_activities
        if pending.activity_type.name == "download_clip"
        and pending.last_worker_identity == identity(first)
    ]
    assert slow.attempt == 2, slow
    assert slow.last_failure.application_failure_info.type == "WorkerShutdown", slow

    second = await workers.start()
    await wait_completed(stack, job_id, 60)
    assert_one_prediction_per_scene(stack, scenes=2)
    attempts = sorted(await download_attempts(stack, job_id, scenes=2))
    # One scene's download (the fast one) may have finished on worker 1 or 2.
    assert attempts[-1] == (2, identity(second)), attempts
    assert attempts[0][0] == 1, attempts
    assert stack.store.get(job_id)["download_retries"] == 1


# -- readiness --------------------------------------------------------------------------------


async def readyz(stack: Stack) -> tuple[int, dict[str, Any], float]:
    """GET /readyz without a key (a load balancer has none): status, body, seconds taken."""
    asked = time.monotonic()
    response = await stack.anonymous().get("/readyz")
    return response.status_code, response.json(), time.monotonic() - asked


async def test_readyz_is_ready_when_the_database_temporal_and_storage_answer(
    stack: Stack,
) -> None:
    status, body, _ = await readyz(stack)
    assert (status, body) == (200, {"status": "ready", "checks": ALL_OK})


async def test_readyz_is_503_naming_temporal_while_temporal_is_down_and_recovers(
    renderer: RunningServer, tmp_path: Path
) -> None:
    server = TemporalDevServer(tmp_path)
    await server.start_and_wait()
    try:
        client = await Client.connect(server.address)
        async with running_stack(
            WorkflowEnvironment.from_client(client), renderer, tmp_path, worker=False
        ) as stack:
            status, body, _ = await readyz(stack)
            assert (status, body["checks"]) == (200, ALL_OK)

            server.kill()
            status, body, took = await readyz(stack)
            assert status == 503, body
            assert body["status"] == "not_ready"
            checks = body["checks"]
            assert checks["temporal"].startswith("failed ("), checks
            assert (checks["database"], checks["storage"]) == ("ok", "ok"), checks
            # Bounded: a probe must answer before the load balancer's own timeout.
            assert took < READY_TIMEOUT + 2.0, f"/readyz took {took:.1f} s"

            # The API's client reconnects on its own once Temporal is back.
            await server.start_and_wait()

            async def ready_again() -> bool:
                return (await readyz(stack))[0] == 200

            await eventually(ready_again, 30, "/readyz to be ready again")
    finally:
        server.stop()


async def test_readyz_is_503_naming_the_database_when_it_refuses_connections(
    temporal_env: WorkflowEnvironment,
    renderer: RunningServer,
    tmp_path: Path,
    new_postgres_url: Callable[[], str],
) -> None:
    url = new_postgres_url()
    async with running_stack(
        temporal_env, renderer, tmp_path, worker=False, database_url=url
    ) as stack:
        status, body, _ = await readyz(stack)
        assert (status, body["checks"]) == (200, ALL_OK)

        # The database goes away under the API: no new connections, the open ones cut.
        # (From the server's maintenance database: a database cannot lock itself out.)
        name = make_url(url).database
        admin = make_url(url).set(drivername="postgresql", database="postgres")
        with psycopg.connect(admin.render_as_string(hide_password=False), autocommit=True) as db:
            db.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
            db.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (name,),
            )
        status, body, _ = await readyz(stack)
        assert status == 503, body
        checks = body["checks"]
        assert checks["database"].startswith("failed ("), checks
        assert (checks["temporal"], checks["storage"]) == ("ok", "ok"), checks
