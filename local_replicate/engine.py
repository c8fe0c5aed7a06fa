"""Prediction state, lifecycle, faults and counters; everything here runs on the event loop."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import math
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from .config import ConfigError, ServerConfig, load_or_create_secret
from .faults import CREATE_KINDS, DOWNLOAD_KINDS, PREDICTION_KINDS, Fault, FaultQueue
from .models import Model, ModelRegistry, build_registry, default_schemas_dir
from .render import ClipJob, InputError, RenderCanceled, RenderJob, image_client, render
from .store import PredictionStore
from .webhooks import WebhookSender, secret_bytes

log = logging.getLogger("local_replicate")

TERMINAL = frozenset({"succeeded", "failed", "canceled", "aborted"})
PAGE_SIZE = 100  # Replicate's page size for listing predictions
RATE_WINDOW = 60.0  # seconds: the create limit is per rolling minute

# (reverse, position) of a page of the prediction list; see Engine.list_page
Cursor = tuple[bool, int]


def new_id() -> str:
    # the shape of Replicate ids: 26 lowercase base32 characters
    return base64.b32encode(secrets.token_bytes(16)).decode().rstrip("=").lower()


def rfc3339(ts: datetime) -> str:
    return ts.isoformat(timespec="microseconds").replace("+00:00", "Z")


def _now() -> datetime:
    return datetime.now(UTC)


def _time(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


RECORD_FORMAT = 1


@dataclass(eq=False)
class Prediction:
    id: str
    model: str
    version: str
    input: dict[str, Any]
    base_url: str
    webhook: str | None
    events: frozenset[str]
    faults: list[Fault]
    status: str = "starting"
    output: str | None = None
    error: str | None = None
    logs: list[str] = field(default_factory=list)
    created_at: datetime = field(default_factory=_now)
    started_at: datetime | None = None
    completed_at: datetime | None = None
    predict_time: float | None = None
    # seconds of video in the output, for video models' billing (Replicate's metric)
    video_seconds: float | None = None
    data_removed: bool = False
    # Cancel-After: past this the server ends the prediction itself
    deadline: datetime | None = None
    # output_gone: the output file answers 410 from this time.monotonic() on (not persisted)
    gone_at: float | None = None
    # creation order, for listing; created_at can tie
    seq: int = 0
    # read by the render thread, so a threading.Event rather than an asyncio one
    cancel: threading.Event = field(default_factory=threading.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def fault(self, kind: str) -> Fault | None:
        return next((f for f in self.faults if f.kind == kind), None)

    def to_record(self) -> dict[str, Any]:
        """What is persisted (faults are not: they are test devices, gone after a restart)."""
        return {
            "format": RECORD_FORMAT,
            "id": self.id,
            "seq": self.seq,
            "model": self.model,
            "version": self.version,
            "input": self.input,
            "base_url": self.base_url,
            "webhook": self.webhook,
            "events": sorted(self.events),
            "status": self.status,
            "output": self.output,
            "error": self.error,
            "logs": list(self.logs),
            "created_at": self.created_at.isoformat(),
            "started_at": self.started_at.isoformat() if self.started_at else None,
            "completed_at": self.completed_at.isoformat() if self.completed_at else None,
            "predict_time": self.predict_time,
            "video_seconds": self.video_seconds,
            "data_removed": self.data_removed,
            "deadline": self.deadline.isoformat() if self.deadline else None,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Prediction:
        if record.get("format") != RECORD_FORMAT:
            raise ValueError(f"unknown record format {record.get('format')!r}")
        created_at = _time(record["created_at"])
        if created_at is None:
            raise ValueError("created_at: missing")
        p = cls(
            id=record["id"],
            seq=int(record["seq"]),
            model=record["model"],
            version=record["version"],
            input=dict(record["input"]),
            base_url=record["base_url"],
            webhook=record["webhook"],
            events=frozenset(record["events"]),
            faults=[],
            status=record["status"],
            output=record["output"],
            error=record["error"],
            logs=[str(line) for line in record["logs"]],
            created_at=created_at,
            started_at=_time(record["started_at"]),
            completed_at=_time(record["completed_at"]),
            predict_time=record["predict_time"],
            # absent from records written before these existed
            video_seconds=record.get("video_seconds"),
            data_removed=bool(record["data_removed"]),
            deadline=_time(record.get("deadline")),
        )
        if p.status not in TERMINAL | {"starting", "processing"}:
            raise ValueError(f"unknown status {p.status!r}")
        if p.terminal:
            p.done.set()
        return p

    def to_list_json(self) -> dict[str, Any]:
        # Replicate's list results are the prediction without its logs
        body = self.to_json()
        del body["logs"]
        return body

    def to_json(self) -> dict[str, Any]:
        api = f"{self.base_url}/v1/predictions/{self.id}"
        metrics: dict[str, float] = {}
        if self.predict_time is not None:
            metrics["predict_time"] = round(self.predict_time, 6)
        if self.video_seconds is not None and self.status == "succeeded":
            metrics["video_output_duration_seconds"] = round(self.video_seconds, 6)
        if self.completed_at is not None:
            metrics["total_time"] = round((self.completed_at - self.created_at).total_seconds(), 6)
        body: dict[str, Any] = {
            "id": self.id,
            "model": self.model,
            "version": self.version,
            "input": self.input,
            "logs": "".join(line + "\n" for line in self.logs),
            "output": self.output,
            "data_removed": self.data_removed,
            "error": self.error,
            "status": self.status,
            "created_at": rfc3339(self.created_at),
            "urls": {"get": api, "cancel": f"{api}/cancel", "web": f"{self.base_url}/p/{self.id}"},
            "metrics": metrics,
            "source": "api",
        }
        # the published schema types these as non-nullable strings; Replicate omits them when unset
        if self.started_at is not None:
            body["started_at"] = rfc3339(self.started_at)
        if self.completed_at is not None:
            body["completed_at"] = rfc3339(self.completed_at)
        return body


def _not_mp4_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (255, 0, 255)).save(buf, "PNG")
    return buf.getvalue()


class Engine:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        # fails here, when the app is created, if the data dir is unset or cannot be written
        self.store = PredictionStore(config.data_dir)
        self.store.open()
        self.data_dir = Path(config.data_dir)
        self.webhook_secret = config.webhook_secret or load_or_create_secret(self.data_dir)
        try:
            secret_bytes(self.webhook_secret)
        except ValueError as exc:  # a malformed configured secret fails here, not at a webhook
            raise ConfigError("webhook secret must look like whsec_<base64>") from exc
        schemas_dir = config.schemas_dir if config.schemas_dir else default_schemas_dir()
        self.models: ModelRegistry = build_registry(
            config.pose, schemas_dir, config.model_name, config.clip_max_height
        )
        self.predictions: dict[str, Prediction] = {}
        self.faults = FaultQueue()
        self.deliveries: list[dict[str, Any]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._executor: ThreadPoolExecutor | None = None
        self._http: httpx.AsyncClient | None = None
        self._images: httpx.Client | None = None
        self._sender: WebhookSender | None = None
        # not reset with the stats, so a cursor from before a reset cannot match new predictions
        self._last_seq = 0
        # times (monotonic) of the creates the limit counts: those of the last minute
        self._recent_creates: deque[float] = deque()
        self.reset_stats()

    def reset_stats(self) -> None:
        self.counts = {
            "creates": 0,
            "gets": 0,
            "cancels": 0,
            "lists": 0,
            "file_gets": 0,
            # full GETs of output files (not HEAD or Range) that ended, by how they ended
            "download_completes": 0,
            "download_aborts": 0,
            # webhook events withheld by lose_webhook
            "webhooks_dropped": 0,
            # creates refused by create_limit_per_minute
            "throttled": 0,
        }
        self.cancelled_ids: list[str] = []
        self.deliveries.clear()
        # every accepted create since the last reset, for the busiest minute in the stats
        self.create_times: list[float] = []
        self._recent_creates.clear()

    async def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._executor = ThreadPoolExecutor(
            max_workers=self.config.render_workers, thread_name_prefix="render"
        )
        self._http = httpx.AsyncClient(timeout=10.0, follow_redirects=False)
        self._images = image_client()
        self._sender = WebhookSender(
            self._http,
            self.webhook_secret,
            self.config.webhook_retry_delays,
            self.deliveries,
        )
        self._restore()

    def _restore(self) -> None:
        """Load the persisted predictions: finished ones as they were, unfinished ones run again."""
        for stale in self.data_dir.glob("*.mp4.part"):  # a render cut short by a killed process
            stale.unlink(missing_ok=True)
        records, next_seq = self.store.load()
        loaded: list[Prediction] = []
        for record in records:
            try:
                loaded.append(Prediction.from_record(record))
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("ignoring persisted prediction %s: %r", record.get("id"), exc)
        self._last_seq = max([next_seq - 1, self._last_seq, *(p.seq for p in loaded)])
        for p in sorted(loaded, key=lambda p: p.seq):
            self.predictions[p.id] = p
            if not p.terminal:
                # rendered again from the beginning, with the same id, created_at and webhook
                self._log(p, "render server restarted: rendering again from the beginning")
                self._spawn(self._run(p))
                if p.deadline is not None:
                    self._spawn(self._deadline(p))
            elif p.output is not None and not p.data_removed:
                if not self.output_path(p.id).is_file():
                    self._remove_output(p)
                    continue
                age = (_now() - (p.completed_at or p.created_at)).total_seconds()
                self._spawn(self._expire(p, self.config.retention_seconds - age))

    def _save(self, p: Prediction) -> None:
        # a prediction dropped by a reset is not written back by a render thread still finishing
        if self.predictions.get(p.id) is p:
            self.store.save(p.to_record())

    async def stop(self) -> None:
        await self._cancel_everything()
        if self._sender:
            await self._sender.aclose()
        if self._http:
            await self._http.aclose()
        if self._executor:
            self._executor.shutdown(wait=False, cancel_futures=True)
        if self._images:
            self._images.close()

    async def _cancel_everything(self) -> None:
        for p in self.predictions.values():
            p.cancel.set()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def reset(self) -> None:
        await self._cancel_everything()
        if self._sender:
            await self._sender.aclose()
        self.predictions.clear()
        self.store.clear(self._last_seq + 1)
        self.faults.clear()
        self.reset_stats()
        for path in self.data_dir.glob("*.mp4"):
            path.unlink(missing_ok=True)

    def stats(self) -> dict[str, Any]:
        return {
            **self.counts,
            "predictions": {pid: p.status for pid, p in self.predictions.items()},
            "cancelled_ids": list(self.cancelled_ids),
            "webhook_deliveries": list(self.deliveries),
            "faults": self.faults.list(),
            "create_limit_per_minute": self.config.create_limit_per_minute,
            "max_creates_per_minute": busiest_window(self.create_times, RATE_WINDOW),
        }

    def output_path(self, prediction_id: str) -> Path:
        return self.data_dir / f"{prediction_id}.mp4"

    def output_gone(self, prediction_id: str) -> bool:
        p = self.predictions.get(prediction_id)
        return p is not None and p.gone_at is not None and time.monotonic() >= p.gone_at

    def run_count(self, model: Model) -> int:
        return sum(1 for p in self.predictions.values() if self.models.get(p.model) is model)

    # -- operations called by the HTTP layer --

    def take_create_fault(self, inp: dict[str, Any]) -> Fault | None:
        return self.faults.take_one(CREATE_KINDS, inp)

    def take_download_fault(self, full: bool) -> Fault | None:
        # slow_download paces a whole-file GET only; HEAD and Range requests leave it queued
        return self.faults.take_one(DOWNLOAD_KINDS if full else DOWNLOAD_KINDS - {"slow_download"})

    def throttle(self) -> int | None:
        """Seconds until a create would be accepted again, or None if one may go now."""
        limit = self.config.create_limit_per_minute
        if limit is None:
            return None
        now = time.monotonic()
        while self._recent_creates and now - self._recent_creates[0] >= RATE_WINDOW:
            self._recent_creates.popleft()
        if len(self._recent_creates) < limit:
            return None
        self.counts["throttled"] += 1
        # the oldest create that counts leaves the window then (at least 1 s, as Replicate says)
        return max(1, math.ceil(self._recent_creates[0] + RATE_WINDOW - now))

    def list_page(
        self, cursor: Cursor | None, keep: Callable[[Prediction], bool]
    ) -> tuple[list[Prediction], Cursor | None, Cursor | None]:
        """A page of the predictions `keep` accepts, newest first, with the cursors of the next
        (older) and previous (newer) pages, None where there are none.

        A cursor is (reverse, position): forward, the page starts at the newest prediction with
        seq < position; reverse, it is the page that ends just above position. Sequence numbers
        only grow, so pages stay put while new predictions arrive on top.
        """
        ordered = sorted(
            (p for p in self.predictions.values() if keep(p)), key=lambda p: p.seq, reverse=True
        )
        if cursor is None:
            start = 0
            end = min(PAGE_SIZE, len(ordered))
        elif not cursor[0]:
            start = sum(1 for p in ordered if p.seq >= cursor[1])
            end = min(start + PAGE_SIZE, len(ordered))
        else:
            end = sum(1 for p in ordered if p.seq > cursor[1])
            start = max(0, end - PAGE_SIZE)
        # cursors are strict bounds, so each sits one past the first prediction it must include
        next_cursor = (False, ordered[end].seq + 1) if end < len(ordered) else None
        previous_cursor = (True, ordered[start - 1].seq - 1) if start > 0 else None
        return ordered[start:end], next_cursor, previous_cursor

    def create(
        self,
        *,
        model: str,
        version: str,
        input: dict[str, Any],
        base_url: str,
        webhook: str | None,
        events: frozenset[str],
        extra_faults: list[Fault],
        cancel_after: float | None = None,
    ) -> Prediction:
        queued = self.faults.take(PREDICTION_KINDS, input)
        self._last_seq += 1
        now = time.monotonic()
        self._recent_creates.append(now)
        self.create_times.append(now)
        p = Prediction(
            seq=self._last_seq,
            id=new_id(),
            model=model,
            version=version,
            input=input,
            base_url=base_url,
            webhook=webhook,
            events=events,
            faults=extra_faults + queued,
        )
        if cancel_after is not None:
            p.deadline = p.created_at + timedelta(seconds=cancel_after)
        self.predictions[p.id] = p
        self._save(p)
        self._spawn(self._run(p))
        if p.deadline is not None:
            self._spawn(self._deadline(p))
        self._emit(p, "start")
        return p

    def cancel(self, p: Prediction) -> None:
        if p.id not in self.cancelled_ids:
            self.cancelled_ids.append(p.id)
        if not p.terminal:
            self._log(p, "prediction canceled")
            self._finish(p, "canceled")

    # -- lifecycle --

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _emit(self, p: Prediction, event: str) -> None:
        if not (p.webhook and event in p.events and self._sender):
            return
        if p.fault("lose_webhook"):
            self.counts["webhooks_dropped"] += 1
            return
        duplicate = p.fault("duplicate_webhook") if event == "completed" else None
        self._sender.send(
            p.id,
            p.webhook,
            event,
            json.dumps(p.to_json()),
            redeliveries=1 if duplicate else 0,
            redelivery_delay=duplicate.delay if duplicate else 0.0,
        )

    def _log(self, p: Prediction, line: str) -> None:
        p.logs.append(line)
        self._save(p)
        self._emit(p, "logs")

    def _finish(self, p: Prediction, status: str, error: str | None = None) -> None:
        if p.terminal:
            return
        p.status = status
        p.error = error
        p.completed_at = _now()
        if p.started_at is not None:
            # what Replicate bills: the time it ran, from processing to the end
            p.predict_time = max(0.0, (p.completed_at - p.started_at).total_seconds())
        if status != "succeeded":
            p.cancel.set()
        p.done.set()
        self._save(p)
        self._emit(p, "completed")

    async def _pause(self, p: Prediction, seconds: float) -> bool:
        """Sleep unless the prediction ends first; True when it is still live."""
        if seconds > 0 and not p.terminal:
            try:
                await asyncio.wait_for(p.done.wait(), seconds)
            except TimeoutError:
                pass
        return not p.terminal

    async def _deadline(self, p: Prediction) -> None:
        """Cancel-After: end the prediction at its deadline, `aborted` if it never started
        processing (not billed), `canceled` if it did (billed for the time it ran)."""
        assert p.deadline is not None
        if not await self._pause(p, (p.deadline - _now()).total_seconds()):
            return
        if p.status == "starting":
            self._log(p, "deadline (Cancel-After) reached before the prediction started")
            self._finish(p, "aborted")
        else:
            self._log(p, "deadline (Cancel-After) reached: prediction canceled")
            self._finish(p, "canceled")

    async def _run(self, p: Prediction) -> None:
        # a prediction resumed after a restart may already be `processing`: it stays so (statuses
        # only move forward) and keeps its started_at, but renders from the beginning
        if p.status == "starting":
            slow_start = p.fault("slow_start")
            delay = self.config.start_delay + (slow_start.delay if slow_start else 0.0)
            if not await self._pause(p, delay):
                return
            if abort := p.fault("abort"):
                self._finish(p, "aborted", abort.detail)
                return
            p.status = "processing"
            p.started_at = _now()
            self._save(p)
        t0 = time.monotonic()
        slow_render = p.fault("slow_render")
        min_processing = max(self.config.min_processing, slow_render.delay if slow_render else 0.0)
        model = self.models.resolve(p.model, p.version)
        job: RenderJob | ClipJob | None = None
        error: str | None = None
        try:
            job = model.plan(p.input)
        except InputError as exc:
            error = str(exc)
        if isinstance(job, ClipJob):
            self._log(p, f"starting render of a {job.seconds:g} s clip from {job.field}")
        else:
            self._log(p, f"starting render of {len(p.input.get('images') or [])} image(s)")

        if fail := p.fault("fail"):
            if await self._pause(p, min_processing):
                self._finish(p, "failed", fail.detail or "Injected failure")
            return

        path = self.output_path(p.id)
        loop = asyncio.get_running_loop()

        def log_from_thread(line: str) -> None:
            try:
                loop.call_soon_threadsafe(self._log, p, line)
            except RuntimeError:  # the loop closed during shutdown; nobody is listening
                pass

        if job is not None:
            try:
                await loop.run_in_executor(
                    self._executor, render, job, path, p.cancel, log_from_thread, self._images
                )
            except RenderCanceled:
                pass
            except InputError as exc:
                error = str(exc)
            except Exception:  # an encoder failure must end the prediction, not the task
                log.exception("render of prediction %s failed", p.id)
                error = "render failed (encoder error)"
        self._save(p)

        if p.terminal:  # canceled while rendering
            path.unlink(missing_ok=True)
            return
        if error is not None:
            self._log(p, f"error: {error}")
            if await self._pause(p, min_processing - (time.monotonic() - t0)):
                self._finish(p, "failed", error)
            return

        if p.fault("truncated"):
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])  # the ftyp box is at the start, so it stays
        elif p.fault("not_mp4"):
            path.write_bytes(_not_mp4_bytes())

        render_time = time.monotonic() - t0
        if not await self._pause(p, min_processing - render_time):
            path.unlink(missing_ok=True)
            return
        p.output = f"{p.base_url}/files/{p.id}.mp4"
        assert job is not None  # no error, so it was planned and rendered
        p.video_seconds = job.seconds if isinstance(job, ClipJob) else sum(job.durations)
        self._log(p, f"render finished in {render_time:.2f}s")
        self._emit(p, "output")
        self._finish(p, "succeeded")
        if gone := p.fault("output_gone"):
            p.gone_at = time.monotonic() + gone.delay
        self._spawn(self._expire(p, self.config.retention_seconds))

    async def _expire(self, p: Prediction, after: float) -> None:
        if after > 0:
            await asyncio.sleep(after)
        self._remove_output(p)

    def _remove_output(self, p: Prediction) -> None:
        self.output_path(p.id).unlink(missing_ok=True)
        p.output = None
        p.data_removed = True
        self._save(p)


def busiest_window(times: list[float], window: float) -> int:
    """The most of `times` (ascending) that fall in any span of `window` seconds."""
    best = 0
    start = 0
    for end, t in enumerate(times):
        while t - times[start] >= window:
            start += 1
        best = max(best, end - start + 1)
    return best
