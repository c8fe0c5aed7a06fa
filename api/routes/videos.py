"""Finished videos: with the API key of the job's tenant, or through a signed, expiring link
(a `<video>` tag cannot send a header)."""

from __future__ import annotations

from datetime import timedelta
from email.utils import format_datetime
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.responses import FileResponse, RedirectResponse, StreamingResponse

from api.deps import ReadsDep, SettingsDep, SignerDep, StorageDep
from api.errors import Forbidden, Unauthorized, error_response, error_responses
from api.security import JobId, authenticate
from backend.auth import signature_valid
from backend.database import JobNotFound
from backend.planning import FINAL, POSTER, PREVIEW, thumbnail_name
from backend.settings import Settings
from backend.storage import Storage, scene_key, video_key
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
    307: {"description": "With VIDEO_REDIRECTS on object storage: a presigned URL of the file"},
    **error_responses(401, 403, 404, 416, 422, 503),
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
    storage: StorageDep,
    expires: Expires = None,
    signature: Signature = None,
) -> Any:
    job = await _readable_job(job_id, request, reads, signer, expires, signature)
    # A job rendered again keeps serving its last verified video until the new one replaces
    # it; a job that never completed has none.
    missing = f"Job {job_id} has no video yet (status {job['status']})"
    if not job["video_url"]:
        return error_response(404, missing)
    return await _serve(
        request,
        storage,
        settings,
        video_key(job_id, FINAL),
        "video/mp4",
        missing,
        filename=f"job-{job_id}.mp4",
    )


def _image_responses(media_type: str, what: str) -> dict[int | str, dict[str, Any]]:
    return {
        200: {
            "description": what,
            "content": {media_type: {"schema": {"type": "string", "format": "binary"}}},
        },
        206: {
            "description": "The requested byte range",
            "content": {media_type: {"schema": {"type": "string", "format": "binary"}}},
        },
        307: {"description": "With VIDEO_REDIRECTS on object storage: a presigned URL of it"},
        **error_responses(401, 403, 404, 416, 422, 503),
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
    storage: StorageDep,
    expires: Expires = None,
    signature: Signature = None,
) -> Any:
    job = await _readable_job(job_id, request, reads, signer, expires, signature)
    return await _made_from_video(
        request, storage, settings, job, video_key(job_id, POSTER), "image/jpeg", "poster"
    )


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
    storage: StorageDep,
    expires: Expires = None,
    signature: Signature = None,
) -> Any:
    job = await _readable_job(job_id, request, reads, signer, expires, signature)
    return await _made_from_video(
        request, storage, settings, job, video_key(job_id, PREVIEW), "video/mp4", "preview"
    )


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
    storage: StorageDep,
    expires: Expires = None,
    signature: Signature = None,
) -> Any:
    job = await _readable_job(job_id, request, reads, signer, expires, signature)
    key = scene_key(job_id, thumbnail_name(number))
    # A whole-storyboard model made one clip for every scene, and so one thumbnail.
    if await storage.head(key) is None and any(s["number"] == number for s in job["scenes"]):
        key = scene_key(job_id, thumbnail_name(0))
    what = f"thumbnail of scene {number}"
    return await _made_from_video(request, storage, settings, job, key, "image/jpeg", what)


async def _made_from_video(
    request: Request,
    storage: Storage,
    settings: Settings,
    job: dict[str, Any],
    key: str,
    media_type: str,
    what: str,
) -> Any:
    missing = f"Job {job['id']} has no {what} yet (status {job['status']})"
    if not job["media_ready"]:
        return error_response(404, missing)
    return await _serve(request, storage, settings, key, media_type, missing)


async def _serve(
    request: Request,
    storage: Storage,
    settings: Settings,
    key: str,
    media_type: str,
    missing: str,
    filename: str | None = None,
) -> Response:
    """The file at `key`: from this host's disk, streamed from object storage with Range
    support, or (VIDEO_REDIRECTS) a 307 to a presigned URL of it."""
    local = storage.local_path(key)
    if local is not None:
        if not local.is_file():
            return error_response(404, missing)
        return FileResponse(
            local, media_type=media_type, filename=filename, content_disposition_type="inline"
        )
    # A StorageError is a 503 (api/errors.py): the file may well be there.
    stored = await storage.head(key)
    if stored is None:
        return error_response(404, missing)
    if settings.video_redirects:
        url = await storage.presign(key, timedelta(seconds=settings.signed_url_ttl_seconds))
        if url:
            return RedirectResponse(url, status_code=307)
    headers = {
        "Accept-Ranges": "bytes",
        "Content-Disposition": (f'inline; filename="{filename}"' if filename else "inline"),
    }
    if stored.etag:
        headers["ETag"] = stored.etag
    if stored.modified:
        headers["Last-Modified"] = format_datetime(stored.modified, usegmt=True)
    start, end, status = 0, stored.size, 200
    try:
        span = _byte_range(request.headers.get("range", ""), stored.size)
    except ValueError:
        headers["Content-Range"] = f"bytes */{stored.size}"
        return error_response(416, "The requested range is not in the file", headers)
    if span is not None:
        start, end = span
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{stored.size}"
    headers["Content-Length"] = str(end - start)
    if request.method == "HEAD" or end == start:
        return Response(status_code=status, headers=headers, media_type=media_type)
    return StreamingResponse(
        storage.read(key, start, end, stored.etag),
        status_code=status,
        headers=headers,
        media_type=media_type,
    )


def _byte_range(header: str, size: int) -> tuple[int, int] | None:
    """[start, end) of a single `bytes=` range (RFC 9110), or None for the whole file (no
    Range, or a multi-range or malformed one, which the RFC lets a server ignore). Raises
    ValueError when the range is not in the file (416)."""
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash or not (first.isdigit() or last.isdigit()):
        return None
    if not first:  # the last N bytes
        if int(last) == 0 or size == 0:
            raise ValueError("empty suffix range")
        return (max(0, size - int(last)), size)
    start = int(first)
    if start >= size:
        raise ValueError("starts past the end")
    if last and not last.isdigit():
        return None
    end = min(int(last) + 1, size) if last else size
    return None if end <= start else (start, end)


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
