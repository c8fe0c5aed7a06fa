"""Records the RenderVideo histories that tests/test_replay.py replays.

Run from the repo root after changing the workflow on purpose (see "Changing the workflow
safely" in the README):

    .venv/bin/python tests/record_histories.py

It starts its own Temporal dev server, the local render server, the API and a real worker,
drives each run over HTTP as a client would, checks that every run ended the way it should,
and only then (re)writes tests/histories/*.json. It needs no network and takes ~20 s.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
# Run as a plain script: make `backend`, `workflows`, ... and the tests' `support` importable.
for _path in (REPO_ROOT, TESTS_DIR):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from support import Stack, running_stack  # noqa: E402
from temporalio.api.enums.v1 import EventType  # noqa: E402
from temporalio.client import WorkflowExecutionStatus, WorkflowHistory  # noqa: E402
from temporalio.testing import WorkflowEnvironment  # noqa: E402

from backend.cli import temporal_binary  # noqa: E402
from local_replicate.config import ServerConfig  # noqa: E402
from local_replicate.testing import RunningServer  # noqa: E402
from workflows.payloads import scene_workflow_id, workflow_id_for  # noqa: E402
from workflows.render_video import SEARCH_ATTRIBUTES, RenderVideo  # noqa: E402

HISTORIES_DIR = TESTS_DIR / "histories"
# The workflow id each saved history ran under.
WORKFLOW_IDS = "workflow-ids.txt"
# Generous: every run here takes a few seconds; a hang must still end the script.
RUN_TIMEOUT_SECONDS = 60.0


class RecordingFailed(RuntimeError):
    """A run did not end the way its history file claims; nothing is written."""


@dataclass
class Recorded:
    name: str
    history: WorkflowHistory


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise RecordingFailed(message)


def signal_names(history: WorkflowHistory) -> list[str]:
    return [
        event.workflow_execution_signaled_event_attributes.signal_name
        for event in history.events
        if event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED
    ]


def activity_names(history: WorkflowHistory) -> list[str]:
    return [
        event.activity_task_scheduled_event_attributes.activity_type.name
        for event in history.events
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
    ]


async def wait_until(what: str, check: Callable[[], Awaitable[bool]]) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT_SECONDS
    while not await check():
        if time.monotonic() > deadline:
            raise RecordingFailed(f"Timed out waiting until {what}")
        await asyncio.sleep(0.1)


async def finish(
    stack: Stack,
    job_id: int,
    status: WorkflowExecutionStatus,
    job_status: str,
    scenes: list[int] | None = None,
) -> tuple[WorkflowHistory, list[WorkflowHistory]]:
    """Waits for the run to close, checks how it closed, and fetches its history and its
    scene runs' (`scenes`: their numbers; 0 is a whole-storyboard model's one scene run)."""
    try:
        job = await asyncio.wait_for(stack.wait_closed(job_id), RUN_TIMEOUT_SECONDS)
    except TimeoutError as exc:
        raise RecordingFailed(f"Job {job_id}'s run did not close in time") from exc
    handle = stack.temporal.get_workflow_handle(workflow_id_for(job_id))
    closed = (await handle.describe()).status
    expect(closed == status, f"Job {job_id}'s run closed as {closed}, expected {status}")
    expect(
        job["status"] == job_status,
        f"Job {job_id} is {job['status']!r} ({job['error_message']}), expected {job_status!r}",
    )
    scene_histories = []
    for number in [0] if scenes is None else scenes:
        scene = stack.temporal.get_workflow_handle(scene_workflow_id(job_id, number))
        scene_histories.append(await scene.fetch_history())
    return await handle.fetch_history(), scene_histories


async def start_approved(stack: Stack, scenes: int = 2) -> int:
    job_id = await stack.create_job(stack.sample_scenes(count=scenes, seconds=1))
    approved = await stack.api.post(f"/api/v2/jobs/{job_id}/approve")
    expect(approved.status_code == 200, f"approve: {approved.status_code} {approved.text}")
    return job_id


async def record_completed_by_webhook(stack: Stack) -> list[Recorded]:
    job_id = await start_approved(stack)
    history, [scene] = await finish(stack, job_id, WorkflowExecutionStatus.COMPLETED, "completed")
    expect(
        "prediction_finished" in signal_names(scene),
        "the completed run did not hear the webhook: the signal path is not in its history",
    )
    return [Recorded("completed", history), Recorded("completed.scene", scene)]


async def record_completed_by_polling(stack: Stack) -> list[Recorded]:
    job_id = await start_approved(stack)
    history, [scene] = await finish(stack, job_id, WorkflowExecutionStatus.COMPLETED, "completed")
    expect("poll_prediction" in activity_names(scene), "the polling run never polled")
    return [Recorded("completed_polling", history), Recorded("completed_polling.scene", scene)]


async def record_failed(stack: Stack) -> list[Recorded]:
    stack.renderer.add_fault("fail", times=1, detail="Recorded failure for the replay tests")
    job_id = await start_approved(stack)
    history, [scene] = await finish(stack, job_id, WorkflowExecutionStatus.FAILED, "failed")
    expect("mark_job_failed" in activity_names(history), "the failed run never marked the job")
    return [Recorded("failed", history), Recorded("failed.scene", scene)]


async def record_cancelled(stack: Stack) -> list[Recorded]:
    # Slow enough that the cancel surely lands while the run is polling the prediction.
    stack.renderer.add_fault("slow_render", times=1, delay=30)
    job_id = await start_approved(stack)

    async def polling() -> bool:
        return bool(stack.store.get(job_id)["prediction_id"])

    await wait_until(f"job {job_id} has a prediction", polling)
    cancelled = await stack.api.post(f"/api/v2/jobs/{job_id}/cancel")
    expect(cancelled.status_code == 202, f"cancel: {cancelled.status_code} {cancelled.text}")
    history, [scene] = await finish(stack, job_id, WorkflowExecutionStatus.CANCELED, "cancelled")
    expect(
        "cancel_prediction" in activity_names(scene),
        "the cancelled run did not cancel its prediction",
    )
    return [Recorded("cancelled", history), Recorded("cancelled.scene", scene)]


async def record_reviewed(stack: Stack) -> list[Recorded]:
    job_id = await stack.create_job(stack.sample_scenes(count=2, seconds=1))
    review = await stack.api.post(f"/api/v2/jobs/{job_id}/review")
    expect(review.status_code == 200, f"review: {review.status_code} {review.text}")
    handle = stack.temporal.get_workflow_handle(workflow_id_for(job_id))

    async def awaiting_approval() -> bool:
        try:
            progress = await handle.query(RenderVideo.progress)
        except Exception:  # noqa: BLE001 - the first workflow task may not have run yet
            return False
        return progress.stage == "awaiting_approval"

    await wait_until(f"job {job_id} awaits approval", awaiting_approval)
    approved = await stack.api.post(
        f"/api/v2/jobs/{job_id}/approve", json={"approved_by": "replay-recorder"}
    )
    expect(approved.status_code == 200, f"approve: {approved.status_code} {approved.text}")
    history, _ = await finish(stack, job_id, WorkflowExecutionStatus.COMPLETED, "completed")
    expect("record_approval" in activity_names(history), "the reviewed run skipped the approval")
    return [Recorded("reviewed", history)]


async def record_per_scene(stack: Stack) -> list[Recorded]:
    job_id = await start_approved(stack, scenes=2)
    history, scenes = await finish(
        stack, job_id, WorkflowExecutionStatus.COMPLETED, "completed", scenes=[1, 2]
    )
    expect(activity_names(history).count("stitch_video") == 1, "the per-scene run did not stitch")
    return [Recorded("per_scene", history), Recorded("per_scene.scene", scenes[1])]


async def record_all(work_dir: Path) -> list[Recorded]:
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=temporal_binary(),
        ui=False,
        dev_server_log_level="error",
        search_attributes=list(SEARCH_ATTRIBUTES),
    )
    recorded: list[Recorded] = []
    for name in ("render-server", "webhooks", "polling", "scenes"):
        (work_dir / name).mkdir()
    try:
        config = ServerConfig(data_dir=work_dir / "render-server", start_delay=0.2)
        with RunningServer(config) as renderer:
            # One job store for every stack: workflow ids (`render-video-{job_id}`) stay unique.
            database_url = f"sqlite:///{work_dir / 'jobs.db'}"
            async with running_stack(
                env, renderer, work_dir / "webhooks", database_url=database_url, webhooks=True
            ) as stack:
                recorded += await record_completed_by_webhook(stack)
                recorded += await record_failed(stack)
            async with running_stack(
                env, renderer, work_dir / "polling", database_url=database_url
            ) as stack:
                recorded += await record_completed_by_polling(stack)
                recorded += await record_cancelled(stack)
                recorded += await record_reviewed(stack)
            async with running_stack(
                env,
                renderer,
                work_dir / "scenes",
                database_url=database_url,
                webhooks=True,
                replicate_model="local/i2v",
            ) as stack:
                recorded += await record_per_scene(stack)
    finally:
        await env.shutdown()
    return recorded


def main() -> None:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="record-histories-") as tmp:
        recorded = asyncio.run(record_all(Path(tmp)))
    # Written only once every run ended as expected: never a half-refreshed set.
    HISTORIES_DIR.mkdir(exist_ok=True)
    for item in recorded:
        path = HISTORIES_DIR / f"{item.name}.json"
        path.write_text(item.history.to_json() + "\n", encoding="utf-8")
        print(f"wrote {path.relative_to(REPO_ROOT)} ({len(item.history.events)} events)")
    # A run derives its scenes' ids from its own: replay needs the id it ran under.
    ids = {item.name: item.history.workflow_id for item in recorded}
    (HISTORIES_DIR / WORKFLOW_IDS).write_text(json.dumps(ids, indent=2) + "\n")
    print(f"recorded {len(recorded)} histories in {time.monotonic() - started:.1f} s")


if __name__ == "__main__":
    main()
