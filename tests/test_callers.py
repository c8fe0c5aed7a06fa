"""The callers' side: signed completion events to their callbacks, posters and previews, job
listings, fair shares and caps, and the seed's last promises. Real parts only: a loopback
listener for callbacks, the real stack of tests/support.py."""

from __future__ import annotations

import asyncio
import io
import json
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import av
import pytest
from fixtures_images import WebhookReceiver, webhook_receiver
from PIL import Image, ImageStat
from processes import run_script
from standardwebhooks import Webhook
from support import Stack, eventually, running_stack
from temporalio.api.enums.v1 import EventType
from temporalio.testing import WorkflowEnvironment

from backend.settings import CHECKOUT
from local_replicate.testing import RunningServer
from workflows.payloads import workflow_id_for


@pytest.fixture
def listener() -> Iterator[WebhookReceiver]:
    with webhook_receiver() as receiver:
        yield receiver


@pytest.fixture
async def callers(
    temporal_env: WorkflowEnvironment, renderer: RunningServer, tmp_path: Path, jobs_db: str
) -> AsyncIterator[Stack]:
    """A stack whose callbacks may call loopback (the listener), with quick retries."""
    async with running_stack(
        temporal_env,
        renderer,
        tmp_path,
        database_url=jobs_db,
        allow_private_callbacks=True,
        callback_retry_initial_seconds=0.2,
        replicate_model="local/i2v",
    ) as stack:
        yield stack


async def secret_of(stack: Stack) -> str:
    response = await stack.api.get("/api/v2/tenant/webhook-secret")
    assert response.status_code == 200, response.text
    secret: str = response.json()["secret"]
    assert secret.startswith("whsec_")
    return secret


async def render(stack: Stack, body: dict[str, Any]) -> dict[str, Any]:
    created = await stack.api.post("/api/v2/jobs", json=body)
    assert created.status_code == 201, created.text
    job_id = created.json()["job_id"]
    approved = await stack.api.post(f"/api/v2/jobs/{job_id}/approve")
    assert approved.status_code == 200, approved.text
    await stack.wait_closed(job_id)
    return (await stack.api.get(f"/api/v2/jobs/{job_id}")).json()


# -- completion events --


async def test_a_completed_job_sends_one_signed_event_with_its_metadata(
    callers: Stack, listener: WebhookReceiver
) -> None:
    secret = await secret_of(callers)
    metadata = {"order": "A-1042", "customer": {"id": 7}}
    view = await render(
        callers,
        {
            "storyboard": callers.sample_scenes(2),
            "callback_url": f"{listener.base_url}/hooks",
            "metadata": metadata,
        },
    )
    assert view["status"] == "completed"
    [call] = await eventually(lambda: listener.to("/hooks"), what="the job.completed event")
    # Verified by the Standard Webhooks library with the tenant's secret.
    event = Webhook(secret).verify(call.body, call.headers)
    assert event["type"] == "job.completed"
    data = event["data"]
    assert data["job_id"] == view["job_id"] and data["status"] == "completed"
    assert data["metadata"] == metadata
    assert data["actual_cost"] == view["actual_cost"]
    assert data["duration_seconds"] == 2.0
    assert data["video_url"] == f"/api/videos/{view['job_id']}/data"
    assert data["poster_url"] == f"/api/videos/{view['job_id']}/poster.jpg"
    # The view lists the delivery (recorded once the callback has answered).
    after = await eventually(
        lambda: _delivered(callers, view["job_id"]), what="the delivery in the job's view"
    )
    assert [(c["event"], c["status_code"], c["delivered"]) for c in after["callbacks"]] == [
        ("completed", 200, True)
    ]
    assert after["callbacks"][0]["webhook_id"] == call.headers["webhook-id"]
    assert after["metadata"] == metadata


async def test_a_failing_callback_is_retried_under_the_same_webhook_id(
    callers: Stack, listener: WebhookReceiver
) -> None:
    listener.respond = lambda path, n: 500 if n <= 2 else 200
    view = await render(
        callers,
        {"storyboard": callers.sample_scenes(1), "callback_url": f"{listener.base_url}/flaky"},
    )
    calls = await eventually(
        lambda: (c := listener.to("/flaky")) and len(c) == 3 and c, what="three deliveries"
    )
    assert len({call.headers["webhook-id"] for call in calls}) == 1
    secret = await secret_of(callers)
    for call in calls:  # each attempt is signed anew, and verifies
        Webhook(secret).verify(call.body, call.headers)
    job = await eventually(
        lambda: _delivered(callers, view["job_id"]), what="the attempts in the job's view"
    )
    assert [(c["attempt"], c["status_code"], c["delivered"]) for c in job["callbacks"]] == [
        (1, 500, False),
        (2, 500, False),
        (3, 200, True),
    ]


async def _delivered(stack: Stack, job_id: int) -> dict[str, Any] | None:
    job: dict[str, Any] = (await stack.api.get(f"/api/v2/jobs/{job_id}")).json()
    return job if any(c["delivered"] for c in job["callbacks"]) else None


async def test_a_failed_job_sends_job_failed_and_a_caller_can_ask_again(
    callers: Stack, listener: WebhookReceiver
) -> None:
    callers.renderer.add_fault("fail", detail="out of credit")
    view = await render(
        callers,
        {"storyboard": callers.sample_scenes(1), "callback_url": f"{listener.base_url}/f"},
    )
    assert view["status"] == "failed"
    [first] = await eventually(lambda: listener.to("/f"), what="the job.failed event")
    event = json.loads(first.body)
    assert event["type"] == "job.failed"
    assert event["data"]["error"] == "Scene 1 failed: out of credit"
    await eventually(lambda: _delivered(callers, view["job_id"]), what="the delivery recorded")

    again = await callers.api.post(f"/api/v2/jobs/{view['job_id']}/callbacks/redeliver")
    assert again.status_code == 202, again.text
    assert again.json()["webhook_id"] == first.headers["webhook-id"]
    calls = await eventually(lambda: len(listener.to("/f")) == 2 and listener.to("/f"))
    assert calls[1].headers["webhook-id"] == first.headers["webhook-id"]


async def test_the_tenants_default_callback_and_a_rotated_secret(
    callers: Stack, listener: WebhookReceiver
) -> None:
    tenant = callers.client_for("rotating")
    put = await tenant.put("/api/v2/tenant", json={"callback_url": f"{listener.base_url}/t"})
    assert put.status_code == 200, put.text
    old = (await tenant.get("/api/v2/tenant/webhook-secret")).json()["secret"]
    rotated = await tenant.post("/api/v2/tenant/webhook-secret/rotate")
    assert rotated.status_code == 200, rotated.text
    new = rotated.json()["secret"]
    assert new != old and new.startswith("whsec_")
    created = await tenant.post("/api/v2/jobs", json={"storyboard": callers.sample_scenes(1)})
    job_id = created.json()["job_id"]
    await tenant.post(f"/api/v2/jobs/{job_id}/approve")
    [call] = await eventually(lambda: listener.to("/t"), what="the tenant's callback")
    assert Webhook(new).verify(call.body, call.headers)["data"]["job_id"] == job_id
    with pytest.raises(Exception):  # noqa: B017 - standardwebhooks raises its own error type
        Webhook(old).verify(call.body, call.headers)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/x",
        "http://localhost/x",
        "http://169.254.169.254/latest",
        "http://[::1]/",
    ],
)
async def test_private_callbacks_are_refused_unless_allowed(stack: Stack, url: str) -> None:
    response = await stack.api.post(
        "/api/v2/jobs", json={"storyboard": stack.sample_scenes(1), "callback_url": url}
    )
    assert response.status_code == 422, response.text
    assert "ALLOW_PRIVATE_CALLBACKS" in response.json()["detail"]


async def test_metadata_over_1_kb_is_refused(stack: Stack) -> None:
    response = await stack.api.post("/api/v2/jobs", json={"metadata": {"x": "y" * 1100}})
    assert response.status_code == 422, response.text
    assert "metadata" in response.json()["detail"]


# -- posters, previews, thumbnails --


async def test_a_completed_job_has_a_poster_a_preview_and_scene_thumbnails(
    callers: Stack,
) -> None:
    view = await render(callers, {"storyboard": callers.sample_scenes(2)})
    assert view["status"] == "completed"
    poster = await callers.api.get(view["poster_url"])
    assert poster.status_code == 200 and poster.headers["content-type"] == "image/jpeg"
    image = Image.open(io.BytesIO(poster.content))
    image.load()
    # Not black: the poster is a real frame of the video.
    assert max(ImageStat.Stat(image.convert("L")).mean) > 20

    preview = await callers.api.get(view["preview_url"])
    assert preview.status_code == 200 and preview.headers["content-type"] == "video/mp4"
    path = callers.settings.video_dir(view["job_id"]) / "preview.mp4"
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.height <= 360
        assert sum(1 for _ in container.decode(stream)) > 0
    assert len(preview.content) <= 1_100_000

    for scene in view["scenes"]:
        thumb = await callers.api.get(scene["thumbnail_url"])
        assert thumb.status_code == 200
        Image.open(io.BytesIO(thumb.content)).load()
    # The same access rules as the video: another tenant sees nothing, a signed link works.
    other = callers.client_for("someone-else")
    assert (await other.get(view["poster_url"])).status_code == 404
    anonymous = callers.anonymous()
    assert (await anonymous.get(view["poster_url"])).status_code == 401
    assert (await anonymous.get(view["signed_poster_url"])).status_code == 200
    assert (await anonymous.get(view["signed_preview_url"])).status_code == 200


# -- listing --


async def test_jobs_are_listed_newest_first_a_page_at_a_time_per_tenant(stack: Stack) -> None:
    tenant = stack.client_for("lister")
    other = stack.client_for("not-the-lister")
    ids = []
    for n in range(5):
        created = await tenant.post("/api/v2/jobs", json={"metadata": {"n": n, "batch": "b1"}})
        ids.append(created.json()["job_id"])
    hidden = (await other.post("/api/v2/jobs", json={"metadata": {"batch": "b1"}})).json()

    first = (await tenant.get("/api/v2/jobs", params={"limit": 2})).json()
    assert [job["job_id"] for job in first["jobs"]] == ids[:-3:-1]
    # A job created while paging does not shift the next page.
    await tenant.post("/api/v2/jobs", json={})
    second = (
        await tenant.get("/api/v2/jobs", params={"limit": 2, "cursor": first["next_cursor"]})
    ).json()
    assert [job["job_id"] for job in second["jobs"]] == [ids[2], ids[1]]
    third = (
        await tenant.get("/api/v2/jobs", params={"limit": 2, "cursor": second["next_cursor"]})
    ).json()
    assert [job["job_id"] for job in third["jobs"]] == [ids[0]]
    assert third["next_cursor"] is None

    by_key = (await tenant.get("/api/v2/jobs", params={"metadata_key": "batch"})).json()
    listed = [job["job_id"] for job in by_key["jobs"]]
    assert listed == ids[::-1] and hidden["job_id"] not in listed
    by_value = (
        await tenant.get("/api/v2/jobs", params={"metadata_key": "n", "metadata_value": "3"})
    ).json()
    assert [job["job_id"] for job in by_value["jobs"]] == [ids[3]]
    drafts = (await tenant.get("/api/v2/jobs", params={"status": "completed"})).json()
    assert drafts["jobs"] == []
    bad = await tenant.get("/api/v2/jobs", params={"cursor": "not-a-cursor"})
    assert bad.status_code == 422


async def test_completed_jobs_page_through_with_a_cursor(stack: Stack) -> None:
    tenant = stack.client_for("pager")
    done = []
    for _ in range(3):
        created = await tenant.post("/api/v2/jobs", json={"storyboard": stack.sample_scenes(1)})
        job_id = created.json()["job_id"]
        await tenant.post(f"/api/v2/jobs/{job_id}/approve")
        assert (await stack.wait_closed(job_id))["status"] == "completed"
        done.append(job_id)
    await tenant.post("/api/v2/jobs", json={})  # a draft, not listed
    seen: list[int] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"status": "completed", "limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = (await tenant.get("/api/v2/jobs", params=params)).json()
        seen += [job["job_id"] for job in page["jobs"]]
        assert all(job["status"] == "completed" for job in page["jobs"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == done[::-1]
    view = page["jobs"][-1]
    for field in ("created_at", "updated_at", "approved_by", "scenes_total", "duration_seconds"):
        assert field in view
    assert isinstance(view["actual_cost"], float)


# -- fair shares and caps --


async def test_runs_carry_their_tenant_as_the_fairness_key(stack: Stack) -> None:
    tenant = stack.client_for("fair")
    created = await tenant.post("/api/v2/jobs", json={"storyboard": stack.sample_scenes(1)})
    job_id = created.json()["job_id"]
    await tenant.post(f"/api/v2/jobs/{job_id}/approve")
    await stack.wait_closed(job_id)
    for workflow_id in (workflow_id_for(job_id), f"{workflow_id_for(job_id)}-scene-all"):
        history = await stack.temporal.get_workflow_handle(workflow_id).fetch_history()
        started = history.events[0].workflow_execution_started_event_attributes
        assert started.priority.fairness_key == "fair", workflow_id
        scheduled = [
            e.activity_task_scheduled_event_attributes
            for e in history.events
            if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
        ]
        assert scheduled and {a.priority.fairness_key for a in scheduled} <= {"fair", ""}


async def test_a_tenant_at_its_cap_of_jobs_in_flight_gets_429(
    temporal_env: WorkflowEnvironment, renderer: RunningServer, tmp_path: Path, jobs_db: str
) -> None:
    async with running_stack(
        temporal_env, renderer, tmp_path, database_url=jobs_db, tenant_max_active_jobs=1
    ) as stack:
        renderer.add_fault("slow_start", delay=30)
        tenant = stack.client_for("capped")
        first = (
            await tenant.post("/api/v2/jobs", json={"storyboard": stack.sample_scenes(1)})
        ).json()
        assert (await tenant.post(f"/api/v2/jobs/{first['job_id']}/approve")).status_code == 200
        second = (
            await tenant.post("/api/v2/jobs", json={"storyboard": stack.sample_scenes(1)})
        ).json()
        refused = await tenant.post(f"/api/v2/jobs/{second['job_id']}/approve")
        assert refused.status_code == 429, refused.text
        assert refused.headers["retry-after"] == "30"
        assert "capped" in refused.json()["detail"]
        assert stack.store.get(second["job_id"])["status"] == "ready"
        # Another tenant is not held back by it.
        free = stack.client_for("free")
        job = (await free.post("/api/v2/jobs", json={"storyboard": stack.sample_scenes(1)})).json()
        assert (await free.post(f"/api/v2/jobs/{job['job_id']}/approve")).status_code == 200
        await tenant.post(f"/api/v2/jobs/{first['job_id']}/cancel")


async def test_a_spend_cap_fails_a_job_before_any_prediction(
    temporal_env: WorkflowEnvironment, renderer: RunningServer, tmp_path: Path, jobs_db: str
) -> None:
    async with running_stack(
        temporal_env, renderer, tmp_path, database_url=jobs_db, tenant_spend_cap="0.50"
    ) as stack:
        tenant = stack.client_for("thrifty")
        # 3 images x $0.003 + 6 s x $0.10 = $0.609 -> $0.61, over the $0.50 cap.
        job = (
            await tenant.post("/api/v2/jobs", json={"storyboard": stack.sample_scenes(3, 2)})
        ).json()
        await tenant.post(f"/api/v2/jobs/{job['job_id']}/approve")
        closed = await stack.wait_closed(job["job_id"])
        assert closed["status"] == "failed"
        assert closed["error_message"] == (
            "Tenant thrifty's spend cap of $0.50 per 30 days would be exceeded: $0.00 spent or "
            "committed, and this job is estimated at $0.61; no prediction was created"
        )
        assert stack.renderer.stats()["creates"] == 0


# -- /docs, the seed's promises --


async def test_docs_render_with_no_network(stack: Stack) -> None:
    page = await stack.anonymous().get("/docs")
    assert page.status_code == 200
    # Every asset the page loads comes from the API itself.
    assert "cdn" not in page.text.lower() and "https://" not in page.text
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        assert f"/static-offline-docs/{asset}" in page.text
        loaded = await stack.anonymous().get(f"/static-offline-docs/{asset}")
        assert loaded.status_code == 200 and len(loaded.content) > 1000


def seed_env(**values: str) -> dict[str, str]:
    """The environment of a script a user runs: no test settings, no setting variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATA_DIR", "DATABASE_URL"))}
    env.update(values)
    return env


async def test_the_seeds_manual_download_test_works_from_another_directory(
    renderer: RunningServer, tmp_path: Path
) -> None:
    # A finished prediction's output at the provider, as replicate.delivery would serve it.
    provider = ProviderForDownload(renderer)
    url = await provider.finished_output()
    script = (
        "from backend.services.video_renderer import download_video\n"
        "\n"
        "video_path = download_video(\n"
        f'    "{url}",\n'
        "    job_id=123\n"
        ")\n"
        'print(f"Downloaded to: {video_path}")\n'
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = seed_env(DATA_DIR=str(tmp_path / "data"), REPLICATE_BASE_URL=renderer.base_url)
    done = await asyncio.to_thread(run_script, script, cwd=elsewhere, env=env)
    assert done.returncode == 0, done.stderr
    path = Path(done.stdout.strip().removeprefix("Downloaded to: "))
    assert path == (tmp_path / "data" / "videos" / "123" / "final.mp4").resolve()
    assert path.read_bytes()[4:8] == b"ftyp"
    assert not list(path.parent.glob(".*"))  # no partial file left

    gone = await asyncio.to_thread(
        run_script,
        "from backend.services.video_renderer import download_video\n"
        f'download_video("{url.rsplit("/", 1)[0]}/nothing.mp4", job_id=124)\n',
        cwd=elsewhere,
        env=env,
    )
    assert gone.returncode != 0
    assert "The video is gone from the provider (HTTP 404)" in gone.stderr


async def test_seed_scripts_find_the_projects_data_from_any_directory(tmp_path: Path) -> None:
    env = seed_env()
    done = await asyncio.to_thread(
        run_script,
        "from backend.settings import Settings; print(Settings().data_dir)",
        cwd=tmp_path,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert CHECKOUT is not None
    assert Path(done.stdout.strip()) == CHECKOUT / "DATA"


async def test_render_video_task_says_what_to_do_in_async_code_and_when_temporal_is_down(
    tmp_path: Path,
) -> None:
    from backend.services import render_video_task

    with pytest.raises(RuntimeError, match="await backend.services.render_video_task_async"):
        render_video_task(1)
    script = (
        "from backend.database import create_video_job, approve_storyboard\n"
        "from backend.services import render_video_task\n"
        "job = create_video_job([{'image_url': 'http://example.invalid/a.png'}])\n"
        "approve_storyboard(job)\n"
        "render_video_task(job)\n"
    )
    env = seed_env(DATA_DIR=str(tmp_path), TEMPORAL_ADDRESS="127.0.0.1:9")
    done = await asyncio.to_thread(run_script, script, cwd=tmp_path, env=env)
    assert done.returncode != 0
    assert "backend.orchestration.TemporalUnavailable: Temporal at 127.0.0.1:9" in done.stderr


class ProviderForDownload:
    """A finished prediction on the local render server: its output URL is what the seed's
    download test fetches."""

    def __init__(self, renderer: RunningServer) -> None:
        self.renderer = renderer

    async def finished_output(self) -> str:
        import httpx
        from fixtures_images import png_data_url

        async with httpx.AsyncClient(
            base_url=self.renderer.base_url, headers={"Authorization": "Bearer t"}
        ) as client:
            created = await client.post(
                "/v1/models/local/slideshow/predictions",
                json={"input": {"images": [png_data_url()], "durations": [1]}},
            )
            prediction = created.json()
            while prediction["status"] not in ("succeeded", "failed"):
                await asyncio.sleep(0.1)
                prediction = (await client.get(f"/v1/predictions/{prediction['id']}")).json()
        assert prediction["status"] == "succeeded", prediction
        output: str = prediction["output"]
        return output
