"""The download and verify activities on their own, with real HTTP and real files."""

from __future__ import annotations

import asyncio
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment
from test_media import make_clip

from activities.media import InvalidVideo, MediaActivities, probe_video
from backend import media
from backend.database import JobStore, make_engine
from backend.provider import ProviderClient
from backend.settings import Settings
from backend.storage import scene_key, storage_for
from workflows.payloads import CheckClipInput, DownloadClipInput

VIDEO_BYTES = b"\x00\x00\x00\x18ftypisom" + b"x" * 5000


class Recorder(BaseHTTPRequestHandler):
    seen: list[dict[str, str]] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        Recorder.seen.append({"path": self.path, "auth": self.headers.get("Authorization", "")})
        self.send_response(200)
        self.send_header("Content-Type", "video/mp4")
        self.send_header("Content-Length", str(len(VIDEO_BYTES)))
        self.end_headers()
        self.wfile.write(VIDEO_BYTES)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def two_origins() -> Iterator[tuple[str, str]]:
    servers = [ThreadingHTTPServer(("127.0.0.1", 0), Recorder) for _ in range(2)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    Recorder.seen = []
    yield tuple(f"http://127.0.0.1:{s.server_address[1]}" for s in servers)  # type: ignore[misc]
    for server in servers:
        server.shutdown()


async def run_download(settings: Settings, url: str, job_id: int) -> Path:
    store = JobStore(make_engine(f"sqlite:///{settings.data_dir / 'jobs.db'}"))
    created = store.create()
    async with httpx.AsyncClient() as http:
        activities = MediaActivities(store, ProviderClient(settings), settings, http)
        result = await ActivityEnvironment().run(
            activities.download_clip,
            DownloadClipInput(job_id=created, number=1, digest="0123456789abcdef", url=url),
        )
    # Downloaded, not yet checked: it waits beside the name it will have once verified.
    return settings.scenes_dir(created) / f".{result.path}.unverified"


async def test_token_goes_only_to_the_provider_origin(
    two_origins: tuple[str, str], tmp_path: Path
) -> None:
    provider, cdn = two_origins
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        data_dir=tmp_path,
        replicate_api_token="r8_secret",
        replicate_base_url=provider,
    )
    path = await run_download(settings, f"{cdn}/out.mp4", 1)
    assert path.read_bytes() == VIDEO_BYTES
    assert path.name == ".001-0123456789abcdef.mp4.unverified"
    await run_download(settings, f"{provider}/files/out.mp4", 2)
    assert Recorder.seen == [
        {"path": "/out.mp4", "auth": ""},
        {"path": "/files/out.mp4", "auth": "Bearer r8_secret"},
    ]


async def test_only_http_urls_are_downloaded(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, data_dir=tmp_path)  # type: ignore[call-arg]
    with pytest.raises(ApplicationError, match="not http") as caught:
        await run_download(settings, "file:///etc/passwd", 1)
    assert caught.value.non_retryable


def test_garbage_behind_mp4_magic_is_rejected(tmp_path: Path) -> None:
    fake = tmp_path / "fake.mp4"
    fake.write_bytes(VIDEO_BYTES)
    with pytest.raises(InvalidVideo, match="could not be decoded"):
        probe_video(fake)


def test_non_mp4_is_rejected(tmp_path: Path) -> None:
    png = tmp_path / "image.mp4"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100)
    with pytest.raises(InvalidVideo, match="not an MP4"):
        probe_video(png)


@pytest.mark.parametrize("where", ["local", "s3"])
async def test_a_check_retried_after_its_clip_was_kept_reads_the_kept_clip(
    where: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """An attempt that kept the clip but whose answer was lost (a worker killed between the
    rename and the reply) is tried again: the retry must pass on the kept clip, not fail the
    scene as missing (which would render, and bill, it once more)."""
    extra = request.getfixturevalue("s3_storage") if where == "s3" else {}
    settings = Settings(_env_file=None, data_dir=tmp_path / "data", **extra)  # type: ignore[call-arg]
    store = JobStore(make_engine(f"sqlite:///{tmp_path / 'jobs.db'}"))
    job_id = store.create()
    storage = storage_for(settings)
    clip = "001-0123456789abcdef.mp4"
    made = make_clip(tmp_path / "clip.mp4", seconds=1.0)
    await storage.push(made, scene_key(job_id, f".{clip}.unverified"))
    async with httpx.AsyncClient() as http:
        activities = MediaActivities(store, ProviderClient(settings), settings, http, storage)
        check = CheckClipInput(job_id=job_id, number=1, clip=clip, min_seconds=0.5)
        first = await ActivityEnvironment().run(activities.check_clip, check)
        again = await ActivityEnvironment().run(activities.check_clip, check)
    assert again == first and first.frames > 0
    assert await storage.head(scene_key(job_id, clip)) is not None
    assert await storage.head(scene_key(job_id, f".{clip}.unverified")) is None


async def test_video_work_runs_at_most_media_threads_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each PyAV call holds its codecs' frame buffers: a worker runs MEDIA_THREADS of them
    at once and the rest wait, however many clip checks Temporal hands it."""
    settings = Settings(_env_file=None, data_dir=tmp_path / "data", media_threads=2)  # type: ignore[call-arg]
    store = JobStore(make_engine(f"sqlite:///{tmp_path / 'jobs.db'}"))
    job_id = store.create()
    storage = storage_for(settings)
    made = make_clip(tmp_path / "clip.mp4", seconds=1.0)
    clips = [f"{n:03d}-0123456789abcdef.mp4" for n in range(1, 7)]
    for clip in clips:
        copy = shutil.copyfile(made, tmp_path / clip)
        await storage.push(copy, scene_key(job_id, f".{clip}.unverified"))

    real_check = media.check_clip
    lock = threading.Lock()
    running = peak = 0
    pair, crowd = threading.Event(), threading.Event()

    def counted_check(*args: Any, **kwargs: Any) -> media.ClipReport:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
            if running == 2:
                pair.set()
            if running > 2:
                crowd.set()
        try:
            # The first call waits for a second (however slow the machine), then each stays in
            # until a third joins, or a second has passed: without the bound all six are in.
            pair.wait(60)
            crowd.wait(1.0)
            return real_check(*args, **kwargs)
        finally:
            with lock:
                running -= 1

    monkeypatch.setattr(media, "check_clip", counted_check)
    async with httpx.AsyncClient() as http:
        activities = MediaActivities(store, ProviderClient(settings), settings, http, storage)
        checks = [
            ActivityEnvironment().run(
                activities.check_clip,
                CheckClipInput(job_id=job_id, number=n, clip=clip, min_seconds=0.5),
            )
            for n, clip in enumerate(clips, start=1)
        ]
        reports = await asyncio.gather(*checks)
    assert all(report.frames > 0 for report in reports)
    assert peak == 2
