"""Downloading a 1 GiB MP4 against curl.

The product's `download_video` activity runs in a worker process of its own (bench/download_worker)
under a real Temporal dev server, fetching a real 1 GiB MP4 from a sendfile server on loopback;
curl fetches the same URL into the same filesystem. Interleaved, medians of three each.
"""

from __future__ import annotations

import asyncio
import filecmp
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from fractions import Fraction
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import av
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client

from activities.media import probe_video
from backend.database import JobStore, make_engine
from workflows.payloads import DownloadedVideo, DownloadVideoInput

from .common import BENCH_DIR, Figure, Result, RssSampler, free_port, median, run_bench
from .download_worker import WORKFLOW
from .stack import _spawn, _stop, _wait_worker_polling, temporal_server, workdir

CURL = "/usr/bin/curl"
VIDEO = BENCH_DIR / ".cache" / "download-1gib.mp4"
SIZE = 1024 * 1024 * 1024
TASK_QUEUE = "bench-download"
RUNS = 3
MB = 1e6


def make_video(path: Path) -> None:
    """A real, fully decodable H.264 MP4 of just under 1 GiB, in seconds: a dozen frames of noise
    are encoded losslessly and all-intra (each ~2.2 MB, every one a keyframe), then their packets
    are muxed over and over with fresh timestamps, so nothing is encoded twice."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with av.open(str(tmp), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = 1280, 720, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 24)
        stream.codec_context.gop_size = 1
        stream.options = {"preset": "ultrafast", "qp": "0"}
        packets: list[bytes] = []
        for i in range(12):
            frame = av.VideoFrame(1280, 720, "yuv420p")
            for plane in frame.planes:
                plane.update(os.urandom(plane.buffer_size))
            frame.pts = i
            packets += [bytes(p) for p in stream.encode(frame)]
        packets += [bytes(p) for p in stream.encode(None)]
        total = n = 0
        # Headroom for the moov index, which grows ~20 bytes a frame.
        while total + len(packets[n % len(packets)]) < SIZE - 64 * 1024:
            data = packets[n % len(packets)]
            packet = av.Packet(data)
            packet.pts = packet.dts = n
            packet.time_base = stream.codec_context.time_base
            packet.stream = stream
            packet.is_keyframe = True
            container.mux(packet)
            total += len(data)
            n += 1
    os.replace(tmp, path)


def cached_video() -> Path:
    if not VIDEO.is_file() or not SIZE - 8 * 1024**2 < VIDEO.stat().st_size <= SIZE:
        t0 = time.monotonic()
        make_video(VIDEO)
        print(f"   made {VIDEO.name} in {time.monotonic() - t0:.1f} s", flush=True)
    return VIDEO


class _SendfileHandler(BaseHTTPRequestHandler):
    """The whole file with a Content-Length, copied by the kernel: the server costs next to no
    CPU, so what is measured is the client."""

    protocol_version = "HTTP/1.1"
    file: Path

    def do_GET(self) -> None:
        with self.file.open("rb") as f:
            self.send_response(200)
            self.send_header("Content-Type", "video/mp4")
            self.send_header("Content-Length", str(os.fstat(f.fileno()).st_size))
            self.end_headers()
            self.wfile.flush()
            self.connection.sendfile(f)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def sendfile_server(file: Path) -> Iterator[str]:
    handler = type("Handler", (_SendfileHandler,), {"file": file})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/video.mp4"
    finally:
        server.shutdown()
        server.server_close()


def curl(url: str, out: Path | str) -> dict[str, Any]:
    """Wall time of the whole curl process (as ours counts its whole activity), its CPU time, and
    its peak RSS sampled from /proc (ru_maxrss would count the pages of the forking parent)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [CURL, "-s", "-o", str(out), "-w", "%{time_total} %{size_download}", url],
        stdout=subprocess.PIPE,
    )
    with RssSampler(proc.pid, every=0.02) as rss:
        written, _ = proc.communicate()
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"curl {url} exited with {proc.returncode}")
    curl_total, size = written.decode().split()
    if out != "/dev/null":
        Path(out).unlink()
    return {
        "seconds": seconds,
        "curl_time_total": float(curl_total),
        "size": int(size),
        "mb_s": int(size) / seconds / MB,
        "peak_rss_kib": rss.peak_sampled_kib,
        # Only curl is reaped meanwhile; the other children run on.
        "cpu_seconds": after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime,
    }


class Ours:
    """Runs the download workflow against the benchmark worker, one fresh job per download."""

    def __init__(self, client: Client, store: JobStore, worker_pid: int, timings: Path) -> None:
        self.client, self.store, self.worker_pid, self.timings = client, store, worker_pid, timings

    async def download(self, url: str, *, compare: Path | None = None) -> dict[str, Any]:
        job_id = await asyncio.to_thread(self.store.create)
        with RssSampler(self.worker_pid, every=0.05) as rss:
            handle = await self.client.start_workflow(
                WORKFLOW,
                DownloadVideoInput(job_id=job_id, url=url),
                id=f"bench-download-{job_id}",
                task_queue=TASK_QUEUE,
                result_type=DownloadedVideo,
            )
            done = await handle.result()
        # Speed means nothing if the bytes are wrong: one download is compared in full.
        if compare is not None and not filecmp.cmp(compare, done.path, shallow=False):
            raise RuntimeError(f"{done.path} differs from {compare}")
        Path(done.path).unlink()
        times = {}
        async for event in handle.fetch_history_events():
            if event.event_type in (
                EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED,
                EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED,
            ):
                times[event.event_type] = event.event_time.ToDatetime()
        history = (
            times[EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED]
            - times[EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED]
        ).total_seconds()
        inside = next(
            line
            for line in map(json.loads, self.timings.read_text().splitlines())
            if line["job_id"] == job_id
        )
        return {
            "seconds": inside["seconds"],
            "cpu_seconds": inside["cpu_seconds"],
            "minor_faults": inside["minor_faults"],
            "history_seconds": history,
            "size": done.size_bytes,
            "attempt": done.attempt,
            "mb_s": done.size_bytes / inside["seconds"] / MB,
            "rss_growth_kib": inside["hwm_kib"] - inside["rss_before_kib"],
            "rss_growth_sampled_kib": rss.peak_sampled_kib - rss.start_kib,
        }


async def measure(
    ours: Ours, url: str, render_url: str, scratch: Path, raw: dict[str, Any]
) -> None:
    # The server's ceiling, with no disk behind the client; also brings the file into the
    # page cache, so no run reads the disk.
    raw["ceiling"] = [curl(url, "/dev/null") for _ in range(2)]
    raw["ours_warmup"] = await ours.download(url, compare=VIDEO)
    raw["ours"], raw["curl"] = [], []
    for i in range(RUNS):
        # Alternating who goes first, so neither always inherits the other's dirty pages.
        for who in ("ours", "curl") if i % 2 == 0 else ("curl", "ours"):
            if who == "ours":
                raw["ours"].append(await ours.download(url))
            else:
                raw["curl"].append(curl(url, scratch / "curl.mp4"))
    raw["verify"] = _verify(VIDEO)
    raw["render_server_ours"], raw["render_server_curl"] = [], []
    for _ in range(2):
        raw["render_server_ours"].append(await ours.download(render_url))
        raw["render_server_curl"].append(curl(render_url, scratch / "curl.mp4"))


def _verify(path: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    info = probe_video(path)
    return {"seconds": time.perf_counter() - t0, "frames": info.frames, "width": info.width}


def body(result: Result) -> None:
    video = cached_video()
    size = video.stat().st_size
    raw = result.raw
    raw["file"] = {"path": str(video.relative_to(BENCH_DIR.parent)), "bytes": size}
    with ExitStack() as stack:
        work = stack.enter_context(workdir("download"))
        stack.callback(shutil.rmtree, work / "data" / "videos", ignore_errors=True)
        address = stack.enter_context(temporal_server(work))
        url = stack.enter_context(sendfile_server(video))

        # The render server serves data_dir/{id}.mp4; a hard link there costs no copy.
        served = work / "render-server"
        served.mkdir()
        os.link(video, served / "bench1gib.mp4")
        stack.callback((served / "bench1gib.mp4").unlink, missing_ok=True)
        render_port = free_port()
        render = _spawn(
            "render-server",
            [
                sys.executable,
                "-m",
                "local_replicate",
                "--port",
                str(render_port),
                "--data-dir",
                str(served),
            ],
            dict(os.environ),
            work,
            render_port,
        )
        stack.callback(_stop, render)
        render_url = f"http://127.0.0.1:{render_port}/files/bench1gib.mp4"

        timings = work / "timings.jsonl"
        env = dict(
            os.environ,
            DATA_DIR=str(work / "data"),
            TEMPORAL_ADDRESS=address,
            TASK_QUEUE=TASK_QUEUE,
            LOCAL_RENDER_PORT=str(render_port),
            BENCH_TIMINGS=str(timings),
            PYTHONUNBUFFERED="1",
        )
        env.pop("REPLICATE_API_TOKEN", None)
        env.pop("DATABASE_URL", None)
        worker = _spawn("worker", [sys.executable, "-m", "bench.download_worker"], env, work, None)
        stack.callback(_stop, worker)
        _wait_worker_polling(work / "worker.log", worker)

        async def run() -> None:
            client = await Client.connect(address)
            store = JobStore(make_engine(f"sqlite:///{work / 'data' / 'jobs.db'}"))
            await measure(Ours(client, store, worker.pid, timings), url, render_url, work, raw)

        asyncio.run(run())

    for key in ("ours_warmup", "ours", "render_server_ours"):
        for run_ in [raw[key]] if key == "ours_warmup" else raw[key]:
            if run_["size"] != size or run_["attempt"] != 1:
                raise RuntimeError(f"{key}: got {run_['size']} of {size} bytes, {run_}")
    for run_ in raw["curl"] + raw["render_server_curl"]:
        if run_["size"] != size:
            raise RuntimeError(f"curl got {run_['size']} of {size} bytes")

    def mbs(runs: list[dict[str, Any]]) -> float:
        return median([r["mb_s"] for r in runs])

    every_ours = [raw["ours_warmup"], *raw["ours"], *raw["render_server_ours"]]
    growth = max(r["rss_growth_kib"] for r in every_ours) * 1024 / MB
    curl_rss = max(r["peak_rss_kib"] for r in raw["curl"]) * 1024 / MB
    verify = raw["verify"]
    result.add(
        Figure(
            "Download throughput, 1 GiB MP4 over loopback",
            "MB/s",
            mbs(raw["ours"]),
            mbs(raw["curl"]),
            "ratio>=0.9",
            "download_video in its own Temporal worker, timed inside the worker around the "
            "activity; curl -o timed as a whole process; same sendfile server, same "
            f"filesystem; median of {RUNS}, interleaved",
        ),
        Figure(
            "Worker peak RSS growth during a download",
            "MB",
            growth,
            None,
            "ours<=50",
            f"VmHWM (reset per download) minus VmRSS before, worst of {len(every_ours)}; "
            f"curl's whole peak RSS: {curl_rss:.0f} MB",
        ),
        Figure(
            "Sendfile server ceiling (curl to /dev/null)",
            "MB/s",
            mbs(raw["ceiling"]),
            note="what the server and loopback give a client that writes nothing",
        ),
        Figure(
            "Download throughput via the local render server's /files/{id}.mp4",
            "MB/s",
            mbs(raw["render_server_ours"]),
            mbs(raw["render_server_curl"]),
            note="the server streams 64 KiB reads, so both clients wait on it; median of 2",
        ),
        Figure(
            "verify_video (probe_video, full decode) of the 1 GiB MP4",
            "s",
            verify["seconds"],
            note=f"{verify['frames']} lossless 1280x720 frames of noise, ~2.2 MB each",
        ),
    )


def main() -> None:
    run_bench("download", "Downloading a 1 GiB MP4 against curl", body)


if __name__ == "__main__":
    main()
