"""`Idempotency-Key` on every authenticated POST under /api/v2/: safe retries for callers.

A client whose POST got no answer (a reset connection, a timeout) cannot tell whether it was
done; retried with the same key, it gets the first answer instead of a second job or render.
The semantics are Stripe's (see backend/idempotency.py, which keeps the keys): a replay carries
`Idempotent-Replayed: true`; the same key with another request is a 422; a retry while the
first request is still being processed is a 409 with `Retry-After: 1`; only 2xx and 4xx
answers are kept. A request without the header is untouched.

A pure ASGI middleware, so that every POST route is covered, those added later included; the
exceptions are the receivers of signed webhooks, which dedupe by their delivery ids.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Any

from fastapi import FastAPI
from sqlalchemy.exc import OperationalError
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import RETRY_AFTER, ApiError, FieldError, error_response
from api.security import authenticate
from backend.idempotency import (
    MAX_KEY_LENGTH,
    IdempotencyStore,
    Outcome,
    StoredAnswer,
    request_fingerprint,
)

log = logging.getLogger("api")

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
PREFIX = "/api/v2/"
# Signed by the provider, deduplicated by their delivery ids: a key there would mean nothing.
EXEMPT_PREFIXES = ("/api/v2/webhooks/",)
# Headers of a kept answer that a replay sends again (content-length is counted anew).
KEPT_HEADERS = frozenset({"content-type", "location", "retry-after", "cache-control"})
# Answers that decided nothing about the request: a retry must really try again. A 5xx is a
# failure on our side; 401 is about the credentials, 408 and 429 about timing.
_NOT_KEPT = frozenset({401, 408, 429})
# POST answers here are small JSON documents; anything larger is sent but not kept.
MAX_KEPT_BODY = 1024 * 1024

_HEADER_BYTES = HEADER.lower().encode()


def applies_to(method: str, path: str) -> bool:
    """Whether a request may carry an Idempotency-Key (and the OpenAPI document says so)."""
    return (
        method == "POST"
        and path.startswith(PREFIX)
        and not any(path.startswith(prefix) for prefix in EXEMPT_PREFIXES)
    )


def kept(status: int) -> bool:
    return 200 <= status < 300 or (400 <= status < 500 and status not in _NOT_KEPT)


class Idempotency:
    """Answers a POST retried with the same Idempotency-Key from the first answer.

    Runs inside the body cap (an oversized body is refused before it is buffered here) and
    outside the routes: it authenticates the caller as the routes do (the key's tenant owns the
    idempotency key; no valid API key, and the request goes on unchanged to be refused with
    401), buffers the body to fingerprint the request, claims the key, hands the body on, and
    keeps the answer before its last byte goes out.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not applies_to(scope["method"], scope["path"]):
            await self.app(scope, receive, send)
            return
        values = [value for name, value in scope["headers"] if name == _HEADER_BYTES]
        if not values:
            await self.app(scope, receive, send)
            return
        try:
            tenant = await authenticate(Request(scope))
        except (ApiError, OperationalError):
            # The route refuses it as it would without the header (401, or 503 for a store
            # that cannot be read); nothing is kept.
            await self.app(scope, receive, send)
            return
        key, problem = _parse_key(values)
        if problem is not None:
            await error_response(
                422,
                problem.msg,
                errors=[problem],
            )(scope, receive, send)
            return

        body = await _read_body(receive)
        if body is None:
            return  # the client went away before sending its body: nothing to answer
        path: str = scope["path"]
        fingerprint = request_fingerprint(
            scope["method"], path, scope.get("query_string", b""), body
        )
        request_line = f"{scope['method']} {path}"
        store: IdempotencyStore = scope["app"].state.idempotency
        try:
            claim = await asyncio.to_thread(store.claim, tenant, key, fingerprint, request_line)
        except OperationalError as exc:
            log.warning("Idempotency keys unavailable: %s", exc.orig)
            await error_response(
                503,
                "The job store is busy or unavailable; nothing was changed, try again shortly",
                {"Retry-After": RETRY_AFTER},
            )(scope, receive, send)
            return

        if claim.outcome is Outcome.REPLAY:
            assert claim.answer is not None
            await _replay(claim.answer, send)
        elif claim.outcome is Outcome.CONFLICT:
            first = claim.first_request or "another request"
            what = f"{first}, with another body or query" if first == request_line else first
            detail = (
                f'{HEADER} "{key}" was first used with a different request ({what}); '
                "send a new key for a new request"
            )
            await error_response(422, detail)(scope, receive, send)
        elif claim.outcome is Outcome.IN_PROGRESS:
            await error_response(
                409,
                f"A request with this {HEADER} is still in progress; retry shortly",
                {"Retry-After": "1"},
            )(scope, receive, send)
        else:
            assert claim.token is not None
            await _Processing(store, tenant, key, claim.token).run(
                self.app, scope, _replaying(body, receive), send
            )


class _Processing:
    """One claimed request: runs it and keeps its answer, or releases the key."""

    def __init__(self, store: IdempotencyStore, tenant: str, key: str, token: str) -> None:
        self.store = store
        self.tenant = tenant
        self.key = key
        self.token = token
        self.status: int | None = None
        self.headers: list[tuple[str, str]] = []
        self.chunks: list[bytes] = []
        self.size = 0
        self.settled = False
        self.client_gone = False

    async def run(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        async def capture(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.status = int(message["status"])
                self.headers = [
                    (name.decode("latin-1").lower(), value.decode("latin-1"))
                    for name, value in message.get("headers", [])
                    if name.decode("latin-1").lower() in KEPT_HEADERS
                ]
            elif message["type"] == "http.response.body":
                chunk = message.get("body", b"")
                self.size += len(chunk)
                if self.size <= MAX_KEPT_BODY:
                    self.chunks.append(chunk)
                if not message.get("more_body", False):
                    # Kept before the client can see the end of it: a retry sent the moment
                    # the answer arrives finds it.
                    await self._settle()
            if self.client_gone:
                return
            try:
                await send(message)
            except OSError:
                # The client went away (uvicorn drops the messages silently; other servers
                # raise): the request is still finished, and its answer kept for the retry.
                self.client_gone = True

        try:
            await app(scope, receive, capture)
        finally:
            if not self.settled:
                # No answer (an exception, which becomes a 500): nothing to keep.
                await self._release()

    async def _settle(self) -> None:
        self.settled = True
        status = self.status or 500
        if not kept(status) or self.size > MAX_KEPT_BODY:
            if self.size > MAX_KEPT_BODY:
                log.warning("An answer of %d bytes was not kept for its idempotency key", self.size)
            await self._release()
            return
        try:
            stored = await asyncio.to_thread(
                self.store.complete,
                self.tenant,
                self.key,
                self.token,
                status,
                self.headers,
                b"".join(self.chunks),
            )
        except OperationalError as exc:
            # The answer still goes out. The claim stays in progress: retries get 409 until
            # its lease ends, then run anew.
            log.warning("Could not keep the answer for an idempotency key: %s", exc.orig)
            return
        if not stored:
            log.warning("An idempotency key's claim was taken over before its answer was kept")

    async def _release(self) -> None:
        self.settled = True
        try:
            await asyncio.to_thread(self.store.release, self.tenant, self.key, self.token)
        except OperationalError as exc:
            log.warning("Could not release an idempotency key: %s", exc.orig)


def _parse_key(values: list[bytes]) -> tuple[str, FieldError | None]:
    loc: list[str | int] = ["header", HEADER]
    if len(values) > 1:
        message = f"Send one {HEADER} header, not {len(values)}"
        return "", FieldError(loc=loc, msg=message, type="value_error")
    # Header bytes are Latin-1 by HTTP's rules; decoding them so cannot fail.
    key = values[0].decode("latin-1").strip()
    if not key:
        message = f"{HEADER} must not be empty"
        return key, FieldError(loc=loc, msg=message, type="string_too_short")
    if len(key) > MAX_KEY_LENGTH:
        message = f"{HEADER} must be at most {MAX_KEY_LENGTH} characters, not {len(key)}"
        return key, FieldError(loc=loc, msg=message, type="string_too_long")
    return key, None


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body (capped by BodyLimit outside); None if the client left."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replaying(body: bytes, receive: Receive) -> Receive:
    """A receive that hands the buffered body to the app, then waits as the server's does (for
    the client to disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _replay(answer: StoredAnswer, send: Send) -> None:
    headers = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in answer.headers]
    headers.append((b"content-length", str(len(answer.body)).encode()))
    headers.append((REPLAYED_HEADER.lower().encode(), b"true"))
    await send({"type": "http.response.start", "status": answer.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": answer.body})


# -- the OpenAPI document --

_PARAMETER: dict[str, Any] = {
    "name": HEADER,
    "in": "header",
    "required": False,
    "description": "Makes the request safe to retry: a retry with the same key (this "
    "tenant's, within 24 hours) and the same request gets the first answer again, with "
    f"`{REPLAYED_HEADER}: true`, and changes nothing. The same key with another request is a "
    "422; while the first request is still being processed, a 409 with `Retry-After`. Answers "
    "with a 5xx status are not kept: a retry really tries again. Use a fresh key (a UUID) "
    "per change you mean to make.",
    "schema": {"type": "string", "minLength": 1, "maxLength": MAX_KEY_LENGTH},
}
_REPLAYED: dict[str, Any] = {
    "description": "`true` when this is the answer kept for the request's Idempotency-Key",
    "schema": {"type": "string", "enum": ["true"]},
}
_IN_PROGRESS = (
    "a request with the same Idempotency-Key is still in progress (retry after `Retry-After` "
    "seconds)"
)
_CONFLICT = "the Idempotency-Key was first used with a different request, or is malformed"
_ERROR_REF = {"$ref": "#/components/schemas/ErrorBody"}


def document_idempotency(app: FastAPI) -> None:
    """Adds the header and its answers to every operation the middleware covers, in the
    OpenAPI document: routes added later are covered with no change to them."""
    make_schema: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            _add_to(make_schema())
        schema: dict[str, Any] = app.openapi_schema  # type: ignore[assignment]
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _add_to(schema: dict[str, Any]) -> None:
    for path, operations in schema.get("paths", {}).items():
        for method, operation in _operations(operations):
            if not applies_to(method.upper(), path):
                continue
            operation.setdefault("parameters", []).append(dict(_PARAMETER))
            responses = operation.setdefault("responses", {})
            for status, response in responses.items():
                if str(status).startswith("2"):
                    response.setdefault("headers", {})[REPLAYED_HEADER] = dict(_REPLAYED)
            _error(responses, "409", _IN_PROGRESS, retry_after=True)
            _error(responses, "422", _CONFLICT)


def _operations(operations: dict[str, Any]) -> Iterable[tuple[str, dict[str, Any]]]:
    return ((method, op) for method, op in operations.items() if isinstance(op, dict))


def _error(responses: dict[str, Any], status: str, why: str, *, retry_after: bool = False) -> None:
    if status in responses:
        response = responses[status]
        response["description"] = f"{response.get('description', '')}; or {why}".lstrip("; ")
    else:
        response = responses[status] = {
            "description": why[0].upper() + why[1:],
            "content": {"application/json": {"schema": dict(_ERROR_REF)}},
        }
    if retry_after:
        response.setdefault("headers", {})["Retry-After"] = {
            "description": "Seconds (sent when the key's first request is still in progress)",
            "schema": {"type": "string"},
        }
