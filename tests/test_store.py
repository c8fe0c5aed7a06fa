"""The job store, on SQLite and on PostgreSQL."""

from __future__ import annotations

import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from backend.database import JobConflict, JobNotFound, JobStore, make_engine
from backend.storyboard import StoryboardError

SCENES = [{"image_url": "https://img.example/1.png", "prompt": "a cat"}, {"image_url": None}]
SEED_KEYS = {
    "status",
    "approved",
    "storyboard_data",
    "video_url",
    "actual_cost",
    "progress",
    "error_message",
    "download_retries",
    "prediction_id",
    "workflow_id",
    "created_at",
    "updated_at",
}


def test_new_job_is_draft_with_the_seed_keys(store: JobStore) -> None:
    job = store.get(store.create())
    assert SEED_KEYS <= set(job)
    assert job["status"] == "draft"
    assert job["approved"] is False
    assert job["storyboard_data"] is None
    assert job["progress"] == {
        "current_stage": "created",
        "message": "Job created",
        "scenes_total": 0,
        "scenes_completed": 0,
    }
    assert job["created_at"].endswith("+00:00")


def test_storyboard_makes_job_ready_and_approval_sticks(store: JobStore) -> None:
    job_id = store.create()
    store.set_storyboard(job_id, SCENES)
    job = store.get(job_id)
    assert job["status"] == "ready"
    assert '"prompt":"a cat"' in job["storyboard_data"]
    store.approve(job_id)
    assert store.get(job_id)["approved"] is True
    # A new storyboard needs a new approval.
    store.set_storyboard(job_id, {"scenes": SCENES[:1]})
    assert store.get(job_id)["approved"] is False


def test_approve_without_storyboard_is_a_conflict(store: JobStore) -> None:
    with pytest.raises(JobConflict, match="No storyboard data available"):
        store.approve(store.create())


def test_unknown_job(store: JobStore) -> None:
    with pytest.raises(JobNotFound, match="Job 424242 not found"):
        store.get(424242)


def test_bad_storyboards_are_refused(store: JobStore) -> None:
    job_id = store.create()
    with pytest.raises(StoryboardError, match="Scene 1 image_url"):
        store.set_storyboard(job_id, [{"image_url": "ftp://x/y.png"}])
    with pytest.raises(StoryboardError, match="list of scenes"):
        store.set_storyboard(job_id, {"frames": []})
    with pytest.raises(StoryboardError, match="not valid JSON"):
        store.set_storyboard(job_id, "{nope")
    with pytest.raises(StoryboardError, match="control characters"):
        store.set_storyboard(job_id, [{"image_url": "https://x.example/a\x00.png"}])
    assert store.get(job_id)["status"] == "draft"


def test_render_lifecycle_columns(store: JobStore) -> None:
    job_id = store.create(SCENES)
    store.mark_rendering(job_id, "render-video-x")
    store.progress(job_id, "downloading", "Downloading", scenes_total=2)
    assert store.record_prediction(store.record_intent(job_id, "run-1", "d"), "pred-1", "created")
    store.note_download_retries(job_id, 2)
    store.note_download_retries(job_id, 1)  # the most any download needed
    store.complete(job_id, video_url="/api/videos/1/data", actual_cost=Decimal("1.02"))
    job = store.get(job_id)
    assert job["status"] == "completed"
    assert job["actual_cost"] == 1.02
    assert job["prediction_id"] == "pred-1"
    assert job["download_retries"] == 2
    assert job["workflow_id"] == "render-video-x"
    assert job["progress"]["scenes_completed"] == 2
    # A completed job may change: back to ready, its video still served meanwhile.
    changed = store.set_storyboard(job_id, SCENES)
    assert (changed["status"], changed["video_url"]) == ("ready", "/api/videos/1/data")
    store.mark_rendering(job_id, "render-video-x")
    with pytest.raises(JobConflict):
        store.set_storyboard(job_id, SCENES)


def test_failure_keeps_the_message(store: JobStore) -> None:
    job_id = store.create(SCENES)
    store.mark_rendering(job_id, "w")
    store.fail(job_id, "Scene 2 is missing image")
    job = store.get(job_id)
    assert job["status"] == "failed"
    assert job["error_message"] == "Scene 2 is missing image"
    # A failed job may be retried with a fixed storyboard.
    store.set_storyboard(job_id, SCENES[:1])
    assert store.get(job_id)["status"] == "ready"


def test_processes_creating_a_fresh_store_at_once_all_succeed(tmp_path: Path) -> None:
    # `render-video dev` starts the API and the worker together on a new SQLite file.
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    code = "import sys; from backend.database import make_engine; make_engine(sys.argv[1])"
    procs = [
        subprocess.Popen([sys.executable, "-c", code, url], stderr=subprocess.PIPE, text=True)
        for _ in range(6)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    assert JobStore(make_engine(url)).create() == 1
