"""Replicate, through the official `replicate` client (pointed at the local server by default)."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
import pydantic
import pydantic.v1
import replicate
from replicate.exceptions import ReplicateError

from backend.settings import Settings

# replicate 1.0.7 builds its models with pydantic.v1 when pydantic 2 is installed.
_MODEL_ERRORS = (pydantic.ValidationError, pydantic.v1.ValidationError)

CREATE_TIMEOUT_SECONDS = 60.0

TERMINAL = frozenset({"succeeded", "failed", "canceled", "aborted"})


@dataclass
class PredictionState:
    id: str
    status: str
    output: Any = None
    error: str | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def output_url(self) -> str | None:
        # Video models answer with one URL or a list of them.
        output = self.output
        if isinstance(output, list):
            output = output[-1] if output else None
        return output if isinstance(output, str) else None

    @classmethod
    def from_json(cls, data: Any) -> PredictionState:
        if not isinstance(data, dict):
            raise ValueError("a prediction is a JSON object")
        if not isinstance(data.get("id"), str) or not isinstance(data.get("status"), str):
            raise ValueError("a prediction has a string `id` and `status`")
        return cls(
            id=data["id"],
            status=data["status"],
            output=data.get("output"),
            error=_error_text(data.get("error")),
        )


def _error_text(error: Any) -> str | None:
    if error is None or isinstance(error, str):
        return error
    return str(error)


class ProviderClient:
    """The three calls the pipeline makes, tolerant of statuses the client does not know."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.base_url = settings.provider_base_url
        self.client = replicate.Client(
            api_token=settings.api_token,
            base_url=self.base_url,
            timeout=httpx.Timeout(30.0, connect=10.0),
        )

    def owns(self, url: str) -> bool:
        """True for URLs on the provider's own API host: only those may see our token."""
        ours, theirs = urlsplit(self.base_url), urlsplit(url)
        return (ours.scheme, ours.hostname, ours.port) == (
            theirs.scheme,
            theirs.hostname,
            theirs.port,
        )

    async def create(
        self,
        model_input: dict[str, Any],
        *,
        webhook: str | None = None,
        webhook_events_filter: list[str] | None = None,
        cancel_after_seconds: float | None = None,
    ) -> PredictionState:
        """Creates a prediction of REPLICATE_MODEL. `cancel_after_seconds` is sent as the
        Cancel-After header: the provider ends the prediction itself past that deadline
        (aborted if it never started, and then not billed)."""
        body: dict[str, Any] = {"input": model_input}
        if webhook:
            body["webhook"] = webhook
            body["webhook_events_filter"] = webhook_events_filter or ["completed"]
        headers = {}
        if cancel_after_seconds:
            headers["Cancel-After"] = f"{max(1, math.ceil(cancel_after_seconds))}s"
        name, _, version = self.settings.replicate_model.partition(":")
        if version:
            path = "/v1/predictions"
            body["version"] = version
        else:
            path = f"/v1/models/{name}/predictions"
        # The client's own create has no way to send a header; its request method (auth,
        # base URL, error mapping) does. Bounded here: replicate 1.0.7 sends a create without
        # any timeout. A create cut off this way may still have gone through; the ledger
        # finds it.
        async with asyncio.timeout(CREATE_TIMEOUT_SECONDS):
            response = await self.client._async_request("POST", path, json=body, headers=headers)
        return PredictionState.from_json(response.json())

    async def get(self, prediction_id: str) -> PredictionState:
        try:
            prediction = await self.client.predictions.async_get(prediction_id)
        except _MODEL_ERRORS:
            return await self._raw("GET", f"/v1/predictions/{prediction_id}")
        return PredictionState.from_json(prediction.dict())

    async def cancel(self, prediction_id: str) -> PredictionState:
        try:
            prediction = await self.client.predictions.async_cancel(prediction_id)
        except _MODEL_ERRORS:
            return await self.get(prediction_id)
        return PredictionState.from_json(prediction.dict())

    async def list_since(self, since: datetime) -> list[dict[str, Any]]:
        """Raw predictions created at or after `since`, newest first (for the ledger's search).

        Raw JSON: the client's strict model would refuse an `aborted` one, and the
        search needs each prediction's `input` exactly as sent.
        """
        stamp = since.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        url: str | None = f"/v1/predictions?created_after={stamp}"
        found: list[dict[str, Any]] = []
        while url:
            page = (await self.client._async_request("GET", url)).json()
            results = page.get("results") or []
            for item in results:
                created = _parse_time(item.get("created_at"))
                if created is not None and created < since:
                    return found
                found.append(item)
            url = page.get("next")
        return found

    async def webhook_secret(self) -> str:
        secret = await self.client.webhooks.default.async_secret()
        return secret.key

    async def _raw(self, method: str, path: str) -> PredictionState:
        # replicate 1.0.7's Prediction model has no `aborted` status and refuses to parse it.
        # Same client, same auth and retry transport; we only skip its strict model.
        response = await self.client._async_request(method, path)
        return PredictionState.from_json(response.json())


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def is_retryable(error: ReplicateError) -> bool:
    """Throttling and server trouble pass; a bad token or a bad request will not."""
    status = error.status or 0
    return status in (408, 409, 425, 429) or status >= 500
