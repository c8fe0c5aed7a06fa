"""Idempotency-Key: a POST retried with the same key is answered once (Stripe's semantics),
against the real stack (Temporal dev server, worker, render server, the API over HTTP)."""

from __future__ import annotations

import asyncio
import json
import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
from sqlmodel import Session, func, select
from support import Stack, api_client, make_settings, new_key
from temporalio.testing import WorkflowEnvironment

from api.main import create_app
from backend.cli import temporal_binary
from backend.database import IdempotencyRecord, Job, JobStore, make_engine
from backend.idempotency import IdempotencyStore, request_fingerprint
from local_replicate.testing import RunningServer
from local_replicate.threaded import UvicornThread
from worker import running_worker
from workflows.render_video import SEARCH_ATTRIBUTES

JSON = {"Content-Type": "application/json"}


def fresh(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def keyed(key: str) -> dict[str, str]:
    return {"Idempotency-Key": key}


def jobs_of(stack: Stack, tenant: str) -> int:
    with Session(stack.store.engine) as session:
        return session.exec(select(func.count()).select_from(Job).where(Job.tenant == tenant)).one()


def records_with(stack: Stack, key: str) -> int:
    with Session(stack.store.engine) as session:
        query = select(func.count()).select_from(IdempotencyRecord)
        return session.exec(query.where(IdempotencyRecord.idempotency_key == key)).one()


async def test_a_create_retried_with_the_same_key_returns_the_same_job(stack: Stack) -> None:
    tenant = fresh("idem")
    body = {"storyboard": stack.sample_scenes(2), "max_cost": 5}
    async with stack.client_for(tenant) as api:
        key = fresh("create")
        first = await api.post("/api/v2/jobs", json=body, headers=keyed(key))
        assert first.status_code == 201, first.text
        assert "idempotent-replayed" not in first.headers
        retried = await api.post("/api/v2/jobs", json=body, headers=keyed(key))
        assert retried.status_code == 201, retried.text
        assert retried.headers["idempotent-replayed"] == "true"
        assert retried.headers["content-type"] == "application/json"
        assert retried.json() == first.json()
        assert jobs_of(stack, tenant) == 1

        # Another key of the same tenant is the same caller: the key is the tenant's.
        async with api_client(stack.base_url, new_key(stack.store, tenant)) as other:
            again = await other.post("/api/v2/jobs", json=body, headers=keyed(key))
        assert again.headers["idempotent-replayed"] == "true"
        assert again.json()["job_id"] == first.json()["job_id"]

        # A new key is a new request.
        second = await api.post("/api/v2/jobs", json=body, headers=keyed(fresh("create")))
        assert second.status_code == 201
        assert second.json()["job_id"] != first.json()["job_id"]
        assert jobs_of(stack, tenant) == 2


@asynccontextmanager
async def losing_first_answer(upstream: str) -> AsyncIterator[str]:
    """A TCP proxy to `upstream` (host:port) whose first connection delivers the request, waits
    for the whole answer, and closes without passing it on: a reset connection after the
    server did the work. Later connections are passed through."""
    host, port = upstream.rsplit(":", 1)
    connections = 0

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        server_r, server_w = await asyncio.open_connection(host, int(port))
        if connections > 1:
            await asyncio.gather(pipe(client_r, server_w), pipe(server_r, client_w))
            return
        head = await client_r.readuntil(b"\r\n\r\n")
        length = int(_header(head, b"content-length") or 0)
        server_w.write(head + await client_r.readexactly(length))
        answer = await server_r.readuntil(b"\r\n\r\n")
        await server_r.readexactly(int(_header(answer, b"content-length") or 0))
        for writer in (client_w, server_w):
            writer.transport.abort()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


def _header(head: bytes, name: bytes) -> bytes | None:
    for line in head.split(b"\r\n")[1:]:
        field, _, value = line.partition(b":")
        if field.strip().lower() == name:
            return value.strip()
    return None


async def test_a_create_whose_answer_was_lost_is_retried_into_the_same_job(
    stack: Stack,
) -> None:
    tenant = fresh("idem")
    body = {"storyboard": stack.sample_scenes(1)}
    headers = {"Authorization": f"Bearer {new_key(stack.store, tenant)}", **keyed(fresh("lost"))}
    async with (
        losing_first_answer(stack.base_url.removeprefix("http://")) as proxy,
        httpx.AsyncClient(base_url=proxy, headers=headers, timeout=30) as api,
    ):
        try:
            await api.post("/api/v2/jobs", json=body)
        except httpx.TransportError:
            pass
        else:
            raise AssertionError("the proxy passed the first answer on")
        # The job was made; the client cannot know. Its retry, with the same key:
        assert jobs_of(stack, tenant) == 1
        retried = await api.post("/api/v2/jobs", json=body)
    assert retried.status_code == 201, retried.text
    assert retried.headers["idempotent-replayed"] == "true"
    assert jobs_of(stack, tenant) == 1
    with Session(stack.store.engine) as session:
        job = session.exec(select(Job).where(Job.tenant == tenant)).one()
    assert retried.json() == {"job_id": job.id, "status": "ready"}


async def test_the_same_key_with_another_request_is_422_and_changes_nothing(
    stack: Stack,
) -> None:
    tenant = fresh("idem")
    async with stack.client_for(tenant) as api:
        key = fresh("conflict")
        first = await api.post("/api/v2/jobs", json={"max_cost": 1}, headers=keyed(key))
        assert first.status_code == 201, first.text

        other_body = await api.post("/api/v2/jobs", json={"max_cost": 2}, headers=keyed(key))
        assert other_body.status_code == 422, other_body.text
        detail = other_body.json()["detail"]
        assert f'Idempotency-Key "{key}" was first used with a different request' in detail
        assert "POST /api/v2/jobs, with another body or query" in detail
        assert jobs_of(stack, tenant) == 1

        job_id = first.json()["job_id"]
        other_path = await api.post(f"/api/v2/jobs/{job_id}/approve", headers=keyed(key))
        assert other_path.status_code == 422, other_path.text
        assert "different request (POST /api/v2/jobs)" in other_path.json()["detail"]
        # Nothing was approved: the job is still the draft it was made.
        assert stack.store.get(job_id)["approved"] is False

        # The original request is still answered from its key.
        replay = await api.post("/api/v2/jobs", json={"max_cost": 1}, headers=keyed(key))
        assert replay.headers["idempotent-replayed"] == "true"
        assert replay.json() == first.json()


async def test_keys_are_per_tenant(stack: Stack) -> None:
    key = fresh("shared")
    tenant_a, tenant_b = fresh("idem-a"), fresh("idem-b")
    async with stack.client_for(tenant_a) as a, stack.client_for(tenant_b) as b:
        made_a = await a.post("/api/v2/jobs", json={"max_cost": 1}, headers=keyed(key))
        made_b = await b.post("/api/v2/jobs", json={"max_cost": 1}, headers=keyed(key))
        assert made_a.status_code == made_b.status_code == 201
        assert "idempotent-replayed" not in made_b.headers
        assert made_a.json()["job_id"] != made_b.json()["job_id"]
        # Each tenant's retry gets its own job back.
        again_b = await b.post("/api/v2/jobs", json={"max_cost": 1}, headers=keyed(key))
        assert again_b.json()["job_id"] == made_b.json()["job_id"]
        # B's job is B's: A cannot see it.
        assert (await a.get(f"/api/v2/jobs/{made_b.json()['job_id']}")).status_code == 404
    assert jobs_of(stack, tenant_a) == jobs_of(stack, tenant_b) == 1


async def test_an_approve_retried_with_the_same_key_starts_no_second_render(
    stack: Stack,
) -> None:
    job_id = await stack.create_job(stack.sample_scenes(1))
    key = fresh("approve")
    first = await stack.api.post(f"/api/v2/jobs/{job_id}/approve", headers=keyed(key))
    assert first.status_code == 200, first.text
    retried = await stack.api.post(f"/api/v2/jobs/{job_id}/approve", headers=keyed(key))
    assert retried.status_code == 200
    assert retried.headers["idempotent-replayed"] == "true"
    assert retried.json() == first.json()
    assert retried.json()["workflow_id"] == f"render-video-{job_id}"

    assert (await stack.wait_closed(job_id))["status"] == "completed"
    # Still the first answer, not what an approve of a completed job says ("completed"):
    # the retry did not reach the route at all.
    late = await stack.api.post(f"/api/v2/jobs/{job_id}/approve", headers=keyed(key))
    assert late.json() == first.json() and late.json()["status"] == "rendering_started"
    assert stack.renderer.stats()["creates"] == 1


async def test_a_refusal_is_kept_like_any_decision(stack: Stack) -> None:
    job_id = await stack.create_job()  # a draft: approve is refused with 409
    key = fresh("refused")
    refused = await stack.api.post(f"/api/v2/jobs/{job_id}/approve", headers=keyed(key))
    assert refused.status_code == 409, refused.text
    await stack.api.put(f"/api/v2/jobs/{job_id}/storyboard", json=stack.sample_scenes(1))
    retried = await stack.api.post(f"/api/v2/jobs/{job_id}/approve", headers=keyed(key))
    assert retried.status_code == 409
    assert retried.headers["idempotent-replayed"] == "true"
    assert retried.json() == refused.json()
    assert stack.store.get(job_id)["status"] == "ready"


async def test_a_key_whose_first_request_is_in_progress_gets_409_with_retry_after(
    stack: Stack,
) -> None:
    tenant = fresh("idem")
    key = fresh("busy")
    body = json.dumps({"max_cost": 3}).encode()
    fingerprint = request_fingerprint("POST", "/api/v2/jobs", b"", body)
    keys = IdempotencyStore(stack.store.engine)
    # The first request holds the key, as it does while the route runs.
    claim = keys.claim(tenant, key, fingerprint, "POST /api/v2/jobs")
    assert claim.token is not None
    async with stack.client_for(tenant) as api:
        busy = await api.post("/api/v2/jobs", content=body, headers={**JSON, **keyed(key)})
        assert busy.status_code == 409, busy.text
        assert busy.headers["retry-after"] == "1"
        assert busy.json()["detail"] == (
            "A request with this Idempotency-Key is still in progress; retry shortly"
        )
        assert jobs_of(stack, tenant) == 0

        # The first request ends without an answer worth keeping: the retry is processed.
        keys.release(tenant, key, claim.token)
        done = await api.post("/api/v2/jobs", content=body, headers={**JSON, **keyed(key)})
        assert done.status_code == 201, done.text
        assert jobs_of(stack, tenant) == 1


async def test_a_claim_whose_request_died_is_taken_over_after_its_lease(stack: Stack) -> None:
    tenant = fresh("idem")
    key = fresh("dead")
    body = json.dumps({"max_cost": 3}).encode()
    fingerprint = request_fingerprint("POST", "/api/v2/jobs", b"", body)
    ten_minutes_ago = datetime.now(UTC) - timedelta(minutes=10)
    IdempotencyStore(stack.store.engine).claim(
        tenant, key, fingerprint, "POST /api/v2/jobs", now=ten_minutes_ago
    )
    async with stack.client_for(tenant) as api:
        made = await api.post("/api/v2/jobs", content=body, headers={**JSON, **keyed(key)})
        assert made.status_code == 201, made.text
        replay = await api.post("/api/v2/jobs", content=body, headers={**JSON, **keyed(key)})
        assert replay.headers["idempotent-replayed"] == "true"
    assert jobs_of(stack, tenant) == 1


async def test_answers_older_than_24_hours_are_not_replayed(stack: Stack) -> None:
    tenant = fresh("idem")
    key = fresh("old")
    body = json.dumps({"max_cost": 4}).encode()
    fingerprint = request_fingerprint("POST", "/api/v2/jobs", b"", body)
    keys = IdempotencyStore(stack.store.engine)
    yesterday = datetime.now(UTC) - timedelta(hours=24, minutes=1)
    claim = keys.claim(tenant, key, fingerprint, "POST /api/v2/jobs", now=yesterday)
    assert claim.token is not None
    stale = b'{"job_id": 2000000000, "status": "draft"}'
    headers = [("content-type", "application/json")]
    assert keys.complete(tenant, key, claim.token, 201, headers, stale)

    async with stack.client_for(tenant) as api:
        made = await api.post("/api/v2/jobs", content=body, headers={**JSON, **keyed(key)})
        assert made.status_code == 201, made.text
        assert "idempotent-replayed" not in made.headers
        assert made.json()["job_id"] != 2000000000
        assert jobs_of(stack, tenant) == 1
        # The new answer is the one kept now.
        replay = await api.post("/api/v2/jobs", content=body, headers={**JSON, **keyed(key)})
        assert replay.headers["idempotent-replayed"] == "true"
        assert replay.json() == made.json()


async def test_malformed_keys_are_refused_and_unauthenticated_requests_are_401(
    stack: Stack,
) -> None:
    tenant = fresh("idem")
    async with stack.client_for(tenant) as api:
        long = await api.post("/api/v2/jobs", json={}, headers=keyed("k" * 256))
        assert long.status_code == 422, long.text
        assert long.json()["detail"] == "Idempotency-Key must be at most 255 characters, not 256"
        assert long.json()["errors"][0]["loc"] == ["header", "Idempotency-Key"]
        empty = await api.post("/api/v2/jobs", json={}, headers=keyed(""))
        assert empty.status_code == 422, empty.text
        assert empty.json()["detail"] == "Idempotency-Key must not be empty"
        assert jobs_of(stack, tenant) == 0
        longest = await api.post("/api/v2/jobs", json={}, headers=keyed("k" * 255))
        assert longest.status_code == 201, longest.text

    key = fresh("anonymous")
    async with stack.anonymous() as anonymous:
        refused = await anonymous.post("/api/v2/jobs", json={}, headers=keyed(key))
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"] == "Bearer"
    assert records_with(stack, key) == 0


async def test_an_oversized_body_is_refused_before_its_key_is_claimed(stack: Stack) -> None:
    key = fresh("big")
    chunk = b" " * 65536
    size = stack.settings.max_request_bytes + len(chunk)

    async def chunked() -> AsyncIterator[bytes]:
        for _ in range(size // len(chunk)):
            yield chunk

    response = await stack.api.post(
        "/api/v2/jobs", content=chunked(), headers={**JSON, **keyed(key)}
    )
    assert response.status_code == 413, response.text
    assert records_with(stack, key) == 0


async def test_the_webhook_receiver_ignores_idempotency_keys(stack: Stack) -> None:
    key = fresh("webhook")
    headers = {
        **keyed(key),
        "webhook-id": "msg_1",
        "webhook-timestamp": "1",
        "webhook-signature": "v1,bad",
    }
    response = await stack.api.post("/api/v2/webhooks/replicate", json={}, headers=headers)
    assert response.status_code == 401, response.text
    assert "idempotent-replayed" not in response.headers
    assert records_with(stack, key) == 0


async def test_a_503_is_not_kept_and_the_retry_really_approves(
    renderer: RunningServer, tmp_path: Path
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = make_settings(tmp_path, f"127.0.0.1:{port}", renderer.base_url)
    store = JobStore(make_engine(settings.resolved_database_url))
    key = fresh("approve")
    with UvicornThread(create_app(settings)) as server:
        async with api_client(server.base_url, new_key(store)) as api:
            scenes = [{"image_url": f"{server.base_url}/samples/scene-1.jpg"}]
            created = await api.post("/api/v2/jobs", json={"storyboard": scenes})
            job_id = created.json()["job_id"]
            down = await api.post(f"/api/v2/jobs/{job_id}/approve", headers=keyed(key))
            assert down.status_code == 503, down.text
            with Session(store.engine) as session:
                kept = select(IdempotencyRecord).where(IdempotencyRecord.idempotency_key == key)
                assert session.exec(kept).first() is None

            # Temporal comes back where the API looks for it.
            env = await WorkflowEnvironment.start_local(
                dev_server_existing_path=temporal_binary(),
                port=port,
                ui=False,
                dev_server_log_level="error",
                search_attributes=list(SEARCH_ATTRIBUTES),
            )
            try:
                async with running_worker(env.client, settings):
                    retried = await api.post(f"/api/v2/jobs/{job_id}/approve", headers=keyed(key))
                    assert retried.status_code == 200, retried.text
                    assert "idempotent-replayed" not in retried.headers
                    assert retried.json()["status"] == "rendering_started"
                    handle = env.client.get_workflow_handle(f"render-video-{job_id}")
                    await handle.result()
                    assert store.get(job_id)["status"] == "completed"
            finally:
                await env.shutdown()


async def test_concurrent_requests_with_one_key_make_one_job(stack: Stack) -> None:
    tenant = fresh("idem")
    key = fresh("race")
    async with stack.client_for(tenant) as api:
        answers = await asyncio.gather(
            *(api.post("/api/v2/jobs", json={"max_cost": 7}, headers=keyed(key)) for _ in range(8))
        )
    assert {a.status_code for a in answers} <= {201, 409}, [a.text for a in answers]
    made = [a for a in answers if a.status_code == 201]
    assert len({a.json()["job_id"] for a in made}) == 1
    assert sum("idempotent-replayed" not in a.headers for a in made) == 1
    assert all(a.headers["retry-after"] == "1" for a in answers if a.status_code == 409)
    assert jobs_of(stack, tenant) == 1


def test_the_key_store_claims_replays_and_expires(store: JobStore) -> None:
    tenant, key = fresh("t"), fresh("k")
    line = "POST /api/v2/jobs"
    now = datetime.now(UTC)
    # An expired row of another key, left by another process; removed by the clean-up that
    # this process's first claim does.
    old = IdempotencyStore(store.engine).claim(
        tenant, "old", "f0", line, now=now - timedelta(hours=25)
    )
    assert old.outcome == "claimed"
    keys = IdempotencyStore(store.engine)

    first = keys.claim(tenant, key, "f1", line, now=now)
    assert first.outcome == "claimed" and first.token is not None
    assert keys.claim(tenant, key, "f1", line, now=now).outcome == "in_progress"
    conflict = keys.claim(tenant, key, "f2", "POST /api/v2/jobs/1/approve", now=now)
    assert conflict.outcome == "conflict" and conflict.first_request == line
    # Another tenant's key of the same name is its own.
    assert keys.claim(fresh("t"), key, "f2", line, now=now).outcome == "claimed"

    answer = b'{"job_id": 1}\x00\xff'
    headers = [("content-type", "application/json"), ("location", "/x")]
    assert keys.complete(tenant, key, first.token, 201, headers, answer)
    replay = keys.claim(tenant, key, "f1", line, now=now + timedelta(hours=23))
    assert replay.outcome == "replay" and replay.answer is not None
    assert (replay.answer.status_code, replay.answer.headers) == (201, headers)
    assert replay.answer.body == answer
    # Only the claim's holder settles it.
    assert not keys.complete(tenant, key, "not-the-token", 500, [], b"")

    # A day later the key is free again, for any request.
    again = keys.claim(tenant, key, "f2", line, now=now + timedelta(hours=24, seconds=1))
    assert again.outcome == "claimed" and again.token is not None
    keys.release(tenant, key, again.token)
    assert keys.claim(tenant, key, "f3", line, now=now).outcome == "claimed"

    with Session(store.engine) as session:
        query = select(IdempotencyRecord).where(IdempotencyRecord.tenant == tenant)
        assert {row.idempotency_key for row in session.exec(query)} == {key}
