"""Shared test plumbing: settings for a test, and a worker plus the API for one test."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from api.main import create_app
from backend.auth import KeyStore
from backend.database import JobStore, make_engine
from backend.settings import Settings
from local_replicate.testing import RunningServer
from local_replicate.threaded import UvicornThread
from worker import running_worker
from workflows.payloads import workflow_id_for


def make_settings(data_dir: Path, temporal_address: str, provider: str, **extra: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "temporal_address": temporal_address,
        "task_queue": f"render-{uuid.uuid4().hex[:8]}",
        "replicate_base_url": provider,
        "poll_interval_seconds": 0.2,
        # One reconcile schedule per test's task queue would outlive the test's worker; the
        # tests of the reconciler turn it on.
        "reconcile_interval_seconds": 0,
        # One prediction for the whole storyboard: the tests of the pipeline's mechanics
        # (webhooks, ledger, crashes) count on one; the per-scene tests ask for local/i2v.
        "replicate_model": "local/slideshow",
    }
    values.update(extra)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def new_key(store: JobStore, tenant: str = "default") -> str:
    """A fresh API key of `tenant`, made in the stack's own store."""
    return KeyStore(store.engine).create(tenant, label="tests").key


def api_client(base_url: str, key: str | None, **kwargs: Any) -> httpx.AsyncClient:
    """An httpx client for the API that sends `key` (None: no key) with every request."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.AsyncClient(base_url=base_url, headers=headers, timeout=30, **kwargs)


@dataclass
class Stack:
    """A worker and the API for one test, on a Temporal env and the render server.

    `api` sends an API key of the tenant `default`; `client_for(tenant)` gives a client of
    another tenant, and `anonymous()` one without a key.
    """

    settings: Settings
    temporal: Client
    store: JobStore
    api: httpx.AsyncClient
    renderer: RunningServer
    # Clients made for the test, closed with the stack.
    clients: list[httpx.AsyncClient] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return str(self.api.base_url).rstrip("/")

    def client_for(self, tenant: str) -> httpx.AsyncClient:
        """A client with a new key of `tenant` (closed with the stack; `async with` works too)."""
        client = api_client(self.base_url, new_key(self.store, tenant))
        self.clients.append(client)
        return client

    def anonymous(self) -> httpx.AsyncClient:
        client = api_client(self.base_url, None)
        self.clients.append(client)
        return client

    async def aclose(self) -> None:
        for client in self.clients:
            await client.aclose()

    async def create_job(self, storyboard: Any = None) -> int:
        body = {"storyboard": storyboard} if storyboard is not None else None
        response = await self.api.post("/api/v2/jobs", json=body)
        assert response.status_code == 201, response.text
        return response.json()["job_id"]

    def sample_scenes(self, count: int = 3, seconds: float = 1.0) -> list[dict[str, Any]]:
        base = self.base_url
        return [
            {"image_url": f"{base}/samples/scene-{i % 5 + 1}.jpg", "duration_seconds": seconds}
            for i in range(count)
        ]

    async def wait_closed(self, job_id: int) -> dict[str, Any]:
        handle = self.temporal.get_workflow_handle(
            workflow_id_for(job_id, self.settings.workflow_id_prefix)
        )
        try:
            await handle.result()
        except Exception:  # noqa: BLE001 - the job row tells the outcome
            pass
        return self.store.get(job_id)


@asynccontextmanager
async def running_stack(
    env: WorkflowEnvironment,
    renderer: RunningServer,
    data_dir: Path,
    *,
    webhooks: bool = False,
    worker: bool = True,
    **overrides: Any,
) -> AsyncIterator[Stack]:
    """The API on a thread and (unless worker=False) a worker in this process.

    webhooks=True points PUBLIC_BASE_URL at this API, so the render server calls it back.
    """
    address = env.client.service_client.config.target_host
    settings = make_settings(data_dir, address, renderer.base_url, **overrides)
    store = JobStore(make_engine(settings.resolved_database_url))
    with UvicornThread(create_app(settings)) as api_server:
        if webhooks:
            settings = settings.model_copy(update={"public_base_url": api_server.base_url})
        async with api_client(api_server.base_url, new_key(store)) as api:
            stack = Stack(settings, env.client, store, api, renderer)
            try:
                if not worker:
                    yield stack
                    return
                async with running_worker(env.client, settings):
                    yield stack
            finally:
                await stack.aclose()
                store.engine.dispose()


async def listed_runs(stack: Stack, query: str, count: int) -> list[str] | None:
    """The ids of the runs a visibility query finds, once it finds at least `count` (the
    visibility store is eventually consistent)."""
    ids = [run.id async for run in stack.temporal.list_workflows(query)]
    return ids if len(ids) >= count else None


async def eventually(check: Any, within: float = 30.0, what: str = "condition") -> Any:
    """Re-checks `check` (sync or async) until it returns something truthy, and returns that."""
    try:
        async with asyncio.timeout(within):
            while True:
                value = check()
                if asyncio.iscoroutine(value):
                    value = await value
                if value:
                    return value
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise AssertionError(f"timed out after {within:g} s waiting for {what}") from None
