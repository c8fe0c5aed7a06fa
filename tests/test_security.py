"""The API's security boundary: keys and tenants, signed video links, CORS, JSON-only bodies."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlmodel import Session, select
from support import Stack, api_client, running_stack
from temporalio.testing import WorkflowEnvironment

from backend.auth import ApiKey, KeyStore, dev_api_key, url_signing_key, video_signature
from backend.database import make_engine
from backend.settings import Settings
from local_replicate.testing import RunningServer

BIN = Path(sys.executable).parent

# Every route that needs a key, with a body where the route takes one.
PROTECTED = [
    ("POST", "/api/v2/jobs", {}),
    ("GET", "/api/v2/jobs/{id}", None),
    ("PUT", "/api/v2/jobs/{id}/storyboard", []),
    ("PUT", "/api/v2/jobs/{id}/budget", {"max_cost": 1}),
    ("POST", "/api/v2/jobs/{id}/approve", None),
    ("POST", "/api/v2/jobs/{id}/review", None),
    ("POST", "/api/v2/jobs/{id}/cancel", None),
    ("GET", "/api/v2/jobs/{id}/events", None),
    ("GET", "/api/videos/{id}/data", None),
    ("HEAD", "/api/videos/{id}/data", None),
]


def tampered(query: str) -> str:
    last = query[-1]
    return query[:-1] + ("0" if last != "0" else "1")


async def completed_job(stack: Stack) -> int:
    job_id = await stack.create_job(stack.sample_scenes(count=1))
    approved = await stack.api.post(f"/api/v2/jobs/{job_id}/approve")
    assert approved.status_code == 200, approved.text
    assert (await stack.wait_closed(job_id))["status"] == "completed"
    return job_id


async def test_every_job_and_video_route_needs_a_key(stack: Stack) -> None:
    job_id = await stack.create_job(stack.sample_scenes(count=1))
    unknown = "rvk_0123456789abcdef_" + "A" * 43
    for key in [None, "not-a-key", unknown]:
        async with api_client(stack.base_url, key) as client:
            for method, path, body in PROTECTED:
                url = path.format(id=job_id)
                response = await client.request(method, url, json=body)
                assert response.status_code == 401, (key, method, url, response.text)
                assert response.headers["www-authenticate"] == "Bearer"
                if method != "HEAD":
                    assert response.json()["detail"], response.text
    # A scheme other than Bearer is refused the same way.
    async with api_client(stack.base_url, None) as client:
        response = await client.get(
            f"/api/v2/jobs/{job_id}", headers={"Authorization": "Basic dXNlcjpwYXNz"}
        )
        assert response.status_code == 401
    # Nothing was changed by any of it.
    job = stack.store.get(job_id)
    assert job["status"] == "ready" and job["approved"] is False


async def test_health_docs_and_sample_images_stay_public(stack: Stack) -> None:
    async with stack.anonymous() as client:
        for path in ["/healthz", "/docs", "/openapi.json", "/samples/scene-1.jpg"]:
            response = await client.get(path)
            assert response.status_code == 200, (path, response.text[:200])


async def test_keys_are_stored_as_hashes_and_a_revoked_key_fails_on_its_next_request(
    stack: Stack,
) -> None:
    keys = KeyStore(stack.store.engine)
    new = keys.create("acme", label="ci")
    with Session(stack.store.engine) as session:
        row = session.exec(select(ApiKey).where(ApiKey.key_id == new.key_id)).one()
        secret = new.key.split("_", 2)[2]
        assert secret not in row.key_hash and new.key not in row.key_hash
        assert row.tenant == "acme" and row.label == "ci"
    async with api_client(stack.base_url, new.key) as client:
        assert (await client.post("/api/v2/jobs", json={})).status_code == 201
        assert keys.revoke(new.key_id)
        refused = await client.post("/api/v2/jobs", json={})
        assert refused.status_code == 401, refused.text
    listed = {k.key_id: k for k in keys.list()}
    assert listed[new.key_id].revoked_at is not None


async def test_another_tenant_sees_none_of_a_job(stack: Stack) -> None:
    done = await completed_job(stack)
    ready = await stack.create_job(stack.sample_scenes(count=1))
    before = {job_id: stack.store.get(job_id) for job_id in (done, ready)}
    async with stack.client_for("other-tenant") as other:
        for job_id in (done, ready):
            for method, path, body in PROTECTED[1:]:
                url = path.format(id=job_id)
                response = await other.request(method, url, json=body)
                assert response.status_code == 404, (method, url, response.text)
                if method != "HEAD":
                    # The same answer as for a job that does not exist.
                    assert response.json() == {"detail": f"Job {job_id} not found"}
        # Its own jobs are its own.
        mine = await other.post("/api/v2/jobs", json={"storyboard": stack.sample_scenes(1)})
        assert mine.status_code == 201
        assert (await other.get(f"/api/v2/jobs/{mine.json()['job_id']}")).status_code == 200
    assert stack.store.get(mine.json()["job_id"])["tenant"] == "other-tenant"
    assert (await stack.api.get(f"/api/v2/jobs/{mine.json()['job_id']}")).status_code == 404
    for job_id, job in before.items():
        after = stack.store.get(job_id)
        assert (after["status"], after["approved"], after["storyboard_data"]) == (
            job["status"],
            job["approved"],
            job["storyboard_data"],
        )
    assert stack.store.get(done)["tenant"] == "default"


async def test_a_completed_job_has_a_signed_expiring_video_link(stack: Stack) -> None:
    job_id = await completed_job(stack)
    view = (await stack.api.get(f"/api/v2/jobs/{job_id}")).json()
    assert view["video_url"] == f"/api/videos/{job_id}/data"
    signed = view["signed_video_url"]
    assert signed.startswith(f"/api/videos/{job_id}/data?expires=")
    video = Path(stack.settings.video_path(job_id)).read_bytes()
    async with stack.anonymous() as browser:
        # What a <video> tag does: no header, only the link.
        response = await browser.get(signed)
        assert response.status_code == 200, response.text
        assert response.content == video
        assert (await browser.get(f"/api/videos/{job_id}/data")).status_code == 401

        secret = url_signing_key(stack.settings)
        expired = int(time.time()) - 1
        for query in [
            f"expires={expired}&signature={video_signature(secret, job_id, expired)}",
            tampered(signed.split("?", 1)[1]),
            f"expires={int(time.time()) + 60}&signature={'ab' * 32}",
            # its expiry pushed back by editing the link
            signed.split("?", 1)[1].replace("expires=", "expires=1"),
        ]:
            response = await browser.get(f"/api/videos/{job_id}/data?{query}")
            assert response.status_code == 403, (query, response.text)
            assert "expired" in response.json()["detail"]
    # The generated key is kept for the API processes sharing the data dir, readable by its
    # owner only.
    key_file = stack.settings.url_signing_key_file
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600


async def test_a_signed_link_works_for_its_own_job_only(stack: Stack) -> None:
    first = await completed_job(stack)
    second = await completed_job(stack)
    signed = (await stack.api.get(f"/api/v2/jobs/{first}")).json()["signed_video_url"]
    query = signed.split("?", 1)[1]
    async with stack.anonymous() as browser:
        assert (await browser.get(f"/api/videos/{first}/data?{query}")).status_code == 200
        response = await browser.get(f"/api/videos/{second}/data?{query}")
        assert response.status_code == 403, response.text


async def test_cross_site_form_and_text_posts_are_refused(stack: Stack) -> None:
    job_id = await stack.create_job(stack.sample_scenes(count=1))
    form = {"Origin": "http://evil.example", "Content-Type": "application/x-www-form-urlencoded"}
    text = {"Origin": "http://evil.example", "Content-Type": "text/plain"}
    # A browser's cross-site form carries no key...
    async with stack.anonymous() as browser:
        response = await browser.post(f"/api/v2/jobs/{job_id}/approve", headers=form)
        assert response.status_code == 401, response.text
        response = await browser.post(f"/api/v2/jobs/{job_id}/cancel", headers=text, content=b"")
        assert response.status_code == 401, response.text
    # ...and even with one, a body that is not JSON never reaches a route.
    for path, headers, body in [
        (f"/api/v2/jobs/{job_id}/approve", form, b""),
        (f"/api/v2/jobs/{job_id}/cancel", text, b"x"),
        (f"/api/v2/jobs/{job_id}/storyboard", text, b'[{"image_url": "http://a/b.png"}]'),
        ("/api/v2/jobs", text, b'{"storyboard": []}'),
        ("/api/v2/jobs", {"Content-Type": "multipart/form-data; boundary=x"}, b"--x--"),
    ]:
        method = "PUT" if path.endswith("storyboard") else "POST"
        response = await stack.api.request(method, path, headers=headers, content=body)
        assert response.status_code == 415, (path, response.text)
        assert "application/json" in response.json()["detail"]
    # A body without any Content-Type is refused too: the API takes JSON, and says so.
    response = await stack.api.post("/api/v2/jobs", content=b"{}")
    assert response.status_code == 415, response.text
    job = stack.store.get(job_id)
    assert job["approved"] is False and job["status"] == "ready"
    assert "a/b.png" not in job["storyboard_data"]


async def test_no_cors_unless_origins_are_listed(stack: Stack) -> None:
    preflight = {
        "Origin": "https://app.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    response = await stack.api.options("/api/v2/jobs", headers=preflight)
    assert "access-control-allow-origin" not in response.headers
    response = await stack.api.get("/healthz", headers={"Origin": "https://app.example"})
    assert "access-control-allow-origin" not in response.headers


@pytest.fixture
async def cors_stack(
    temporal_env: WorkflowEnvironment, renderer: RunningServer, tmp_path: Path
) -> AsyncIterator[Stack]:
    async with running_stack(
        temporal_env, renderer, tmp_path, worker=False, cors_origins=["https://app.example"]
    ) as stack:
        yield stack


async def test_listed_origins_get_cors_and_others_do_not(cors_stack: Stack) -> None:
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    allowed = await cors_stack.api.options(
        "/api/v2/jobs", headers={**preflight, "Origin": "https://app.example"}
    )
    assert allowed.status_code == 200, allowed.text
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    refused = await cors_stack.api.options(
        "/api/v2/jobs", headers={**preflight, "Origin": "http://evil.example"}
    )
    assert "access-control-allow-origin" not in refused.headers
    simple = await cors_stack.api.post(
        "/api/v2/jobs", json={}, headers={"Origin": "http://evil.example"}
    )
    assert "access-control-allow-origin" not in simple.headers


def test_keys_cli_creates_lists_and_revokes(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL",)}
    env["DATA_DIR"] = str(tmp_path / "DATA")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "render-video"), "keys", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    created = run("create", "--tenant", "acme", "--label", "ci bot")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]
    assert key.startswith("rvk_")
    key_id = key.split("_")[1]
    assert key_id in created.stdout.splitlines()[0]

    keys = KeyStore(make_engine(f"sqlite:///{tmp_path / 'DATA' / 'jobs.db'}"))
    assert keys.tenant_of(key) == "acme"

    listed = run("list")
    assert listed.returncode == 0, listed.stderr
    [line] = [line for line in listed.stdout.splitlines() if line.startswith(key_id)]
    assert "acme" in line and "ci bot" in line
    assert key not in listed.stdout

    revoked = run("revoke", key_id)
    assert revoked.returncode == 0, revoked.stderr
    assert keys.tenant_of(key) is None
    assert run("revoke", "0000000000000000").returncode == 1
    assert run("create", "--tenant", "no spaces").returncode == 2


def test_the_dev_key_is_kept_and_renewed_once_revoked(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, data_dir=tmp_path / "DATA")  # type: ignore[call-arg]
    keys = KeyStore(make_engine(settings.resolved_database_url))
    first = dev_api_key(settings, keys)
    assert keys.tenant_of(first) == "default"
    assert dev_api_key(settings, keys) == first
    assert stat.S_IMODE(os.stat(settings.dev_api_key_file).st_mode) == 0o600
    keys.revoke(first.split("_")[1])
    second = dev_api_key(settings, keys)
    assert second != first and keys.tenant_of(second) == "default"
    assert settings.dev_api_key_file.read_text().strip() == second
