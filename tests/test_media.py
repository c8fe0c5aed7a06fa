"""backend.media on real files: every clip here is encoded with PyAV (libx264, AAC) by the test
itself, and every output is checked by decoding it again."""

from __future__ import annotations

import array
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import pytest
from PIL import Image, ImageDraw, ImageStat

from backend import media
from backend.media import ClipCut, MediaError

FPS = 24


@dataclass
class Decoded:
    frames: int
    last_time: float
    duration: float
    width: int
    height: int
    audio_samples: int
    audio_rate: int
    has_audio: bool


def _texture(width: int, height: int, seed: int = 0) -> Image.Image:
    """A wide picture with detail everywhere, for clips that pan across it."""
    image = Image.linear_gradient("L").resize((width * 3, height)).convert("RGB")
    draw = ImageDraw.Draw(image)
    step = max(8, width // 10)
    for i, x in enumerate(range(0, width * 3, step)):
        shade = (i * 53 + seed * 31) % 256
        draw.rectangle([x, (i * 7) % height, x + step // 2, height - 1], fill=(shade, 255 - shade, 90))
    return image


def make_clip(
    path: Path,
    *,
    seconds: float = 2.0,
    width: int = 320,
    height: int = 180,
    fps: int = FPS,
    kind: str = "moving",
    keyint: int = 24,
    audio: bool = False,
    black_lead: float = 0.0,
    faststart: bool = True,
) -> Path:
    """An H.264 MP4 made frame by frame: `moving` pans across a texture (every frame differs),
    `black` is black throughout, `frozen` shows one picture throughout. `black_lead` seconds of
    black come first; `audio` adds a 440 Hz stereo AAC tone as long as the picture."""
    options = {"movflags": "+faststart"} if faststart else {}
    texture = _texture(width, height, seed=width + height)
    count = round(seconds * fps)
    with av.open(str(path), "w", format="mp4", options=options) as out:
        video = out.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.options = {
            "preset": "veryfast",
            "x264-params": f"keyint={keyint}:min-keyint={keyint}:scenecut=0",
        }
        sound = None
        if audio:
            sound = out.add_stream("aac", rate=48_000)
            sound.layout = "stereo"
        black = av.VideoFrame.from_image(Image.new("RGB", (width, height)))
        still = av.VideoFrame.from_image(texture.crop((0, 0, width, height)))
        for i in range(count):
            if i < black_lead * fps or kind == "black":
                frame = black
            elif kind == "frozen":
                frame = still
            else:
                x = (i * 3) % (width * 2)
                frame = av.VideoFrame.from_image(texture.crop((x, 0, x + width, height)))
            frame.pts = i
            for packet in video.encode(frame):
                out.mux(packet)
        for packet in video.encode(None):
            out.mux(packet)
        if sound is not None:
            samples = round(seconds * 48_000)
            for start in range(0, samples, 1024):
                n = min(1024, samples - start)
                tone = array.array(
                    "f", (0.3 * math.sin(2 * math.pi * 440 * (start + k) / 48_000) for k in range(n))
                ).tobytes()
                frame = av.AudioFrame(format="fltp", layout="stereo", samples=n)
                frame.sample_rate = 48_000
                frame.pts = start
                for plane in frame.planes:
                    plane.update(tone + bytes(plane.buffer_size - len(tone)))
                for packet in sound.encode(frame):
                    out.mux(packet)
            for packet in sound.encode(None):
                out.mux(packet)
    return path


def decode(path: Path) -> Decoded:
    """Counts what a player would get: every video frame, every audio sample."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames, last = 0, 0.0
        for frame in container.decode(stream):
            frames += 1
            last = max(last, frame.time or 0.0)
        width, height = stream.codec_context.width, stream.codec_context.height
        duration = (container.duration or 0) / 1_000_000
    samples, rate, has_audio = 0, 0, False
    with av.open(str(path)) as container:
        if container.streams.audio:
            has_audio = True
            audio = container.streams.audio[0]
            rate = audio.codec_context.sample_rate
            samples = sum(f.samples for f in container.decode(audio))
    return Decoded(frames, last, duration, width, height, samples, rate, has_audio)


def moov_first(path: Path) -> bool:
    """Whether the index (moov) comes before the media data: a progressive download plays."""
    data = path.read_bytes()
    return 0 <= data.find(b"moov") < data.find(b"mdat")
