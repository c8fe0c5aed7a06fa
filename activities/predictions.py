"""Predictions at the provider: create (or adopt) through the ledger, read, poll, cancel."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import httpx
from temporalio import activity
from temporalio.exceptions import ApplicationError, ApplicationErrorCategory

from activities.common import fatal, heartbeating, in_thread, short_reason
from backend.database import JobStore
from backend.provider import PredictionState, ProviderClient, ReplicateError, is_retryable
from backend.settings import Settings
from workflows.payloads import (
    CancelPredictionInput,
    CancelPredictionResult,
    PollPredictionInput,
    PredictionOutcome,
    PredictionRef,
    StartPredictionInput,
)

T = TypeVar("T")

# A create that went through unseen shows up in the provider's list this close to its intent
# (the provider's clock and ours may differ by this much).
CLOCK_SLACK = timedelta(minutes=2)
# An open intent untouched this long belongs to an attempt that is over: start_prediction runs
# at most 2 minutes and its create call at most 60 s. Another run may then settle it.
INTENT_TTL = timedelta(minutes=3)
# How often a run waiting for another run's create of the same input looks again.
SAME_INPUT_RECHECK = timedelta(seconds=2)
TERMINAL_FAILED = frozenset({"failed", "canceled", "aborted"})
_RESETS_IN = re.compile(r"resets in ~?(\d+)\s*s", re.IGNORECASE)


class PredictionActivities:
    """Given the job store (for the ledger), the provider client and the settings."""

    def __init__(self, store: JobStore, provider: ProviderClient, settings: Settings) -> None:
        self.store = store
        self.provider = provider
        self.settings = settings

    def all(self) -> list[Callable[..., Any]]:
        return [
            self.start_prediction,
            self.get_prediction,
            self.poll_prediction,
            self.cancel_prediction,
        ]

    @property
    def _model_name(self) -> str:
        return self.settings.replicate_model.partition(":")[0]

    def digest(self, model_input: dict[str, Any]) -> str:
        """The digest the ledger keys a prediction's input by (backend.profiles.input_digest)."""
        canonical = json.dumps({"model": self._model_name, "input": model_input}, sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()

    # -- create --

    @activity.defn
    async def start_prediction(self, input: StartPredictionInput) -> PredictionRef:
        """Creates the run's one prediction, or adopts the one an earlier attempt created.

        Replicate has no idempotency key, so the ledger records an intent before the create
        and the id after it. An open intent means a create may have gone through unseen: the
        provider's list is searched before anything new is created. Only one intent per input
        is open at a time, so a prediction found that way has exactly one possible owner; a
        run whose input another run is creating right now waits for it.
        """
        info = activity.info()
        run_id = info.workflow_run_id
        digest = input.digest
        webhook = bool(self.settings.webhook_url)
        entries = [
            entry
            for entry in await in_thread(self.store.ledger, input.job_id, run_id)
            if (entry["scene"] or 0) == input.scene and entry["take"] == input.take
        ]

        for entry in entries:
            if entry["prediction_id"] and entry["state"] in ("created", "adopted"):
                state = await self._call(self.provider.get(entry["prediction_id"]))
                return _ref(state, adopted=True, webhook=webhook)

        if not entries and input.take == 1:
            # An earlier run of this job (terminated, so it cleaned nothing up) may have left
            # this very render going: adopt it rather than pay for it twice.
            earlier = await in_thread(
                self.store.earlier_prediction, input.job_id, input.scene, digest, run_id
            )
            if earlier is not None:
                state = await self._call(self.provider.get(earlier["prediction_id"]))
                if not state.terminal and await in_thread(
                    self.store.move_to_run, input.job_id, state.id, run_id
                ):
                    return _ref(state, adopted=True, webhook=webhook)

        while True:
            intent = await in_thread(
                self.store.claim_intent,
                input.job_id,
                run_id,
                digest,
                workflow_id=info.workflow_id,
                scene=input.scene,
                take=input.take,
            )
            if (intent["job_id"], intent["run_id"]) == (input.job_id, run_id):
                break
            # Raises while the other run may still be creating; otherwise its intent is
            # closed here and the loop claims again (each pass closes one stale intent).
            await self._wait_or_settle(intent)

        adopted = await self._settle(intent, own=True)
        if adopted is not None:
            return _ref(adopted, adopted=True, webhook=webhook)

        # This attempt is about to call: others judge the intent alive by this time.
        await in_thread(self.store.touch_intent, intent["id"])
        try:
            state = await self._call(
                self.provider.create(
                    input.model_input,
                    webhook=self._webhook_url(input.job_id),
                    webhook_events_filter=["completed"] if webhook else None,
                    cancel_after_seconds=input.cancel_after_seconds,
                ),
                refused="Replicate refused the prediction",
            )
        except ApplicationError as exc:
            if exc.type in ("BadRequest", "ProviderThrottled"):
                # The provider answered no: nothing was created, the input is free again.
                await in_thread(self.store.close_intent, intent["id"], "not_created")
            raise
        if not await in_thread(self.store.record_prediction, intent["id"], state.id, "created"):
            raise fatal(
                f"Prediction {state.id} is already held by another ledger entry", "LedgerConflict"
            )
        # Each create is billed: one line for it, with the job and run it belongs to.
        activity.logger.info(
            "Created prediction %s for job %s (scene %s, take %s)",
            state.id,
            input.job_id,
            input.scene or "all",
            input.take,
        )
        return _ref(state, adopted=False, webhook=webhook)

    def _webhook_url(self, job_id: int) -> str | None:
        # job_id is for people reading logs; the API routes a webhook by the ledger alone.
        url = self.settings.webhook_url
        return f"{url}?job_id={job_id}" if url else None

    async def _wait_or_settle(self, intent: dict[str, Any]) -> None:
        """Another run holds the open intent for this input: wait while its attempt may still
        be creating; once it cannot be, settle the intent on its behalf."""
        touched = _utc(intent["updated_at"])
        if datetime.now(UTC) - touched < INTENT_TTL:
            raise ApplicationError(
                f"Waiting for job {intent['job_id']}'s prediction of the same input to be "
                "created first",
                type="SameInputInFlight",
                category=ApplicationErrorCategory.BENIGN,
                next_retry_delay=SAME_INPUT_RECHECK,
            )
        await self._settle(intent, own=False)

    async def _settle(self, intent: dict[str, Any], *, own: bool) -> PredictionState | None:
        """Finds what an open intent's earlier attempts created unseen, and closes it: the best
        such prediction is recorded for the intent's run (a succeeded one is used, never
        cancelled), extra running ones are cancelled as orphans. None when nothing was found
        (the intent stays open for `own`, and is abandoned otherwise)."""
        found = await self._find_unrecorded(intent["input_digest"], _utc(intent["intent_at"]))
        # Newest first; a finished render beats one still running, a failed one is never used.
        usable = [item for item in found if item.get("status") not in TERMINAL_FAILED]
        usable.sort(key=lambda item: item.get("status") != "succeeded")
        chosen: PredictionState | None = None
        for item in usable:
            if await in_thread(self.store.record_prediction, intent["id"], item["id"], "adopted"):
                chosen = PredictionState.from_json(item)
                activity.logger.warning(
                    "Adopted prediction %s for job %s, created by an attempt that did not "
                    "record it",
                    item["id"],
                    intent["job_id"],
                )
                break
        for item in found:
            if chosen is not None and item["id"] == chosen.id:
                continue
            await self._orphan(intent, item)
        if chosen is None and not own:
            await in_thread(self.store.close_intent, intent["id"], "abandoned")
        return chosen

    async def _orphan(self, intent: dict[str, Any], item: dict[str, Any]) -> None:
        """An extra prediction of the intent's run: cancelled if it still runs, recorded."""
        state = "orphan_finished"
        if item.get("status") not in ("succeeded", *TERMINAL_FAILED):
            await self._call(self.provider.cancel(item["id"]))
            state = "orphan_cancelled"
        await in_thread(
            self.store.record_orphan,
            intent["job_id"],
            intent["run_id"],
            item["id"],
            intent["input_digest"],
            state=state,
            scene=intent["scene"],
        )
        activity.logger.warning(
            "Extra prediction %s of job %s: %s", item["id"], intent["job_id"], state
        )

    async def _find_unrecorded(self, digest: str, since: datetime) -> list[dict[str, Any]]:
        """Predictions with this exact input created since `since` that no ledger entry holds,
        newest first."""
        listed = await self._call(self.provider.list_since(since - CLOCK_SLACK))
        candidates = [
            item
            for item in listed
            if isinstance(item.get("input"), dict)
            and self.digest(item["input"]) == digest
            and item.get("model") in (None, self._model_name)
        ]
        claimed = await in_thread(self.store.claimed, [item["id"] for item in candidates])
        return [item for item in candidates if item["id"] not in claimed]

    # -- read, poll, cancel --

    @activity.defn
    async def get_prediction(self, input: PollPredictionInput) -> PredictionOutcome:
        """One read of the prediction: what the provider says, whatever its status (a webhook
        only wakes the run; this is what it believes)."""
        state = await self._call(
            self.provider.get(input.prediction_id),
            refused=f"Could not read prediction {input.prediction_id}",
        )
        await in_thread(self.store.note_prediction_status, input.job_id, input.scene, state.status)
        return _outcome(state)

    @activity.defn
    async def poll_prediction(self, input: PollPredictionInput) -> PredictionOutcome:
        state = await self._call(
            self.provider.get(input.prediction_id),
            refused=f"Could not read prediction {input.prediction_id}",
        )
        await in_thread(self.store.note_prediction_status, input.job_id, input.scene, state.status)
        if not state.terminal:
            what = f"Scene {input.scene}" if input.scene else "The video"
            await in_thread(
                self.store.progress,
                input.job_id,
                "rendering",
                f"{what} is rendering (prediction {state.status}, check {activity.info().attempt})",
            )
            # Benign: "not ready yet" is the normal way this activity waits.
            raise ApplicationError(
                f"Prediction {state.id} is still {state.status}",
                type="PredictionPending",
                category=ApplicationErrorCategory.BENIGN,
            )
        return _outcome(state)

    @activity.defn
    async def cancel_prediction(self, input: CancelPredictionInput) -> CancelPredictionResult:
        """Cancels the run's prediction, and any its ledger shows was created unrecorded."""
        run_id = activity.info().workflow_run_id
        ids = [input.prediction_id] if input.prediction_id else []
        entries = await in_thread(self.store.ledger, input.job_id, run_id)
        ids += [
            e["prediction_id"]
            for e in entries
            if e["prediction_id"]
            and e["state"] in ("created", "adopted")
            and e["prediction_id"] not in ids
        ]
        status = None
        for prediction_id in ids:
            state = await self._call(self.provider.cancel(prediction_id))
            status = status or state.status
        for intent in [e for e in entries if e["state"] == "intent"]:
            found = await self._find_unrecorded(intent["input_digest"], _utc(intent["intent_at"]))
            for item in found:
                await self._orphan(intent, item)
                ids.append(item["id"])
            # Nothing of this run's may wait on it any more.
            await in_thread(self.store.close_intent, intent["id"], "abandoned")
        if ids:
            await in_thread(
                self.store.progress,
                input.job_id,
                "cancelling",
                f"Prediction {', '.join(ids)} cancelled",
            )
        return CancelPredictionResult(cancelled=ids, status=status)

    async def _call(self, call: Awaitable[T], refused: str = "Replicate refused the request") -> T:
        """A provider call with heartbeats, and Replicate's errors in our words."""
        try:
            return await heartbeating(call)
        except ReplicateError as exc:
            message = f"{refused} (HTTP {exc.status}): {exc.detail or exc.title or 'no reason'}"
            count_provider_error(
                "throttled"
                if exc.status == 429
                else "unavailable"
                if is_retryable(exc)
                else "refused"
            )
            if exc.status == 429:
                # Wait as long as the provider says; Temporal's retry policy does the waiting.
                resets = _RESETS_IN.search(exc.detail or "")
                delay = timedelta(seconds=int(resets.group(1))) if resets else None
                raise ApplicationError(
                    message, type="ProviderThrottled", next_retry_delay=delay
                ) from exc
            if is_retryable(exc):
                raise ApplicationError(message, type="ProviderUnavailable") from exc
            raise fatal(message, "BadRequest") from exc
        except httpx.HTTPError as exc:
            count_provider_error("unreachable")
            raise ApplicationError(
                f"Could not reach Replicate ({short_reason(exc)})", type="ProviderUnavailable"
            ) from exc
        except TimeoutError as exc:
            count_provider_error("timeout")
            raise ApplicationError(
                "Replicate did not answer in time", type="ProviderUnavailable"
            ) from exc


def count_provider_error(kind: str) -> None:
    """`render_video_provider_errors{kind}` on the worker's metrics endpoint (the Temporal
    runtime's, at WORKER_METRICS_ADDRESS, beside the SDK's metrics and with the activity's
    labels): throttled (429), unavailable (5xx and other retried statuses), refused (other
    4xx), unreachable (no answer over HTTP), timeout (a create cut off)."""
    try:
        meter = activity.metric_meter()
    except RuntimeError:  # not in an activity (a direct call, as some tests make)
        return
    meter.create_counter(
        "render_video_provider_errors", "Failed calls to the provider's API, by kind"
    ).add(1, {"kind": kind})


def _ref(state: PredictionState, *, adopted: bool, webhook: bool) -> PredictionRef:
    return PredictionRef(
        prediction_id=state.id,
        status=state.status,
        adopted=adopted,
        webhook=webhook,
        output_url=state.output_url,
        error=state.error,
    )


def _outcome(state: PredictionState) -> PredictionOutcome:
    return PredictionOutcome(
        prediction_id=state.id,
        status=state.status,
        output_url=state.output_url,
        error=state.error,
    )


def _utc(moment: datetime) -> datetime:
    # SQLite hands datetimes back without their zone; they were written in UTC.
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
