"""Bad requests get 4xx JSON bodies naming the problem, never a 500."""

from __future__ import annotations

import asyncio
import json
import socket
import sqlite3
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import make_url
from sqlmodel import Session, select
from support import Stack, api_client, make_settings, new_key, running_stack
from temporalio.testing import WorkflowEnvironment

from api.main import create_app
from backend.database import Job, JobStore, make_engine
from backend.settings import Settings
from local_replicate.testing import RunningServer
from local_replicate.threaded import UvicornThread
from local_replicate.webhooks import sign


async def test_unknown_job_is_404(stack: Stack) -> None:
    for method, path in [
        ("GET", "/api/v2/jobs/999999"),
        ("POST", "/api/v2/jobs/999999/approve"),
        ("PUT", "/api/v2/jobs/999999/storyboard"),
        ("GET", "/api/videos/999999/data"),
    ]:
        response = await stack.api.request(method, path, json=[] if method == "PUT" else None)
        assert response.status_code == 404, (method, path, response.text)
        assert response.json() == {"detail": "Job 999999 not found"}


async def test_approve_without_storyboard_is_409(stack: Stack) -> None:
    job_id = await stack.create_job()
    response = await stack.api.post(f"/api/v2/jobs/{job_id}/approve")
    assert response.status_code == 409
    assert response.json() == {"detail": "No storyboard data available"}
    assert (await stack.api.get(f"/api/v2/jobs/{job_id}")).json()["status"] == "draft"


async def test_malformed_bodies_are_422(stack: Stack) -> None:
    job_id = await stack.create_job()
    sb = f"/api/v2/jobs/{job_id}/storyboard"
    cases = [
        ("POST", "/api/v2/jobs", b"{not json"),
        ("PUT", f"/api/v2/jobs/{job_id}/storyboard", b"{not json"),
        ("PUT", f"/api/v2/jobs/{job_id}/storyboard", b'{"scenes": "nope"}'),
        ("PUT", f"/api/v2/jobs/{job_id}/storyboard", b'[{"image_url": "file:///etc/passwd"}]'),
        (
            "PUT",
            f"/api/v2/jobs/{job_id}/storyboard",
            b'[{"image_url": "http://a/b", "duration_seconds": -1}]',
        ),
        ("POST", "/api/v2/jobs", b'{"storyboard": 42}'),
        ("PUT", sb, b'[{"image_url": "http://a/b", "duration_seconds": NaN}]'),
        ("PUT", sb, b'[{"image_url": "http://a/b", "duration_seconds": true}]'),
        ("PUT", sb, b'[{"image_url": "http://"}]'),
        ("PUT", sb, b'[{"image_url": "http://a b/c.png"}]'),
        ("PUT", sb, json.dumps([{"image_url": "http://a/b", "prompt": "x" * 1001}]).encode()),
        ("PUT", sb, json.dumps([{"image_url": "http://a/b"}] * 201).encode()),
        (
            "PUT",
            sb,
            json.dumps([{"image_url": "http://a/b", "duration_seconds": 600}] * 7).encode(),
        ),
    ]
    for method, path, body in cases:
        response = await stack.api.request(
            method, path, content=body, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 422, (path, body, response.text)
        assert response.json()["detail"], response.text


async def test_non_numeric_job_id_is_422(stack: Stack) -> None:
    response = await stack.api.get("/api/v2/jobs/abc")
    assert response.status_code == 422
    assert response.json()["errors"][0]["loc"] == ["path", "job_id"]
    assert "job_id" in response.json()["detail"]


async def test_create_with_storyboard_is_ready(stack: Stack) -> None:
    response = await stack.api.post("/api/v2/jobs", json={"storyboard": stack.sample_scenes(1)})
    assert response.status_code == 201
    assert response.json()["status"] == "ready"
    job = (await stack.api.get(f"/api/v2/jobs/{response.json()['job_id']}")).json()
    assert job["approved"] is False


async def test_video_of_unfinished_job_is_404(stack: Stack) -> None:
    job_id = await stack.create_job(stack.sample_scenes(1))
    response = await stack.api.get(f"/api/videos/{job_id}/data")
    assert response.status_code == 404
    assert "no video yet" in response.json()["detail"]


async def test_out_of_range_job_ids_are_422_not_500(stack: Stack) -> None:
    for path in [
        "/api/v2/jobs/99999999999999999999999",
        "/api/v2/jobs/0",
        "/api/videos/99999999999999999999/data",
    ]:
        response = await stack.api.get(path)
        assert response.status_code == 422, (path, response.text)
        assert response.json()["errors"][0]["loc"] == ["path", "job_id"]
    response = await stack.api.post("/api/v2/jobs/99999999999999999999999/approve")
    assert response.status_code == 422


@pytest.fixture
def temporal_down(renderer: RunningServer, tmp_path: Path) -> Settings:
    """Settings whose Temporal address is a port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{sock.getsockname()[1]}"
    return make_settings(tmp_path, closed, renderer.base_url)


async def test_approve_while_temporal_is_down_is_503_and_keeps_the_job(
    temporal_down: Settings,
) -> None:
    settings = temporal_down
    key = new_key(JobStore(make_engine(settings.resolved_database_url)))
    with UvicornThread(create_app(settings)) as server:
        async with api_client(server.base_url, key) as api:
            created = await api.post(
                "/api/v2/jobs", json={"storyboard": [{"image_url": "http://a/b.png"}]}
            )
            job_id = created.json()["job_id"]
            response = await api.post(f"/api/v2/jobs/{job_id}/approve")
            assert response.status_code == 503
            assert "unavailable" in response.json()["detail"]
            job = (await api.get(f"/api/v2/jobs/{job_id}")).json()
            assert job["status"] == "ready"
            assert job["approved"] is True
            assert job["workflow_id"] is None
            assert job["progress"]["current_stage"] == "storyboard"


async def test_review_cancel_and_webhooks_while_temporal_is_down_are_503(
    temporal_down: Settings, renderer: RunningServer
) -> None:
    settings = temporal_down
    store = JobStore(make_engine(settings.resolved_database_url))
    with UvicornThread(create_app(settings)) as server:
        async with api_client(server.base_url, new_key(store)) as api:
            created = await api.post(
                "/api/v2/jobs", json={"storyboard": [{"image_url": "http://a/b.png"}]}
            )
            job_id = created.json()["job_id"]
            approve = await api.post(f"/api/v2/jobs/{job_id}/approve")
            assert approve.status_code == 503, approve.text
            review = await api.post(f"/api/v2/jobs/{job_id}/review")
            assert review.status_code == 503, review.text
            # Both starts were undone: the approval given first is kept.
            assert store.get(job_id)["status"] == "ready"
            assert store.get(job_id)["approved"] is True

            # A job waiting in review stays there when its approval cannot reach the run.
            store.mark_rendering(job_id, f"render-video-{job_id}", review=True)
            approve = await api.post(f"/api/v2/jobs/{job_id}/approve")
            assert approve.status_code == 503, approve.text
            assert store.get(job_id)["status"] == "in_review"
            assert store.get(job_id)["progress"]["current_stage"] == "awaiting_approval"
            assert store.get(job_id)["approved"] is False

            store.mark_rendering(job_id, f"render-video-{job_id}")
            cancel = await api.post(f"/api/v2/jobs/{job_id}/cancel")
            assert cancel.status_code == 503, cancel.text
            assert "not cancelled" in cancel.json()["detail"]
            assert store.get(job_id)["status"] == "rendering"

            # Reads still work, from the job store.
            view = (await api.get(f"/api/v2/jobs/{job_id}")).json()
            assert view["status"] == "rendering" and view["live"] is None

            # A genuine webhook is refused with 503, so Replicate retries it later.
            entry = store.record_intent(
                job_id, "run-1", "digest", workflow_id=f"render-video-{job_id}"
            )
            assert store.record_prediction(entry, "p1", "created")
            body = json.dumps({"id": "p1", "status": "succeeded", "output": "http://a/v.mp4"})
            stamp = int(time.time())
            headers = {
                "webhook-id": "msg_down",
                "webhook-timestamp": str(stamp),
                "webhook-signature": sign(renderer.webhook_secret, "msg_down", stamp, body),
            }
            hook = await api.post(
                f"/api/v2/webhooks/replicate?job_id={job_id}", content=body, headers=headers
            )
            assert hook.status_code == 503, hook.text
            assert not store.seen_webhook("msg_down", "p1")


async def test_approve_refuses_a_job_whose_run_completed_but_whose_row_was_reset(
    stack: Stack,
) -> None:
    job_id = await stack.create_job(stack.sample_scenes(count=1))
    await stack.api.post(f"/api/v2/jobs/{job_id}/approve")
    assert (await stack.wait_closed(job_id))["status"] == "completed"
    # The job store is restored from a backup taken before the render finished.
    with Session(stack.store.engine) as session:
        row = session.get(Job, job_id)
        assert row is not None
        row.status = "ready"
        row.video_url = None
        row.actual_cost = None
        session.add(row)
        session.commit()
    response = await stack.api.post(f"/api/v2/jobs/{job_id}/approve")
    assert response.status_code == 409, response.text
    assert "refusing to render it again" in response.json()["detail"]
    assert stack.renderer.stats()["creates"] == 1


# -- strict input --


async def test_deeply_nested_storyboards_and_bodies_are_422_not_500(stack: Stack) -> None:
    job_id = await stack.create_job()
    deep = "[" * 1500 + "]" * 1500
    as_text = json.dumps(deep).encode()  # a storyboard sent as a JSON string
    cases = [
        ("PUT", f"/api/v2/jobs/{job_id}/storyboard", as_text),
        ("POST", "/api/v2/jobs", b'{"storyboard": ' + as_text + b"}"),
        ("PUT", f"/api/v2/jobs/{job_id}/storyboard", deep.encode()),
        ("POST", "/api/v2/jobs", b'{"storyboard": ' + deep.encode() + b"}"),
        ("PUT", f"/api/v2/jobs/{job_id}/budget", b'{"max_cost": ' + deep.encode() + b"}"),
    ]
    for method, path, body in cases:
        response = await stack.api.request(
            method, path, content=body, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 422, (path, body[:40], response.text)
        detail = response.json()["detail"]
        assert "nest" in detail, detail
        assert "/" not in detail.replace("/api", "") and "<" not in detail, detail
    assert stack.store.get(job_id)["status"] == "draft"


async def test_scene_durations_must_be_numbers_of_at_least_half_a_second(stack: Stack) -> None:
    job_id = await stack.create_job()
    url = "http://a/b.png"
    cases = {
        "Scene 1 duration_seconds": [{"image_url": url, "duration_seconds": 1e-300}],
        "Scene 2 duration_seconds": [
            {"image_url": url},
            {"image_url": url, "duration_seconds": "2"},
        ],
        "Scene 3 duration_seconds": [
            {"image_url": url},
            {"image_url": url},
            {"image_url": url, "duration_seconds": False},
        ],
    }
    for where, scenes in cases.items():
        response = await stack.api.put(f"/api/v2/jobs/{job_id}/storyboard", json=scenes)
        assert response.status_code == 422, (scenes, response.text)
        assert where in response.json()["detail"], response.text
    tiny = await stack.api.put(
        f"/api/v2/jobs/{job_id}/storyboard", json=[{"image_url": url, "duration_seconds": 0.49}]
    )
    assert "0.5" in tiny.json()["detail"]
    ok = await stack.api.put(
        f"/api/v2/jobs/{job_id}/storyboard", json=[{"image_url": url, "duration_seconds": 0.5}]
    )
    assert ok.status_code == 200, ok.text


async def test_unknown_fields_are_refused_by_name(stack: Stack) -> None:
    job_id = await stack.create_job()
    url = "http://a/b.png"
    cases = [
        (
            "PUT",
            f"/api/v2/jobs/{job_id}/storyboard",
            [{"image_url": url, "durration": 3}],
            "durration",
        ),
        ("PUT", f"/api/v2/jobs/{job_id}/storyboard", {"scenes": [], "fps": 24}, "fps"),
        ("POST", "/api/v2/jobs", {"storyboard": [{"image_url": url}], "maxcost": 1}, "maxcost"),
        ("POST", "/api/v2/jobs", {"storyboard": [{"imageurl": url}]}, "imageurl"),
        ("PUT", f"/api/v2/jobs/{job_id}/budget", {"max_cost": 1, "currency": "EUR"}, "currency"),
        ("POST", f"/api/v2/jobs/{job_id}/approve", {"approver": "ana"}, "approver"),
        ("POST", "/api/v2/jobs", {"max_cost": "2.50"}, "max_cost"),
    ]
    for method, path, body, field in cases:
        response = await stack.api.request(method, path, json=body)
        assert response.status_code == 422, (body, response.text)
        assert field in response.json()["detail"], response.text
    scene_2 = await stack.api.put(
        f"/api/v2/jobs/{job_id}/storyboard", json=[{"image_url": url}, {"image_url": url, "x": 1}]
    )
    assert "Scene 2 x" in scene_2.json()["detail"]
    assert stack.store.get(job_id)["status"] == "draft"


async def test_a_locked_job_store_is_503_with_retry_after_and_nothing_half_made(
    temporal_env: WorkflowEnvironment, renderer: RunningServer, tmp_path: Path
) -> None:
    async with running_stack(
        temporal_env, renderer, tmp_path, worker=False, db_lock_timeout_seconds=0.5
    ) as stack:
        before = await stack.create_job()
        path = make_url(stack.settings.resolved_database_url).database
        holder = sqlite3.connect(path, isolation_level=None)
        try:
            holder.execute("BEGIN EXCLUSIVE")
            response = await stack.api.post(
                "/api/v2/jobs", json={"storyboard": [{"image_url": "http://a/locked.png"}]}
            )
            assert response.status_code == 503, response.text
            assert int(response.headers["retry-after"]) > 0
            assert "try again" in response.json()["detail"]
            assert "/" not in response.json()["detail"]
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        with Session(stack.store.engine) as session:
            jobs = session.exec(select(Job).where(Job.id > before)).all()
        assert jobs == []
        # Released, the same request goes through.
        again = await stack.api.post(
            "/api/v2/jobs", json={"storyboard": [{"image_url": "http://a/locked.png"}]}
        )
        assert again.status_code == 201, again.text


async def read_events(response: httpx.Response) -> list[tuple[str, dict]]:
    events: list[tuple[str, dict]] = []
    name = None
    async for line in response.aiter_lines():
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: ") and name:
            events.append((name, json.loads(line.removeprefix("data: "))))
    return events


async def test_events_of_a_job_without_a_run_end_at_once(stack: Stack) -> None:
    for storyboard in (None, stack.sample_scenes(count=1)):
        job_id = await stack.create_job(storyboard)
        async with asyncio.timeout(30):
            async with stack.api.stream("GET", f"/api/v2/jobs/{job_id}/events") as response:
                assert response.status_code == 200
                events = await read_events(response)
        assert [name for name, _ in events] == ["progress", "end"]
        assert events[0][1]["job_id"] == job_id
        assert events[1][1]["reason"] == "idle"
        assert events[1][1]["status"] == ("draft" if storyboard is None else "ready")


async def test_events_of_a_running_job_end_after_events_max_seconds(
    temporal_env: WorkflowEnvironment, renderer: RunningServer, tmp_path: Path, jobs_db: str
) -> None:
    async with running_stack(
        temporal_env, renderer, tmp_path, database_url=jobs_db, events_max_seconds=1.0
    ) as stack:
        # The prediction stays `starting` for a minute: the job is rendering throughout.
        stack.renderer.add_fault("slow_start", times=1, delay=60)
        job_id = await stack.create_job(stack.sample_scenes(count=1))
        await stack.api.post(f"/api/v2/jobs/{job_id}/approve")
        async with asyncio.timeout(30):
            async with stack.api.stream("GET", f"/api/v2/jobs/{job_id}/events") as response:
                events = await read_events(response)
        assert events[-1][0] == "end"
        assert events[-1][1]["reason"] == "max_duration"
        assert events[-1][1]["status"] == "rendering"
        assert all(name == "progress" for name, _ in events[:-1])
        cancelled = await stack.api.post(f"/api/v2/jobs/{job_id}/cancel")
        assert cancelled.status_code == 202, cancelled.text
        assert (await stack.wait_closed(job_id))["status"] == "cancelled"
