"""The prediction ledger and the budget, activity by activity, against the real render server
and a real SQLite job store: no create is ever repeated, no created prediction is orphaned."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from fixtures_images import png_data_url
from temporalio.testing import ActivityEnvironment

from activities.jobs import JobActivities
from activities.predictions import PredictionActivities
from backend.database import JobStore, make_engine
from backend.provider import ProviderClient
from backend.settings import Settings
from local_replicate.testing import RunningServer
from workflows.payloads import CancelPredictionInput, RecordCostInput, StartPredictionInput

RUN_ID = "run-under-test"


@dataclasses.dataclass
class Bench:
    store: JobStore
    acts: PredictionActivities
    jobs: JobActivities
    env: ActivityEnvironment
    renderer: RunningServer
    provider: ProviderClient

    def request(self, job_id: int) -> StartPredictionInput:
        return StartPredictionInput(
            job_id=job_id, image_urls=[png_data_url()], durations=[1.0], prompt=None
        )

    def model_input(self, job_id: int) -> dict[str, Any]:
        return self.acts.model_input(self.request(job_id))

    async def start(self, job_id: int) -> Any:
        return await self.env.run(self.acts.start_prediction, self.request(job_id))


@pytest.fixture
async def bench(renderer: RunningServer, tmp_path: Path) -> AsyncIterator[Bench]:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, data_dir=tmp_path, replicate_base_url=renderer.base_url
    )
    store = JobStore(make_engine(f"sqlite:///{tmp_path / 'jobs.db'}"))
    provider = ProviderClient(settings)
    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, workflow_run_id=RUN_ID)
    yield Bench(
        store,
        PredictionActivities(store, provider, settings),
        JobActivities(store, settings),
        env,
        renderer,
        provider,
    )


async def test_first_start_records_intent_then_prediction(bench: Bench) -> None:
    job_id = bench.store.create()
    ref = await bench.start(job_id)
    assert ref.adopted is False
    [entry] = bench.store.ledger(job_id, RUN_ID)
    assert entry["state"] == "created" and entry["prediction_id"] == ref.prediction_id
    assert bench.store.get(job_id)["prediction_id"] == ref.prediction_id
    assert bench.renderer.stats()["creates"] == 1


async def test_retry_after_a_recorded_create_adopts_without_creating(bench: Bench) -> None:
    job_id = bench.store.create()
    first = await bench.start(job_id)
    again = await bench.start(job_id)
    assert again.adopted is True and again.prediction_id == first.prediction_id
    assert bench.renderer.stats()["creates"] == 1


async def test_unrecorded_create_is_found_adopted_and_extras_cancelled(bench: Bench) -> None:
    # Two creates went through but their answers were lost (a worker killed twice).
    bench.renderer.add_fault("slow_render", times=2, delay=30)
    job_id = bench.store.create()
    digest = bench.acts.digest(bench.model_input(job_id))
    bench.store.record_intent(job_id, RUN_ID, digest)
    older = await bench.provider.create(bench.model_input(job_id))
    newer = await bench.provider.create(bench.model_input(job_id))

    ref = await bench.start(job_id)
    assert ref.adopted is True
    assert ref.prediction_id == newer.id
    stats = bench.renderer.stats()
    assert stats["creates"] == 2  # nothing new was billed
    assert older.id in stats["cancelled_ids"] and newer.id not in stats["cancelled_ids"]
    states = {e["prediction_id"]: e["state"] for e in bench.store.ledger(job_id)}
    assert states == {newer.id: "adopted", older.id: "orphan_cancelled"}
    assert bench.store.get(job_id)["prediction_id"] == newer.id


async def test_intent_whose_create_never_landed_creates_once(bench: Bench) -> None:
    job_id = bench.store.create()
    bench.store.record_intent(job_id, RUN_ID, bench.acts.digest(bench.model_input(job_id)))
    ref = await bench.start(job_id)
    assert ref.adopted is False
    assert bench.renderer.stats()["creates"] == 1
    assert bench.renderer.stats()["lists"] >= 1  # it looked before creating


async def test_another_jobs_prediction_is_never_adopted(bench: Bench) -> None:
    # Same storyboard in two jobs: the first job's prediction is claimed in the ledger.
    first_job = bench.store.create()
    first = await bench.start(first_job)
    second_job = bench.store.create()
    bench.store.record_intent(second_job, RUN_ID, bench.acts.digest(bench.model_input(second_job)))
    ref = await bench.start(second_job)
    assert ref.prediction_id != first.prediction_id
    assert bench.renderer.stats()["creates"] == 2
    assert first.prediction_id not in bench.renderer.stats()["cancelled_ids"]


async def test_cancel_also_finds_a_prediction_whose_id_never_came_back(bench: Bench) -> None:
    bench.renderer.add_fault("slow_render", delay=30)
    job_id = bench.store.create()
    bench.store.record_intent(job_id, RUN_ID, bench.acts.digest(bench.model_input(job_id)))
    lost = await bench.provider.create(bench.model_input(job_id))
    result = await bench.env.run(
        bench.acts.cancel_prediction, CancelPredictionInput(job_id=job_id, prediction_id=None)
    )
    assert result.cancelled == [lost.id]
    assert bench.renderer.stats()["predictions"][lost.id] == "canceled"


async def test_cost_over_the_budget_is_recorded_and_flagged(bench: Bench) -> None:
    job_id = bench.store.create(max_cost=Decimal("0.50"))
    record = await bench.env.run(
        bench.jobs.record_cost,
        RecordCostInput(job_id=job_id, image_count=5, duration_seconds=10.0, max_cost="0.50"),
    )
    assert record.actual_cost == "1.02" and record.over_budget is True
    job = bench.store.get(job_id)
    assert job["status"] == "completed"
    assert job["actual_cost"] == 1.02 and job["over_budget"] is True
    assert job["progress"]["message"] == (
        "Video ready; it cost $1.02, over the job's budget of $0.50"
    )


def test_an_older_job_store_gains_the_new_columns(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    old = sqlalchemy.create_engine(url)
    with old.begin() as conn:
        conn.execute(
            sqlalchemy.text(
                "CREATE TABLE video_jobs (id INTEGER PRIMARY KEY, status VARCHAR(16) NOT NULL, "
                "approved BOOLEAN NOT NULL, storyboard_data TEXT, video_url VARCHAR, "
                "actual_cost NUMERIC(12, 2), current_stage VARCHAR NOT NULL, "
                "progress_message VARCHAR NOT NULL, scenes_total INTEGER NOT NULL, "
                "scenes_completed INTEGER NOT NULL, error_message TEXT, "
                "download_retries INTEGER NOT NULL, prediction_id VARCHAR(128), "
                "workflow_id VARCHAR(128), created_at DATETIME NOT NULL, "
                "updated_at DATETIME NOT NULL)"
            )
        )
        conn.execute(
            sqlalchemy.text(
                "INSERT INTO video_jobs VALUES (7, 'completed', 1, '{\"scenes\": []}', "
                "'/api/videos/7/data', 2.03, 'completed', 'Video ready', 5, 5, NULL, 0, "
                "'p1', 'render-video-7', '2026-01-01 00:00:00', '2026-01-01 00:00:00')"
            )
        )
    store = JobStore(make_engine(url))
    job = store.get(7)
    assert job["actual_cost"] == 2.03 and job["over_budget"] is False and job["max_cost"] is None
    assert store.create(max_cost=Decimal("3.00")) == 8
