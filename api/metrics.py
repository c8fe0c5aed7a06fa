"""The API's Prometheus metrics, served at /metrics: request latency by route, jobs by status,
webhook deliveries by outcome. Provider call failures happen in the workers, which expose them
beside the Temporal SDK's metrics (WORKER_METRICS_ADDRESS).

/metrics shows every tenant's job counts, so no tenant's key opens it: it takes the bearer
token in METRICS_TOKEN, is public only with METRICS_PUBLIC=true, and is off (404) otherwise.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
import time
from collections.abc import Callable, Iterator

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import ApiError, Unauthorized
from backend.database import JobStatus
from backend.settings import Settings

log = logging.getLogger("api")

PREFIX = "render_video"
# How long one reading of the job counts serves scrapes: several Prometheus servers (or a
# dashboard refresh) cost the job store one query.
JOB_COUNTS_TTL_SECONDS = 5.0
# Request latency buckets, seconds: reads take milliseconds, an approve a Temporal round
# trip; /events streams are long by design and land in +Inf.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# signalled: relayed to its run; run_closed: its run had ended; duplicate: a delivery already
# relayed; ignored: not a final event; unknown: no job knows the prediction (404, the provider
# retries); rejected: bad or stale signature; malformed: signed, but not a prediction;
# unavailable: could not be verified or relayed now (503, the provider retries).
# The route label of requests answered before routing (unknown paths, bodies over the cap).
UNROUTED = "unrouted"
WEBHOOK_OUTCOMES = (
    "signalled",
    "run_closed",
    "duplicate",
    "ignored",
    "unknown",
    "rejected",
    "malformed",
    "unavailable",
)

router = APIRouter()


class MetricsOff(ApiError):
    status = 404


class JobsByStatus(Collector):
    """`render_video_jobs{status}`, read from the job store at scrape time (one GROUP BY),
    the reading kept JOB_COUNTS_TTL_SECONDS. A failed reading leaves the family empty (and is
    logged) rather than showing stale numbers."""

    def __init__(self, ttl: float = JOB_COUNTS_TTL_SECONDS) -> None:
        self.read: Callable[[], dict[str, int]] | None = None
        self.ttl = ttl
        self._lock = threading.Lock()
        self._at = float("-inf")
        self._counts: dict[str, int] | None = None

    def counts(self) -> dict[str, int] | None:
        with self._lock:
            if self.read is None:
                return None
            if time.monotonic() - self._at >= self.ttl:
                try:
                    self._counts = self.read()
                except Exception as exc:  # noqa: BLE001 - a scrape must not fail on it
                    log.warning("Could not count jobs by status: %s", exc)
                    self._counts = None
                self._at = time.monotonic()
            return self._counts

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            f"{PREFIX}_jobs", "Jobs in the job store by status, every tenant's", labels=["status"]
        )
        counts = self.counts()
        if counts is not None:
            # Every status, so a dashboard sees 0 rather than a gap.
            for status in sorted({*(s.value for s in JobStatus), *counts}):
                family.add_metric([status], counts.get(status, 0))
        yield family

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(f"{PREFIX}_jobs", "Jobs in the job store by status")


class ApiMetrics:
    """One app's metrics, in a registry of its own (several apps may share a process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Histogram(
            f"{PREFIX}_http_request_duration_seconds",
            "API request latency by route template, method and status class",
            ["method", "route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.webhooks = Counter(
            f"{PREFIX}_webhook_deliveries",
            "Provider webhook deliveries received, by outcome",
            ["outcome"],
            registry=self.registry,
        )
        for outcome in WEBHOOK_OUTCOMES:
            self.webhooks.labels(outcome)
        self.jobs = JobsByStatus()
        self.registry.register(self.jobs)

    def webhook(self, outcome: str) -> None:
        self.webhooks.labels(outcome).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def count_webhook(request: Request, outcome: str) -> None:
    metrics: ApiMetrics | None = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.webhook(outcome)


class RequestMetrics:
    """Times every HTTP request into `render_video_http_request_duration_seconds`, labelled
    by the route's template (`/api/v2/jobs/{job_id}`, never the raw path, so the label set
    stays small; `unrouted` for what no route answered), method and status class (2xx,
    4xx, ...)."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what the client gets if the app raises before answering
        started = time.perf_counter()

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.requests.labels(
                scope["method"], self._template(scope), f"{status // 100}xx"
            ).observe(time.perf_counter() - started)

    @staticmethod
    def _template(scope: Scope) -> str:
        # The router leaves the route it chose in the scope. None: the request was answered
        # before it reached one (no route matched, or the body cap or CORS answered).
        path = getattr(scope.get("route"), "path", None)
        return path if isinstance(path, str) else UNROUTED


def _authorize(request: Request, settings: Settings) -> None:
    if settings.metrics_token:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), settings.metrics_token.encode()
        ):
            raise Unauthorized("/metrics needs `Authorization: Bearer <METRICS_TOKEN>`")
        return
    if not settings.metrics_public:
        raise MetricsOff("Metrics are off: set METRICS_TOKEN, or METRICS_PUBLIC=true")


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Prometheus text exposition (not in the OpenAPI document: it is not part of the API)."""
    _authorize(request, request.app.state.settings)
    body = await asyncio.to_thread(request.app.state.metrics.exposition)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
