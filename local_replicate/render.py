"""Image fetching, fitting and H.264 encoding (runs in worker threads): the slideshow, and the
image-to-video clip (a slow zoom and pan over one image)."""

from __future__ import annotations

import base64
import hashlib
import io
import math
import os
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import httpx
from PIL import Image, ImageDraw, ImageOps

DEFAULT_DURATION = 2.0
DEFAULT_WIDTH = 1280
DEFAULT_HEIGHT = 720
DEFAULT_FPS = 24
MAX_SIDE = 3840
MAX_TOTAL_SECONDS = 3600.0
MAX_IMAGE_BYTES = 50 * 1024 * 1024
FETCH_TIMEOUT = 30.0
# same-origin redirects followed per image; a redirect to another origin is refused outright,
# so the server cannot be used to probe hosts and ports it was not given
MAX_REDIRECTS = 3
# the clip's source is fitted this much larger than the frame, so zoom and pan stay inside it
KEN_BURNS_MARGIN = 1.3
# zoom at the first and last frame; linear in between, so every frame moves as much as the next
KEN_BURNS_ZOOM = (1.1, 1.3)


class InputError(ValueError):
    """Model input the render cannot accept; becomes the prediction's `error`."""


class RenderCanceled(Exception):
    """The prediction was canceled while its render was running."""


class FetchError(Exception):
    """An image could not be fetched; the message is short and names no address or port."""


@dataclass(frozen=True)
class RenderJob:
    """A slideshow: each image shown for its duration."""

    images: list[str]
    durations: list[float]
    width: int
    height: int
    fps: int


@dataclass(frozen=True)
class ClipJob:
    """An image-to-video clip: `frames` frames of a slow zoom and pan over one image."""

    # None: the model was given no image (text to video), so the clip pans over a made-up one
    image: str | None
    frames: int
    width: int
    height: int
    fps: int
    # the input field the image came from, for error messages
    field: str = "image"
    # picks the made-up image's colours when there is no image
    prompt: str = ""

    @property
    def seconds(self) -> float:
        return self.frames / self.fps


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


def is_image_url(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(("http://", "https://", "data:"))


def parse_input(inp: dict[str, Any]) -> RenderJob:
    """Validate slideshow input the way the model would, raising InputError with a readable
    message."""
    images = inp.get("images")
    if not isinstance(images, list) or not images:
        raise InputError("images: required, a non-empty list of URLs")
    for i, url in enumerate(images):
        if not is_image_url(url):
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


def _decode_data_url(url: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep:
        raise FetchError("malformed data: URL")
    try:
        if header.endswith(";base64"):
            return base64.b64decode(payload, validate=False)
        return urllib.parse.unquote_to_bytes(payload)
    except ValueError as exc:
        raise FetchError("malformed data: URL") from exc


def _same_origin(a: httpx.URL, b: httpx.URL) -> bool:
    return (a.scheme, a.host, a.port) == (b.scheme, b.host, b.port)


def fetch_image(client: httpx.Client, url: str) -> bytes:
    """The image's bytes; raises FetchError with a short reason (no address, port or repr)."""
    if url.startswith("data:"):
        return _decode_data_url(url)
    try:
        return _fetch(client, httpx.URL(url))
    except httpx.TimeoutException as exc:
        raise FetchError("timed out") from exc
    except httpx.TooManyRedirects as exc:
        raise FetchError("too many redirects") from exc
    except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
        raise FetchError("invalid URL") from exc
    except httpx.HTTPError as exc:  # refused, reset, DNS failure, protocol error: all alike
        raise FetchError("connection failed") from exc


def _fetch(client: httpx.Client, url: httpx.URL) -> bytes:
    for _ in range(MAX_REDIRECTS + 1):
        with client.stream("GET", url) as resp:
            if resp.is_redirect:
                target = url.join(resp.headers["location"])
                if not _same_origin(url, target):
                    raise FetchError("redirect to another host refused")
                url = target
                continue
            if resp.status_code != 200:
                raise FetchError(f"HTTP {resp.status_code}")
            chunks: list[bytes] = []
            size = 0
            for chunk in resp.iter_bytes():
                size += len(chunk)
                if size > MAX_IMAGE_BYTES:
                    raise FetchError(f"larger than {MAX_IMAGE_BYTES // (1024 * 1024)} MB")
                chunks.append(chunk)
            return b"".join(chunks)
    raise FetchError("too many redirects")


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


def load_canvas(client: httpx.Client, url: str, field: str, width: int, height: int) -> Image.Image:
    """Fetch and fit one image, raising InputError that names the input field."""
    try:
        data = fetch_image(client, url)
    except FetchError as exc:
        raise InputError(f"{field}: could not fetch the image ({exc})") from exc
    try:
        return fit_on_black(data, width, height)
    except Image.DecompressionBombError as exc:
        raise InputError(f"{field}: could not decode the image (too many pixels)") from exc
    except Exception as exc:  # Pillow raises many unrelated types for bad data
        raise InputError(f"{field}: could not decode the image (not a supported image)") from exc


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
    server's CPU for a small video (bench/orchestration). Redirects are followed by
    fetch_image, which refuses those to another origin."""
    return httpx.Client(timeout=FETCH_TIMEOUT, follow_redirects=False)


def render(
    job: RenderJob | ClipJob,
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
    if isinstance(job, ClipJob):
        if cancel.is_set():
            raise RenderCanceled()
        size = (_even(job.width * KEN_BURNS_MARGIN), _even(job.height * KEN_BURNS_MARGIN))
        if job.image is None:
            source = made_up_image(job.prompt, *size)
            log("no image given: the clip moves over a generated picture")
        else:
            source = load_canvas(client, job.image, job.field, *size)
            log("fetched the image")
        frames = ken_burns(source, job.width, job.height, job.frames)
        _write(out_path, job.width, job.height, job.fps, frames, cancel, still=False)
        log(f"encoded {job.frames} frames at {job.fps} fps, {job.width}x{job.height}")
        return

    canvases: list[Image.Image] = []
    for i, url in enumerate(job.images):
        if cancel.is_set():
            raise RenderCanceled()
        canvases.append(load_canvas(client, url, f"images[{i}]", job.width, job.height))
    log(f"fetched {len(canvases)} image(s)")
    counts = frame_counts(job.durations, job.fps)
    _write(
        out_path, job.width, job.height, job.fps, _slideshow(canvases, counts), cancel, still=True
    )
    log(f"encoded {sum(counts)} frames at {job.fps} fps, {job.width}x{job.height}")


def _even(value: float) -> int:
    return 2 * math.ceil(value / 2)


def made_up_image(prompt: str, width: int, height: int) -> Image.Image:
    """Diagonal bands in colours drawn from the prompt: detail for the camera to move over."""
    digest = hashlib.sha256(prompt.encode()).digest()
    colours = [tuple(digest[i : i + 3]) for i in range(0, 12, 3)]
    image = Image.new("RGB", (width, height), colours[0])
    draw = ImageDraw.Draw(image)
    band = max(8, width // 24)
    for i, x in enumerate(range(-height, width, band)):
        corners = [(x, 0), (x + band, 0), (x + band + height, height), (x + height, height)]
        draw.polygon(corners, colours[1 + i % 3])
    return image


def _slideshow(canvases: list[Image.Image], counts: list[int]) -> Iterator[av.VideoFrame]:
    for canvas, count in zip(canvases, counts, strict=True):
        # one conversion per image; the encoder copies the planes, so the frame is reusable
        frame = av.VideoFrame.from_image(canvas).reformat(format="yuv420p")
        for _ in range(count):
            yield frame


def ken_burns(source: Image.Image, width: int, height: int, frames: int) -> Iterator[av.VideoFrame]:
    """A zoom in with a pan from left to right over `source` (larger than the frame).

    The crop box shrinks and slides at a constant speed, so consecutive frames always differ by
    about as much, the first and last ones too (an eased motion would nearly stop there).
    """
    sw, sh = source.size
    z0, z1 = KEN_BURNS_ZOOM
    # the pan stays within the margin the widest (first) box leaves
    pan_x, pan_y = 0.9 * (sw - sw / z0) / 2, 0.4 * (sh - sh / z0) / 2
    for i in range(frames):
        t = i / (frames - 1) if frames > 1 else 0.0
        bw = sw / z0 + (sw / z1 - sw / z0) * t
        bh = sh / z0 + (sh / z1 - sh / z0) * t
        cx = sw / 2 + pan_x * (2 * t - 1)
        cy = sh / 2 + pan_y * (2 * t - 1)
        box = (cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2)
        image = source.resize((width, height), Image.Resampling.BILINEAR, box=box)
        yield av.VideoFrame.from_image(image).reformat(format="yuv420p")


def _write(
    out_path: Path,
    width: int,
    height: int,
    fps: int,
    frames: Iterator[av.VideoFrame],
    cancel: threading.Event,
    still: bool,
) -> None:
    tmp_path = out_path.with_name(out_path.name + ".part")
    try:
        _encode(tmp_path, width, height, fps, frames, cancel, still)
        if cancel.is_set():
            raise RenderCanceled()
        os.replace(tmp_path, out_path)
    finally:
        tmp_path.unlink(missing_ok=True)


def _encode(
    path: Path,
    width: int,
    height: int,
    fps: int,
    frames: Iterator[av.VideoFrame],
    cancel: threading.Event,
    still: bool,
) -> None:
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = width
        stream.height = height
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = Fraction(1, fps)
        # Frame threads, as the ffmpeg CLI runs libx264. PyAV's default, slice threads, makes
        # the threads meet on every frame, and encoding took a quarter longer (bench/rendering).
        stream.codec_context.thread_type = "FRAME"
        options = {"preset": "ultrafast"}
        if still:
            options["tune"] = "stillimage"
        stream.options = options
        for pts, frame in enumerate(frames):
            if pts % 24 == 0 and cancel.is_set():
                raise RenderCanceled()
            frame.pts = pts
            frame.time_base = stream.codec_context.time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
