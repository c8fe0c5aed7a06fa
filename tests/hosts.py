"""Many hosts: one deployment run as several API processes and several workers, the way it is
spread over machines, on one Temporal server, a PostgreSQL job store and shared video storage.
Used by tests/test_many_hosts.py and bench/many_hosts.py.

Where the videos live is chosen in one place, `storage()`: an S3 bucket (moto on loopback)
that every process reaches over the network, while each keeps a DATA_DIR of its own, as on
separate machines: a step of a render may run on any worker, and any API serves any video.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from processes import ApiServer, LoggedProcess, MotoServer, Workers, free_port, worker_env

from backend.auth import KeyStore
from backend.database import JobStore, make_engine, migrate_store
from backend.settings import Settings
from bench.common import send


@contextmanager
def storage(folder: Path) -> Iterator[dict[str, str]]:
    """The video storage every process of a deployment shares, as settings laid over each
    process's own: a bucket on an S3-protocol server (moto) on loopback, as hosts share
    one object store. Each process keeps a DATA_DIR of its own for its scratch files."""
    folder.mkdir(parents=True, exist_ok=True)
    server = MotoServer(folder)
    server.start_and_wait()
    try:
        bucket = server.new_bucket()
        yield {
            "VIDEO_STORAGE_URL": f"s3://{bucket}/deployment",
            "S3_ENDPOINT_URL": server.endpoint,
            **MotoServer.ENV,
        }
    finally:
        server.stop()


@dataclass
class Deployment:
    """API processes and workers of one deployment: one job store, one task queue, one
    storage. Scene images are served by `apis[0]`; the render server calls back `apis[-1]`."""

    settings: Settings
    folder: Path
    storage: dict[str, str]
    key: str
    store: JobStore
    apis: list[ApiServer] = field(default_factory=list)
    workers: Workers | None = None
    # Settings every process gets beyond the ones `worker_env` passes from `settings`.
    extra: dict[str, str] = field(default_factory=dict)

    def process_env(self, name: str) -> dict[str, str]:
        """One process's settings: a DATA_DIR of its own unless the storage shares one."""
        own = self.folder / name
        own.mkdir(parents=True, exist_ok=True)
        return {**self.extra, "DATA_DIR": str(own), **self.storage}

    async def start_worker(self) -> LoggedProcess:
        assert self.workers is not None
        return await self.workers.start(
            **self.process_env(f"worker-{len(self.workers.started) + 1}")
        )

    def client(self, api: ApiServer, **kwargs: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=api.base_url,
            headers={"Authorization": f"Bearer {self.key}"},
            timeout=60,
            **kwargs,
        )

    def storyboard(self, tag: str, scenes: int) -> list[dict[str, Any]]:
        """`scenes` one-second scenes; the prompt makes each input unique, so no scene waits for
        another job's prediction of the same input."""
        return [
            {
                "image_url": f"{self.apis[0].base_url}/samples/scene-{n % 5 + 1}.jpg",
                "prompt": f"{tag} scene {n + 1}",
                "duration_seconds": 1,
            }
            for n in range(scenes)
        ]

    async def submit(
        self, clients: list[httpx.AsyncClient], jobs: int, scenes: int, at_once: int = 8
    ) -> list[int]:
        """Creates and approves `jobs` jobs, taking turns over the clients (one per API);
        every POST carries an Idempotency-Key and is retried on a transport error."""
        gate = asyncio.Semaphore(at_once)

        async def one(n: int) -> int:
            api = clients[n % len(clients)]
            async with gate:
                created = await send(
                    api,
                    "POST",
                    "/api/v2/jobs",
                    json={"storyboard": self.storyboard(f"j{n}", scenes)},
                )
                assert created.status_code == 201, created.text
                job_id: int = created.json()["job_id"]
                approved = await send(api, "POST", f"/api/v2/jobs/{job_id}/approve")
                assert approved.status_code == 200, approved.text
                return job_id

        return list(await asyncio.gather(*(one(n) for n in range(jobs))))

    def completed(self) -> int:
        return self.store.count_by_status().get("completed", 0)

    def stop(self) -> None:
        if self.workers is not None:
            self.workers.stop_all()
        for api in self.apis:
            api.stop()
            print(f"--- {api.name} log ---\n{api.output()[-6000:]}")
        self.store.engine.dispose()


@asynccontextmanager
async def running_deployment(
    settings: Settings,
    folder: Path,
    storage: dict[str, str],
    *,
    apis: int,
    workers: int,
    extra: dict[str, str] | None = None,
) -> AsyncIterator[Deployment]:
    """Migrates the job store (API and worker refuse one that is behind), makes an API key, and
    starts `apis` API processes and `workers` workers, all at once."""
    url = settings.resolved_database_url
    await asyncio.to_thread(migrate_store, url)
    store = JobStore(make_engine(url))
    key = KeyStore(store.engine).create("many-hosts", label="many hosts").key
    ports = [free_port() for _ in range(apis)]
    folder.mkdir(parents=True, exist_ok=True)
    env = {
        "WORKFLOW_ID_PREFIX": settings.workflow_id_prefix,
        "SCENE_CONCURRENCY": str(settings.scene_concurrency),
        "PROVIDER_CREATES_PER_MINUTE": str(settings.provider_creates_per_minute),
        "WEBHOOK_WAIT_SECONDS": str(settings.webhook_wait_seconds),
        # One key for every API process: a link signed by one is good at any other.
        "URL_SIGNING_SECRET": secrets.token_hex(16),
        # The render server reports to one API (a load balancer's address in production).
        "PUBLIC_BASE_URL": f"http://127.0.0.1:{ports[-1]}",
        **(extra or {}),
    }
    deployment = Deployment(settings, folder, storage, key, store, extra=env)
    deployment.workers = Workers(settings, folder)
    try:
        for n, port in enumerate(ports, 1):
            environment = worker_env(settings, **deployment.process_env(f"api-{n}"))
            deployment.apis.append(ApiServer(f"api-{n}", folder, environment, port=port))
        await asyncio.gather(
            *(api.start_and_wait() for api in deployment.apis),
            *(deployment.start_worker() for _ in range(workers)),
        )
        yield deployment
    finally:
        deployment.stop()
