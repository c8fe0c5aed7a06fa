"""OpenTelemetry traces for one process: an API request, the workflow runs it starts, their
activities and the provider's HTTP calls, in one trace.

Configured only by the standard `OTEL_*` variables, read by the SDK's own classes: the OTLP
exporter reads its endpoint, headers, timeout and compression, the tracer provider its sampler
(`OTEL_TRACES_SAMPLER`), the resource `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES`, the
batch processor `OTEL_BSP_*`. Exporters are chosen as the SDK chooses them, by name from the
`opentelemetry_traces_exporter` entry points, with two choices of ours: with no
`OTEL_TRACES_EXPORTER`, traces are exported (by OTLP) only when an OTLP endpoint is set, so a
bare process exports nothing and pays nearly nothing; and OTLP without a protocol means
`http/protobuf`, the specification's default and the exporter this project installs.

Nothing here imports the SDK until tracing is switched on.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI
    from opentelemetry.sdk.trace.export import SpanExporter
    from temporalio.plugin import SimplePlugin

log = logging.getLogger(__name__)

API_SERVICE = "storyboard-api"
WORKER_SERVICE = "storyboard-worker"

# Names from opentelemetry.sdk.environment_variables, spelled out so reading them does not
# import the SDK.
SDK_DISABLED = "OTEL_SDK_DISABLED"
TRACES_EXPORTER = "OTEL_TRACES_EXPORTER"
OTLP_ENDPOINT = "OTEL_EXPORTER_OTLP_ENDPOINT"
OTLP_TRACES_ENDPOINT = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
OTLP_PROTOCOL = "OTEL_EXPORTER_OTLP_PROTOCOL"
OTLP_TRACES_PROTOCOL = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"

EXPORTER_GROUP = "opentelemetry_traces_exporter"
_OTLP_BY_PROTOCOL = {"http/protobuf": "otlp_proto_http", "grpc": "otlp_proto_grpc"}
# Probes and scrapes would otherwise start a trace every few seconds.
EXCLUDED_URLS = "/healthz,/metrics"

_lock = threading.Lock()
_provider: Any = None


class TelemetryError(ValueError):
    """The OTEL_* variables ask for something this installation cannot do."""


def exporter_names(environ: Mapping[str, str] = os.environ) -> list[str]:
    """The trace exporters the environment asks for, as entry point names; [] for none."""
    if environ.get(SDK_DISABLED, "").strip().lower() == "true":
        return []
    names = environ.get(TRACES_EXPORTER, "").strip()
    if not names:
        endpoint = environ.get(OTLP_TRACES_ENDPOINT) or environ.get(OTLP_ENDPOINT)
        names = "otlp" if endpoint and endpoint.strip() else "none"
    chosen: list[str] = []
    for raw in names.split(","):
        name = raw.strip().lower()
        if not name or name == "none":
            continue
        if name == "otlp":
            protocol = (
                environ.get(OTLP_TRACES_PROTOCOL) or environ.get(OTLP_PROTOCOL) or "http/protobuf"
            ).strip()
            if protocol not in _OTLP_BY_PROTOCOL:
                raise TelemetryError(
                    f"OTLP protocol {protocol!r} is not supported; use http/protobuf or grpc"
                )
            name = _OTLP_BY_PROTOCOL[protocol]
        if name not in chosen:
            chosen.append(name)
    return chosen


def _exporter(name: str) -> SpanExporter:
    found = list(entry_points(group=EXPORTER_GROUP, name=name))
    if not found:
        installed = sorted({ep.name for ep in entry_points(group=EXPORTER_GROUP)})
        hint = (
            " (install opentelemetry-exporter-otlp-proto-grpc for OTLP over gRPC)"
            if name == "otlp_proto_grpc"
            else ""
        )
        raise TelemetryError(
            f"Trace exporter {name!r} is not installed{hint}; installed: {', '.join(installed)}"
        )
    # No arguments: each exporter reads its own OTEL_EXPORTER_* variables.
    exporter: SpanExporter = found[0].load()()
    return exporter


def setup_tracing(service_name: str, environ: Mapping[str, str] = os.environ) -> Any:
    """Installs this process's tracer provider, once; returns it, or None when the
    environment asks for no exporter (then nothing is traced and nothing is imported).

    `service_name` is the default; OTEL_SERVICE_NAME or a `service.name` in
    OTEL_RESOURCE_ATTRIBUTES win. The provider is Temporal's replay-safe one, so spans made
    inside workflows survive a replay without being sent twice. httpx is instrumented
    process-wide: the provider's client (through the `replicate` package) and the download
    client both make a span per request.
    """
    global _provider
    with _lock:
        if _provider is not None:
            return _provider
        names = exporter_names(environ)
        if not names:
            return None
        exporters = [_exporter(name) for name in names]

        from opentelemetry import trace
        from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from temporalio.contrib.opentelemetry import create_tracer_provider

        resource = Resource.create()
        if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
            resource = resource.merge(Resource({SERVICE_NAME: service_name}))
        provider = create_tracer_provider(resource=resource)
        for exporter in exporters:
            provider.add_span_processor(BatchSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        if trace.get_tracer_provider() is not provider:
            # Someone (opentelemetry-instrument, say) set one first; theirs stays in charge.
            log.warning("A tracer provider was already set; Temporal spans are not added")
            provider.shutdown()
            return None
        HTTPXClientInstrumentor().instrument(tracer_provider=provider)
        _provider = provider
        log.info(
            "Tracing on: service %s, exporters %s",
            resource.attributes.get(SERVICE_NAME),
            ", ".join(names),
        )
        return provider


def flush(timeout_millis: int = 5000) -> None:
    """Exports the spans still batched: for a process about to end other than by returning
    (uvicorn re-raises SIGTERM after its shutdown, so the SDK's atexit hook never runs)."""
    if _provider is not None:
        _provider.force_flush(timeout_millis)


def tracing_provider() -> Any:
    """The provider setup_tracing installed in this process, or None."""
    return _provider


def temporal_plugins() -> list[SimplePlugin]:
    """Plugins for Client.connect: with tracing on, Temporal's OpenTelemetry plugin, which the
    client's workers inherit. It carries the trace in the headers of every start, signal,
    child workflow and activity, and adds StartWorkflow, RunWorkflow, StartActivity and
    RunActivity spans."""
    if _provider is None:
        return []
    from temporalio.contrib.opentelemetry import OpenTelemetryPlugin

    return [OpenTelemetryPlugin(add_temporal_spans=True)]


def instrument_app(app: FastAPI) -> None:
    """A server span per request, named by method and route template (no-op untraced)."""
    if _provider is None:
        return
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    FastAPIInstrumentor.instrument_app(app, tracer_provider=_provider, excluded_urls=EXCLUDED_URLS)


def current_trace_ids() -> tuple[str, str] | None:
    """(trace id, span id) of the span current in this context, as hex; None outside one."""
    if _provider is None:
        return None
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return trace.format_trace_id(context.trace_id), trace.format_span_id(context.span_id)
