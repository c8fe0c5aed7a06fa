"""The prediction ledger and the budget, activity by activity, against the real render server
and real job stores (SQLite and PostgreSQL): no create is ever repeated, no created prediction
is orphaned, and a prediction is never taken by a job that may not own it."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from fixtures_images import png_data_url
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.jobs import JobActivities
from activities.predictions import INTENT_TTL, PredictionActivities
from backend.database import JobStore, PredictionLedger, make_engine
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
    # Unique per test: the PostgreSQL store is shared by the session's tests, and identical
    # inputs in two tests would meet in its ledger.
    prompt: str = dataclasses.field(default_factory=lambda: f"test {uuid.uuid4().hex}")

    def model_input(self, job_id: int) -> dict[str, Any]:
        # The slideshow's input: one prediction for a one-scene storyboard.
        return {"images": [png_data_url()], "durations": [1.0], "prompt": self.prompt}

    def digest(self, job_id: int) -> str:
        return self.acts.digest(self.model_input(job_id))

    def request(self, job_id: int) -> StartPredictionInput:
        return StartPredictionInput(
            job_id=job_id, model_input=self.model_input(job_id), digest=self.digest(job_id)
        )

    async def start(self, job_id: int, run_id: str = RUN_ID) -> Any:
        env = ActivityEnvironment()
        env.info = dataclasses.replace(env.info, workflow_run_id=run_id)
        return await env.run(self.acts.start_prediction, self.request(job_id))


@pytest.fixture(params=["sqlite", "postgresql"])
async def bench(
    request: pytest.FixtureRequest, renderer: RunningServer, tmp_path: Path
) -> AsyncIterator[Bench]:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        data_dir=tmp_path,
        replicate_base_url=renderer.base_url,
        replicate_model="local/slideshow",
    )
    if request.param == "sqlite":
        store = JobStore(make_engine(f"sqlite:///{tmp_path / 'jobs.db'}"))
    else:
        store = JobStore(make_engine(request.getfixturevalue("postgres_url")))
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
    digest = bench.digest(job_id)
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
    bench.store.record_intent(job_id, RUN_ID, bench.digest(job_id))
    ref = await bench.start(job_id)
    assert ref.adopted is False
    assert bench.renderer.stats()["creates"] == 1
    assert bench.renderer.stats()["lists"] >= 1  # it looked before creating


async def test_another_jobs_prediction_is_never_adopted(bench: Bench) -> None:
    # Same storyboard in two jobs: the first job's prediction is claimed in the ledger.
    first_job = bench.store.create()
    first = await bench.start(first_job)
    second_job = bench.store.create()
    bench.store.record_intent(second_job, RUN_ID, bench.digest(second_job))
    ref = await bench.start(second_job)
    assert ref.prediction_id != first.prediction_id
    assert bench.renderer.stats()["creates"] == 2
    assert first.prediction_id not in bench.renderer.stats()["cancelled_ids"]


async def test_cancel_also_finds_a_prediction_whose_id_never_came_back(bench: Bench) -> None:
    bench.renderer.add_fault("slow_render", delay=30)
    job_id = bench.store.create()
    bench.store.record_intent(job_id, RUN_ID, bench.digest(job_id))
    lost = await bench.provider.create(bench.model_input(job_id))
    result = await bench.env.run(
        bench.acts.cancel_prediction, CancelPredictionInput(job_id=job_id, prediction_id=None)
    )
    assert result.cancelled == [lost.id]
    assert bench.renderer.stats()["predictions"][lost.id] == "canceled"


async def test_a_second_job_with_the_same_input_waits_for_the_first_ones_create(
    bench: Bench,
) -> None:
    """Job A's create went through unseen (its worker died before the answer). Job B, with the
    same storyboard, must neither create beside it (two unrecorded predictions of one input
    could each be taken for the other's) nor take it: B waits, A adopts its own, then B
    creates its own."""
    bench.renderer.add_fault("slow_render", times=2, delay=30)
    job_a, job_b = bench.store.create(), bench.store.create()
    bench.store.claim_intent(job_a, "run-a", bench.digest(job_a))
    lost = await bench.provider.create(bench.model_input(job_a))

    with pytest.raises(ApplicationError) as waiting:
        await bench.start(job_b, run_id="run-b")
    assert waiting.value.type == "SameInputInFlight"
    assert f"job {job_a}" in waiting.value.message
    assert bench.renderer.stats()["creates"] == 1  # B created nothing
    assert bench.store.ledger(job_b) == []

    ref_a = await bench.start(job_a, run_id="run-a")
    assert (ref_a.prediction_id, ref_a.adopted) == (lost.id, True)
    ref_b = await bench.start(job_b, run_id="run-b")
    assert ref_b.adopted is False and ref_b.prediction_id != lost.id
    stats = bench.renderer.stats()
    assert stats["creates"] == 2 and stats["cancelled_ids"] == []
    assert bench.store.get(job_a)["prediction_id"] == lost.id
    assert bench.store.get(job_b)["prediction_id"] == ref_b.prediction_id


async def test_an_intent_left_by_a_dead_run_is_settled_for_its_owner(bench: Bench) -> None:
    """Nobody came back for job A's open intent within INTENT_TTL: job B records A's unseen
    prediction for A (A's retry adopts it later), then creates its own."""
    bench.renderer.add_fault("slow_render", times=2, delay=30)
    job_a, job_b = bench.store.create(), bench.store.create()
    intent = bench.store.claim_intent(job_a, "run-a", bench.digest(job_a))
    lost = await bench.provider.create(bench.model_input(job_a))
    stale = datetime.now(UTC) - INTENT_TTL - timedelta(seconds=5)
    with bench.store.engine.begin() as conn:
        conn.execute(
            sqlalchemy.update(PredictionLedger)
            .where(PredictionLedger.id == intent["id"])
            .values(updated_at=stale)
        )

    ref_b = await bench.start(job_b, run_id="run-b")
    assert ref_b.adopted is False and ref_b.prediction_id != lost.id
    assert [(e["prediction_id"], e["state"]) for e in bench.store.ledger(job_a)] == [
        (lost.id, "adopted")
    ]
    ref_a = await bench.start(job_a, run_id="run-a")
    assert (ref_a.prediction_id, ref_a.adopted) == (lost.id, True)
    assert bench.renderer.stats()["creates"] == 2
    assert bench.renderer.stats()["cancelled_ids"] == []


async def test_a_succeeded_unrecorded_prediction_is_used_and_never_cancelled(
    bench: Bench,
) -> None:
    job_id = bench.store.create()
    bench.store.claim_intent(job_id, RUN_ID, bench.digest(job_id))
    finished = await bench.provider.create(bench.model_input(job_id))
    await eventually(lambda: bench.renderer.stats()["predictions"][finished.id] == "succeeded")
    bench.renderer.add_fault("slow_render", delay=30)
    running = await bench.provider.create(bench.model_input(job_id))

    ref = await bench.start(job_id)
    # The newest is still rendering, but the finished one is already paid for: it is used.
    assert (ref.prediction_id, ref.adopted, ref.status) == (finished.id, True, "succeeded")
    stats = bench.renderer.stats()
    assert stats["cancelled_ids"] == [running.id]
    assert stats["predictions"][finished.id] == "succeeded"
    states = {e["prediction_id"]: e["state"] for e in bench.store.ledger(job_id)}
    assert states == {finished.id: "adopted", running.id: "orphan_cancelled"}


async def test_a_refused_create_frees_the_input(bench: Bench) -> None:
    bench.renderer.add_fault("rate_limit")
    job_id = bench.store.create()
    with pytest.raises(ApplicationError) as throttled:
        await bench.start(job_id)
    assert throttled.value.type == "ProviderThrottled"
    # The provider's "resets in ~30s" is how long Temporal waits before the next attempt.
    assert throttled.value.next_retry_delay == timedelta(seconds=30)
    assert [e["state"] for e in bench.store.ledger(job_id)] == ["not_created"]
    other = bench.store.create()
    ref = await bench.start(other, run_id="run-other")  # not kept waiting by the refused one
    assert ref.adopted is False and list(bench.renderer.stats()["predictions"]) == [
        ref.prediction_id
    ]


def test_a_prediction_claimed_twice_is_refused_not_raised(bench: Bench) -> None:
    job_a, job_b = bench.store.create(), bench.store.create()
    first = bench.store.claim_intent(job_a, "run-a", f"{bench.prompt}-a")
    second = bench.store.claim_intent(job_b, "run-b", f"{bench.prompt}-b")
    prediction_id = f"p-{uuid.uuid4().hex}"
    assert bench.store.record_prediction(first["id"], prediction_id, "created") is True
    assert bench.store.record_prediction(second["id"], prediction_id, "created") is False
    assert bench.store.get(job_a)["prediction_id"] == prediction_id
    assert bench.store.get(job_b)["prediction_id"] is None
    assert [e["state"] for e in bench.store.ledger(job_b)] == ["intent"]


def test_concurrent_claims_of_one_prediction_leave_exactly_one_owner(bench: Bench) -> None:
    jobs = [bench.store.create() for _ in range(8)]
    entries = [
        bench.store.claim_intent(job, f"run-{n}", f"{bench.prompt}-{n}")["id"]
        for n, job in enumerate(jobs)
    ]
    prediction_id = f"p-{uuid.uuid4().hex}"
    results: list[bool] = []
    barrier = threading.Barrier(len(entries))

    def claim(entry_id: int) -> None:
        barrier.wait()
        results.append(bench.store.record_prediction(entry_id, prediction_id, "created"))

    threads = [threading.Thread(target=claim, args=(entry,)) for entry in entries]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [False] * 7 + [True]
    owners = [job for job in jobs if bench.store.get(job)["prediction_id"] == prediction_id]
    assert len(owners) == 1
    assert bench.store.prediction_owner(prediction_id).job_id == owners[0]


def test_one_open_intent_per_input(bench: Bench) -> None:
    job_a, job_b = bench.store.create(), bench.store.create()
    held = bench.store.claim_intent(job_a, "run-a", bench.prompt)
    assert bench.store.claim_intent(job_b, "run-b", bench.prompt)["id"] == held["id"]
    with pytest.raises(sqlalchemy.exc.IntegrityError):
        bench.store.record_intent(job_b, "run-b", bench.prompt)
    bench.store.close_intent(held["id"], "abandoned")
    mine = bench.store.claim_intent(job_b, "run-b", bench.prompt)
    assert (mine["job_id"], mine["run_id"]) == (job_b, "run-b")


async def eventually(predicate: Any, within: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_cost_over_the_budget_is_recorded_and_flagged(bench: Bench) -> None:
    job_id = bench.store.create(max_cost=Decimal("0.50"))
    # The provider billed 10 s of video for it (the seed's example: 5 images and 10 s).
    bench.store.record_scene(job_id, [1], "rendered", billed_seconds=Decimal(10))
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
