"""Who is calling: the API key in `Authorization: Bearer`, its tenant, and the job routes'
checks that run before FastAPI reads a body."""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import Depends, Path, Request, Response, Security
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.deps import ReadsDep
from api.errors import Unauthorized, UnsupportedMediaType
from backend.database import JobNotFound

# Documents the scheme in OpenAPI; the key itself is checked by `authenticate`, which sends
# 401 with `WWW-Authenticate: Bearer` in every case.
bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="An API key (`rvk_...`) from `render-video keys create`",
)

TENANT_SCOPE_KEY = "renderer.tenant"

# Job ids are 32-bit database keys: anything else is a malformed request, not a lookup.
JobId = Annotated[int, Path(ge=1, le=2**31 - 1, description="The job's id")]


async def authenticate(request: Request) -> str:
    """The tenant of the request's API key; 401 without a valid, unrevoked one."""
    header = request.headers.get("authorization")
    if not header:
        raise Unauthorized("An API key is required: send Authorization: Bearer <key>")
    scheme, _, key = header.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise Unauthorized("The Authorization header must read: Bearer <key>")
    tenant = await request.app.state.keys.tenant_of(key)
    if tenant is None:
        raise Unauthorized("The API key is not valid or has been revoked")
    tenant_name: str = tenant
    return tenant_name


async def caller_tenant(
    request: Request,
    _credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
) -> str:
    """The caller's tenant, found by `ProtectedRoute` before the body was read."""
    tenant = request.scope.get(TENANT_SCOPE_KEY)
    if tenant is None:
        tenant = await authenticate(request)
    return str(tenant)


TenantDep = Annotated[str, Depends(caller_tenant)]


async def owned_job(job_id: JobId, tenant: TenantDep, reads: ReadsDep) -> dict[str, Any]:
    """The job, if it belongs to the caller's tenant; otherwise the same 404 as for a job that
    does not exist, so ids of other tenants' jobs reveal nothing."""
    job = await reads.get(job_id)
    if job["tenant"] != tenant:
        raise JobNotFound(job_id)
    return job


OwnedJob = Annotated[dict[str, Any], Depends(owned_job)]

_BODY_METHODS = {"POST", "PUT", "PATCH"}


def _is_json(content_type: str) -> bool:
    mime = content_type.split(";", 1)[0].strip().lower()
    return mime == "application/json" or (
        mime.startswith("application/") and mime.endswith("+json")
    )


class ProtectedRoute(APIRoute):
    """A route that needs an API key and takes JSON only.

    Checked before FastAPI reads the body, in this order: the key (401), the body's type (415:
    a cross-site form or text/plain post never reaches the route), its syntax (422, however
    deep it nests). FastAPI then uses the JSON parsed here.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            request.scope[TENANT_SCOPE_KEY] = await authenticate(request)
            if request.method in _BODY_METHODS:
                await _read_json(request)
            return await handler(request)

        return guarded


async def _read_json(request: Request) -> None:
    content_type = request.headers.get("content-type")
    if content_type is not None and not _is_json(content_type):
        raise UnsupportedMediaType(
            f"The body must be JSON (Content-Type: application/json), not {content_type[:100]}"
        )
    body = await request.body()
    if not body:
        return
    if content_type is None:
        raise UnsupportedMediaType("Send the body as JSON, with Content-Type: application/json")
    try:
        await request.json()  # kept on the request: FastAPI reads it from there
    except RecursionError:
        reason = "it nests too deeply"
    except json.JSONDecodeError as exc:
        reason = f"{exc.msg} at line {exc.lineno}, column {exc.colno}"
    except ValueError:
        reason = "it is not UTF-8 text"
    else:
        return
    raise RequestValidationError(
        [{"type": "json_invalid", "loc": ("body",), "msg": f"The body is not valid JSON: {reason}"}]
    )
