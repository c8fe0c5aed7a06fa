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
        draw.rectangle(
            [x, (i * 7) % height, x + step // 2, height - 1], fill=(shade, 255 - shade, 90)
        )
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
    tone_at: float = 0.0,
    audio_from: float = 0.0,
    audio_seconds: float | None = None,
) -> Path:
    """An H.264 MP4 made frame by frame: `moving` pans across a texture (every frame differs),
    `black` is black throughout, `frozen` shows one picture throughout. `black_lead` seconds of
    black come first. `audio` adds a stereo AAC track from `audio_from` for `audio_seconds`
    (default: as long as the picture): silence, then from `tone_at` a 440 Hz tone."""
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
            first = round(audio_from * 48_000)
            samples = round((seconds if audio_seconds is None else audio_seconds) * 48_000)
            onset = round(tone_at * 48_000)
            for start in range(first, first + samples, 1024):
                n = min(1024, first + samples - start)
                tone = array.array(
                    "f",
                    (
                        0.3 * math.sin(2 * math.pi * 440 * (start + k) / 48_000)
                        if start + k >= onset
                        else 0.0
                        for k in range(n)
                    ),
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


def tone_onsets(path: Path, threshold: float = 0.15, quiet: float = 0.1) -> list[float]:
    """Times at which the sound rises above `threshold` after `quiet` seconds below it."""
    onsets: list[float] = []
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        rate = stream.codec_context.sample_rate
        position, last_loud = 0, -(10**9)
        for frame in container.decode(stream):
            assert frame.format.name == "fltp"
            left = array.array("f", bytes(frame.planes[0])[: frame.samples * 4])
            for k, value in enumerate(left):
                if abs(value) > threshold:
                    if position + k - last_loud > quiet * rate:
                        onsets.append((position + k) / rate)
                    last_loud = position + k
            position += frame.samples
    return onsets


def moov_first(path: Path) -> bool:
    """Whether the index (moov) comes before the media data: a progressive download plays."""
    data = path.read_bytes()
    return 0 <= data.find(b"moov") < data.find(b"mdat")


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One set of clips for the module, each 320x180 at 24 fps with a keyframe every second
    unless its name says otherwise."""
    folder = tmp_path_factory.mktemp("clips")
    return {
        "a": make_clip(folder / "scene-a.mp4", seconds=2.0),
        "b": make_clip(folder / "scene-b.mp4", seconds=2.0),
        "a_audio": make_clip(folder / "scene-a-audio.mp4", seconds=2.0, audio=True),
        "b_audio": make_clip(folder / "scene-b-audio.mp4", seconds=2.0, audio=True),
        "black": make_clip(folder / "black.mp4", kind="black"),
        "frozen": make_clip(folder / "frozen.mp4", kind="frozen"),
        "fps30": make_clip(folder / "fps30.mp4", seconds=2.0, fps=30, keyint=30),
        "square": make_clip(folder / "square.mp4", seconds=2.0, width=240, height=240),
        "small": make_clip(folder / "small.mp4", seconds=2.0, width=256, height=144),
        "short": make_clip(folder / "short.mp4", seconds=3.2),
        "one_frame_short": make_clip(folder / "one-frame-short.mp4", seconds=119 / FPS),
        "black_lead": make_clip(folder / "black-lead.mp4", seconds=4.0, black_lead=1.5, keyint=250),
        "beep": make_clip(folder / "beep.mp4", seconds=2.0, audio=True, tone_at=0.5),
        "beep_late": make_clip(
            folder / "beep-late.mp4", seconds=2.0, audio=True, audio_from=0.5, tone_at=0.7
        ),
        "beep_short": make_clip(
            folder / "beep-short.mp4", seconds=2.0, audio=True, audio_seconds=1.0, tone_at=0.5
        ),
    }


@pytest.fixture
def truncated(tmp_path: Path) -> Path:
    """A clip cut off halfway, its index (at the front: faststart) still promising 4 s."""
    path = make_clip(tmp_path / "truncated.mp4", seconds=4.0)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def near(value: float, expected: float, tolerance: float) -> bool:
    return abs(value - expected) <= tolerance


FRAME = 1 / FPS


# -- probe -------------------------------------------------------------------------------------


def test_probe_reads_the_streams(clips: dict[str, Path]) -> None:
    info = media.probe(clips["a_audio"])
    assert (info.name, info.codec, info.width, info.height) == (
        "scene-a-audio.mp4",
        "h264",
        320,
        180,
    )
    assert info.pix_fmt == "yuv420p"
    assert info.fps == Fraction(24) and isinstance(info.fps, Fraction)
    assert info.frames == 48
    assert near(info.duration, 2.0, FRAME)
    assert info.has_audio and info.audio_codec == "aac"
    assert (info.audio_sample_rate, info.audio_channels) == (48_000, 2)
    silent = media.probe(clips["a"])
    assert not silent.has_audio and silent.audio_codec is None


def test_keyframes_are_where_the_encoder_put_them(clips: dict[str, Path]) -> None:
    assert media.keyframes(clips["a"]) == [0.0, 1.0]
    assert media.keyframes(clips["black_lead"]) == [0.0]


def test_probe_errors_name_the_file_but_not_its_folder(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"\x00\x00\x00\x18ftypisom" + bytes(2000))
    for path, expected in [
        (tmp_path / "missing.mp4", "missing.mp4 does not exist"),
        (garbage, "garbage.mp4 is not a readable video"),
    ]:
        with pytest.raises(MediaError, match=expected) as caught:
            media.probe(path)
        assert str(tmp_path) not in str(caught.value)
        assert "<" not in str(caught.value)  # no object repr


def test_every_function_names_a_bad_file_but_not_its_folder(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"\x00\x00\x00\x18ftypisom" + bytes(2000))
    out = tmp_path / "out"
    calls = {
        "probe": lambda: media.probe(garbage),
        "keyframes": lambda: media.keyframes(garbage),
        "check_clip": lambda: media.check_clip(garbage, min_seconds=1),
        "stitch": lambda: media.stitch([(garbage, 1.0)], out.with_suffix(".mp4")),
        "poster": lambda: media.poster(garbage, out.with_suffix(".jpg")),
        "thumbnail": lambda: media.thumbnail(garbage, out.with_suffix(".jpg")),
        "preview": lambda: media.preview(garbage, out.with_suffix(".mp4")),
    }
    for name, call in calls.items():
        with pytest.raises(MediaError) as caught:
            call()
        message = str(caught.value)
        assert message.startswith("garbage.mp4 is not a readable video ("), (name, message)
        assert str(tmp_path) not in message and "<" not in message, (name, message)
    assert [p.name for p in tmp_path.iterdir()] == ["garbage.mp4"]


# -- the quality gate --------------------------------------------------------------------------


def test_gate_accepts_a_moving_clip_and_reports_what_it_measured(clips: dict[str, Path]) -> None:
    report = media.check_clip(clips["a"], min_seconds=2.0)
    assert report.frames == 48
    assert near(report.duration, 2.0, 1e-6)
    assert report.motion > 10 * media.FROZEN_MOTION
    assert media.BLACK_LUMA < report.luma_min <= report.luma_max
    assert report.samples >= 4


def test_gate_rejects_a_black_clip(clips: dict[str, Path]) -> None:
    with pytest.raises(MediaError, match="Clip is black throughout"):
        media.check_clip(clips["black"], min_seconds=2.0)


def test_gate_rejects_a_frozen_clip_unless_the_profile_is_still_images(
    clips: dict[str, Path],
) -> None:
    with pytest.raises(MediaError, match="Clip is frozen: its 8 sampled frames differ by at most"):
        media.check_clip(clips["frozen"], min_seconds=2.0)
    report = media.check_clip(clips["frozen"], min_seconds=2.0, still_image=True)
    assert report.motion < media.FROZEN_MOTION
    assert report.frames == 48


def test_gate_rejects_a_clip_shorter_than_its_scene_by_more_than_a_frame(
    clips: dict[str, Path],
) -> None:
    # 3.2 s at 24 fps is 77 frames: 3.21 s
    with pytest.raises(MediaError, match=r"^Clip lasts 3\.21 s, the scene needs 5 s$"):
        media.check_clip(clips["short"], min_seconds=5)
    report = media.check_clip(clips["one_frame_short"], min_seconds=119 / FPS + FRAME)
    assert report.frames == 119


def test_gate_rejects_a_truncated_clip(truncated: Path) -> None:
    with pytest.raises(MediaError, match=r"^Clip is truncated: frames stop at [\d.]+ s of 4 s$"):
        media.check_clip(truncated, min_seconds=4)


def test_gate_rejects_a_cut_off_clip_whose_index_was_at_the_end(tmp_path: Path) -> None:
    path = make_clip(tmp_path / "no-index.mp4", seconds=2.0, faststart=False)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(MediaError, match="^no-index.mp4 is not a readable video") as caught:
        media.check_clip(path, min_seconds=2)
    assert str(tmp_path) not in str(caught.value)


# -- stitching ---------------------------------------------------------------------------------


def test_stitch_copies_streams_when_clips_match_and_cuts_fall_on_keyframes(
    clips: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "final.mp4"
    # whole clips, and a cut at 1 s where each clip has a keyframe
    cuts = [ClipCut(clips["a"], 2.0), ClipCut(clips["b"], 1.0), ClipCut(clips["a"], 2.0)]
    report = media.stitch(cuts, out)
    assert report.mode == "copy" and report.reason == ""
    assert [c.frames for c in report.clips] == [48, 24, 48]
    assert [c.seconds_used for c in report.clips] == [2.0, 1.0, 2.0]
    seen = decode(out)
    assert seen.frames == report.frames == 120
    assert near(seen.last_time + FRAME, 5.0, FRAME)
    assert near(seen.duration, 5.0, FRAME)
    assert (seen.width, seen.height) == (320, 180)
    assert not seen.has_audio
    assert moov_first(out)
    assert [p.name for p in tmp_path.iterdir()] == ["final.mp4"]


def test_stitch_reencodes_when_a_cut_misses_a_keyframe(
    clips: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "final.mp4"
    cuts = [(clips["a"], 1.5), (clips["b"], 1.3), (clips["a"], 2.0)]
    report = media.stitch(cuts, out)
    assert report.mode == "reencode"
    assert report.reason == "Clip 1 (scene-a.mp4): the cut at 1.5 s is not on a keyframe"
    seen = decode(out)
    # 4.8 s at 24 fps; each scene within a frame of its seconds
    assert seen.frames == report.frames == round(4.8 * FPS)
    assert near(seen.last_time + FRAME, 4.8, FRAME)
    assert near(seen.duration, 4.8, FRAME)
    for used, (_, seconds) in zip(report.clips, cuts, strict=True):
        assert near(used.seconds_used, seconds, FRAME)
    assert moov_first(out)


def test_stitch_reencodes_other_sizes_and_rates_to_the_most_common(
    clips: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "final.mp4"
    cuts = [
        (clips["a"], 1.3),
        (clips["fps30"], 1.7),
        (clips["square"], 2.0),
        (clips["small"], 1.1),
        (clips["b"], 2.0),
    ]
    report = media.stitch(cuts, out)
    assert report.mode == "reencode"
    assert "frame rate" in report.reason
    assert (report.width, report.height, report.fps) == (320, 180, Fraction(24))
    seen = decode(out)
    total = sum(seconds for _, seconds in cuts)
    assert seen.frames == report.frames
    assert near(seen.frames / FPS, total, FRAME)
    assert near(seen.duration, total, FRAME)
    assert (seen.width, seen.height) == (320, 180)


@pytest.mark.parametrize("cut_b", [2.0, 1.5], ids=["copy", "reencode"])
def test_stitch_keeps_audio_cut_to_the_picture_when_every_clip_has_some(
    clips: dict[str, Path], tmp_path: Path, cut_b: float
) -> None:
    out = tmp_path / "final.mp4"
    cuts = [(clips["a_audio"], 2.0), (clips["b_audio"], cut_b), (clips["a_audio"], 1.0)]
    report = media.stitch(cuts, out)
    assert report.mode == report.audio_mode == ("copy" if cut_b == 2.0 else "reencode")
    assert report.has_audio
    seen = decode(out)
    total = 3.0 + cut_b
    assert seen.frames == round(total * FPS)
    assert seen.has_audio and seen.audio_rate == 48_000
    # AAC codes 1024 samples at a time: the last packet may hold up to 1023 samples of padding
    assert near(seen.audio_samples / seen.audio_rate, total, 1024 / 48_000)
    assert near(seen.duration, total, 1024 / 48_000)


@pytest.mark.parametrize(
    ("cuts", "mode", "tolerance"),
    [
        # AAC packets copied: each clip's sound within half an AAC frame (10.7 ms) of its
        # picture, and the error does not add up over the clips
        ([2.0, 1.0, 2.0, 2.0, 1.0, 2.0], "copy", 0.012),
        # decoded and cut to the sample
        ([1.5, 1.3, 2.0, 1.1, 1.7], "reencode", 0.003),
    ],
    ids=["copy", "reencode"],
)
def test_stitched_sound_stays_on_its_picture(
    clips: dict[str, Path], tmp_path: Path, cuts: list[float], mode: str, tolerance: float
) -> None:
    """Every clip beeps 0.5 s after it starts: in the final video, so must every scene."""
    out = tmp_path / "final.mp4"
    report = media.stitch([(clips["beep"], seconds) for seconds in cuts], out)
    assert report.mode == report.audio_mode == mode
    # where each scene's picture starts: whole frames, so up to half a frame off the seconds
    used = [clip.seconds_used for clip in report.clips]
    starts = [sum(used[:i]) for i in range(len(used))]
    planned = [sum(cuts[:i]) for i in range(len(cuts))]
    assert all(near(a, b, FRAME / 2) for a, b in zip(starts, planned, strict=True))
    onsets = tone_onsets(out)
    assert len(onsets) == len(cuts)
    for heard, start in zip(onsets, starts, strict=True):
        assert near(heard, start + 0.5, tolerance), (heard, start + 0.5)


@pytest.mark.parametrize("other", ["beep_short", "beep_late"])
def test_sound_that_ends_early_or_starts_late_is_reencoded_with_silence(
    clips: dict[str, Path], tmp_path: Path, other: str
) -> None:
    """The picture is still copied; the sound is re-encoded so the gap is silence in place
    (copied packets laid end to end would close it, and the sound after it would come early).
    The short clip's sound ends halfway (found from its header); the late one's starts 0.5 s
    in (found while copying, which then starts again)."""
    out = tmp_path / "final.mp4"
    report = media.stitch([(clips[other], 2.0), (clips["beep"], 2.0)], out)
    assert (report.mode, report.audio_mode) == ("copy", "reencode")
    seen = decode(out)
    assert seen.frames == 96
    assert near(seen.audio_samples / seen.audio_rate, 4.0, 1024 / 48_000)
    first = 0.7 if other == "beep_late" else 0.5
    onsets = tone_onsets(out)
    assert len(onsets) == 2
    assert near(onsets[0], first, 0.003) and near(onsets[1], 2.5, 0.003)
    assert [p.name for p in tmp_path.iterdir()] == ["final.mp4"]


def test_stitch_drops_audio_when_any_clip_has_none(clips: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "final.mp4"
    report = media.stitch([(clips["a_audio"], 2.0), (clips["b"], 2.0)], out)
    assert report.mode == "copy"
    assert not report.has_audio and report.audio_mode == "none"
    seen = decode(out)
    assert not seen.has_audio
    assert seen.frames == 96


class Stop(Exception):
    pass


def _stopping_after(calls: int) -> tuple[list[int], media.Progress]:
    seen: list[int] = []

    def progress() -> None:
        seen.append(1)
        if len(seen) >= calls:
            raise Stop()

    return seen, progress


@pytest.mark.parametrize("cut", [2.0, 1.5], ids=["copy", "reencode"])
def test_a_raising_progress_callback_stops_stitch_and_leaves_no_file(
    clips: dict[str, Path], tmp_path: Path, cut: float
) -> None:
    out = tmp_path / "final.mp4"
    seen, progress = _stopping_after(3)
    with pytest.raises(Stop):
        media.stitch([(clips["a_audio"], cut), (clips["b_audio"], 2.0)], out, progress=progress)
    assert len(seen) == 3
    assert list(tmp_path.iterdir()) == []


def test_progress_is_called_as_stitch_goes(clips: dict[str, Path], tmp_path: Path) -> None:
    calls: list[int] = []
    media.stitch(
        [(clips["a"], 1.5), (clips["b"], 2.0)],
        tmp_path / "out.mp4",
        progress=lambda: calls.append(1),
    )
    # 84 frames re-encoded: at least one call per FRAMES_PER_TICK frames
    assert len(calls) >= 84 // media.FRAMES_PER_TICK


def test_stitch_errors_name_the_clip_but_not_its_folder(
    clips: dict[str, Path], truncated: Path, tmp_path: Path
) -> None:
    out = tmp_path / "final.mp4"
    cases = [
        (
            [(clips["a"], 2.0), (clips["short"], 5.0)],
            r"^Clip 2 \(short.mp4\) lasts 3.21 s, the scene needs 5 s$",
        ),
        (
            [(clips["a"], 1.0), (truncated, 4.0)],
            r"^Clip 2 \(truncated.mp4\) is truncated: its frames stop at",
        ),
        ([(clips["a"], 0.0)], r"^Clip 1 \(scene-a.mp4\): its duration must be a positive number$"),
        (
            [(clips["a"], 0.01)],
            r"^Clip 1 \(scene-a.mp4\): the scene's 0.01 s is shorter than one frame",
        ),
        ([(tmp_path / "gone.mp4", 1.0)], r"^gone.mp4 does not exist$"),
        ([], r"^No clips to stitch$"),
    ]
    for cuts, pattern in cases:
        with pytest.raises(MediaError, match=pattern) as caught:
            media.stitch(cuts, out)
        assert str(tmp_path) not in str(caught.value)
        assert str(clips["a"].parent) not in str(caught.value)
    assert [p.name for p in tmp_path.iterdir()] == ["truncated.mp4"]


def test_stitch_allows_a_clip_one_frame_short(clips: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "final.mp4"
    report = media.stitch([(clips["one_frame_short"], 5.0), (clips["a"], 1.0)], out)
    assert decode(out).frames == report.frames == 6 * FPS


# -- posters, thumbnails, previews -------------------------------------------------------------


def _jpeg_luma(path: Path) -> float:
    with Image.open(path) as image:
        assert image.format == "JPEG"
        return ImageStat.Stat(image.convert("L")).mean[0]


def test_poster_is_not_the_black_opening(clips: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "poster.jpg"
    report = media.poster(clips["black_lead"], out)
    assert report.time >= 1.5
    assert (report.width, report.height) == (320, 180)
    assert _jpeg_luma(out) > 5 * media.BLACK_LUMA
    with Image.open(out) as image:
        assert image.size == (320, 180)


def test_thumbnail_is_at_most_max_width_and_decodes(clips: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "thumb.jpg"
    report = media.thumbnail(clips["black_lead"], out, max_width=160)
    with Image.open(out) as image:
        image.load()
        assert image.size == (160, 90) == (report.width, report.height)
    assert _jpeg_luma(out) > 5 * media.BLACK_LUMA


def test_preview_is_small_short_and_playable(tmp_path: Path) -> None:
    source = make_clip(tmp_path / "long.mp4", seconds=20.0, width=640, height=480, keyint=48)
    out = tmp_path / "preview.mp4"
    report = media.preview(source, out)
    # 20 s is over the 15 s cap: five 3 s excerpts spread over the video
    assert report.segments == ((0.0, 3.0), (4.25, 3.0), (8.5, 3.0), (12.75, 3.0), (17.0, 3.0))
    assert out.stat().st_size == report.bytes <= 1_100_000
    seen = decode(out)
    assert seen.height <= 360 and (seen.width, seen.height) == (480, 360)
    assert seen.frames == report.frames == 15 * FPS
    assert not seen.has_audio
    assert moov_first(out)


def test_preview_keeps_to_a_tight_byte_budget(clips: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "preview.mp4"
    report = media.preview(clips["short"], out, max_height=120, target_bytes=30_000)
    assert out.stat().st_size <= 30_000
    seen = decode(out)
    assert seen.height == 120 and seen.frames == report.frames == 77


@pytest.mark.parametrize("what", ["preview", "poster", "check_clip"])
def test_a_raising_progress_callback_stops_the_others_too(
    clips: dict[str, Path], tmp_path: Path, what: str
) -> None:
    seen, progress = _stopping_after(2)
    with pytest.raises(Stop):
        if what == "preview":
            media.preview(clips["black_lead"], tmp_path / "out.mp4", progress=progress)
        elif what == "poster":
            media.poster(clips["black_lead"], tmp_path / "out.jpg", progress=progress)
        else:
            media.check_clip(clips["black_lead"], min_seconds=4, progress=progress)
    assert len(seen) == 2
    assert list(tmp_path.iterdir()) == []


def test_writing_into_a_missing_folder_is_a_clear_error(
    clips: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(MediaError, match="^Cannot write out.mp4: its folder does not exist$"):
        media.stitch([(clips["a"], 1.0)], tmp_path / "nowhere" / "out.mp4")
