"""The API's reads: job and key lookups batched together, and running jobs' progress answers
shared between their readers. One of each per app, made in its lifespan."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Generic, TypeVar

from temporalio.client import Client
from temporalio.common import QueryRejectCondition

from backend.auth import KeyStore
from backend.database import ACTIVE, JobNotFound, JobStore
from workflows.payloads import workflow_id_for
from workflows.render_video import RenderVideo

log = logging.getLogger("api")

QUERY_TIMEOUT = timedelta(seconds=2)

K = TypeVar("K")
V = TypeVar("V")


async def live_progress(client: Client, job: dict[str, Any]) -> dict[str, Any] | None:
    """The running workflow's answer to `progress` as a dict (made once, however many GETs
    share it); None when it cannot answer quickly."""
    if job["status"] not in ACTIVE:
        return None
    handle = client.get_workflow_handle(job["workflow_id"] or workflow_id_for(job["id"]))
    try:
        # rpc_timeout bounds one attempt; the client retries a refused connection for up
        # to 10 s, so the whole call gets the bound too.
        # A closed run still answers queries (from its history): only an open one is live.
        progress = await asyncio.wait_for(
            handle.query(
                RenderVideo.progress,
                rpc_timeout=QUERY_TIMEOUT,
                reject_condition=QueryRejectCondition.NOT_OPEN,
            ),
            QUERY_TIMEOUT.seconds,
        )
    except Exception as exc:  # noqa: BLE001 - a read must not fail because Temporal is slow
        log.debug("progress query for job %s failed: %s", job["id"], exc)
        return None
    return dataclasses.asdict(progress)


class ProgressCache:
    """Each running job's latest answer to `progress`, shared by its readers for `ttl` seconds.

    A query is a round trip through Temporal to a worker, many times a GET's own cost: with
    many clients polling a job, the run answers about once a second instead of once per GET.
    Only `live` is shared: the status is read from the job store on every GET, so a job that
    finished reads as finished at once and never queries. Changes made through this API
    (approve, review, cancel, a relayed webhook) drop the job's answer.
    """

    def __init__(self, ttl: float = 1.0) -> None:
        self.ttl = ttl
        # job id -> (when the query started, its workflow id, the query's task)
        self._answers: dict[int, tuple[float, str, asyncio.Task[dict[str, Any] | None]]] = {}
        self._pruned = 0.0

    async def get(self, client: Client, job: dict[str, Any]) -> dict[str, Any] | None:
        if job["status"] not in ACTIVE:
            return None
        now = time.monotonic()
        workflow_id = job["workflow_id"] or workflow_id_for(job["id"])
        entry = self._answers.get(job["id"])
        # Aged from the query's start: an answer is never older than `ttl` when served.
        if entry is None or now - entry[0] >= self.ttl or entry[1] != workflow_id:
            self._prune(now)
            entry = (now, workflow_id, asyncio.create_task(live_progress(client, job)))
            self._answers[job["id"]] = entry
        task = entry[2]
        if task.done():
            return task.result()
        # Shielded: a reader that goes away must not cancel the query others wait for.
        return await asyncio.shield(task)

    def forget(self, job_id: int) -> None:
        self._answers.pop(job_id, None)

    def _prune(self, now: float) -> None:
        # At most once per ttl, so the map holds about one ttl's worth of polled jobs.
        if now - self._pruned >= self.ttl:
            self._pruned = now
            for job_id in [j for j, e in self._answers.items() if now - e[0] >= self.ttl]:
                del self._answers[job_id]


class BatchedReads(Generic[K, V]):
    """Reads of one kind, in batches: the reads asked for while one batch runs go together in
    the next, with one thread hop and one query for all of them.

    Under many pollers the hop to a thread and a connection per read cost more than the read
    itself. A batch starts after its requests arrived, so each still sees every write that was
    committed before it came. What a batch returns is shared between requests: read only.
    """

    BATCH = 100  # keys per query, well under any database's limit on parameters

    def __init__(self, fetch: Callable[[set[K]], dict[K, V]]) -> None:
        self._fetch = fetch
        self._waiting: list[tuple[K, asyncio.Future[V | None]]] = []
        self._reading: asyncio.Task[None] | None = None

    async def lookup(self, key: K) -> V | None:
        """The value for `key`; None when there is none."""
        future: asyncio.Future[V | None] = asyncio.get_running_loop().create_future()
        self._waiting.append((key, future))
        if self._reading is None:
            self._reading = asyncio.create_task(self._read())
        return await future

    async def _read(self) -> None:
        batch: list[tuple[K, asyncio.Future[V | None]]] = []
        try:
            while self._waiting:
                batch = self._waiting[: self.BATCH]
                del self._waiting[: self.BATCH]
                try:
                    found = await asyncio.to_thread(self._fetch, {k for k, _ in batch})
                except Exception as exc:  # noqa: BLE001 - each request fails with it, as before
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for key, future in batch:
                    if not future.done():  # its request may have gone away
                        future.set_result(found.get(key))
        finally:
            self._reading = None
            # Left unanswered only if this task was cancelled, as the loop shuts down.
            for _, future in batch + self._waiting:
                future.cancel()


class JobReads(BatchedReads[int, dict[str, Any]]):
    """GET's reads of the job store, batched."""

    def __init__(self, store: JobStore) -> None:
        super().__init__(store.get_many)
        self.store = store

    async def get(self, job_id: int) -> dict[str, Any]:
        job = await self.lookup(job_id)
        if job is None:
            raise JobNotFound(job_id)
        return job


class KeyReads(BatchedReads[str, str]):
    """Every request's API key looked up (a tenant, or None for an unknown or revoked key),
    batched like the job reads: no key is cached, so a revocation holds from the next
    request on."""

    def __init__(self, keys: KeyStore) -> None:
        super().__init__(keys.tenants_of)

    async def tenant_of(self, key: str) -> str | None:
        return await self.lookup(key)
