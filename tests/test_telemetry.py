"""Traces, metrics and logs of a render, as production gets them: the API (uvicorn) and the
worker run as their own processes, configured only by environment variables, and export their
spans by OTLP/HTTP to a real receiver on 127.0.0.1."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from prometheus_client.parser import text_string_to_metric_families
from support import api_client, eventually, make_settings
from temporalio.testing import WorkflowEnvironment

from api.main import create_app
from api.metrics import JobsByStatus
from backend.auth import KeyStore
from backend.database import JobStore, make_engine
from backend.logs import JsonFormatter, job_id_of
from backend.telemetry import TelemetryError, exporter_names
from local_replicate.testing import RunningServer
from local_replicate.threaded import UvicornThread

METRICS_TOKEN = "metrics-token-for-tests-0123456789"


# -- an OTLP/HTTP receiver -------------------------------------------------------------------


@dataclass
class Span:
    service: str
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict[str, Any]


class OtlpReceiver:
    """Accepts `POST /v1/traces` (protobuf, optionally gzipped) as a collector does, and keeps
    every span with the service that sent it."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.requests = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/traces":
                    self.send_error(404)
                    return
                receiver.add(ExportTraceServiceRequest.FromString(body))
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def add(self, request: ExportTraceServiceRequest) -> None:
        self.requests += 1
        for resource_spans in request.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(
                        Span(
                            service=str(resource.get("service.name")),
                            name=span.name,
                            kind=span.kind,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_id=span.parent_span_id.hex(),
                            attributes=_attributes(span.attributes),
                        )
                    )

    def __enter__(self) -> OtlpReceiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def _attributes(items: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        value = item.value
        kind = value.WhichOneof("value")
        out[item.key] = getattr(value, kind) if kind else None
    return out


# -- one render through the API and worker processes -----------------------------------------


@dataclass
class TracedRender:
    job_id: int
    spans: list[Span]
    api_metrics: str
    worker_metrics: str
    worker_log: list[str]
    api_log: list[str]
    prefix: str
    scenes: int = 2


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _process_env(base: dict[str, str]) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OTEL_", "REPLICATE_", "METRICS_", "LOG_FORMAT"))
    }
    env.update(base)
    return env


async def _stop(proc: asyncio.subprocess.Process) -> int:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(30):
            return await proc.wait()
    except TimeoutError:
        proc.kill()
        return await proc.wait()


@pytest.fixture(scope="module")
async def traced_render(
    temporal_env: WorkflowEnvironment,
    render_server: RunningServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[TracedRender]:
    render_server.reset()
    data = tmp_path_factory.mktemp("traced")
    # A job store of its own, so the jobs gauge counts this render alone; its job ids repeat
    # other tests' on the session's Temporal server, which WORKFLOW_ID_PREFIX keeps apart.
    database_url = f"sqlite:///{data / 'jobs.db'}"
    api_port, worker_metrics_port = _free_port(), _free_port()
    prefix = f"traced-{api_port}-"
    api_url = f"http://127.0.0.1:{api_port}"
    with OtlpReceiver() as receiver:
        env = _process_env(
            {
                "DATA_DIR": str(data),
                "DATABASE_URL": database_url,
                "TEMPORAL_ADDRESS": temporal_env.client.service_client.config.target_host,
                "WORKFLOW_ID_PREFIX": prefix,
                "REPLICATE_BASE_URL": render_server.base_url,
                "REPLICATE_MODEL": "local/i2v",
                "REPLICATE_WEBHOOK_SECRET": render_server.webhook_secret,
                "PUBLIC_BASE_URL": api_url,
                "POLL_INTERVAL_SECONDS": "0.2",
                "RECONCILE_INTERVAL_SECONDS": "0",
                "WORKER_METRICS_ADDRESS": f"127.0.0.1:{worker_metrics_port}",
                "METRICS_TOKEN": METRICS_TOKEN,
                "LOG_FORMAT": "json",
                # Only the endpoint: the exporter, its protocol and the service names follow.
                "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                "OTEL_BSP_SCHEDULE_DELAY": "100",
            }
        )
        key = KeyStore(make_engine(database_url)).create("default", label="tests").key
        api_log, worker_log = data / "api.log", data / "worker.log"
        with api_log.open("wb") as api_err, worker_log.open("wb") as worker_err:
            api = await asyncio.create_subprocess_exec(
                *[sys.executable, "-m", "uvicorn", "api.main:app", "--port", str(api_port)],
                cwd=data,
                env=env,
                stderr=api_err,
                stdout=api_err,
            )
            worker = await asyncio.create_subprocess_exec(
                *[sys.executable, "-m", "worker"], cwd=data, env=env, stderr=worker_err
            )
        try:
            async with api_client(api_url, key) as client:

                async def api_up() -> bool:
                    assert api.returncode is None, api_log.read_text()
                    try:
                        return (await client.get("/healthz")).status_code == 200
                    except httpx.TransportError:
                        return False

                await eventually(api_up, within=60, what="the API process")

                def worker_up() -> bool:
                    assert worker.returncode is None, worker_log.read_text()
                    return "worker running" in worker_log.read_text()

                await eventually(worker_up, within=60, what="the worker process")
                # One throttled create: a provider error for the worker's metrics, retried
                # after the second the provider names.
                render_server.add_fault(
                    "rate_limit", detail="Request was throttled. Your rate limit resets in ~1s."
                )
                scenes = [
                    {"image_url": f"{api_url}/samples/scene-{n}.jpg", "duration_seconds": 1}
                    for n in (1, 2)
                ]
                created = await client.post("/api/v2/jobs", json={"storyboard": scenes})
                job_id = created.json()["job_id"]
                approved = await client.post(f"/api/v2/jobs/{job_id}/approve")
                assert approved.status_code == 200, approved.text
                handle = temporal_env.client.get_workflow_handle(f"{prefix}render-video-{job_id}")
                async with asyncio.timeout(120):
                    await handle.result()
                job = (await client.get(f"/api/v2/jobs/{job_id}")).json()
                assert job["status"] == "completed", job
                scraped = await client.get(
                    "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}
                )
                assert scraped.status_code == 200, scraped.text
                async with httpx.AsyncClient() as plain:
                    worker_metrics = await plain.get(
                        f"http://127.0.0.1:{worker_metrics_port}/metrics"
                    )
        finally:
            # A clean exit flushes every span still batched.
            codes = await _stop(api), await _stop(worker)
        # uvicorn ends by re-raising the SIGTERM it handled.
        logs = api_log.read_text(), worker_log.read_text()
        assert codes in ((0, 0), (-signal.SIGTERM, 0)), logs
        yield TracedRender(
            job_id=job_id,
            spans=list(receiver.spans),
            api_metrics=scraped.text,
            worker_metrics=worker_metrics.text,
            worker_log=worker_log.read_text().splitlines(),
            api_log=api_log.read_text().splitlines(),
            prefix=prefix,
        )


def _one(spans: list[Span], name: str, service: str | None = None) -> Span:
    found = [s for s in spans if s.name == name and (service is None or s.service == service)]
    assert len(found) == 1, (name, [s.name for s in spans])
    return found[0]


def _draw(root: Span, spans: list[Span], depth: int = 0) -> str:
    """The tree under `root`, one span a line: for failure messages."""
    lines = [f"{'  ' * depth}{root.name} [{root.service}]"]
    for child in (s for s in spans if s.parent_id == root.span_id):
        lines.append(_draw(child, spans, depth + 1))
    return "\n".join(lines)


def _ancestors(span: Span, by_id: dict[str, Span]) -> list[str]:
    names = []
    while span.parent_id in by_id:
        span = by_id[span.parent_id]
        names.append(span.name)
    return names


async def test_one_trace_follows_a_render_from_the_api_request_to_the_provider_calls(
    traced_render: TracedRender,
) -> None:
    spans = traced_render.spans
    request = _one(spans, "POST /api/v2/jobs/{job_id}/approve", "storyboard-api")
    assert request.kind == 2  # SERVER
    trace = [s for s in spans if s.trace_id == request.trace_id]
    by_id = {s.span_id: s for s in trace}
    assert len(by_id) == len(trace), "span ids are unique"

    # A tree: the request is the one root, every other span's parent is in the trace.
    roots = [s for s in trace if s.parent_id not in by_id]
    assert roots == [request], [(s.name, s.parent_id) for s in roots]
    assert {s.service for s in trace} == {"storyboard-api", "storyboard-worker"}

    tree = _draw(request, trace)
    # The request starts the run; the run (in the worker) continues the request's trace.
    start = _one(trace, "SignalWithStartWorkflow:RenderVideo", "storyboard-api")
    assert start.parent_id == request.span_id, tree
    run = _one(trace, "RunWorkflow:RenderVideo", "storyboard-worker")
    assert run.parent_id == start.span_id, tree
    # Each scene's child run, under the parent run's start of it.
    scene_runs = [s for s in trace if s.name == "RunWorkflow:RenderScene"]
    assert len(scene_runs) == traced_render.scenes, tree
    for scene in scene_runs:
        assert by_id[scene.parent_id].name == "StartChildWorkflow:RenderScene", tree
        assert by_id[by_id[scene.parent_id].parent_id] is run, tree

    names = {s.name for s in trace}
    for activity in ("validate_storyboard", "start_prediction", "download_clip", "record_cost"):
        assert f"RunActivity:{activity}" in names, activity
    # The throttled create is in the trace too: two attempts of one scene's start_prediction.
    creates = [s for s in trace if s.name == "RunActivity:start_prediction"]
    assert len(creates) == traced_render.scenes + 1, tree
    for create in creates:
        assert _ancestors(create, by_id)[:2] == [
            "StartActivity:start_prediction",
            "RunWorkflow:RenderScene",
        ], tree

    # The provider's HTTP calls, made by the worker's httpx clients under the activities.
    def url(span: Span) -> str:
        return str(span.attributes.get("url.full") or span.attributes.get("http.url") or "")

    def method(span: Span) -> str:
        return str(span.attributes.get("http.request.method") or span.attributes.get("http.method"))

    posts = [
        s
        for s in trace
        if s.kind == 3 and method(s) == "POST" and url(s).endswith("/predictions")  # CLIENT
    ]
    assert len(posts) == traced_render.scenes + 1
    assert {by_id[s.parent_id].name for s in posts} == {"RunActivity:start_prediction"}
    assert all(s.service == "storyboard-worker" for s in posts)
    downloads = [s for s in trace if s.kind == 3 and by_id[s.parent_id].name.endswith("clip")]
    assert downloads, "the clip downloads are traced"


async def test_metrics_count_requests_jobs_webhooks_and_provider_errors(
    traced_render: TracedRender,
) -> None:
    api = _samples(traced_render.api_metrics)
    approve = {
        "method": "POST",
        "route": "/api/v2/jobs/{job_id}/approve",
        "status": "2xx",
    }
    assert api[("render_video_http_request_duration_seconds_count", _key(approve))] == 1
    assert api[("render_video_jobs", _key({"status": "completed"}))] == 1
    assert api[("render_video_jobs", _key({"status": "rendering"}))] == 0
    signalled = api[("render_video_webhook_deliveries_total", _key({"outcome": "signalled"}))]
    assert signalled >= traced_render.scenes
    assert api[("render_video_webhook_deliveries_total", _key({"outcome": "rejected"}))] == 0

    # The worker: the SDK's own metrics and ours, on one endpoint.
    worker = traced_render.worker_metrics
    assert "temporal_activity_execution_latency" in worker
    errors = [
        line for line in worker.splitlines() if line.startswith("render_video_provider_errors{")
    ]
    assert len(errors) == 1, errors
    assert 'kind="throttled"' in errors[0] and 'activity_type="start_prediction"' in errors[0]
    assert errors[0].rsplit(" ", 1)[1] == "1"


def _key(labels: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(labels.items()))


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, _key(sample.labels)): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_worker_and_api_log_json_lines_with_job_workflow_and_trace(
    traced_render: TracedRender,
) -> None:
    job_id = traced_render.job_id
    lines = [json.loads(line) for line in traced_render.worker_log if line.strip()]
    assert lines and all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    activity_lines = [line for line in lines if "activity_type" in line]
    created = [line for line in activity_lines if line["message"].startswith("Created prediction")]
    assert len(created) == traced_render.scenes
    for line in activity_lines:
        assert line["job_id"] == job_id, line
        assert line["workflow_id"].startswith(
            f"{traced_render.prefix}render-video-{job_id}-scene-"
        ), line
        assert "({" not in line["message"], "Temporal's details are fields, not message text"
    # Lines the activities log carry the render's trace, and the activity's span.
    approve = _one(traced_render.spans, "POST /api/v2/jobs/{job_id}/approve")
    creates = {
        s.span_id: s for s in traced_render.spans if s.name == "RunActivity:start_prediction"
    }
    for line in created:
        assert line["trace_id"] == approve.trace_id, line
        assert creates[line["span_id"]].attributes["temporalWorkflowID"] == line["workflow_id"]
    # The throttled attempt's failure, logged by the SDK through the activity's logger (after
    # the activity's span has closed: job and workflow, no trace).
    [failed] = [line for line in activity_lines if line["level"] == "WARNING"]
    assert failed["activity_type"] == "start_prediction" and "429" in failed["exception"]

    # The API: its own and uvicorn's lines (startup, access log) are JSON too.
    api_lines = [json.loads(line) for line in traced_render.api_log if line.strip()]
    assert any(line["logger"] == "uvicorn.access" for line in api_lines)
    assert any(line["logger"] == "uvicorn.error" for line in api_lines)


# -- settings and pieces, without a render ---------------------------------------------------


def test_exporters_follow_the_standard_variables() -> None:
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}
    assert exporter_names({}) == []
    assert exporter_names(endpoint) == ["otlp_proto_http"]
    assert exporter_names({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}) == [
        "otlp_proto_http"
    ]
    assert exporter_names({**endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}) == [
        "otlp_proto_grpc"
    ]
    assert exporter_names({**endpoint, "OTEL_TRACES_EXPORTER": "none"}) == []
    assert exporter_names({**endpoint, "OTEL_SDK_DISABLED": "true"}) == []
    assert exporter_names({"OTEL_TRACES_EXPORTER": "console,otlp"}) == [
        "console",
        "otlp_proto_http",
    ]
    with pytest.raises(TelemetryError, match="http/json"):
        exporter_names({**endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})


def test_job_ids_come_from_render_workflow_ids() -> None:
    assert job_id_of("render-video-12") == 12
    assert job_id_of("render-video-12-scene-3") == 12
    assert job_id_of("render-video-12-scene-all") == 12
    assert job_id_of("acme-render-video-7") == 7
    assert job_id_of("reconcile-jobs-render-video") is None
    assert job_id_of(None) is None


def test_json_lines_take_job_and_workflow_from_temporal_details() -> None:
    import logging

    record = logging.makeLogRecord(
        {
            "name": "temporalio.activity",
            "levelname": "INFO",
            "msg": "Created prediction %s",
            "args": ("p1",),
            "temporal_activity": {
                "activity_type": "start_prediction",
                "workflow_id": "render-video-5-scene-2",
                "attempt": 1,
            },
            "color_message": "\x1b[1mno\x1b[0m",
        }
    )
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "Created prediction p1"
    assert (line["job_id"], line["workflow_id"]) == (5, "render-video-5-scene-2")
    assert line["activity_type"] == "start_prediction"
    assert "color_message" not in line and "trace_id" not in line


def test_job_counts_are_read_once_per_interval() -> None:
    reads: list[int] = []

    def read() -> dict[str, int]:
        reads.append(1)
        return {"completed": len(reads)}

    cached = JobsByStatus(ttl=60)
    cached.read = read
    assert cached.counts() == cached.counts() == {"completed": 1}
    fresh = JobsByStatus(ttl=0)
    fresh.read = read
    assert fresh.counts() != fresh.counts()


@pytest.fixture
def app_server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[str, JobStore]]:
    settings = make_settings(tmp_path, "127.0.0.1:1", "http://127.0.0.1:1", **request.param)
    store = JobStore(make_engine(settings.resolved_database_url))
    with UvicornThread(create_app(settings)) as server:
        yield server.base_url, store


@pytest.mark.parametrize(
    "app_server", [{"metrics_token": METRICS_TOKEN, "max_request_bytes": 1000}], indirect=True
)
async def test_metrics_take_the_metrics_token_and_no_tenant_key(
    app_server: tuple[str, JobStore],
) -> None:
    base, store = app_server
    tenant_key = KeyStore(store.engine).create("default").key
    store.create([{"image_url": "https://example.com/a.png"}])
    async with api_client(base, None) as anonymous:
        refused = await anonymous.get("/metrics")
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"] == "Bearer"
        assert "METRICS_TOKEN" in refused.json()["detail"]
        tenant = await anonymous.get("/metrics", headers={"Authorization": f"Bearer {tenant_key}"})
        assert tenant.status_code == 401
        # A 404 and a refused body are timed under a template, never the raw path.
        await anonymous.get("/no/such/path")
        big = await anonymous.post("/api/v2/jobs", content=b"x" * 5000)
        assert big.status_code == 413
    async with api_client(base, METRICS_TOKEN) as prometheus:
        scraped = await prometheus.get("/metrics")
    assert scraped.status_code == 200
    assert scraped.headers["content-type"].startswith("text/plain")
    samples = _samples(scraped.text)
    assert samples[("render_video_jobs", _key({"status": "ready"}))] == 1
    assert samples[("render_video_jobs", _key({"status": "completed"}))] == 0
    refused_scrape = {"method": "GET", "route": "/metrics", "status": "4xx"}
    assert samples[("render_video_http_request_duration_seconds_count", _key(refused_scrape))] == 2
    for method in ("GET", "POST"):  # the unknown path, the body over the cap
        unrouted = {"method": method, "route": "unrouted", "status": "4xx"}
        assert samples[("render_video_http_request_duration_seconds_count", _key(unrouted))] == 1
    assert not any("/no/such/path" in str(labels) for _, labels in samples)


@pytest.mark.parametrize("app_server", [{"metrics_public": True}], indirect=True)
async def test_metrics_are_public_only_when_a_setting_says_so(
    app_server: tuple[str, JobStore],
) -> None:
    async with api_client(app_server[0], None) as anonymous:
        assert (await anonymous.get("/metrics")).status_code == 200


@pytest.mark.parametrize("app_server", [{}], indirect=True)
async def test_metrics_are_off_by_default(app_server: tuple[str, JobStore]) -> None:
    async with api_client(app_server[0], None) as anonymous:
        answer = await anonymous.get("/metrics")
        schema = (await anonymous.get("/openapi.json")).json()
    assert answer.status_code == 404
    assert "METRICS_TOKEN" in answer.json()["detail"]
    assert "/metrics" not in schema["paths"]


def test_job_store_counts_jobs_by_status(store: JobStore) -> None:
    # The PostgreSQL store is shared by the session's tests: count what this test adds.
    before = store.count_by_status()
    first = store.create([{"image_url": "https://example.com/a.png"}])
    store.create([{"image_url": "https://example.com/b.png"}])
    store.create()
    store.fail(first, "broken")
    after = store.count_by_status()
    added = {status: after[status] - before.get(status, 0) for status in after}
    assert {status: n for status, n in added.items() if n} == {"ready": 1, "draft": 1, "failed": 1}
