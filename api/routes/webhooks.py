"""Replicate's webhooks: verified, routed by the signed body alone, relayed to the run."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from typing import Annotated, Any

import replicate
from fastapi import APIRouter, FastAPI, Query, Request
from replicate.webhook import (
    InvalidSecretKeyError,
    InvalidSignatureError,
    WebhookSigningSecret,
    WebhookValidationError,
)
from starlette.requests import ClientDisconnect
from temporalio.service import RPCError, RPCStatusCode

from api.deps import ProgressDep, SettingsDep, StoreDep, TemporalDep
from api.errors import ApiError, Unavailable, error_responses
from api.metrics import count_webhook
from api.models import (
    PredictionBody,
    WebhookAnswer,
    WebhookDuplicate,
    WebhookIgnored,
    WebhookRelayed,
)
from backend.provider import TERMINAL, PredictionState
from backend.settings import Settings
from workflows.payloads import PredictionWebhook
from workflows.render_scene import RenderScene

log = logging.getLogger("api")

router = APIRouter(tags=["webhooks"])


class WebhookRejected(ApiError):
    """A delivery without a good signature (401; no WWW-Authenticate: it takes no key)."""

    status = 401


class NotAPrediction(ApiError):
    status = 400


class UnknownPrediction(ApiError):
    # 404 makes Replicate retry: the run may not have recorded the prediction yet.
    status = 404


_SIGNATURE_HEADERS = [
    {
        "name": name,
        "in": "header",
        "required": True,
        "schema": {"type": "string"},
        "description": description,
    }
    for name, description in [
        ("webhook-id", "Standard Webhooks message id (the same on Replicate's retries)"),
        ("webhook-timestamp", "Unix time of the signature"),
        ("webhook-signature", "`v1,<base64 HMAC-SHA256>`, one or more, space-separated"),
    ]
]


@router.post(
    "/api/v2/webhooks/replicate",
    response_model=WebhookAnswer,
    responses=error_responses(400, 401, 404, 413, 422, 503),
    openapi_extra={
        "parameters": _SIGNATURE_HEADERS,
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": PredictionBody.model_json_schema()}},
        },
    },
    summary="Replicate's signed webhook (no API key: the signature is the credential)",
)
async def replicate_webhook(
    request: Request,
    store: StoreDep,
    temporal: TemporalDep,
    settings: SettingsDep,
    progress: ProgressDep,
    job_id: Annotated[
        int | None,
        Query(
            ge=1,
            le=2**31 - 1,
            deprecated=True,
            description="Ignored: older webhook URLs carry it; the signed body names the "
            "prediction, and the prediction ledger names its job",
        ),
    ] = None,
) -> Any:
    """Relays a verified, final webhook to the run that waits on its prediction, as a signal.

    The prediction id in the signed body is looked up in the prediction ledger, which names
    the job and workflow that created it: nothing unsigned can redirect a delivery.
    """
    try:
        raw = await request.body()
    except ClientDisconnect:
        # The sender went away mid-body: nobody reads this answer, but nothing is logged as
        # a server error either.
        raise NotAPrediction("The webhook's body did not arrive in full") from None
    try:
        secret = await _webhook_secret(request.app, settings)
        _verify(dict(request.headers), raw, secret, settings.webhook_tolerance_seconds)
    except WebhookRejected:
        count_webhook(request, "rejected")
        raise
    except Unavailable:
        count_webhook(request, "unavailable")
        raise
    webhook_id = request.headers["webhook-id"]
    try:
        state = PredictionState.from_json(json.loads(raw))
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        count_webhook(request, "malformed")
        raise NotAPrediction(f"Webhook body is not a prediction: {_reason(exc)}") from None
    if state.status not in TERMINAL:
        # Only the final event matters to a run; earlier ones are acknowledged.
        count_webhook(request, "ignored")
        return WebhookIgnored(status="ignored", prediction_status=state.status)
    if await asyncio.to_thread(store.seen_webhook, webhook_id, state.id):
        count_webhook(request, "duplicate")
        return WebhookDuplicate(status="duplicate", webhook_id=webhook_id, prediction_id=state.id)
    owner = await asyncio.to_thread(store.prediction_owner, state.id)
    if owner is None:
        count_webhook(request, "unknown")
        raise UnknownPrediction(f"No job knows prediction {state.id}")
    handle = temporal.get_workflow_handle(owner.workflow_id)
    # The run reads the outcome from the provider itself: the signal only says "look now".
    signal = PredictionWebhook(prediction_id=state.id, status=state.status, webhook_id=webhook_id)
    outcome = "signalled"
    try:
        await handle.signal(RenderScene.prediction_finished, signal)
        progress.forget(owner.job_id)
    except RPCError as exc:
        if exc.status != RPCStatusCode.NOT_FOUND:
            log.warning("Could not relay webhook %s: %s", webhook_id, exc)
            count_webhook(request, "unavailable")
            raise Unavailable("Temporal is unavailable; retry the webhook") from None
        outcome = "run_closed"  # a late webhook after the run ended: nothing to do
    except RuntimeError:
        count_webhook(request, "unavailable")
        raise Unavailable("Temporal is unavailable; retry the webhook") from None
    await asyncio.to_thread(store.remember_webhook, webhook_id, state.id)
    count_webhook(request, outcome)
    return WebhookRelayed(status=outcome, job_id=owner.job_id, prediction_id=state.id)


def _verify(headers: dict[str, str], raw: bytes, secret: str, tolerance: int) -> None:
    """401 unless one of the delivery's `v1` signatures is good and recent.

    replicate's check gives up at the first signature it cannot decode, and Standard Webhooks
    allows several (a secret being rotated) and other versions: only well-formed v1 entries
    are handed to it.
    """
    offered = headers.get("webhook-signature", "").split()
    headers["webhook-signature"] = " ".join(s for s in offered if _well_formed_v1(s))
    try:
        body = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise WebhookRejected("Webhook signature rejected: the body is not UTF-8") from None
    try:
        replicate.webhooks.validate(
            headers=headers, body=body, secret=WebhookSigningSecret(key=secret), tolerance=tolerance
        )
    except InvalidSecretKeyError:
        # Its message holds the secret itself: neither logged nor sent.
        log.error("REPLICATE_WEBHOOK_SECRET is not a whsec_<base64> secret")
        raise Unavailable("The webhook signing secret is misconfigured") from None
    except InvalidSignatureError:
        raise WebhookRejected("Webhook signature rejected: no signature matches") from None
    except WebhookValidationError as exc:  # a missing header, body or a stale timestamp
        raise WebhookRejected(f"Webhook signature rejected: {exc}") from None
    except ValueError:  # int() of the timestamp
        raise WebhookRejected(
            "Webhook signature rejected: the timestamp is not a Unix time"
        ) from None


def _well_formed_v1(signature: str) -> bool:
    version, _, value = signature.partition(",")
    if version != "v1" or not value:
        return False
    try:
        base64.b64decode(value, validate=True)
    except ValueError:
        return False
    return True


def _reason(exc: Exception) -> str:
    if isinstance(exc, RecursionError):
        return "it nests too deeply"
    if isinstance(exc, KeyError):
        return f"missing field {exc}"
    return str(exc) or type(exc).__name__


async def _webhook_secret(app: FastAPI, settings: Settings) -> str:
    # Fetched once: Replicate's default signing secret does not change under a running API.
    if app.state.webhook_secret is None:
        try:
            app.state.webhook_secret = await app.state.provider.webhook_secret()
        except Exception as exc:  # noqa: BLE001 - any failure means: cannot verify now
            log.warning("Could not fetch the webhook signing secret: %s", exc)
            raise Unavailable(
                "Could not fetch the webhook signing secret from the provider; retry later"
            ) from None
    secret: str = app.state.webhook_secret
    return secret
