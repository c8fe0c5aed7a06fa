"""The local slideshow render against the ffmpeg command line.

The local render server's `render()` (fetch, Lanczos fit on black, libx264) makes a 10 s
slideshow of the five sample scenes; ffmpeg's CLI makes the same video from the same images on
the same loopback HTTP server. Both outputs are decoded and must agree in frame count, size,
duration and pixel format. One warm-up each, then interleaved runs, medians.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import av
import httpx
import imageio_ffmpeg

from local_replicate.render import RenderJob, frame_counts, image_client, render

from .common import ROOT, Figure, Result, free_port, median, run_bench
from .stack import _spawn, _stop, workdir

SAMPLES = ROOT / "backend" / "samples"
WIDTH, HEIGHT, FPS, SECONDS = 1280, 720, 24, 2.0
RUNS = 5


def ffmpeg_command(urls: list[str], out: Path) -> list[str]:
    """What someone would run by hand for the same video. Each image is scaled and padded once
    and then repeated by the loop filter, as render() reuses one frame per image: the -loop 1
    image input would decode and scale every one of the 240 frames, a weaker baseline."""
    frames = frame_counts([SECONDS] * len(urls), FPS)
    chains = [
        f"[{i}:v]scale={WIDTH}:{HEIGHT}:force_original_aspect_ratio=decrease:flags=lanczos"
        # JPEGs decode full-range; render() converts to limited-range yuv420p
        ":out_range=limited,"
        f"pad={WIDTH}:{HEIGHT}:(ow-iw)/2:(oh-ih)/2:black,setsar=1,format=yuv420p,"
        # a time base of 1/fps makes frame numbers the timestamps, so concat and -r drop nothing
        f"loop=loop={n - 1}:size=1:start=0,settb=1/{FPS},setpts=N[v{i}]"
        for i, n in enumerate(frames)
    ]
    joined = "".join(f"[v{i}]" for i in range(len(urls)))
    graph = ";".join(chains) + f";{joined}concat=n={len(urls)}:v=1:a=0[out]"
    inputs = [arg for url in urls for arg in ("-i", url)]
    return [
        imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
        *inputs,
        "-filter_complex", graph, "-map", "[out]",
        "-c:v", "libx264", "-preset", "ultrafast", "-tune", "stillimage", "-pix_fmt", "yuv420p",
        "-r", str(FPS), str(out),
    ]  # fmt: skip


def run_ours(job: RenderJob, out: Path, client: httpx.Client) -> dict[str, float]:
    cpu0, t0 = time.process_time(), time.perf_counter()
    # With the image client the server keeps for all its renders, as the server calls it.
    render(job, out, threading.Event(), lambda _message: None, client)
    return {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - cpu0}


def run_ffmpeg(command: list[str]) -> dict[str, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(command, check=True)
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {"seconds": seconds, "cpu_seconds": cpu}


def describe(path: Path) -> dict[str, Any]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        return {
            "frames": frames,
            "width": stream.codec_context.width,
            "height": stream.codec_context.height,
            "duration": round((container.duration or 0) / 1_000_000, 3),
            "pix_fmt": stream.codec_context.pix_fmt,
            "codec": stream.codec_context.name,
            "fps": float(stream.average_rate or 0),
            "bytes": path.stat().st_size,
        }


def body(result: Result) -> None:
    raw = result.raw
    with workdir("rendering") as work:
        # A server process of its own, so neither side's process pays for serving the images.
        port = free_port()
        server = _spawn(
            "image-server",
            [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
             "--directory", str(SAMPLES)],
            dict(os.environ), work, port,
        )  # fmt: skip
        client = image_client()
        try:
            images = sorted(SAMPLES.glob("scene-*.jpg"))
            urls = [f"http://127.0.0.1:{port}/{image.name}" for image in images]
            job = RenderJob(urls, [SECONDS] * len(urls), WIDTH, HEIGHT, FPS)
            ours_out, ffmpeg_out = work / "ours.mp4", work / "ffmpeg.mp4"
            command = ffmpeg_command(urls, ffmpeg_out)
            raw["ffmpeg_command"] = subprocess.list2cmdline(command)
            raw["warmup"] = {"ours": run_ours(job, ours_out, client), "ffmpeg": run_ffmpeg(command)}
            raw["ours"], raw["ffmpeg"] = [], []
            for i in range(RUNS):
                # Alternating who goes first, so neither always runs on the other's heels.
                for who in ("ours", "ffmpeg") if i % 2 == 0 else ("ffmpeg", "ours"):
                    if who == "ours":
                        raw["ours"].append(run_ours(job, ours_out, client))
                    else:
                        raw["ffmpeg"].append(run_ffmpeg(command))
        finally:
            client.close()
            _stop(server)
        check = {"ours": describe(ours_out), "ffmpeg": describe(ffmpeg_out)}
        raw["check"] = check
        expected = {
            "frames": round(SECONDS * len(urls) * FPS),
            "width": WIDTH,
            "height": HEIGHT,
            "duration": SECONDS * len(urls),
            "pix_fmt": "yuv420p",
            "codec": "h264",
            "fps": float(FPS),
        }
        for who, seen in check.items():
            wrong = {k: (seen[k], v) for k, v in expected.items() if seen[k] != v}
            if wrong:
                raise RuntimeError(f"{who}'s video is not the one asked for: {wrong}")
        raw["check_passed"] = True
        for path in (ours_out, ffmpeg_out):
            path.unlink()

    def med(who: str, key: str = "seconds") -> float:
        return median([r[key] for r in raw[who]])

    raw["cpu_seconds_median"] = {who: med(who, "cpu_seconds") for who in ("ours", "ffmpeg")}
    result.add(
        Figure(
            "Slideshow render, 5 images x 2 s, 1280x720 at 24 fps",
            "s",
            med("ours"),
            med("ffmpeg"),
            "ratio<=1.2",
            "render() called in-process as the render server calls it, ffmpeg CLI as a "
            "process; both fetch the JPEGs over HTTP from one loopback server and encode "
            f"libx264 ultrafast/stillimage yuv420p; outputs checked alike; median of {RUNS}, "
            "interleaved",
        )
    )


def main() -> None:
    run_bench("rendering", "The local slideshow render against the ffmpeg command line", body)


if __name__ == "__main__":
    main()
