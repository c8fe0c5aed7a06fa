"""The calling tenant's own settings: its default callback URL, its caps, and the secret its
job events are signed with."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter

from api.deps import SettingsDep, StoreDep
from api.errors import error_responses
from api.models import TenantUpdate, TenantView, WebhookSecret
from api.routes.jobs import checked_callback_url
from api.security import ProtectedRoute, TenantDep
from backend.database import new_webhook_secret
from backend.settings import Settings

router = APIRouter(prefix="/api/v2/tenant", tags=["tenant"], route_class=ProtectedRoute)


def _view(tenant: dict[str, Any], settings: Settings) -> TenantView:
    cap = tenant["spend_cap"] or settings.tenant_spend_cap
    return TenantView(
        tenant=tenant["name"],
        callback_url=tenant["callback_url"],
        max_active_jobs=tenant["max_active_jobs"] or settings.tenant_max_active_jobs,
        spend_cap=float(cap) if cap is not None else None,
        spend_period_days=settings.tenant_spend_period_days,
    )


@router.get(
    "",
    response_model=TenantView,
    responses=error_responses(401, 503),
    summary="The tenant's settings and caps",
)
async def get_tenant(tenant: TenantDep, store: StoreDep, settings: SettingsDep) -> TenantView:
    return _view(await asyncio.to_thread(store.tenant, tenant), settings)


@router.put(
    "",
    response_model=TenantView,
    responses=error_responses(401, 413, 415, 422, 503),
    summary="Set the tenant's default callback URL (null: none)",
)
async def put_tenant(
    tenant: TenantDep, store: StoreDep, settings: SettingsDep, body: TenantUpdate
) -> TenantView:
    url = checked_callback_url(body.callback_url, settings)
    return _view(await asyncio.to_thread(store.update_tenant, tenant, callback_url=url), settings)


@router.get(
    "/webhook-secret",
    response_model=WebhookSecret,
    responses=error_responses(401, 503),
    summary="The secret the tenant's job events are signed with",
)
async def webhook_secret(tenant: TenantDep, store: StoreDep) -> WebhookSecret:
    return WebhookSecret(secret=(await asyncio.to_thread(store.tenant, tenant))["webhook_secret"])


@router.post(
    "/webhook-secret/rotate",
    response_model=WebhookSecret,
    responses=error_responses(401, 413, 415, 422, 503),
    summary="Replace the secret: events from now on are signed with the new one",
)
async def rotate_webhook_secret(tenant: TenantDep, store: StoreDep) -> WebhookSecret:
    row = await asyncio.to_thread(store.update_tenant, tenant, webhook_secret=new_webhook_secret())
    return WebhookSecret(secret=row["webhook_secret"])
