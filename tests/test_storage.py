"""Videos in object storage (VIDEO_STORAGE_URL=s3://...), against moto in server mode on
loopback: what a render leaves in the bucket, how the API serves it, and what a worker killed
mid-upload leaves (nothing)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from processes import MotoServer
from support import Stack, running_stack
from temporalio.testing import WorkflowEnvironment

from api.main import create_app
from local_replicate.testing import RunningServer
from local_replicate.threaded import UvicornThread


@pytest.fixture
async def s3_stack(
    temporal_env: WorkflowEnvironment,
    renderer: RunningServer,
    tmp_path: Path,
    jobs_db: str,
    s3_storage: dict[str, str],
) -> AsyncIterator[Stack]:
    async with running_stack(
        temporal_env,
        renderer,
        tmp_path / "data",
        database_url=jobs_db,
        replicate_model="local/i2v",
        **s3_storage,
    ) as stack:
        yield stack


def bucket_of(stack: Stack) -> tuple[str, str]:
    url = stack.settings.video_storage_url
    assert url is not None
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    return bucket, prefix


def scene_prompts(stack: Stack, count: int) -> list[dict[str, Any]]:
    scenes = stack.sample_scenes(count=count, seconds=1.0)
    for number, scene in enumerate(scenes, start=1):
        scene["prompt"] = f"scene {number}"
    return scenes


async def render(stack: Stack, job_id: int) -> dict[str, Any]:
    response = await stack.api.post(f"/api/v2/jobs/{job_id}/approve")
    assert response.status_code == 200, response.text
    return await stack.wait_closed(job_id)


async def test_a_render_on_s3_keeps_video_poster_and_clips_in_the_bucket_and_serves_ranges(
    s3_stack: Stack, s3_server: MotoServer
) -> None:
    stack = s3_stack
    bucket, prefix = bucket_of(stack)
    job_id = await stack.create_job(scene_prompts(stack, 2))
    job = await render(stack, job_id)
    assert job["status"] == "completed", job["error_message"]

    keys = s3_server.keys(bucket, f"{prefix}/videos/{job_id}/")
    names = [key.removeprefix(f"{prefix}/videos/{job_id}/") for key in keys]
    assert {"final.mp4", "poster.jpg", "preview.mp4", "scenes/001.jpg", "scenes/002.jpg"} <= set(
        names
    ), names
    clips = [n for n in names if n.startswith("scenes/") and n.endswith(".mp4")]
    assert [c[:10] for c in sorted(clips)] == ["scenes/001", "scenes/002"], names
    # Nothing unverified or half-made is left as an object, and nothing on the worker's disk.
    assert not [n for n in names if n.rsplit("/", 1)[-1].startswith(".")], names
    assert not (stack.settings.data_dir / "videos" / str(job_id)).exists()
    assert not list((stack.settings.data_dir / "scratch").glob("*/*"))

    stored = s3_server.client().get_object(Bucket=bucket, Key=f"{prefix}/videos/{job_id}/final.mp4")
    video = stored["Body"].read()
    assert video[4:8] == b"ftyp"

    whole = await stack.api.get(f"/api/videos/{job_id}/data")
    assert whole.status_code == 200 and whole.content == video
    assert whole.headers["content-type"] == "video/mp4"
    assert whole.headers["accept-ranges"] == "bytes"
    head = await stack.api.head(f"/api/videos/{job_id}/data")
    assert head.status_code == 200 and int(head.headers["content-length"]) == len(video)
    part = await stack.api.get(f"/api/videos/{job_id}/data", headers={"Range": "bytes=100-1123"})
    assert part.status_code == 206
    assert part.content == video[100:1124]
    assert part.headers["content-range"] == f"bytes 100-1123/{len(video)}"
    tail = await stack.api.get(f"/api/videos/{job_id}/data", headers={"Range": "bytes=-16"})
    assert tail.status_code == 206 and tail.content == video[-16:]
    past = await stack.api.get(
        f"/api/videos/{job_id}/data", headers={"Range": f"bytes={len(video)}-"}
    )
    assert past.status_code == 416 and past.headers["content-range"] == f"bytes */{len(video)}"

    # The signed link a <video> tag uses, and the images, come from the bucket too.
    view = (await stack.api.get(f"/api/v2/jobs/{job_id}")).json()
    async with httpx.AsyncClient(base_url=stack.base_url) as browser:
        linked = await browser.get(view["signed_video_url"])
        assert linked.status_code == 200 and linked.content == video
    poster = await stack.api.get(f"/api/videos/{job_id}/poster.jpg")
    assert poster.status_code == 200 and poster.content[:2] == b"\xff\xd8"
    thumb = await stack.api.get(f"/api/videos/{job_id}/scenes/2/thumbnail.jpg")
    assert thumb.status_code == 200 and thumb.content[:2] == b"\xff\xd8"

    # Another API (its own disk, the same bucket), told to redirect: a 307 to a presigned
    # URL that serves the same bytes, ranges included, without a key.
    other = stack.settings.model_copy(
        update={"data_dir": stack.settings.data_dir.parent / "b", "video_redirects": True}
    )
    with UvicornThread(create_app(other)) as server:
        async with httpx.AsyncClient(base_url=server.base_url, headers=stack.api.headers) as api:
            moved = await api.get(f"/api/videos/{job_id}/data")
            assert moved.status_code == 307, moved.text
        location = moved.headers["location"]
        assert location.startswith(s3_server.endpoint) and "X-Amz-Signature=" in location
        async with httpx.AsyncClient() as anyone:
            fetched = await anyone.get(location)
            assert fetched.status_code == 200 and fetched.content == video
            ranged = await anyone.get(location, headers={"Range": "bytes=0-99"})
            assert ranged.status_code == 206 and ranged.content == video[:100]


async def test_an_edited_scene_on_s3_renders_one_prediction_and_its_old_clip_is_dropped(
    s3_stack: Stack, s3_server: MotoServer
) -> None:
    stack = s3_stack
    bucket, prefix = bucket_of(stack)
    scenes = scene_prompts(stack, 3)
    job_id = await stack.create_job(scenes)
    assert (await render(stack, job_id))["status"] == "completed"
    clips_key = f"{prefix}/videos/{job_id}/scenes/"
    before = [k for k in s3_server.keys(bucket, clips_key) if k.endswith(".mp4")]
    assert len(before) == 3 and stack.renderer.stats()["creates"] == 3

    # The worker that renders again has none of the clips on its disk: the plan reads the
    # bucket, and the stitch pulls the kept clips from it.
    scenes[1]["prompt"] = "scene 2, another take"
    put = await stack.api.put(f"/api/v2/jobs/{job_id}/storyboard", json=scenes)
    assert put.status_code == 200, put.text
    job = await render(stack, job_id)
    assert job["status"] == "completed", job["error_message"]
    assert stack.renderer.stats()["creates"] == 4
    after = [k for k in s3_server.keys(bucket, clips_key) if k.endswith(".mp4")]
    assert len(after) == 3
    assert [k for k in before if k not in after] == [k for k in before if "/002-" in k]
    video = await stack.api.get(f"/api/videos/{job_id}/data")
    assert video.status_code == 200 and video.content[4:8] == b"ftyp"


async def test_a_missing_bucket_fails_the_job_before_any_prediction_and_readyz_names_storage(
    temporal_env: WorkflowEnvironment,
    renderer: RunningServer,
    tmp_path: Path,
    jobs_db: str,
    s3_storage: dict[str, str],
) -> None:
    gone = {**s3_storage, "video_storage_url": "s3://no-such-bucket-here/renders"}
    async with running_stack(
        temporal_env, renderer, tmp_path, database_url=jobs_db, **gone
    ) as stack:
        ready = await stack.api.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["checks"]["storage"].startswith("failed")
        assert ready.json()["checks"]["database"] == "ok"
        job_id = await stack.create_job(stack.sample_scenes(count=2))
        job = await render(stack, job_id)
        assert job["status"] == "failed"
        assert "NoSuchBucket" in job["error_message"]
        assert "no prediction was created" in job["error_message"]
        assert "127.0.0.1" not in job["error_message"]
        assert renderer.stats()["creates"] == 0


class ThrottledProxy:
    """A TCP proxy on loopback that passes at most `rate` bytes a second each way on each
    connection: an upload through it lasts long enough to kill its process mid-way."""

    def __init__(self, target_port: int, rate: int) -> None:
        self.target_port = target_port
        self.rate = rate
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        chunk = max(1024, self.rate // 20)
        try:
            while data := source.recv(chunk):
                sink.sendall(data)
                time.sleep(len(data) / self.rate)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.closed = True
        self.listener.close()


PUSH = """
import asyncio, sys
from pathlib import Path
from backend.storage import S3Storage
storage = S3Storage(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
asyncio.run(storage.push(Path(sys.argv[4]), sys.argv[5]))
print("pushed")
"""


def test_a_process_killed_mid_upload_leaves_no_object_and_the_next_upload_is_whole(
    s3_server: MotoServer, tmp_path: Path
) -> None:
    """What every push of a worker (clips, the stitched video, posters) relies on: the
    object appears only when its multipart upload completes."""
    bucket = s3_server.new_bucket()
    url = f"s3://{bucket}/renders"
    key = "videos/7/final.mp4"
    video = tmp_path / "final.mp4"
    video.write_bytes(os.urandom(48 * 1024 * 1024))
    proxy = ThrottledProxy(s3_server.port, rate=2 * 1024 * 1024)
    env = {**os.environ, **MotoServer.ENV}
    args = [sys.executable, "-c", PUSH, url, f"http://127.0.0.1:{proxy.port}", str(tmp_path)]
    try:
        pusher = subprocess.Popen([*args, str(video), key], env=env)
        s3 = s3_server.client()

        def a_part_is_in() -> bool:
            uploads = s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
            return any(
                s3.list_parts(Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"]).get("Parts")
                for u in uploads
            )

        deadline = time.monotonic() + 60
        while not a_part_is_in():
            assert time.monotonic() < deadline, "no part of the upload arrived within 60 s"
            time.sleep(0.02)
        assert pusher.poll() is None, "the upload finished before it could be killed"
        pusher.send_signal(signal.SIGKILL)
        pusher.wait(timeout=10)
        assert s3_server.keys(bucket) == []

        # A new worker pushes the file again: one whole object, the bytes it was given.
        copy = tmp_path / "again.mp4"
        copy.write_bytes(video.read_bytes())
        done = subprocess.run(
            [sys.executable, "-c", PUSH, url, s3_server.endpoint, str(tmp_path), str(copy), key],
            env=env,
            capture_output=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr.decode()
        assert s3_server.keys(bucket) == [f"renders/{key}"]
        stored = s3.get_object(Bucket=bucket, Key=f"renders/{key}")["Body"].read()
        assert stored == video.read_bytes()
        assert not copy.exists()  # a push leaves no local copy behind
    finally:
        proxy.close()
