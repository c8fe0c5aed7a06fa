"""Determinism guard: saved RenderVideo histories replayed against the current workflow code.

A run that is still open when a new worker deploys is continued by replaying its history
through the new code; if the code now issues different commands (another activity, another
order, a new timer), that run fails with a nondeterminism error. These tests find that
before deployment. When the workflow changes on purpose, refresh the histories with
`.venv/bin/python tests/record_histories.py`, or guard the change with `workflow.patched`
if old runs may still be open (see "Changing the workflow safely" in the README).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from temporalio import workflow
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer
from temporalio.workflow import NondeterminismError

# The sandbox re-imports this module for ReorderedRenderVideo below; these imports are not
# workflow code (the activities pull in httpx), so they are passed through as the real
# workflow module does.
with workflow.unsafe.imports_passed_through():
    import pytest

    from activities.jobs import JobActivities
    from workflows.payloads import RenderPlanInput, RenderVideoInput, RenderVideoResult
    from workflows.render_scene import SCENE_WORKFLOW, RenderScene
    from workflows.render_video import WORKFLOW_NAME, RenderVideo

HISTORIES_DIR = Path(__file__).parent / "histories"
REFRESH_HINT = "refresh with: .venv/bin/python tests/record_histories.py"


@dataclass(frozen=True)
class SavedRun:
    name: str
    closed_as: EventType.ValueType
    # Something only this kind of run does: a mixed-up file cannot pass for another.
    activity: str | None = None
    signal: str | None = None
    # The job's run, or one of its scenes' runs.
    workflow_type: str = WORKFLOW_NAME


COMPLETED = EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED
SAVED_RUNS = [
    SavedRun("completed", COMPLETED, activity="stitch_video"),
    SavedRun(
        "completed.scene", COMPLETED, signal="prediction_finished", workflow_type=SCENE_WORKFLOW
    ),
    SavedRun("completed_polling", COMPLETED, activity="publish_video"),
    SavedRun(
        "completed_polling.scene",
        COMPLETED,
        activity="poll_prediction",
        workflow_type=SCENE_WORKFLOW,
    ),
    SavedRun("reviewed", COMPLETED, activity="record_approval"),
    SavedRun("failed", EventType.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED, activity="mark_job_failed"),
    SavedRun(
        "failed.scene",
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED,
        activity="record_scene",
        workflow_type=SCENE_WORKFLOW,
    ),
    SavedRun(
        "cancelled", EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CANCELED, activity="mark_job_failed"
    ),
    SavedRun(
        "cancelled.scene",
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CANCELED,
        activity="cancel_prediction",
        workflow_type=SCENE_WORKFLOW,
    ),
    SavedRun("per_scene", COMPLETED, activity="stitch_video"),
    SavedRun("per_scene.scene", COMPLETED, activity="check_clip", workflow_type=SCENE_WORKFLOW),
]


def load_history(name: str) -> WorkflowHistory:
    path = HISTORIES_DIR / f"{name}.json"
    assert path.is_file(), f"{path} is missing; {REFRESH_HINT}"
    # The id it ran under: a job's run names its scenes' runs after its own.
    workflow_id = json.loads((HISTORIES_DIR / "workflow-ids.txt").read_text())[name]
    return WorkflowHistory.from_json(workflow_id, path.read_text(encoding="utf-8"))


def activity_names(history: WorkflowHistory) -> list[str]:
    return [
        event.activity_task_scheduled_event_attributes.activity_type.name
        for event in history.events
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
    ]


def signal_names(history: WorkflowHistory) -> list[str]:
    return [
        event.workflow_execution_signaled_event_attributes.signal_name
        for event in history.events
        if event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED
    ]


def test_every_saved_history_is_replayed() -> None:
    # A history added by the recorder but missing from SAVED_RUNS would never be checked.
    on_disk = {path.name.removesuffix(".json") for path in HISTORIES_DIR.glob("*.json")}
    assert on_disk == {run.name for run in SAVED_RUNS}


@pytest.mark.parametrize("run", SAVED_RUNS, ids=lambda run: run.name)
def test_saved_history_is_the_kind_it_claims(run: SavedRun) -> None:
    history = load_history(run.name)
    first, last = history.events[0], history.events[-1]
    assert first.workflow_execution_started_event_attributes.workflow_type.name == (
        run.workflow_type
    )
    assert EventType.Name(last.event_type) == EventType.Name(run.closed_as)
    if run.activity:
        assert run.activity in activity_names(history)
    if run.signal:
        assert run.signal in signal_names(history)


@pytest.mark.parametrize("run", SAVED_RUNS, ids=lambda run: run.name)
async def test_saved_history_replays_on_current_code(run: SavedRun) -> None:
    history = load_history(run.name)
    try:
        await Replayer(workflows=[RenderVideo, RenderScene]).replay_workflow(history)
    except NondeterminismError as err:
        pytest.fail(
            f"{run.name}.json no longer replays: runs open on the old code would break ({err}). "
            f"Guard the change with workflow.patched(...), or if no such run can be open, "
            f"{REFRESH_HINT}"
        )


@workflow.defn(name=WORKFLOW_NAME)
class ReorderedRenderVideo(RenderVideo):
    """RenderVideo as a careless edit would leave it: the scenes are planned first, before
    the stage update and the validation every recorded run began with. The rest is the real
    workflow, so any history of it must now fail to replay."""

    @workflow.run
    async def run(self, input: RenderVideoInput) -> RenderVideoResult:
        return await super().run(input)

    async def _render(self, input: RenderVideoInput) -> RenderVideoResult:
        await workflow.execute_activity_method(
            JobActivities.plan_render,
            RenderPlanInput(job_id=input.job_id),
            start_to_close_timeout=timedelta(seconds=30),
        )
        return await super()._render(input)


async def test_reordered_activities_fail_replay() -> None:
    """The guard itself works: a changed command order is caught as nondeterminism."""
    with pytest.raises(NondeterminismError):
        await Replayer(workflows=[ReorderedRenderVideo]).replay_workflow(load_history("completed"))
