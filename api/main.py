"""The HTTP front: create jobs, set storyboards, approve (which starts the render), read
status, and serve the finished videos. The routes are in api/routes/, one module per resource;
this module makes the app and the things its requests share."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline

from api.errors import install_error_handlers
from api.idempotency import Idempotency, document_idempotency
from api.limits import BodyLimit
from api.metrics import ApiMetrics, RequestMetrics
from api.metrics import router as metrics_router
from api.reads import JobReads, KeyReads, ProgressCache
from api.routes import health, jobs, tenant, videos, webhooks
from api.views import VideoSigner
from backend import telemetry
from backend.auth import KeyStore, url_signing_key
from backend.database import JobStore, make_engine
from backend.idempotency import IdempotencyStore
from backend.logs import configure_logging
from backend.orchestration import connect
from backend.provider import ProviderClient
from backend.settings import Settings, get_settings
from backend.storage import storage_for


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    if settings.log_format == "json":
        # Text stays as uvicorn (or whoever runs the app) set it up.
        configure_logging("json")
    # Once per process, and only when the OTEL_* variables ask for an exporter.
    telemetry.setup_tracing(telemetry.API_SERVICE)
    metrics = ApiMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.settings = settings
        engine = make_engine(
            settings.resolved_database_url, lock_timeout=settings.db_lock_timeout_seconds
        )
        app.state.store = JobStore(engine)
        app.state.idempotency = IdempotencyStore(engine)
        metrics.jobs.read = app.state.store.count_by_status
        app.state.temporal = await connect(settings, lazy=True)
        app.state.provider = ProviderClient(settings)
        app.state.storage = storage_for(settings)
        app.state.webhook_secret = settings.replicate_webhook_secret
        app.state.signer = VideoSigner(url_signing_key(settings), settings.signed_url_ttl_seconds)
        # Per lifespan: their tasks and futures belong to this event loop.
        app.state.reads = JobReads(app.state.store)
        app.state.keys = KeyReads(KeyStore(engine))
        app.state.progress = ProgressCache()
        # What startup made (modules, models, the engine, the client) lives as long as the
        # process. Frozen, full collections stop walking it: under load they came every second
        # or two and each one stalled every request in flight for about 100 ms.
        gc.freeze()
        try:
            yield
        finally:
            gc.unfreeze()
            engine.dispose()
            telemetry.flush()

    # The docs' Swagger UI and ReDoc assets are served by the API itself (fastapi-offline), so
    # /docs works with no network, as everything else here does.
    app = FastAPIOffline(
        title="Storyboard video renderer",
        version="2.0",
        lifespan=lifespan,
        description="Turns an approved storyboard into a video, durably, on Temporal. Every "
        "path but `/healthz`, the webhook receiver and the sample images needs an API key: "
        "`Authorization: Bearer <key>` (`render-video keys create --tenant NAME`).",
    )
    app.state.metrics = metrics
    install_error_handlers(app)
    for module in (jobs, tenant, videos, webhooks, health):
        app.include_router(module.router)
    app.include_router(metrics_router)
    # Sample scene images for the demo storyboard, public: the render server fetches them.
    samples = resources.files("backend") / "samples"
    app.mount("/samples", StaticFiles(directory=str(samples)), name="samples")

    document_idempotency(app)

    # Outermost last: a browser's preflight is answered before the body cap looks at anything,
    # and a body is capped before the idempotency keys buffer it.
    app.add_middleware(Idempotency)
    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes)
    # Outside the body cap, so its 413s are timed too.
    app.add_middleware(RequestMetrics, metrics=metrics)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "HEAD", "POST", "PUT"],
            allow_headers=["Authorization", "Content-Type", "Range", "Idempotency-Key"],
            expose_headers=["Idempotent-Replayed"],
        )
    telemetry.instrument_app(app)
    return app


app = create_app()
