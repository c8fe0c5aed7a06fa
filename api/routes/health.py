"""Liveness, for load balancers and `render-video dev`: no key needed."""

from __future__ import annotations

from fastapi import APIRouter

from api.models import Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="The API is up")
async def healthz() -> Health:
    return Health(status="ok")
