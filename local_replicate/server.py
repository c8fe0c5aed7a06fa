"""FastAPI app: the Replicate HTTP API subset, the output file server and the admin endpoints."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import html
import json
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .config import ServerConfig
from .downloads import OutputDownload, until_disconnect
from .engine import Cursor, Engine, Prediction
from .faults import ALL_KINDS, PREDICTION_KINDS, Fault, FaultSpecError, parse_fault
from .models import InputInvalid, Model
from .webhooks import EVENTS

__all__ = ["ServerConfig", "create_app"]

PROBLEM = "application/problem+json"
THROTTLED = "Request was throttled. Your rate limit resets in ~{}s."
FILE_NAME = re.compile(r"^([a-z0-9]{1,64})\.mp4$")
# Cancel-After: "90s", "5m", "1h30m45s", or a bare number of seconds (Replicate's format)
CANCEL_AFTER = re.compile(
    r"^(?:(?P<h>\d+(?:\.\d+)?)h)?(?:(?P<m>\d+(?:\.\d+)?)m)?(?:(?P<s>\d+(?:\.\d+)?)s)?$"
    r"|^(?P<bare>\d+(?:\.\d+)?)$"
)
MIN_CANCEL_AFTER = 5.0  # seconds; Replicate refuses shorter deadlines


class Problem(Exception):
    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail
        self.headers = headers
        self.extra = extra


def problem(
    status: int,
    title: str,
    detail: str,
    headers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> JSONResponse:
    body = {"title": title, "detail": detail, "status": status, **(extra or {})}
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


def _invalid(detail: str) -> Problem:
    return Problem(422, "Invalid request", detail)


def _engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


def _base_url(request: Request) -> str:
    config: ServerConfig = request.app.state.config
    return (config.public_url or str(request.base_url)).rstrip("/")


def _authenticate(request: Request) -> None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Problem(401, "Unauthenticated", "You did not pass an authentication token")
    expected = request.app.state.config.token
    if expected is not None and not hmac.compare_digest(token.encode(), expected.encode()):
        raise Problem(401, "Unauthenticated", "You did not pass a valid authentication token")


async def _json_object(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw) if raw else None
    except ValueError as exc:
        raise _invalid(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise _invalid("request body must be a JSON object")
    return body


def _prefer_wait(request: Request) -> float | None:
    header = request.headers.get("prefer")
    if not header:
        return None
    for pref in header.split(","):
        name, _, value = pref.strip().partition("=")
        if name.strip().lower() != "wait":
            continue
        if not value:
            return 60.0  # bare `wait` means the maximum
        try:
            seconds = int(value.strip())
        except ValueError:
            seconds = 0
        if not 1 <= seconds <= 60:
            raise Problem(400, "Invalid Prefer header", "wait must be an integer from 1 to 60")
        return float(seconds)
    return None


def _cancel_after(request: Request) -> float | None:
    header = request.headers.get("cancel-after")
    if header is None:
        return None
    match = CANCEL_AFTER.match(header.strip().lower())
    if not header.strip() or match is None:
        raise _invalid("Cancel-After: must be a duration such as 30s, 5m or 1h30m")
    hours, minutes, seconds, bare = (float(match.group(k) or 0) for k in ("h", "m", "s", "bare"))
    total = hours * 3600 + minutes * 60 + seconds + bare
    if total < MIN_CANCEL_AFTER:
        raise _invalid(f"Cancel-After: must be at least {MIN_CANCEL_AFTER:g} seconds")
    return total


def _validation_failed(exc: InputInvalid) -> Problem:
    """Replicate's answer to input that does not fit the model's schema."""
    fields = [{"type": f.type, "field": f.field, "description": f.description} for f in exc.fields]
    detail = "".join(f"- {f.field}: {f.description}\n" for f in exc.fields)
    return Problem(422, "Input validation failed", detail, extra={"invalid_fields": fields})


def _parse_create(body: dict[str, Any], allowed: set[str]) -> tuple[Any, ...]:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise _invalid(f"unexpected field(s) in request body: {', '.join(unknown)}")
    inp = body.get("input")
    if not isinstance(inp, dict):
        raise _invalid("input: required, must be an object")
    webhook = body.get("webhook")
    if webhook is not None:
        if not isinstance(webhook, str) or urlsplit(webhook).scheme not in ("http", "https"):
            raise _invalid("webhook: must be an http or https URL")
    events_in = body.get("webhook_events_filter")
    if events_in is None:
        events = frozenset(EVENTS)
    elif not isinstance(events_in, list) or not set(events_in) <= set(EVENTS):
        raise _invalid(f"webhook_events_filter: must be a list drawn from {', '.join(EVENTS)}")
    else:
        events = frozenset(events_in)
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _invalid("stream: must be a boolean")
    faults = _input_faults(inp.get("_fault"))
    return inp, webhook, events, faults


def _input_faults(spec: Any) -> list[Fault]:
    if spec is None:
        return []
    specs = spec if isinstance(spec, list) else [spec]
    try:
        return [parse_fault(s, PREDICTION_KINDS) for s in specs]
    except FaultSpecError as exc:
        raise _invalid(f"input._fault: {exc}") from exc


async def _create(
    request: Request, model: Model, model_name: str, version: str, body: dict[str, Any]
) -> Response:
    """A create, in Replicate's order: the request's form, the rate limit, the model's input
    schema (422), then the prediction."""
    engine = _engine(request)
    allowed = {"input", "webhook", "webhook_events_filter", "stream"}
    if version != "hidden":
        allowed.add("version")
    inp, webhook, events, faults = _parse_create(body, allowed)
    wait = _prefer_wait(request)
    cancel_after = _cancel_after(request)
    engine.counts["creates"] += 1
    retry_after = engine.throttle()
    if retry_after is not None:
        detail = THROTTLED.format(retry_after)
        headers = {"Retry-After": str(retry_after)}
        return problem(429, "Request was throttled", detail, headers)
    if model.validates_on_create:
        try:
            model.validate(inp)
        except InputInvalid as exc:
            raise _validation_failed(exc) from exc
    fault = engine.take_create_fault(inp)
    if fault is not None and fault.kind == "rate_limit":
        detail = fault.detail or THROTTLED.format(30)
        return problem(429, "Request was throttled", detail, {"Retry-After": "30"})
    if fault is not None:
        return problem(500, "Internal Server Error", fault.detail or "Injected server error")
    # created (and started) before any hold below: a client that never sees the response has
    # still caused a prediction, as with Replicate when a response is lost
    p = engine.create(
        model=model_name,
        version=version,
        input=inp,
        base_url=_base_url(request),
        webhook=webhook,
        events=events,
        extra_faults=faults,
        cancel_after=cancel_after,
    )
    if slow := p.fault("slow_create"):
        await _hold(request, slow.delay)
    if wait is not None:
        try:
            await asyncio.wait_for(p.done.wait(), wait)
        except TimeoutError:
            pass
    return JSONResponse(p.to_json(), status_code=201)


async def _hold(request: Request, seconds: float) -> None:
    """Sleep `seconds`, or less if the client disconnects (nothing would read the response)."""
    try:
        await asyncio.wait_for(until_disconnect(request.receive), seconds)
    except TimeoutError:
        pass


def _encode_cursor(cursor: Cursor) -> str:
    # Django REST framework's cursor shape, which Replicate's cursors have: base64 of "r=1&p=..."
    reverse, position = cursor
    fields = {"r": "1", "p": str(position)} if reverse else {"p": str(position)}
    return base64.b64encode(urlencode(fields).encode()).decode()


def _decode_cursor(text: str) -> Cursor:
    try:
        decoded = base64.b64decode(text.encode(), validate=True).decode()
        fields = parse_qs(decoded, strict_parsing=True)
        reverse = fields.get("r", ["0"]) == ["1"]
        (position,) = fields["p"]
        return reverse, int(position)
    except (binascii.Error, UnicodeError, ValueError, KeyError) as exc:
        raise Problem(404, "Not found", "Invalid cursor") from exc


def _query_time(request: Request, name: str) -> datetime | None:
    text = request.query_params.get(name)
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError as exc:
        raise _invalid(f"{name}: must be an ISO 8601 date-time") from exc
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _list_filter(request: Request) -> Callable[[Prediction], bool]:
    after = _query_time(request, "created_after")
    before = _query_time(request, "created_before")
    source = request.query_params.get("source")
    if source is not None and source != "web":
        raise _invalid("source: the only supported value is web")

    def keep(p: Prediction) -> bool:
        # every prediction here was created through the API
        if source == "web":
            return False
        return (after is None or p.created_at >= after) and (
            before is None or p.created_at < before
        )

    return keep


def _page_url(request: Request, cursor: Cursor | None) -> str | None:
    if cursor is None:
        return None
    # other query parameters (the filters) carry over, as Replicate's next/previous URLs do
    params = [(k, v) for k, v in request.query_params.multi_items() if k != "cursor"]
    params.append(("cursor", _encode_cursor(cursor)))
    return f"{_base_url(request)}/v1/predictions?{urlencode(params)}"


def _lookup(request: Request, prediction_id: str) -> Prediction:
    p = _engine(request).predictions.get(prediction_id)
    if p is None:
        raise Problem(404, "Not found", f"Prediction {prediction_id} was not found")
    return p


def _model(request: Request, owner: str, name: str) -> Model:
    model = _engine(request).models.get(f"{owner}/{name}")
    if model is None:
        raise Problem(404, "Not found", f"Model {owner}/{name} was not found")
    return model


def create_app(config: ServerConfig) -> FastAPI:
    """The app; raises DataDirError or ConfigError (a malformed webhook secret, a model schema
    that cannot be used) here, before anything is served."""
    engine = Engine(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        try:
            yield
        finally:
            await engine.stop()

    app = FastAPI(title="local_replicate", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.config = config
    app.state.engine = engine

    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> Response:
        return problem(exc.status, exc.title, exc.detail, exc.headers, exc.extra)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        title = {404: "Not found", 405: "Method not allowed"}.get(exc.status_code, "Error")
        return problem(exc.status_code, title, str(exc.detail), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        return problem(422, "Invalid request", str(exc.errors()))

    @app.post("/v1/predictions")
    async def create_by_version(request: Request) -> Response:
        _authenticate(request)
        body = await _json_object(request)
        version = body.get("version")
        if not isinstance(version, str) or not version:
            raise _invalid("version: required, a model version id")
        if ":" in version:  # "owner/name:version" names the model too
            name, _, version = version.partition(":")
            model = engine.models.get(name) or engine.models.for_version(version)
        else:
            model = engine.models.for_version(version)
            name = model.name if model is not None else config.model_name
        # a version id the server does not know runs the slideshow, as before models had names
        model = model or engine.models.slideshow
        return await _create(request, model, name, version, body)

    @app.post("/v1/models/{owner}/{name}/predictions")
    async def create_by_model(owner: str, name: str, request: Request) -> Response:
        _authenticate(request)
        model = _model(request, owner, name)
        body = await _json_object(request)
        return await _create(request, model, f"{owner}/{name}", "hidden", body)

    @app.get("/v1/models/{owner}/{name}")
    async def get_model(owner: str, name: str, request: Request) -> Response:
        _authenticate(request)
        model = _model(request, owner, name)
        return JSONResponse(model.to_json(_base_url(request), engine.run_count(model)))

    @app.get("/v1/predictions")
    async def list_predictions(request: Request) -> Response:
        _authenticate(request)
        engine.counts["lists"] += 1
        keep = _list_filter(request)
        text = request.query_params.get("cursor")
        cursor = _decode_cursor(text) if text is not None else None
        page, next_cursor, previous_cursor = engine.list_page(cursor, keep)
        body = {
            "next": _page_url(request, next_cursor),
            "previous": _page_url(request, previous_cursor),
            "results": [p.to_list_json() for p in page],
        }
        return JSONResponse(body)

    @app.get("/v1/predictions/{prediction_id}")
    async def get_prediction(prediction_id: str, request: Request) -> Response:
        _authenticate(request)
        engine.counts["gets"] += 1
        return JSONResponse(_lookup(request, prediction_id).to_json())

    @app.post("/v1/predictions/{prediction_id}/cancel")
    async def cancel_prediction(prediction_id: str, request: Request) -> Response:
        _authenticate(request)
        engine.counts["cancels"] += 1
        p = _lookup(request, prediction_id)
        engine.cancel(p)
        return JSONResponse(p.to_json())

    @app.get("/v1/webhooks/default/secret")
    async def webhook_secret(request: Request) -> Response:
        _authenticate(request)
        return JSONResponse({"key": engine.webhook_secret})

    @app.api_route("/files/{file_name}", methods=["GET", "HEAD"])
    async def output_file(file_name: str, request: Request) -> Response:
        engine.counts["file_gets"] += 1
        match = FILE_NAME.match(file_name)
        full = request.method == "GET" and "range" not in request.headers
        fault = engine.take_download_fault(full)
        if fault is not None and fault.kind == "download_error":
            return problem(500, "Internal Server Error", "Injected download error")
        if match and engine.output_gone(match.group(1)):
            return problem(410, "Gone", f"File {file_name} is no longer available")
        path = engine.output_path(match.group(1)) if match else None
        missing = problem(404, "Not found", f"File {file_name} was not found")
        if path is None or not path.is_file():
            return missing
        if not full:
            return FileResponse(path, media_type="video/mp4")
        try:
            # opened here, so retention deleting the file cannot cut a started download short
            file = path.open("rb")
        except FileNotFoundError:
            return missing

        def count(completed: bool) -> None:
            engine.counts["download_completes" if completed else "download_aborts"] += 1

        return OutputDownload(file, fault.delay if fault is not None else 0.0, count)

    @app.get("/p/{prediction_id}")
    async def web_page(prediction_id: str, request: Request) -> Response:
        p = _lookup(request, prediction_id)
        text = html.escape(json.dumps(p.to_json(), indent=2))
        return HTMLResponse(f"<!doctype html><title>{p.id}</title><pre>{text}</pre>")

    if config.admin:
        _admin_routes(app, engine)
    return app


def _admin_routes(app: FastAPI, engine: Engine) -> None:
    """Fault injection, counters and reset: only for a server started for tests."""

    @app.post("/_admin/faults", status_code=201)
    async def add_fault(request: Request) -> Response:
        body = await _json_object(request)
        try:
            fault = parse_fault(body, ALL_KINDS)
        except FaultSpecError as exc:
            raise _invalid(str(exc)) from exc
        engine.faults.add(fault)
        return JSONResponse(fault.as_dict(), status_code=201)

    @app.get("/_admin/faults")
    async def list_faults() -> Response:
        return JSONResponse(engine.faults.list())

    @app.delete("/_admin/faults")
    async def clear_faults() -> Response:
        return JSONResponse({"cleared": engine.faults.clear()})

    @app.get("/_admin/stats")
    async def stats() -> Response:
        return JSONResponse(engine.stats())

    @app.get("/_admin/predictions/{prediction_id}")
    async def prediction_record(prediction_id: str, request: Request) -> Response:
        """A prediction as the server keeps it, with what the API does not show (the
        Cancel-After deadline)."""
        return JSONResponse(_lookup(request, prediction_id).to_record())

    @app.post("/_admin/reset")
    async def reset() -> Response:
        await engine.reset()
        return JSONResponse({"reset": True})

    @app.get("/_admin/health")
    async def health() -> Response:
        return JSONResponse({"ok": True})
