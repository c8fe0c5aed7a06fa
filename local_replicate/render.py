"""Input validation, image fetching and MP4 slideshow encoding (runs in worker threads)."""

from __future__ import annotations

import base64
import io
import math
import os
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import httpx
from PIL import Image, ImageOps

DEFAULT_DURATION = 2.0
DEFAULT_WIDTH = 1280
DEFAULT_HEIGHT = 720
DEFAULT_FPS = 24
MAX_SIDE = 3840
MAX_TOTAL_SECONDS = 3600.0
MAX_IMAGE_BYTES = 50 * 1024 * 1024
FETCH_TIMEOUT = 30.0


class InputError(ValueError):
    """Model input the render cannot accept; becomes the prediction's `error`."""


class RenderCanceled(Exception):
    """The prediction was canceled while its render was running."""


@dataclass(frozen=True)
class RenderJob:
    images: list[str]
    durations: list[float]
    width: int
    height: int
    fps: int


def _is_number(value: Any) -> bool:
    # bool is an int subclass, but `true` is not a duration
    return isinstance(value, int | float) and not isinstance(value, bool)


def _int_field(inp: dict[str, Any], name: str, default: int, lo: int, hi: int) -> int:
    value = inp.get(name)
    if value is None:
        return default
    if not _is_number(value) or int(value) != value:
        raise InputError(f"{name}: must be an integer")
    value = int(value)
    if not lo <= value <= hi:
        raise InputError(f"{name}: must be between {lo} and {hi}")
    return value


def parse_input(inp: dict[str, Any]) -> RenderJob:
    """Validate model input the way the model would, raising InputError with a readable message."""
    images = inp.get("images")
    if not isinstance(images, list) or not images:
        raise InputError("images: required, a non-empty list of URLs")
    for i, url in enumerate(images):
        if not isinstance(url, str) or not url.startswith(("http://", "https://", "data:")):
            raise InputError(f"images[{i}]: must be an http(s) or data: URL")

    durations_in = inp.get("durations")
    if durations_in is None:
        durations = [DEFAULT_DURATION] * len(images)
    else:
        if not isinstance(durations_in, list):
            raise InputError("durations: must be a list of seconds, one per image")
        if len(durations_in) != len(images):
            raise InputError(
                f"durations: has {len(durations_in)} entries but images has {len(images)}"
            )
        durations = []
        for i, d in enumerate(durations_in):
            if not _is_number(d) or not math.isfinite(d) or d <= 0:
                raise InputError(f"durations[{i}]: must be a positive number of seconds")
            durations.append(float(d))
    if sum(durations) > MAX_TOTAL_SECONDS:
        raise InputError(f"durations: total must not exceed {MAX_TOTAL_SECONDS:g} seconds")

    prompt = inp.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise InputError("prompt: must be a string")

    width = _int_field(inp, "width", DEFAULT_WIDTH, 16, MAX_SIDE)
    height = _int_field(inp, "height", DEFAULT_HEIGHT, 16, MAX_SIDE)
    # yuv420p subsamples chroma 2x2, so libx264 rejects odd sizes
    if width % 2 or height % 2:
        raise InputError("width/height: must be even numbers")
    fps = _int_field(inp, "fps", DEFAULT_FPS, 1, 120)
    return RenderJob(images=list(images), durations=durations, width=width, height=height, fps=fps)


def short_url(url: str) -> str:
    return url if len(url) <= 80 else url[:77] + "..."


def _decode_data_url(url: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep:
        raise ValueError("malformed data: URL")
    if header.endswith(";base64"):
        return base64.b64decode(payload, validate=False)
    return urllib.parse.unquote_to_bytes(payload)


def fetch_image(client: httpx.Client, url: str) -> bytes:
    if url.startswith("data:"):
        return _decode_data_url(url)
    with client.stream("GET", url) as resp:
        if resp.status_code != 200:
            raise ValueError(f"HTTP {resp.status_code}")
        chunks: list[bytes] = []
        size = 0
        for chunk in resp.iter_bytes():
            size += len(chunk)
            if size > MAX_IMAGE_BYTES:
                raise ValueError(f"larger than {MAX_IMAGE_BYTES} bytes")
            chunks.append(chunk)
        return b"".join(chunks)


def fit_on_black(data: bytes, width: int, height: int) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img = ImageOps.exif_transpose(img)
    if img.mode in ("RGBA", "LA", "P"):
        # composite transparency over black, matching the letterbox background
        rgba = img.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (0, 0, 0))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        img = flat
    else:
        img = img.convert("RGB")
    img = ImageOps.contain(img, (width, height), Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    canvas.paste(img, ((width - img.width) // 2, (height - img.height) // 2))
    return canvas


def frame_counts(durations: list[float], fps: int) -> list[int]:
    """Frames per image from rounded cumulative boundaries, so the total drifts < 1/fps."""
    counts: list[int] = []
    elapsed = 0.0
    prev = 0
    for d in durations:
        elapsed += d
        boundary = round(elapsed * fps)
        counts.append(boundary - prev)
        prev = boundary
    return counts


def image_client() -> httpx.Client:
    """For fetching images; one per server, shared by its render threads (httpx.Client is
    thread-safe). Making one per render loaded the CA bundle each time: half the render
    server's CPU for a small video (bench/orchestration)."""
    return httpx.Client(timeout=FETCH_TIMEOUT, follow_redirects=True)


def render(
    job: RenderJob,
    out_path: Path,
    cancel: threading.Event,
    log: Callable[[str], None],
    client: httpx.Client | None = None,
) -> None:
    """Fetch, fit and encode; writes out_path atomically. Raises InputError, RenderCanceled."""
    if client is None:
        with image_client() as own:
            render(job, out_path, cancel, log, own)
        return
    canvases: list[Image.Image] = []
    for i, url in enumerate(job.images):
        if cancel.is_set():
            raise RenderCanceled()
        try:
            data = fetch_image(client, url)
        except (httpx.HTTPError, ValueError) as exc:
            raise InputError(
                f"images[{i}]: could not fetch {short_url(url)}: {exc or type(exc).__name__}"
            ) from exc
        try:
            canvases.append(fit_on_black(data, job.width, job.height))
        except Exception as exc:  # Pillow raises many unrelated types for bad data
            raise InputError(
                f"images[{i}]: could not decode image from {short_url(url)}: {exc}"
            ) from exc
    log(f"fetched {len(canvases)} image(s)")

    counts = frame_counts(job.durations, job.fps)
    tmp_path = out_path.with_name(out_path.name + ".part")
    try:
        _encode(job, canvases, counts, tmp_path, cancel)
        if cancel.is_set():
            raise RenderCanceled()
        os.replace(tmp_path, out_path)
    finally:
        tmp_path.unlink(missing_ok=True)
    log(f"encoded {sum(counts)} frames at {job.fps} fps, {job.width}x{job.height}")


def _encode(
    job: RenderJob,
    canvases: list[Image.Image],
    counts: list[int],
    path: Path,
    cancel: threading.Event,
) -> None:
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=job.fps)
        stream.width = job.width
        stream.height = job.height
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = Fraction(1, job.fps)
        # Frame threads, as the ffmpeg CLI runs libx264. PyAV's default, slice threads, makes
        # the threads meet on every frame, and encoding took a quarter longer (bench/rendering).
        stream.codec_context.thread_type = "FRAME"
        stream.options = {"preset": "ultrafast", "tune": "stillimage"}
        pts = 0
        for canvas, count in zip(canvases, counts, strict=True):
            # one conversion per image; the encoder copies the planes, so the frame is reusable
            frame = av.VideoFrame.from_image(canvas).reformat(format="yuv420p")
            for _ in range(count):
                if pts % 24 == 0 and cancel.is_set():
                    raise RenderCanceled()
                frame.pts = pts
                frame.time_base = stream.codec_context.time_base
                for packet in stream.encode(frame):
                    container.mux(packet)
                pts += 1
        for packet in stream.encode(None):
            container.mux(packet)
