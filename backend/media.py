"""The media toolkit: probe, quality gate, stitch, poster, thumbnails and previews.

Pure functions on local files, built on PyAV (FFmpeg with libx264). They block: callers run
them in worker threads. Every long one takes `progress`, a callback it calls every few frames
or packets; an activity passes one that heartbeats and raises once the activity is cancelled,
and the function then stops at once. Outputs are written to a hidden temporary file beside the
target and renamed into place at the end, so a failed or cancelled call leaves nothing behind.

Errors are `MediaError` (a `ValueError`) with a message meant for a job's `error_message`: it
names a file by its base name at most, never its folder, and carries no object reprs.
"""

from __future__ import annotations

import math
import os
import queue
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal, NamedTuple

import av
import av.container
import av.filter
from av.audio.frame import AudioFrame
from av.audio.stream import AudioStream
from av.packet import Packet
from av.video.frame import PictureType, VideoFrame
from av.video.stream import VideoStream
from PIL import Image, ImageChops, ImageStat

Progress = Callable[[], None]
StrPath = str | os.PathLike[str]

# Quality gate. Luma is measured on a small grey thumbnail of each sampled frame, in full range
# (0 black .. 255 white; swscale expands video range 16..235 when it converts to grey).
# Black: every sample's mean luma below this. Encoded pure black measures 0, a dark but real
# night scene 20 and up; 12 is about 5 % of the scale.
BLACK_LUMA = 12.0
# Frozen: no sample differs from the first by more than this mean absolute luma difference.
# A still image re-encoded frame after frame measures below 0.2 (codec noise, averaged away by
# the downscale); the slowest pan or zoom that reads as motion measures several units.
FROZEN_MOTION = 1.0
# Samples of a clip the gate measures: one every SAMPLE_SECONDS, at most MAX_SAMPLES.
SAMPLE_SECONDS = 0.25
MAX_SAMPLES = 64
# Frames may end this much (plus one frame) before the duration the container declares
# before the clip counts as truncated (edit lists and rounding leave a few milliseconds).
TRUNCATION_SLACK = 0.25
THUMB_WIDTH = 96

# Re-encoding: x264 at a quality that survives one more generation, a keyframe every two
# seconds so the final video seeks well.
STITCH_CRF = 20
STITCH_PRESET = "veryfast"
KEYFRAME_SECONDS = 2
AUDIO_BITRATE_PER_CHANNEL = 96_000
# Stream copy is offered for codecs whose parameter sets MP4 carries once per track.
COPYABLE_CODECS = frozenset({"h264", "hevc"})

# Previews: the whole video when it is short, otherwise PREVIEW_SEGMENTS excerpts spread over
# it, PREVIEW_MAX_SECONDS in all; no audio (previews play muted on hover).
PREVIEW_MAX_SECONDS = 15.0
PREVIEW_SEGMENTS = 5
PREVIEW_MAX_FPS = 30
PREVIEW_CRF = 24
PREVIEW_MAX_BITRATE = 1_500_000
PREVIEW_PRESET = "veryfast"

# Frames a re-encode decodes ahead of the encoder, on a thread of its own.
DECODE_AHEAD = 8
# The callback is called every this many frames decoded or encoded, or packets copied.
FRAMES_PER_TICK = 4
PACKETS_PER_TICK = 64


class MediaError(ValueError):
    """A file that cannot be used, with a reason fit to show a user."""


@dataclass(frozen=True)
class ClipInfo:
    name: str
    codec: str
    profile: str | None
    width: int
    height: int
    pix_fmt: str
    fps: Fraction
    time_base: Fraction
    duration: float
    frames: int
    has_audio: bool
    audio_codec: str | None = None
    audio_sample_rate: int | None = None
    audio_channels: int | None = None


@dataclass(frozen=True)
class ClipReport:
    """What the quality gate measured on a clip that passed it."""

    name: str
    duration: float
    frames: int
    width: int
    height: int
    fps: Fraction
    luma_min: float
    luma_max: float
    motion: float
    samples: int


class ClipCut(NamedTuple):
    """One scene: its clip and how many seconds of it (from the start) the video uses."""

    path: StrPath
    seconds: float


@dataclass(frozen=True)
class CutReport:
    name: str
    seconds: float
    seconds_used: float
    frames: int


@dataclass(frozen=True)
class StitchReport:
    mode: Literal["copy", "reencode"]
    # why the clips were re-encoded; empty in copy mode
    reason: str
    duration: float
    frames: int
    width: int
    height: int
    fps: Fraction
    has_audio: bool
    # "copy": AAC packets remuxed; "reencode": decoded, cut and encoded again; "none"
    audio_mode: Literal["copy", "reencode", "none"]
    clips: tuple[CutReport, ...]


@dataclass(frozen=True)
class FrameReport:
    """The frame a poster or thumbnail shows."""

    time: float
    width: int
    height: int
    luma: float
    contrast: float


@dataclass(frozen=True)
class PreviewReport:
    duration: float
    frames: int
    width: int
    height: int
    fps: Fraction
    bytes: int
    max_bitrate: int
    # (start, seconds) of each excerpt, in the source video's time
    segments: tuple[tuple[float, float], ...]


# -- helpers -----------------------------------------------------------------------------------


def _seconds(value: float) -> str:
    """3.2 -> '3.2', 5.0 -> '5', 2.4583 -> '2.46'."""
    return f"{value:.2f}".rstrip("0").rstrip(".")


def _reason(exc: av.FFmpegError) -> str:
    # str(exc) ends with the file name FFmpeg was given: a server path.
    return exc.strerror or type(exc).__name__


class _Ticker:
    def __init__(self, progress: Progress | None, every: int) -> None:
        self.progress = progress
        self.every = every
        self.count = 0

    def __call__(self) -> None:
        self.count += 1
        if self.progress is not None and self.count % self.every == 0:
            self.progress()

    def now(self) -> None:
        if self.progress is not None:
            self.progress()


@contextmanager
def _open(path: StrPath, *, light: bool = False) -> Iterator[av.container.InputContainer]:
    """Opens a video for reading. `light` skips the decoding FFmpeg does while opening to learn
    the pixel format (pix_fmt is then unknown until a frame is decoded): two thirds of the
    cost of opening a 720p MP4, and opening was most of a stream copy's time
    (bench/stitching)."""
    name = Path(path).name
    if not Path(path).is_file():
        raise MediaError(f"{name} does not exist")
    container = None
    try:
        if light:
            try:
                container = av.open(os.fspath(path), stream_options=_NO_PROBE_DECODE)
            except ValueError:
                pass  # a format that shows its streams only after probing them
        if container is None:
            container = av.open(os.fspath(path))
    except av.FFmpegError as exc:
        raise MediaError(f"{name} is not a readable video ({_reason(exc)})") from None
    try:
        yield container
    finally:
        container.close()


# Options for the decoders FFmpeg opens while probing a file's streams (one per stream).
_NO_PROBE_DECODE = [{"skip_frame": "all"}] * 16


@contextmanager
def _output(out_path: StrPath) -> Iterator[Path]:
    """A temporary path beside `out_path`, renamed onto it if the block succeeds."""
    target = Path(out_path)
    if not target.parent.is_dir():
        raise MediaError(f"Cannot write {target.name}: its folder does not exist")
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.part")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _video(container: av.container.InputContainer, name: str) -> VideoStream:
    if not container.streams.video:
        raise MediaError(f"{name} has no video stream")
    return container.streams.video[0]


def _audio(container: av.container.InputContainer) -> AudioStream | None:
    return container.streams.audio[0] if container.streams.audio else None


def _info(container: av.container.InputContainer, name: str) -> ClipInfo:
    stream = _video(container, name)
    cc = stream.codec_context
    fps = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not fps or not cc.width or not cc.height:
        raise MediaError(f"{name} has no usable video stream (no size or frame rate)")
    time_base = stream.time_base or Fraction(1, 90_000)
    if stream.duration:
        duration = float(stream.duration * time_base)
    else:
        duration = (container.duration or 0) / 1_000_000
    audio = _audio(container)
    acc = audio.codec_context if audio is not None else None
    return ClipInfo(
        name=name,
        codec=cc.name,
        profile=stream.profile,
        width=cc.width,
        height=cc.height,
        pix_fmt=cc.pix_fmt or "",
        fps=Fraction(fps),
        time_base=Fraction(time_base),
        duration=round(duration, 6),
        frames=stream.frames,
        has_audio=acc is not None,
        audio_codec=acc.name if acc is not None else None,
        audio_sample_rate=acc.sample_rate if acc is not None else None,
        audio_channels=acc.layout.nb_channels if acc is not None else None,
    )


def _start(stream: VideoStream | AudioStream) -> float:
    if stream.start_time is None or stream.time_base is None:
        return 0.0
    return float(stream.start_time * stream.time_base)


def _grey(frame: VideoFrame, width: int = THUMB_WIDTH) -> Image.Image:
    height = max(2, round(width * frame.height / frame.width))
    small = frame.reformat(width=width, height=height, format="gray")
    plane = small.planes[0]
    return Image.frombuffer("L", (width, height), bytes(plane), "raw", "L", plane.line_size, 1)


# -- probe -------------------------------------------------------------------------------------


def probe(path: StrPath) -> ClipInfo:
    """Codec, size, pixel format, frame rate, duration, frame count and audio of a video.

    Reads the header only, unless the container does not say how many frames it holds: then
    its packets are counted (no decoding).
    """
    name = Path(path).name
    with _open(path) as container:
        info = _info(container, name)
        if info.frames:
            return info
        stream = container.streams.video[0]
        try:
            frames = sum(1 for packet in container.demux(stream) if packet.size)
        except av.FFmpegError as exc:
            raise MediaError(f"{name} could not be read ({_reason(exc)})") from None
    return ClipInfo(**{**info.__dict__, "frames": frames})


def keyframes(path: StrPath) -> list[float]:
    """Presentation times (seconds from the first frame) of a video's keyframes, in order.

    Demuxes the packets; decodes nothing.
    """
    name = Path(path).name
    with _open(path) as container:
        stream = _video(container, name)
        start = stream.start_time or 0
        times = []
        try:
            for packet in container.demux(stream):
                if packet.is_keyframe and packet.pts is not None:
                    times.append(float((packet.pts - start) * stream.time_base))
        except av.FFmpegError as exc:
            raise MediaError(f"{name} could not be read ({_reason(exc)})") from None
    return sorted(times)


# -- quality gate ------------------------------------------------------------------------------


def check_clip(
    path: StrPath,
    *,
    min_seconds: float,
    still_image: bool = False,
    progress: Progress | None = None,
) -> ClipReport:
    """The quality gate for one scene's clip: decodes it in full and measures it.

    Fails (MediaError) if the clip is truncated or corrupt, lasts less than `min_seconds`
    minus one frame, is black throughout, or is frozen throughout (not checked when
    `still_image`, for slideshow profiles whose scenes are still on purpose).
    """
    name = Path(path).name
    tick = _Ticker(progress, FRAMES_PER_TICK)
    with _open(path) as container:
        info = _info(container, name)
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        start = _start(stream)
        duration = info.duration or info.frames / info.fps
        every = max(SAMPLE_SECONDS, duration / MAX_SAMPLES)
        frames = 0
        end = 0.0
        next_sample = 0.0
        samples: list[Image.Image] = []
        try:
            for frame in container.decode(stream):
                tick()
                frames += 1
                t = (frame.time if frame.time is not None else frames / info.fps) - start
                end = max(end, t)
                if t >= next_sample:
                    samples.append(_grey(frame))
                    next_sample = t + every
        except av.FFmpegError as exc:
            raise MediaError(
                f"Clip is truncated or corrupt: decoding failed after {_seconds(end)} s "
                f"({_reason(exc)})"
            ) from None
    if frames == 0:
        raise MediaError("Clip is truncated or corrupt: it holds no decodable frames")
    frame_time = float(1 / info.fps)
    decoded = end + frame_time
    if decoded + frame_time + TRUNCATION_SLACK < duration:
        raise MediaError(
            f"Clip is truncated: frames stop at {_seconds(decoded)} s of {_seconds(duration)} s"
        )
    if decoded < min_seconds - frame_time - 1e-6:
        raise MediaError(
            f"Clip lasts {_seconds(decoded)} s, the scene needs {_seconds(min_seconds)} s"
        )
    lumas = [ImageStat.Stat(s).mean[0] for s in samples]
    if max(lumas) < BLACK_LUMA:
        raise MediaError(
            f"Clip is black throughout (brightest sample {max(lumas):.1f} of 255, "
            f"threshold {BLACK_LUMA:g})"
        )
    motion = max(
        (ImageStat.Stat(ImageChops.difference(samples[0], s)).mean[0] for s in samples[1:]),
        default=0.0,
    )
    if not still_image and motion < FROZEN_MOTION:
        raise MediaError(
            f"Clip is frozen: its {len(samples)} sampled frames differ by at most {motion:.2f} "
            f"luma levels (threshold {FROZEN_MOTION:g})"
        )
    return ClipReport(
        name=name,
        duration=round(decoded, 6),
        frames=frames,
        width=info.width,
        height=info.height,
        fps=info.fps,
        luma_min=round(min(lumas), 2),
        luma_max=round(max(lumas), 2),
        motion=round(motion, 3),
        samples=len(samples),
    )


# -- stitching ---------------------------------------------------------------------------------


@dataclass
class _Clip:
    index: int
    cut: ClipCut
    container: av.container.InputContainer
    info: ClipInfo
    extradata: bytes
    frames: int = 0  # frames the final video takes from this clip
    end: float = 0.0  # the clip's cut, seconds from its start
    copy_packets: int = 0
    copy_shift: int = 0
    read: bool = False  # demuxed since it was opened

    @property
    def label(self) -> str:
        return f"Clip {self.index + 1} ({self.info.name})"

    def rewind(self) -> av.container.InputContainer:
        if self.read:
            self.container.seek(0)
        self.read = True
        return self.container


def _scan(index: int, cut: ClipCut, stack: ExitStack) -> _Clip:
    """Opens a clip for the whole stitch: each is opened once (light), however many passes."""
    name = Path(cut.path).name
    seconds = cut.seconds
    if not isinstance(seconds, int | float) or not math.isfinite(seconds) or seconds <= 0:
        raise MediaError(f"Clip {index + 1} ({name}): its duration must be a positive number")
    container = stack.enter_context(_open(cut.path, light=True))
    info = _info(container, name)
    extradata = bytes(container.streams.video[0].codec_context.extradata or b"")
    return _Clip(index, ClipCut(cut.path, float(seconds)), container, info, extradata)


def _most_common(values: list[Any]) -> Any:
    # Counter keeps first-seen order among equal counts, so a tie goes to the earliest clip.
    return Counter(values).most_common(1)[0][0]


def _allot_frames(clips: list[_Clip], fps: Fraction) -> None:
    """Frames per clip from rounded cumulative scene ends, so the total is off by less than a
    frame however many scenes there are."""
    elapsed = Fraction(0)
    taken = 0
    for clip in clips:
        elapsed += Fraction(clip.cut.seconds)
        clip.frames = round(elapsed * fps) - taken
        taken += clip.frames
        if clip.frames < 1:
            raise MediaError(
                f"{clip.label}: the scene's {_seconds(clip.cut.seconds)} s is shorter than one "
                f"frame at {_seconds(float(fps))} fps"
            )
        clip.end = float(clip.frames / fps)
        # The header's duration can be a few units of its time base short of frames / rate.
        lasts = max(clip.info.duration, float(clip.info.frames / clip.info.fps))
        if lasts < clip.cut.seconds - float(1 / fps) - 1e-3:
            raise MediaError(
                f"{clip.label} lasts {_seconds(lasts)} s, the scene needs "
                f"{_seconds(clip.cut.seconds)} s"
            )


def _copy_plan(clips: list[_Clip], tick: _Ticker) -> str:
    """Plans a stream copy: returns "" and fills each clip's packet count and timestamp shift,
    or returns why the clips must be re-encoded."""
    first = clips[0]
    for clip in clips:
        a, b = first.info, clip.info
        if b.codec not in COPYABLE_CODECS:
            return f"{clip.label} is {b.codec}, which is only re-encoded"
        for what, x, y in (
            ("codec", a.codec, b.codec),
            ("size", f"{a.width}x{a.height}", f"{b.width}x{b.height}"),
            # (the pixel format is in the parameter sets, compared below with the extradata)
            ("profile", a.profile, b.profile),
            ("frame rate", a.fps, b.fps),
            ("time base", a.time_base, b.time_base),
        ):
            if x != y:
                return f"clips differ in {what} ({first.label}: {x}, {clip.label}: {y})"
        if clip.extradata != first.extradata:
            return f"{clip.label} was encoded with other settings than {first.label}"
    tick_units = 1 / (first.info.fps * first.info.time_base)
    if tick_units.denominator != 1:
        return "the frame rate is not a whole number of time base units"
    step = int(tick_units)
    offset = 0
    last_dts: int | None = None
    for clip in clips:
        packets = _packet_times(clip, tick)
        if packets is None:
            return f"{clip.label} has packets without timestamps"
        if not packets or not packets[0][2]:
            return f"{clip.label} does not start on a keyframe"
        start = min(pts for pts, _, _ in packets)
        cut = start + clip.frames * step
        # The frames before the cut must be exactly the packets before the cut's keyframe in
        # decode order; an open GOP (frames before the keyframe decoded after it) fails this.
        taken = next((i for i, (pts, _, _) in enumerate(packets) if pts >= cut), len(packets))
        if taken != clip.frames:
            if taken == len(packets):
                return f"{clip.label} has fewer frames than its scene needs"
            return (
                f"{clip.label}: the cut at {_seconds(clip.end)} s is not on a frame boundary "
                "of a constant-rate clip"
            )
        if taken < len(packets):
            if not (packets[taken][2] and packets[taken][0] == cut):
                return f"{clip.label}: the cut at {_seconds(clip.end)} s is not on a keyframe"
            if any(pts < cut for pts, _, _ in packets[taken:]):
                return f"{clip.label}: frames after the cut at {_seconds(clip.end)} s precede it"
        clip.copy_packets = taken
        clip.copy_shift = offset - start
        for _, dts, _ in packets[:taken]:
            shifted = dts + clip.copy_shift
            if last_dts is not None and shifted <= last_dts:
                return f"{clip.label}: its decode timestamps would overlap the clip before"
            last_dts = shifted
        offset += clip.frames * step
    return ""


def _packet_times(clip: _Clip, tick: _Ticker) -> list[tuple[int, int, bool]] | None:
    """(pts, dts, keyframe) of each video packet in decode order; demuxes, decodes nothing."""
    container = clip.rewind()
    stream = container.streams.video[0]
    out = []
    try:
        for packet in container.demux(stream):
            tick()
            if packet.pts is None or packet.dts is None or not packet.size:
                if packet.size:
                    return None  # packets without timestamps cannot be shifted
                continue
            out.append((packet.pts, packet.dts, packet.is_keyframe))
    except av.FFmpegError as exc:
        raise MediaError(f"{clip.label} could not be read ({_reason(exc)})") from None
    return out


class _Retimer:
    """Maps one clip's decoded frames onto `count` output frames at `fps`: output frame k
    shows the last frame that starts by its time (with half a frame of slack), so equal rates
    pass every frame once and other rates drop or repeat frames as ffmpeg's fps filter does."""

    def __init__(self, count: int, fps: Fraction, emit: Callable[[VideoFrame], None]) -> None:
        self.count = count
        self.slot = 1 / float(fps)
        self.emit = emit
        self.done = 0
        self.held: VideoFrame | None = None

    @property
    def full(self) -> bool:
        return self.done >= self.count

    def feed(self, frame: VideoFrame, t: float) -> None:
        while self.done < self.count and (self.done + 0.5) * self.slot < t:
            self.emit(self.held if self.held is not None else frame)
            self.done += 1
        self.held = frame

    def finish(self) -> int:
        """Fills what is left with the last frame; returns how many frames that took."""
        padded = 0
        while self.held is not None and self.done < self.count:
            self.emit(self.held)
            self.done += 1
            padded += 1
        return padded


class _Fitter:
    """Brings frames to the output size and yuv420p, letterboxed if the aspect differs."""

    def __init__(self, width: int, height: int) -> None:
        self.width = width
        self.height = height
        self.graphs: dict[tuple[int, int, str], tuple[av.filter.Graph, Fraction]] = {}
        self.source: VideoFrame | None = None
        self.fitted: VideoFrame | None = None

    def __call__(self, frame: VideoFrame) -> VideoFrame:
        if frame is self.source and self.fitted is not None:
            return self.fitted  # a repeated frame is converted once
        self.source = frame
        key = (frame.width, frame.height, frame.format.name)
        if key == (self.width, self.height, "yuv420p"):
            self.fitted = frame
            return frame
        if key not in self.graphs:
            graph = av.filter.Graph()
            time_base = Fraction(1, 1000)
            src = graph.add_buffer(
                width=frame.width, height=frame.height, format=frame.format, time_base=time_base
            )
            chain = [
                src,
                graph.add(
                    "scale",
                    f"{self.width}:{self.height}:force_original_aspect_ratio=decrease"
                    ":force_divisible_by=2",
                ),
                graph.add("pad", f"{self.width}:{self.height}:(ow-iw)/2:(oh-ih)/2:black"),
                graph.add("setsar", "1"),
                graph.add("format", "yuv420p"),
                graph.add("buffersink"),
            ]
            for a, b in zip(chain, chain[1:], strict=False):
                a.link_to(b)
            graph.configure()
            self.graphs[key] = (graph, time_base)
        graph, time_base = self.graphs[key]
        frame.pts = 0
        frame.time_base = time_base
        graph.push(frame)
        fitted = graph.pull()
        assert isinstance(fitted, VideoFrame)
        self.fitted = fitted
        return fitted


class _AudioGap(Exception):
    """A clip's audio starts late or ends early: copied packets would drift off the picture."""


class _AudioCopy:
    """Remuxes the clips' AAC packets into one track that keeps to the picture.

    AAC comes in frames of 1024 samples, so a copied track can only be cut at frame edges.
    Packets are laid end to end (a gap would shift all later sound earlier). A clip's packets
    start with the first whose middle is not already covered by the sound written, and are
    taken while the track ends nearer its clip's cut with the packet than without. So each
    clip's sound starts, and the track meets each cut, within half a frame (10.7 ms at 48 kHz)
    of where it belongs, however many clips there are; the error does not add up. Each clip's
    first packet (the encoder's priming) plays the previous clip's last frame out, as
    ffmpeg's concat does. Sound that starts late or ends early is not copied (`_AudioGap`).
    """

    def __init__(self, out: av.container.OutputContainer, template: AudioStream) -> None:
        self.out = out
        self.stream = out.add_stream_from_template(template)
        self.time_base = template.time_base or Fraction(1, template.codec_context.sample_rate)
        self.stream.time_base = self.time_base
        cc = template.codec_context
        self.frame = round(Fraction(cc.frame_size or 1024, cc.sample_rate) / self.time_base)
        self.written: int | None = None
        self.offset = self.end = 0
        self.last = False
        self.full = False

    def clip(self, start: float, end: float, last: bool, zero: float) -> None:
        """The next clip, which fills seconds `start` to `end` of the final video; its picture
        starts at `zero` seconds of its own time."""
        self.offset = round((start - zero) / self.time_base)
        self.end = round(end / self.time_base)
        self.last = last
        self.full = False

    def feed(self, packet: Packet) -> None:
        if self.full or not packet.size or packet.pts is None:
            return
        # A short packet (the encoder's last) still decodes to a whole frame, except at the
        # very end of the track, where the muxer records how much of it to play.
        length = self.frame
        if self.last and packet.duration and packet.duration < self.frame:
            length = packet.duration
        start = self.offset + packet.pts  # where the packet belongs in the final video
        if self.written is None:
            # The first clip's priming keeps its negative time (the muxer hides it with an
            # edit list); sound that starts late is a gap like any other.
            self.written = min(start, self.offset)
        if start + length / 2 < self.written:
            return  # the clip before already covers this
        if start - self.written > self.frame / 2:
            raise _AudioGap()
        if self.written + length / 2 > self.end:
            self.full = True
            return
        packet.pts = packet.dts = self.written
        packet.duration = length
        packet.stream = self.stream
        self.out.mux(packet)
        self.written += length

    def end_clip(self) -> None:
        if self.written is None or self.end - self.written > self.frame / 2:
            raise _AudioGap()


def _audio_copy_reason(clips: list[_Clip]) -> str:
    """Why the clips' audio cannot be copied alongside copied video ("" if it can)."""
    first = None
    for clip in clips:
        stream = clip.container.streams.audio[0]
        cc = stream.codec_context
        if cc.name != "aac":
            return f"{clip.label} has {cc.name} audio"
        extradata = bytes(cc.extradata or b"")
        params = (cc.sample_rate, cc.layout.nb_channels, stream.time_base, extradata)
        if first is None:
            first = params
        elif params != first:
            return f"{clip.label}'s audio was encoded with other settings"
        if stream.duration is None or stream.time_base is None:
            return f"{clip.label}'s audio has no duration"
        lasts = float((stream.duration + (stream.start_time or 0)) * stream.time_base)
        if lasts < clip.end - 512 / cc.sample_rate:
            return f"{clip.label}'s audio ends before its scene does"
    return ""


class _AudioJoin:
    """Joins the clips' audio into one AAC track, cut sample-exactly at each clip's end.

    Used whenever the video is re-encoded (then encoding the sound costs next to nothing) and
    when copied audio could not keep to the picture.
    """

    def __init__(self, out: av.container.OutputContainer, rate: int, layout: str) -> None:
        self.out = out
        self.rate = rate
        self.layout = layout
        self.stream = out.add_stream("aac", rate=rate)
        self.stream.layout = layout
        self.stream.bit_rate = AUDIO_BITRATE_PER_CHANNEL * self.stream.layout.nb_channels
        self.fifo = av.AudioFifo()
        self.written = 0  # samples handed to the encoder's fifo
        self.pts = 0

    def clip(self, end_seconds: float) -> _AudioClip:
        """Starts the next clip, whose audio must end at `end_seconds` of the final video."""
        return _AudioClip(self, round(end_seconds * self.rate) - self.written)

    def push(self, frame: AudioFrame) -> None:
        frame.pts = None
        self.fifo.write(frame)
        self.written += frame.samples
        while self.fifo.samples >= 1024:
            self._encode(self.fifo.read(1024))

    def silence(self, samples: int) -> None:
        while samples > 0:
            n = min(samples, 4096)
            frame = AudioFrame(format="fltp", layout=self.layout, samples=n)
            frame.sample_rate = self.rate
            for plane in frame.planes:
                plane.update(bytes(plane.buffer_size))
            self.push(frame)
            samples -= n

    def _encode(self, frame: AudioFrame | None) -> None:
        if frame is not None:
            frame.pts = self.pts
            frame.time_base = Fraction(1, self.rate)
            self.pts += frame.samples
        for packet in self.stream.encode(frame):
            self.out.mux(packet)

    def finish(self) -> None:
        if self.fifo.samples:
            self._encode(self.fifo.read())
        self._encode(None)


class _AudioClip:
    def __init__(self, join: _AudioJoin, needed: int) -> None:
        self.join = join
        self.needed = needed  # samples still owed to the final track
        self.drop = 0  # samples to discard before the clip's sound starts
        self.fifo = av.AudioFifo()
        self.resampler = av.AudioResampler(format="fltp", layout=join.layout, rate=join.rate)
        self.started = False

    @property
    def full(self) -> bool:
        return self.needed <= 0

    def feed(self, frame: AudioFrame | None, t: float = 0.0) -> None:
        if frame is not None and not self.started:
            self.started = True
            # Audio that starts late is preceded by silence; audio that starts early (priming
            # an edit list did not hide) is dropped, so each clip's sound stays on its picture.
            lead = round(t * self.join.rate)
            if lead > 0:
                self._silence(lead)
            self.drop = max(0, -lead)
        for out in self.resampler.resample(frame):
            out.pts = None
            self.fifo.write(out)
        if self.drop:
            n = min(self.drop, self.fifo.samples)
            if n:
                self.fifo.read(n)
                self.drop -= n
        n = min(self.fifo.samples, self.needed)
        if n > 0:
            self.join.push(self.fifo.read(n))
            self.needed -= n

    def _silence(self, samples: int) -> None:
        n = min(samples, self.needed)
        self.join.silence(n)
        self.needed -= n

    def finish(self) -> None:
        self.feed(None)
        if self.needed > 0:
            self._silence(self.needed)


def stitch(
    clips: Sequence[ClipCut | tuple[StrPath, float]],
    out_path: StrPath,
    *,
    progress: Progress | None = None,
    crf: int = STITCH_CRF,
    preset: str = STITCH_PRESET,
) -> StitchReport:
    """Trims each clip to its scene's seconds (from its start) and joins them into one MP4.

    Stream copy (packets remuxed, nothing decoded) when every clip has the same codec
    parameters and every cut falls on a keyframe (a cut at a clip's end always does);
    otherwise everything is re-encoded to H.264 yuv420p (x264 `preset`, `crf`, a keyframe every
    2 s) at the most common size and frame rate (ties go to the earlier clip; other sizes are
    letterboxed, other rates have frames dropped or repeated). Each clip gets a whole number of
    frames, from rounded cumulative scene ends, so the final video lasts the sum of the scenes'
    seconds within one frame. `+faststart`.

    Sound is kept when every clip has some and dropped when any has none (never a video whose
    sound stops midway). With copied video, AAC sound of the same settings is copied too, each
    clip's within half an AAC frame of its picture (`_AudioCopy`); otherwise it is decoded, cut
    to the sample at each scene's end (silence where a clip's sound is missing) and encoded to
    AAC once. The report says which (`mode`, `reason`, `audio_mode`).
    """
    if not clips:
        raise MediaError("No clips to stitch")
    tick = _Ticker(progress, PACKETS_PER_TICK)
    with ExitStack() as stack:
        scanned = [_scan(i, ClipCut(*cut), stack) for i, cut in enumerate(clips)]
        tick.now()
        fps = _most_common([c.info.fps for c in scanned])
        width, height = _most_common([(c.info.width, c.info.height) for c in scanned])
        _allot_frames(scanned, fps)
        reason = _copy_plan(scanned, tick)
        with_audio = all(c.info.has_audio for c in scanned)
        audio_mode: Literal["copy", "reencode", "none"] = "none"
        if with_audio:
            audio_mode = "reencode" if reason or _audio_copy_reason(scanned) else "copy"
        audio_mode = _write(
            scanned, out_path, reason, audio_mode, width, height, fps, crf, preset, progress
        )
    frames = sum(c.frames for c in scanned)
    if not reason:
        width, height = scanned[0].info.width, scanned[0].info.height
    return StitchReport(
        mode="reencode" if reason else "copy",
        reason=reason,
        duration=round(float(frames / fps), 6),
        frames=frames,
        width=width,
        height=height,
        fps=fps,
        has_audio=with_audio,
        audio_mode=audio_mode,
        clips=tuple(
            CutReport(c.info.name, c.cut.seconds, round(float(c.frames / fps), 6), c.frames)
            for c in scanned
        ),
    )


def _write(
    scanned: list[_Clip],
    out_path: StrPath,
    reason: str,
    audio_mode: Literal["copy", "reencode", "none"],
    width: int,
    height: int,
    fps: Fraction,
    crf: int,
    preset: str,
    progress: Progress | None,
) -> Literal["copy", "reencode", "none"]:
    """Writes the video; returns how its audio was made."""
    args = (width, height, fps, crf, preset, progress)
    with _output(out_path) as tmp:
        try:
            try:
                _write_once(scanned, tmp, reason, audio_mode, *args)
            except _AudioGap:
                # Rare (the headers promised sound that is not there): start again and
                # encode the sound, with silence where it is missing.
                audio_mode = "reencode"
                _write_once(scanned, tmp, reason, audio_mode, *args)
            return audio_mode
        except av.FFmpegError as exc:
            raise MediaError(f"Stitching failed ({_reason(exc)})") from None


def _write_once(
    scanned: list[_Clip],
    tmp: Path,
    reason: str,
    audio_mode: Literal["copy", "reencode", "none"],
    width: int,
    height: int,
    fps: Fraction,
    crf: int,
    preset: str,
    progress: Progress | None,
) -> None:
    with av.open(str(tmp), "w", format="mp4", options={"movflags": "+faststart"}) as out:
        sound: tuple[int, str] | None = None
        if audio_mode == "reencode":
            rate = _most_common([c.info.audio_sample_rate for c in scanned])
            layout = "mono" if scanned[0].info.audio_channels == 1 else "stereo"
            sound = (rate, layout)
        if reason:
            _reencode(scanned, out, sound, width, height, fps, crf, preset, progress)
        else:
            _copy(scanned, out, sound, audio_mode == "copy", progress)


def _clip_streams(
    container: av.container.InputContainer, with_audio: bool
) -> tuple[VideoStream, AudioStream | None]:
    video = container.streams.video[0]
    audio = _audio(container) if with_audio else None
    return video, audio


def _copy(
    clips: list[_Clip],
    out: av.container.OutputContainer,
    sound_format: tuple[int, str] | None,
    copy_audio: bool,
    progress: Progress | None,
) -> None:
    tick = _Ticker(progress, PACKETS_PER_TICK)
    audio: _AudioJoin | None = None
    audio_copy: _AudioCopy | None = None
    out_video = None
    elapsed = 0.0
    step = int(1 / (clips[0].info.fps * clips[0].info.time_base))
    for clip in clips:
        container = clip.rewind()
        video, audio_in = _clip_streams(container, sound_format is not None or copy_audio)
        if out_video is None:
            # The video track first, then the audio track, as players expect.
            out_video = out.add_stream_from_template(video)
            out_video.time_base = video.time_base
            if sound_format is not None:
                audio = _AudioJoin(out, *sound_format)
            elif copy_audio and audio_in is not None:
                audio_copy = _AudioCopy(out, audio_in)
        sound = audio.clip(elapsed + clip.end) if audio is not None else None
        if audio_copy is not None:
            audio_copy.clip(elapsed, elapsed + clip.end, clip is clips[-1], _start(video))
        # The picture sets time zero: sound that starts later is preceded by silence.
        audio_start = _start(video)
        copied = 0
        streams = [s for s in (video, audio_in) if s is not None]
        for packet in container.demux(*streams):
            tick()
            if packet.stream.index == video.index:
                if copied < clip.copy_packets and packet.size and packet.pts is not None:
                    _shift(packet, clip.copy_shift, step)
                    packet.stream = out_video
                    out.mux(packet)
                    copied += 1
            elif audio_copy is not None:
                audio_copy.feed(packet)
            elif sound is not None and not sound.full:
                _feed_audio(packet, sound, audio_start)
            audio_done = (sound is None or sound.full) and (audio_copy is None or audio_copy.full)
            if copied >= clip.copy_packets and audio_done:
                break
        if copied < clip.copy_packets:
            raise MediaError(f"{clip.label} is truncated: it ends before its scene does")
        if sound is not None:
            sound.finish()
        if audio_copy is not None:
            audio_copy.end_clip()
        elapsed += clip.end
    if audio is not None:
        audio.finish()


def _shift(packet: Packet, shift: int, step: int) -> None:
    assert packet.pts is not None and packet.dts is not None
    packet.pts += shift
    packet.dts += shift
    if not packet.duration:
        packet.duration = step


def _feed_audio(packet: Packet, sound: _AudioClip, start: float) -> None:
    for frame in packet.decode():
        assert isinstance(frame, AudioFrame)
        t = (frame.time - start) if frame.time is not None else 0.0
        sound.feed(frame, t)


def _reencode(
    clips: list[_Clip],
    out: av.container.OutputContainer,
    sound_format: tuple[int, str] | None,
    width: int,
    height: int,
    fps: Fraction,
    crf: int,
    preset: str,
    progress: Progress | None,
) -> None:
    tick = _Ticker(progress, FRAMES_PER_TICK)
    stream = out.add_stream("libx264", rate=fps)
    stream.width = width
    stream.height = height
    stream.pix_fmt = "yuv420p"
    stream.codec_context.time_base = 1 / fps
    stream.codec_context.gop_size = max(1, round(KEYFRAME_SECONDS * fps))
    # Frame threads, as the ffmpeg CLI runs libx264 (see local_replicate/render.py).
    stream.codec_context.thread_type = "FRAME"
    stream.options = {"preset": preset, "crf": str(crf)}
    audio = _AudioJoin(out, *sound_format) if sound_format is not None else None
    fit = _Fitter(width, height)
    pts = 0

    def emit(frame: VideoFrame) -> None:
        nonlocal pts
        tick()
        fitted = fit(frame)
        fitted.pts = pts
        fitted.time_base = stream.codec_context.time_base
        # A decoded frame keeps its picture type, and libx264 would force a keyframe at
        # every keyframe of the source.
        fitted.pict_type = PictureType.NONE
        pts += 1
        for packet in stream.encode(fitted):
            out.mux(packet)

    elapsed = 0.0
    for clip in clips:
        container = clip.rewind()
        video, audio_in = _clip_streams(container, sound_format is not None)
        video.thread_type = "AUTO"
        start = _start(video)
        retimer = _Retimer(clip.frames, fps, emit)
        sound = audio.clip(elapsed + clip.end) if audio is not None else None
        try:
            for frame in _decode_ahead(container, video, audio_in, start + clip.end):
                if isinstance(frame, VideoFrame):
                    if not retimer.full:
                        retimer.feed(frame, frame.time - start if frame.time is not None else 0.0)
                elif sound is not None and not sound.full:
                    # The picture sets time zero: later sound is preceded by silence.
                    sound.feed(frame, frame.time - start if frame.time is not None else 0.0)
                if retimer.full and (sound is None or sound.full):
                    break
        except av.FFmpegError as exc:
            raise MediaError(
                f"{clip.label} could not be decoded (truncated or corrupt: {_reason(exc)})"
            ) from None
        missing = clip.frames - retimer.done
        if retimer.held is None or missing > 2:
            shown = (retimer.done + (1 if retimer.held is not None else 0)) / float(fps)
            raise MediaError(
                f"{clip.label} is truncated: its frames stop at {_seconds(shown)} s, "
                f"the scene needs {_seconds(clip.cut.seconds)} s"
            )
        retimer.finish()
        if sound is not None:
            sound.finish()
        elapsed += clip.end
    for packet in stream.encode(None):
        tick()
        out.mux(packet)
    if audio is not None:
        audio.finish()


_END = object()


def _decode_ahead(
    container: av.container.InputContainer,
    video: VideoStream,
    audio: AudioStream | None,
    end: float,
) -> Iterator[VideoFrame | AudioFrame]:
    """The clip's frames up to its cut at `end` seconds, decoded by a thread of its own.

    So the decoder works while the caller's thread encodes (PyAV lets go of the GIL inside
    FFmpeg), as ffmpeg's command line runs decoding and encoding in threads of their own;
    everything else (the progress callback, the output) stays on the caller's thread.
    Stopping early (the caller breaks off or raises) stops the thread before this returns.
    """
    frames: queue.Queue[Any] = queue.Queue(maxsize=DECODE_AHEAD)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                frames.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def decode() -> None:
        try:
            # One frame past the cut finishes the picture's last frame; sound stops at it.
            video_done, audio_done = False, audio is None
            streams = [s for s in (video, audio) if s is not None]
            for packet in container.demux(*streams):
                is_video = packet.stream.index == video.index
                if video_done if is_video else audio_done:
                    continue
                for frame in packet.decode():
                    if not put(frame):
                        return
                    past = frame.time is not None and frame.time >= end
                    if is_video:
                        video_done = video_done or past
                    else:
                        audio_done = audio_done or past
                if video_done and audio_done:
                    break
            put(_END)
        except BaseException as exc:  # handed to the caller's thread
            put(exc)

    thread = threading.Thread(target=decode, name="media-decode", daemon=True)
    thread.start()
    try:
        while True:
            item = frames.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


# -- posters and thumbnails --------------------------------------------------------------------


def _score(grey: Image.Image) -> tuple[float, float, float]:
    """(score, mean luma, contrast): contrast, weighted towards mid brightness; near-black and
    near-white frames score below any other."""
    stat = ImageStat.Stat(grey)
    luma, contrast = stat.mean[0], stat.stddev[0]
    if luma < BLACK_LUMA or luma > 255 - BLACK_LUMA:
        return luma / 1000 if luma < 128 else (255 - luma) / 1000, luma, contrast
    return 1 + contrast * (1 - abs(luma - 128) / 255), luma, contrast


def _pick_frame(
    path: StrPath, samples: int, progress: Progress | None
) -> tuple[VideoFrame, FrameReport]:
    """Samples the middles of `samples` equal stretches of the video and keeps the best.

    Seeks to the keyframe before a sample only when that skips frames; otherwise decodes on,
    so a video with one keyframe is decoded once, not once per sample.
    """
    name = Path(path).name
    tick = _Ticker(progress, FRAMES_PER_TICK)
    with _open(path) as container:
        info = _info(container, name)
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        start = _start(stream)
        duration = info.duration or info.frames / info.fps
        key_times = _keyframe_times(container, stream, start)
        targets = [duration * (i + 0.5) / samples for i in range(samples)]
        half = float(1 / info.fps) / 2
        best: tuple[float, VideoFrame, FrameReport] | None = None
        position = -1.0
        decoder: Iterator[VideoFrame] | None = None
        try:
            for target in targets:
                key = max((k for k in key_times if k <= target + half), default=0.0)
                if decoder is None or key > position + half:
                    container.seek(
                        round((key + start) / stream.time_base), stream=stream, backward=True
                    )
                    decoder = container.decode(stream)
                frame = None
                for frame in decoder:
                    tick()
                    position = (frame.time or 0.0) - start
                    if position >= target - half:
                        break
                if frame is None:
                    continue
                score, luma, contrast = _score(_grey(frame))
                if best is None or score > best[0]:
                    report = FrameReport(
                        round(position, 3), frame.width, frame.height, round(luma, 2), contrast
                    )
                    best = (score, frame, report)
        except av.FFmpegError as exc:
            raise MediaError(f"{name} could not be decoded ({_reason(exc)})") from None
    if best is None:
        raise MediaError(f"{name} holds no decodable frames")
    return best[1], best[2]


def _keyframe_times(
    container: av.container.InputContainer, stream: VideoStream, start: float
) -> list[float]:
    # The demuxer's index holds decode times; a keyframe's presentation time is at or after
    # its decode time, so seeking to it lands at or before the keyframe: still correct.
    times = [
        float(entry.timestamp * stream.time_base) - start
        for entry in stream.index_entries
        if entry.is_keyframe
    ]
    return times or [0.0]


def _save_jpeg(frame: VideoFrame, out_jpg: StrPath, max_width: int | None) -> tuple[int, int]:
    width, height = frame.width, frame.height
    if max_width is not None and width > max_width:
        width, height = max_width, max(2, round(max_width * frame.height / frame.width))
    image = frame.reformat(width=width, height=height, format="rgb24", interpolation="AREA")
    with _output(out_jpg) as tmp:
        image.to_image().save(tmp, format="JPEG", quality=88, optimize=True)
    return width, height


def poster(
    video_path: StrPath, out_jpg: StrPath, *, samples: int = 12, progress: Progress | None = None
) -> FrameReport:
    """Writes a JPEG of the video's most representative frame, at full size.

    Samples the middles of `samples` equal stretches (never the very first frame, which is
    often black) and keeps the one with the most contrast, favouring mid brightness;
    near-black and near-white frames are taken only if nothing else is there.
    """
    frame, report = _pick_frame(video_path, samples, progress)
    width, height = _save_jpeg(frame, out_jpg, None)
    return FrameReport(report.time, width, height, report.luma, round(report.contrast, 2))


def thumbnail(
    clip_path: StrPath, out_jpg: StrPath, *, max_width: int = 320, samples: int = 5
) -> FrameReport:
    """A scene's thumbnail: the poster choice over `samples` points, at most `max_width` wide."""
    frame, report = _pick_frame(clip_path, samples, None)
    width, height = _save_jpeg(frame, out_jpg, max_width)
    return FrameReport(report.time, width, height, report.luma, round(report.contrast, 2))


# -- previews ----------------------------------------------------------------------------------


def _even(value: float) -> int:
    return max(2, int(round(value / 2)) * 2)


def preview(
    video_path: StrPath,
    out_mp4: StrPath,
    *,
    max_height: int = 360,
    target_bytes: int = 1_000_000,
    progress: Progress | None = None,
) -> PreviewReport:
    """A short, small, silent H.264 MP4 (faststart) that shows what a video is like.

    Policy: a video of up to PREVIEW_MAX_SECONDS (15 s) is previewed whole; a longer one by
    PREVIEW_SEGMENTS (5) excerpts of 3 s spread evenly over it, so every part of a storyboard
    shows. At most `max_height` pixels high (never upscaled), at most 30 fps. Size: x264 at CRF
    24 capped by a VBV whose maximum rate is chosen from the length so that maxrate x (seconds
    + one second of buffer) fits `target_bytes` less the MP4 overhead; the VBV makes that a
    bound, not an average. Should a file still come out too big, it is made again at a rate
    scaled down to fit.
    """
    name = Path(video_path).name
    with _open(video_path) as container:
        info = _info(container, name)
    duration = info.duration or float(info.frames / info.fps)
    if duration <= 0:
        raise MediaError(f"{name} has no duration")
    if duration <= PREVIEW_MAX_SECONDS:
        segments = [(0.0, duration)]
    else:
        length = PREVIEW_MAX_SECONDS / PREVIEW_SEGMENTS
        gap = (duration - length) / (PREVIEW_SEGMENTS - 1)
        segments = [(i * gap, length) for i in range(PREVIEW_SEGMENTS)]
    fps = info.fps if info.fps <= PREVIEW_MAX_FPS else info.fps / math.ceil(info.fps / 30)
    if max_height < 2:
        raise MediaError("A preview must be at least 2 pixels high")
    height = min(max_height, info.height) // 2 * 2
    width = _even(info.width * height / info.height)
    counts = [round(Fraction(seconds) * fps) for _, seconds in segments]
    frames = sum(counts)
    seconds = float(frames / fps)
    overhead = 8_192 + 16 * frames
    budget = max(target_bytes - overhead, target_bytes // 2) * 8
    rate = min(PREVIEW_MAX_BITRATE, int(budget / (seconds + 1)))
    with _output(out_mp4) as tmp:
        for _attempt in range(3):
            _encode_preview(video_path, tmp, segments, counts, width, height, fps, rate, progress)
            size = tmp.stat().st_size
            if size <= target_bytes:
                break
            rate = int(rate * target_bytes / size * 0.9)
        else:
            raise MediaError(f"Could not fit a preview of {name} in {target_bytes} bytes")
    return PreviewReport(
        duration=round(seconds, 6),
        frames=frames,
        width=width,
        height=height,
        fps=fps,
        bytes=size,
        max_bitrate=rate,
        segments=tuple((round(s, 3), round(n, 3)) for s, n in segments),
    )


def _encode_preview(
    video_path: StrPath,
    tmp: Path,
    segments: list[tuple[float, float]],
    counts: list[int],
    width: int,
    height: int,
    fps: Fraction,
    rate: int,
    progress: Progress | None,
) -> None:
    name = Path(video_path).name
    tick = _Ticker(progress, FRAMES_PER_TICK)
    try:
        with (
            _open(video_path) as container,
            av.open(str(tmp), "w", format="mp4", options={"movflags": "+faststart"}) as out,
        ):
            video = container.streams.video[0]
            video.thread_type = "AUTO"
            start = _start(video)
            stream = out.add_stream("libx264", rate=fps)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.codec_context.time_base = 1 / fps
            stream.codec_context.thread_type = "FRAME"
            stream.codec_context.gop_size = max(1, round(KEYFRAME_SECONDS * fps))
            stream.options = {
                "preset": PREVIEW_PRESET,
                "crf": str(PREVIEW_CRF),
                "maxrate": str(rate),
                "bufsize": str(rate),
            }
            pts = 0
            source: VideoFrame | None = None
            scaled: VideoFrame | None = None

            def emit(frame: VideoFrame) -> None:
                nonlocal pts, source, scaled
                tick()
                if frame is not source or scaled is None:
                    source = frame
                    scaled = frame.reformat(
                        width=width, height=height, format="yuv420p", interpolation="AREA"
                    )
                scaled.pts = pts
                scaled.time_base = stream.codec_context.time_base
                scaled.pict_type = PictureType.NONE
                pts += 1
                for packet in stream.encode(scaled):
                    out.mux(packet)

            position = -1.0
            for (begin, _), count in zip(segments, counts, strict=True):
                retimer = _Retimer(count, fps, emit)
                if begin > position + 1.0:
                    container.seek(round((begin + start) / video.time_base), stream=video)
                for frame in container.decode(video):
                    position = (frame.time or 0.0) - start
                    if position < begin - 0.5 / float(fps):
                        tick()
                        continue
                    retimer.feed(frame, position - begin)
                    if retimer.full:
                        break
                retimer.finish()
            for packet in stream.encode(None):
                out.mux(packet)
    except av.FFmpegError as exc:
        raise MediaError(f"{name} could not be previewed ({_reason(exc)})") from None
