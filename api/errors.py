"""One error shape for every answer that is not a success, and the handlers that send it.

`{"detail": "..."}` names the problem in words; a malformed request also gets `errors`, one
entry per field (`loc`, `msg`, `type`). Nothing echoes the input back: a number like 1e400 or a
deeply nested value cannot be encoded, and an echo is how a repr or a path would leak.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from backend.database import JobConflict, JobNotFound
from backend.orchestration import TemporalUnavailable, TenantAtCapacity
from backend.storage import StorageError
from backend.storyboard import StoryboardError

log = logging.getLogger("api")

# Seconds a client should wait before it retries a 503.
RETRY_AFTER = "2"


class FieldError(BaseModel):
    loc: list[str | int] = Field(description="Where: body, path or query, then the field")
    msg: str
    type: str


class ErrorBody(BaseModel):
    detail: str = Field(description="What is wrong, in words")
    errors: list[FieldError] | None = Field(
        default=None, description="For a malformed request: each field that was refused"
    )


class ApiError(Exception):
    """An answer with an error status, raised from anywhere in a request."""

    status = 400
    headers: dict[str, str] = {}

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class Unauthorized(ApiError):
    status = 401
    headers = {"WWW-Authenticate": "Bearer"}


class Forbidden(ApiError):
    status = 403


class UnsupportedMediaType(ApiError):
    status = 415


class Unavailable(ApiError):
    """A dependency (the provider's webhook secret, Temporal) cannot be reached now."""

    status = 503
    headers = {"Retry-After": RETRY_AFTER}


def error_response(
    status: int, detail: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    body = ErrorBody(detail=detail, **extra).model_dump(exclude_none=True)
    return JSONResponse(status_code=status, content=body, headers=headers)


def _described(error: FieldError) -> str:
    # "storyboard: ...", "path.job_id: ..."; an error about the whole body is its message.
    loc = error.loc[1:] if error.loc[:1] == ["body"] else error.loc
    where = ".".join(str(part) for part in loc)
    return f"{where}: {error.msg}" if where else error.msg


def invalid_field(loc: tuple[str, ...], message: str) -> RequestValidationError:
    """A 422 about one field, for checks a route makes itself (the same shape as pydantic's)."""
    return RequestValidationError([{"loc": loc, "msg": message, "type": "value_error"}])


def validation_errors(exc: RequestValidationError) -> list[FieldError]:
    errors = []
    for error in exc.errors():
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        loc = [part if isinstance(part, int) else str(part) for part in error.get("loc", ())]
        errors.append(FieldError(loc=loc, msg=message, type=str(error.get("type", "invalid"))))
    return errors


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        if exc.status == 503:
            log.warning("%s", exc.detail)
        return error_response(exc.status, exc.detail, exc.headers or None)

    @app.exception_handler(JobNotFound)
    async def _not_found(_: Request, exc: JobNotFound) -> JSONResponse:
        return error_response(404, str(exc))

    @app.exception_handler(JobConflict)
    async def _conflict(_: Request, exc: JobConflict) -> JSONResponse:
        return error_response(409, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = validation_errors(exc)
        detail = "; ".join(_described(e) for e in errors) or "Invalid request"
        return error_response(422, detail, errors=errors)

    @app.exception_handler(StoryboardError)
    async def _bad_storyboard(_: Request, exc: StoryboardError) -> JSONResponse:
        return error_response(422, str(exc))

    @app.exception_handler(TenantAtCapacity)
    async def _tenant_at_capacity(_: Request, exc: TenantAtCapacity) -> JSONResponse:
        return error_response(429, str(exc), {"Retry-After": "30"})

    @app.exception_handler(TemporalUnavailable)
    async def _temporal_down(_: Request, exc: TemporalUnavailable) -> JSONResponse:
        log.warning("%s", exc)
        return error_response(503, str(exc), {"Retry-After": RETRY_AFTER})

    @app.exception_handler(StorageError)
    async def _storage_unavailable(_: Request, exc: StorageError) -> JSONResponse:
        log.warning("%s", exc)
        return error_response(503, str(exc), {"Retry-After": RETRY_AFTER})

    @app.exception_handler(OperationalError)
    async def _store_unavailable(_: Request, exc: OperationalError) -> JSONResponse:
        # Locked (SQLite, past DB_LOCK_TIMEOUT_SECONDS) or unreachable (PostgreSQL): the
        # transaction was rolled back, so nothing was half done and the client may retry.
        log.warning("Job store unavailable: %s", exc.orig)
        return error_response(
            503,
            "The job store is busy or unavailable; nothing was changed, try again shortly",
            {"Retry-After": RETRY_AFTER},
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Unknown paths and methods: the same shape as every other error.
        detail = exc.detail if isinstance(exc.detail, str) else "Request refused"
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # Starlette names only the first route on the path; a path may have several.
            headers["Allow"] = ", ".join(_allowed_methods(request))
        return error_response(exc.status_code, detail, headers or None)


_DESCRIPTIONS = {
    400: "The request cannot be understood",
    401: "No valid API key: send `Authorization: Bearer <key>`",
    403: "The signed link is invalid or has expired",
    404: "No such job for this key's tenant (or no video yet)",
    409: "The job's state does not allow this",
    413: "The request body is larger than MAX_REQUEST_BYTES",
    415: "The body is not JSON (`Content-Type: application/json`)",
    416: "The `Range` asked for is not in the file",
    422: "The request is malformed or a value is out of range; `errors` names each field",
    429: "The tenant has as many jobs going as it may (TENANT_MAX_ACTIVE_JOBS); retry after "
    "`Retry-After` seconds",
    503: "The job store, Temporal or the provider cannot be reached now; retry after "
    "`Retry-After` seconds",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for these error statuses, all with the one error model."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        entry: dict[str, Any] = {"model": ErrorBody, "description": _DESCRIPTIONS[status]}
        if status == 401:
            entry["headers"] = {
                "WWW-Authenticate": {"schema": {"type": "string"}, "description": "`Bearer`"}
            }
        if status == 503:
            entry["headers"] = {
                "Retry-After": {"schema": {"type": "string"}, "description": "Seconds"}
            }
        out[status] = entry
    return out


def _allowed_methods(request: Request) -> list[str]:
    methods: set[str] = set()
    for route in request.app.router.routes:
        regex = getattr(route, "path_regex", None)
        if regex is not None and regex.match(request.url.path):
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)
