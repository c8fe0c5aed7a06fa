"""A job as the API shows it: the seed's response shapes, plus the job and workflow ids, the
budget, and (while a run goes) the run's own progress from its `progress` query."""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter

from api.models import ClosedJob, CompletedJob, JobView, PendingJob, Progress, SceneView
from backend.auth import signed_video_path
from backend.database import FINISHED, JobStatus
from backend.planning import POSTER, PREVIEW


class VideoSigner:
    """Makes the signed, expiring links to finished videos."""

    def __init__(self, secret: bytes, ttl: int) -> None:
        self.secret = secret
        self.ttl = ttl

    def path(self, job_id: int, resource: str = "data") -> str:
        return signed_video_path(self.secret, job_id, self.ttl, resource=resource)


_VIEW: TypeAdapter[Any] = TypeAdapter(JobView)


def job_view(
    job: dict[str, Any], signer: VideoSigner, live: dict[str, Any] | None = None
) -> PendingJob | CompletedJob | ClosedJob:
    """Only the keys of the job's state are set: a response leaves the others out."""
    status = job["status"]
    media = bool(job["media_ready"])
    common: dict[str, Any] = {
        "job_id": job["id"],
        "workflow_id": job["workflow_id"],
        "created_at": job["created_at"],
        "updated_at": job["updated_at"],
        "approved_by": job["approved_by"],
        "scenes_total": job["progress"]["scenes_total"] or len(job.get("scenes", [])),
        "metadata": job["metadata"],
        "callback_url": job["callback_url"],
        "scenes": _scenes(job, media),
        "callbacks": job.get("callbacks", []),
    }
    budget: dict[str, Any] = {}
    if status == JobStatus.COMPLETED:
        if job["max_cost"] is not None:
            budget = {"max_cost": job["max_cost"], "over_budget": job["over_budget"]}
        job_id = job["id"]
        return CompletedJob(
            status=status,
            video_url=job["video_url"],
            signed_video_url=signer.path(job_id),
            poster_url=f"/api/videos/{job_id}/{POSTER}" if media else None,
            preview_url=f"/api/videos/{job_id}/{PREVIEW}" if media else None,
            signed_poster_url=signer.path(job_id, POSTER) if media else None,
            signed_preview_url=signer.path(job_id, PREVIEW) if media else None,
            actual_cost=job["actual_cost"],
            billed_seconds=job["billed_seconds"] or 0.0,
            duration_seconds=job["duration_seconds"] or 0.0,
            **common,
            **budget,
        )
    if status in FINISHED:
        return ClosedJob(status=status, error=job["error_message"], **common)
    # `progress` keeps the seed's four keys; `live` is the run's whole answer.
    progress = dict(job["progress"])
    if live is not None:
        progress |= {
            "current_stage": live["stage"],
            "message": live["message"],
            "scenes_total": live["scenes_total"] or progress["scenes_total"],
            "scenes_completed": live["scenes_completed"],
        }
    if job["max_cost"] is not None:
        budget = {"max_cost": job["max_cost"]}
    return PendingJob(
        status=status,
        approved=job["approved"],
        progress=Progress(**progress),
        live=live,
        estimated_cost=job["estimated_cost"],
        **common,
        **budget,
    )


def _scenes(job: dict[str, Any], media: bool) -> list[SceneView]:
    return [
        SceneView(
            number=scene["number"],
            status=scene["status"],
            prediction_id=scene["prediction_id"],
            prediction_status=scene["prediction_status"],
            billed_seconds=scene["billed_seconds"],
            error=scene["error"],
            thumbnail_url=(
                f"/api/videos/{job['id']}/scenes/{scene['number']}/thumbnail.jpg"
                if media and scene["status"] == "completed"
                else None
            ),
        )
        for scene in job.get("scenes", [])
    ]


def view_bytes(view: PendingJob | CompletedJob | ClosedJob) -> bytes:
    """The view as a response body: already validated when it was made, so the route sends
    these bytes and FastAPI's second validation of its response model (a third of a GET's
    cost) is skipped. The model still documents the answer."""
    return _VIEW.dump_json(view, exclude_unset=True)


def view_json(view: PendingJob | CompletedJob | ClosedJob) -> dict[str, Any]:
    """The view as a response body carries it (for the event stream)."""
    data: dict[str, Any] = _VIEW.dump_python(view, mode="json", exclude_unset=True)
    return data
