"""Finished videos: with the API key of the job's tenant, or through a signed, expiring link
(a `<video>` tag cannot send a header)."""

from __future__ import annotations

from pathlib import Path as Path_
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import FileResponse

from api.deps import ReadsDep, SettingsDep, SignerDep
from api.errors import Forbidden, Unauthorized, error_response, error_responses
from api.security import JobId, authenticate
from backend.auth import signature_valid
from backend.database import JobNotFound
from backend.planning import POSTER, PREVIEW, thumbnail_name
from backend.storyboard import MAX_SCENES

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
Expires = Annotated[
    int | None,
    Query(ge=0, le=2**63 - 1, description="Signed link: when it expires (Unix time)"),
]
Signature = Annotated[
    str | None,
    Query(
        pattern="^[0-9a-fA-F]{64}$",
        description='Signed link: HMAC-SHA256 of "{job_id}.{expires}", hex',
    ),
]


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
    expires: Expires = None,
    signature: Signature = None,
) -> Any:
    job = await _readable_job(job_id, request, reads, signer, expires, signature)
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


def _image_responses(media_type: str, what: str) -> dict[int | str, dict[str, Any]]:
    return {
        200: {
            "description": what,
            "content": {media_type: {"schema": {"type": "string", "format": "binary"}}},
        },
        **error_responses(401, 403, 404, 422, 503),
    }


@router.get(
    f"/api/videos/{{job_id}}/{POSTER}",
    response_class=FileResponse,
    responses=_image_responses("image/jpeg", "A representative frame of the video"),
    openapi_extra=_SECURITY,
    operation_id="get_poster",
    summary="The video's poster",
)
async def poster(
    job_id: JobId,
    request: Request,
    reads: ReadsDep,
    signer: SignerDep,
    settings: SettingsDep,
    expires: Expires = None,
    signature: Signature = None,
) -> Any:
    job = await _readable_job(job_id, request, reads, signer, expires, signature)
    return _made_from_video(job, settings.video_dir(job_id) / POSTER, "image/jpeg", "poster")


@router.get(
    f"/api/videos/{{job_id}}/{PREVIEW}",
    response_class=FileResponse,
    responses=_image_responses("video/mp4", "A short MP4 of at most 360p, about 1 MB"),
    openapi_extra=_SECURITY,
    operation_id="get_preview",
    summary="The video's preview",
)
async def preview(
    job_id: JobId,
    request: Request,
    reads: ReadsDep,
    signer: SignerDep,
    settings: SettingsDep,
    expires: Expires = None,
    signature: Signature = None,
) -> Any:
    job = await _readable_job(job_id, request, reads, signer, expires, signature)
    return _made_from_video(job, settings.video_dir(job_id) / PREVIEW, "video/mp4", "preview")


@router.get(
    "/api/videos/{job_id}/scenes/{number}/thumbnail.jpg",
    response_class=FileResponse,
    responses=_image_responses("image/jpeg", "A frame of the scene's clip"),
    openapi_extra=_SECURITY,
    operation_id="get_scene_thumbnail",
    summary="A scene's thumbnail",
)
async def scene_thumbnail(
    job_id: JobId,
    number: Annotated[int, Path(ge=1, le=MAX_SCENES, description="The scene, from 1")],
    request: Request,
    reads: ReadsDep,
    signer: SignerDep,
    settings: SettingsDep,
    expires: Expires = None,
    signature: Signature = None,
) -> Any:
    job = await _readable_job(job_id, request, reads, signer, expires, signature)
    scenes = settings.scenes_dir(job_id)
    # A whole-storyboard model made one clip for every scene, and so one thumbnail.
    path = scenes / thumbnail_name(number)
    if not path.is_file() and any(s["number"] == number for s in job["scenes"]):
        path = scenes / thumbnail_name(0)
    return _made_from_video(job, path, "image/jpeg", f"thumbnail of scene {number}")


def _made_from_video(job: dict[str, Any], path: Path_, media_type: str, what: str) -> Any:
    if not job["media_ready"] or not path.is_file():
        return error_response(404, f"Job {job['id']} has no {what} yet (status {job['status']})")
    return FileResponse(path, media_type=media_type, content_disposition_type="inline")


async def _readable_job(
    job_id: int,
    request: Request,
    reads: Any,
    signer: Any,
    expires: int | None,
    signature: str | None,
) -> dict[str, Any]:
    """The job, if the caller may read its files: with a key of its tenant, or through a
    valid, unexpired signed link (which stands for the job's own tenant)."""
    if "authorization" in request.headers:
        tenant: str | None = await authenticate(request)
    elif expires is not None or signature is not None:
        if (
            expires is None
            or signature is None
            or not signature_valid(signer.secret, job_id, expires, signature)
        ):
            raise Forbidden("This video link is not valid or has expired")
        tenant = None
    else:
        raise Unauthorized(
            "An API key is required (Authorization: Bearer <key>), or use the job's "
            "signed_video_url"
        )
    job: dict[str, Any] = await reads.get(job_id)
    if tenant is not None and job["tenant"] != tenant:
        raise JobNotFound(job_id)
    return job
