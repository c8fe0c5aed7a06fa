"""Telling the caller that a job ended: one signed event to the job's (or its tenant's) callback
URL, retried by Temporal's retry policy (backoff for up to a day), every attempt recorded."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.common import fatal, in_thread, short_reason
from api.views import VideoSigner, job_view, view_json
from backend.auth import url_signing_key
from backend.callbacks import CallbackRefused, check_callback_url, check_resolved, signed_request
from backend.database import JobStore
from backend.settings import Settings
from workflows.payloads import DeliverEventInput, EventDelivered

# The caller's endpoint has this long to answer; redirects are not followed (a callback that
# answers 3xx has not taken the event, and following one could lead anywhere).
CALLBACK_TIMEOUT = httpx.Timeout(10.0)


def callback_client() -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=CALLBACK_TIMEOUT, follow_redirects=False)


class CallbackActivities:
    def __init__(self, store: JobStore, settings: Settings, http: httpx.AsyncClient) -> None:
        self.store = store
        self.settings = settings
        self.signer = VideoSigner(url_signing_key(settings), settings.signed_url_ttl_seconds)
        self.http = http

    def all(self) -> list[Callable[..., Any]]:
        return [self.deliver_job_event]

    @activity.defn
    async def deliver_job_event(self, input: DeliverEventInput) -> EventDelivered:
        job = await in_thread(self.store.get, input.job_id)
        tenant = await in_thread(self.store.tenant, job["tenant"])
        url = job["callback_url"] or tenant["callback_url"]
        if not url:
            return EventDelivered(delivered=False, reason="no callback URL")
        allow = self.settings.allow_private_callbacks
        attempt = activity.info().attempt
        try:
            check_callback_url(url, allow_private=allow)
            await check_resolved(url, allow_private=allow)
        except CallbackRefused as exc:
            await self._record(input, attempt, None, str(exc), False)
            raise fatal(f"Callback refused: {exc}", "CallbackRefused") from exc
        data = self._data(job)
        body, headers = signed_request(
            tenant["webhook_secret"], input.webhook_id, input.event, data
        )
        try:
            response = await self.http.post(url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            reason = f"could not reach the callback ({short_reason(exc)})"
            await self._record(input, attempt, None, reason, False)
            raise ApplicationError(reason, type="CallbackFailed") from exc
        delivered = 200 <= response.status_code < 300
        reason = None if delivered else f"the callback answered HTTP {response.status_code}"
        await self._record(input, attempt, response.status_code, reason, delivered)
        if not delivered:
            raise ApplicationError(str(reason), type="CallbackFailed")
        return EventDelivered(delivered=True, status_code=response.status_code)

    def _data(self, job: dict[str, Any]) -> dict[str, Any]:
        """The job's view as the API shows it, with absolute links where our address is known,
        and its metadata, untouched."""
        data = view_json(job_view(job, self.signer))
        base = self.settings.public_base_url
        if base:
            for key, value in list(data.items()):
                if key.endswith("_url") and isinstance(value, str) and value.startswith("/"):
                    data[key] = base + value
        data["metadata"] = job["metadata"]
        return data

    async def _record(
        self,
        input: DeliverEventInput,
        attempt: int,
        status_code: int | None,
        error: str | None,
        delivered: bool,
    ) -> None:
        await in_thread(
            self.store.record_callback_attempt,
            input.job_id,
            input.event,
            input.webhook_id,
            attempt,
            status_code=status_code,
            error=error,
            delivered=delivered,
        )
