"""Liveness and readiness, for load balancers and `render-video dev`: no key needed."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

from fastapi import APIRouter, Request, Response
from sqlalchemy import text

from api.models import Health, Readiness
from backend.database import JobStore

# Seconds each readiness check may take.
READY_TIMEOUT = 3.0

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="The API is up")
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "A dependency cannot be reached"}},
    summary="The API can serve: the job store, Temporal and the video storage answer",
)
async def readyz(request: Request, response: Response) -> Readiness:
    """For a load balancer's readiness probe: 503 (with what failed) until every dependency
    answers. Each check is bounded, so the probe itself never hangs."""
    state = request.app.state
    checks = {
        "database": await _check(asyncio.to_thread(_ping_store, state.store)),
        "temporal": await _check(state.temporal.service_client.check_health()),
        "storage": await _check(state.storage.check()),
    }
    ready = all(value == "ok" for value in checks.values())
    if not ready:
        response.status_code = 503
    return Readiness(status="ready" if ready else "not_ready", checks=checks)


async def _check(probe: Awaitable[Any]) -> str:
    try:
        async with asyncio.timeout(READY_TIMEOUT):
            result = await probe
    except Exception as exc:  # noqa: BLE001 - any failure means: not ready; say which kind
        return f"failed ({type(exc).__name__})"
    return "ok" if result is not False else "failed"


def _ping_store(store: JobStore) -> bool:
    with store.engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    return True
