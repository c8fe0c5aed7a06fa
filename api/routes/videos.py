"""Finished videos: with the API key of the job's tenant, or through a signed, expiring link
(a `<video>` tag cannot send a header)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse

from api.deps import ReadsDep, SettingsDep, SignerDep
from api.errors import Forbidden, Unauthorized, error_response, error_responses
from api.security import JobId, authenticate
from backend.auth import signature_valid
from backend.database import JobNotFound

router = APIRouter(tags=["videos"])


_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The MP4 (HTTP Range supported)",
        "content": {"video/mp4": {"schema": {"type": "string", "format": "binary"}}},
    },
    206: {
        "description": "The requested byte range of the MP4",
        "content": {"video/mp4": {"schema": {"type": "string", "format": "binary"}}},
    },
    **error_responses(401, 403, 404, 422, 503),
}
# Either the key, or the signed link's query parameters.
_SECURITY = {"security": [{"ApiKey": []}, {}]}


# HEAD too: players and download tools ask for the size before they fetch.
@router.head(
    "/api/videos/{job_id}/data",
    response_class=FileResponse,
    responses=_RESPONSES,
    openapi_extra=_SECURITY,
    operation_id="head_video",
    summary="The size of the job's video",
)
@router.get(
    "/api/videos/{job_id}/data",
    response_class=FileResponse,
    responses=_RESPONSES,
    openapi_extra=_SECURITY,
    operation_id="get_video",
    summary="The job's video",
)
async def video_data(
    job_id: JobId,
    request: Request,
    reads: ReadsDep,
    signer: SignerDep,
    settings: SettingsDep,
    expires: Annotated[
        int | None,
        Query(ge=0, le=2**63 - 1, description="Signed link: when it expires (Unix time)"),
    ] = None,
    signature: Annotated[
        str | None,
        Query(
            pattern="^[0-9a-fA-F]{64}$",
            description='Signed link: HMAC-SHA256 of "{job_id}.{expires}", hex',
        ),
    ] = None,
) -> Any:
    if "authorization" in request.headers:
        tenant: str | None = await authenticate(request)
    elif expires is not None or signature is not None:
        if (
            expires is None
            or signature is None
            or not signature_valid(signer.secret, job_id, expires, signature)
        ):
            raise Forbidden("This video link is not valid or has expired")
        tenant = None  # the signature stands for the job's own tenant
    else:
        raise Unauthorized(
            "An API key is required (Authorization: Bearer <key>), or use the job's "
            "signed_video_url"
        )
    job = await reads.get(job_id)
    if tenant is not None and job["tenant"] != tenant:
        raise JobNotFound(job_id)
    path = settings.video_path(job_id)
    # A job rendered again keeps serving its last verified video until the new one replaces
    # it; a job that never completed has none.
    if not job["video_url"] or not path.is_file():
        return error_response(404, f"Job {job_id} has no video yet (status {job['status']})")
    return FileResponse(
        path,
        media_type="video/mp4",
        filename=f"job-{job_id}.mp4",
        content_disposition_type="inline",
    )
