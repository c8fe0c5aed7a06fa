"""Running more than one deployment, API process or worker: prefixes, readiness, shutdown."""

from __future__ import annotations

import asyncio
from pathlib import Path

from support import running_stack
from temporalio.testing import WorkflowEnvironment

from local_replicate.testing import RunningServer


async def test_two_deployments_share_a_namespace_through_their_prefixes(
    temporal_env: WorkflowEnvironment, renderer: RunningServer, tmp_path: Path
) -> None:
    """Two deployments with their own job stores (so the same job ids) and the same
    TASK_QUEUE render at once on one Temporal namespace, each its own storyboard."""

    def deployment(name: str):  # noqa: ANN202 - running_stack's context manager
        return running_stack(
            temporal_env,
            renderer,
            tmp_path / name,
            database_url=f"sqlite:///{tmp_path / f'{name}.db'}",
            workflow_id_prefix=f"{name}-",
            task_queue="render-video",
        )

    async with deployment("team-a") as a, deployment("team-b") as b:
        # The prefix keeps the task queues apart too: a worker that took the other
        # deployment's tasks would read the wrong job store.
        assert (a.settings.task_queue, b.settings.task_queue) == (
            "team-a-render-video",
            "team-b-render-video",
        )
        job_a = await a.create_job(a.sample_scenes(count=2, seconds=1.0))
        job_b = await b.create_job(b.sample_scenes(count=3, seconds=1.0))
        assert job_a == job_b
        approved = await asyncio.gather(
            a.api.post(f"/api/v2/jobs/{job_a}/approve"), b.api.post(f"/api/v2/jobs/{job_b}/approve")
        )
        assert [r.json()["workflow_id"] for r in approved] == [
            f"team-a-render-video-{job_a}",
            f"team-b-render-video-{job_b}",
        ]
        done_a, done_b = await asyncio.gather(a.wait_closed(job_a), b.wait_closed(job_b))
        assert (done_a["status"], done_b["status"]) == ("completed", "completed")
        # Each rendered its own storyboard: 2 s and 3 s of video, 2 and 3 scenes.
        views = [
            (await a.api.get(f"/api/v2/jobs/{job_a}")).json(),
            (await b.api.get(f"/api/v2/jobs/{job_b}")).json(),
        ]
        assert [v["scenes_total"] for v in views] == [2, 3]
        for stack, job_id, view in ((a, job_a, views[0]), (b, job_b, views[1])):
            handle = stack.temporal.get_workflow_handle(view["workflow_id"])
            described = await handle.describe()
            assert described.task_queue == stack.settings.task_queue
            video = await stack.api.get(f"/api/videos/{job_id}/data")
            assert video.status_code == 200
        videos = [
            (await a.api.get(f"/api/videos/{job_a}/data")).content,
            (await b.api.get(f"/api/videos/{job_b}/data")).content,
        ]
        assert videos[0] != videos[1]
