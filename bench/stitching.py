"""Stitching ten scene clips into the final video, against the ffmpeg command line.

Ten 5 s clips of 1280x720 H.264 at 24 fps (a textured picture panning under moving film grain,
about 5 Mbit/s like a video model's output; x264's default keyframe interval, so each clip has
one keyframe), made once and cached under bench/.cache/. Three cases:

- stream copy: every clip whole, `backend.media.stitch` (it chooses stream copy) against
  `ffmpeg -f concat -safe 0 -i list.txt -c copy -movflags +faststart`;
- the same with a 48 kHz stereo AAC track in every clip (the same clips, remuxed with sound),
  which stitch() copies too;
- re-encode: every clip trimmed to 3.3 s, which is not on a keyframe, so `stitch` re-encodes;
  against ffmpeg decoding the same frames (per-input `-t`, `trim=end_frame`, the concat filter)
  and encoding them with the same x264 settings (veryfast, CRF 20, keyframe every 2 s, yuv420p,
  faststart).

Both outputs are decoded and must agree in frame count and duration. stitch() is called
in-process, as an activity calls it in a thread; ffmpeg runs as a process. One warm-up each,
then interleaved runs, medians.
"""

from __future__ import annotations

import array
import math
import os
import resource
import subprocess
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import imageio_ffmpeg
from PIL import Image, ImageChops, ImageDraw

from backend import media

from .common import BENCH_DIR, Figure, Result, median, run_bench
from .stack import workdir

WIDTH, HEIGHT, FPS, SECONDS, CLIPS = 1280, 720, 24, 5.0, 10
TRIM = 3.3
COPY_RUNS = 7
CHORD = (220.0, 277.2, 329.6)
REENCODE_RUNS = 7
CACHE = BENCH_DIR / ".cache" / "stitching-v1"


def _clip_frames(index: int) -> list[Image.Image]:
    """A picture twice the width of the frame, with detail everywhere, and grain to move over
    it: what x264 sees is neither static nor noise."""
    grain_amount = 5
    noise = Image.effect_noise((WIDTH // 2, HEIGHT // 4), 60).resize(
        (WIDTH * 2, HEIGHT), Image.Resampling.BICUBIC
    )
    gradient = Image.linear_gradient("L").rotate(90 * (index % 4)).resize((WIDTH * 2, HEIGHT))
    picture = Image.merge("RGB", (noise, gradient, ImageChops.invert(noise)))
    draw = ImageDraw.Draw(picture)
    for i in range(40):
        x, y = (i * 97 + index * 61) % (WIDTH * 2), (i * 53 + index * 17) % HEIGHT
        fill = ((i * 40 + index * 25) % 256, (i * 90) % 256, (i * 20 + index * 7) % 256)
        draw.ellipse([x, y, x + 120, y + 80], fill=fill)
    grain = [
        Image.merge(
            "RGB", [Image.effect_noise((WIDTH // 2, HEIGHT // 2), grain_amount)] * 3
        ).resize((WIDTH, HEIGHT), Image.Resampling.BILINEAR)
        for _ in range(7)
    ]
    speed = 3 + index % 3
    return [
        ImageChops.add(
            picture.crop((i * speed, 0, i * speed + WIDTH, HEIGHT)), grain[i % 7], offset=-128
        )
        for i in range(round(SECONDS * FPS))
    ]


def make_clips() -> list[Path]:
    """The ten clips, made on first use and kept: encoding them takes a minute."""
    CACHE.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(CLIPS):
        path = CACHE / f"clip-{index:02d}.mp4"
        paths.append(path)
        if path.exists():
            continue
        part = path.with_suffix(".part")
        with av.open(str(part), "w", format="mp4", options={"movflags": "+faststart"}) as out:
            stream = out.add_stream("libx264", rate=FPS)
            stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
            stream.codec_context.thread_type = "FRAME"
            stream.options = {"preset": "veryfast", "crf": "20"}
            for pts, image in enumerate(_clip_frames(index)):
                frame = av.VideoFrame.from_image(image).reformat(format="yuv420p")
                frame.pts = pts
                for packet in stream.encode(frame):
                    out.mux(packet)
            for packet in stream.encode(None):
                out.mux(packet)
        os.replace(part, path)
    return paths


def with_sound(clips: list[Path]) -> list[Path]:
    """The clips remuxed with 5 s of 192 kbit/s stereo AAC (a chord), made once and kept."""
    paths = []
    for clip in clips:
        path = clip.with_name(clip.stem + "-aac.mp4")
        paths.append(path)
        if path.exists():
            continue
        part = path.with_suffix(".part")
        with (
            av.open(str(clip)) as source,
            av.open(str(part), "w", format="mp4", options={"movflags": "+faststart"}) as out,
        ):
            video = out.add_stream_from_template(source.streams.video[0])
            audio = out.add_stream("aac", rate=48_000)
            audio.layout = "stereo"
            audio.bit_rate = 192_000
            for packet in source.demux(source.streams.video[0]):
                if packet.dts is not None:
                    packet.stream = video
                    out.mux(packet)
            samples = round(SECONDS * 48_000)
            for start in range(0, samples, 1024):
                n = min(1024, samples - start)
                chord = array.array(
                    "f",
                    (
                        0.1 * sum(math.sin(2 * math.pi * f * (start + k) / 48_000) for f in CHORD)
                        for k in range(n)
                    ),
                ).tobytes()
                frame = av.AudioFrame(format="fltp", layout="stereo", samples=n)
                frame.sample_rate, frame.pts = 48_000, start
                for plane in frame.planes:
                    plane.update(chord + bytes(plane.buffer_size - len(chord)))
                for packet in audio.encode(frame):
                    out.mux(packet)
            for packet in audio.encode(None):
                out.mux(packet)
        os.replace(part, path)
    return paths


def frame_counts(seconds: list[float], fps: int) -> list[int]:
    """Frames per clip as stitch() allots them: rounded cumulative ends."""
    counts, elapsed, taken = [], Fraction(0), 0
    for s in seconds:
        elapsed += Fraction(s)
        counts.append(round(elapsed * fps) - taken)
        taken += counts[-1]
    return counts


def ffmpeg_copy_command(clips: list[Path], listing: Path, out: Path) -> list[str]:
    listing.write_text("".join(f"file '{clip}'\n" for clip in clips))
    return [
        imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
        "-f", "concat", "-safe", "0", "-i", str(listing),
        "-c", "copy", "-movflags", "+faststart", str(out),
    ]  # fmt: skip


def ffmpeg_reencode_command(clips: list[Path], counts: list[int], out: Path) -> list[str]:
    """The same frames, the same encoder settings. `-t` (a little over the cut) stops reading
    each input at its cut; `trim=end_frame` takes exactly the frames stitch() takes."""
    inputs = []
    for clip, n in zip(clips, counts, strict=True):
        inputs += ["-t", f"{(n + 0.5) / FPS:.4f}", "-i", str(clip)]
    chains = [f"[{i}:v]trim=end_frame={n},setpts=PTS-STARTPTS[v{i}]" for i, n in enumerate(counts)]
    joined = "".join(f"[v{i}]" for i in range(len(clips)))
    graph = ";".join(chains) + f";{joined}concat=n={len(clips)}:v=1:a=0[out]"
    return [
        imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
        *inputs,
        "-filter_complex", graph, "-map", "[out]",
        "-c:v", "libx264", "-preset", media.STITCH_PRESET, "-crf", str(media.STITCH_CRF),
        "-g", str(media.KEYFRAME_SECONDS * FPS), "-pix_fmt", "yuv420p",
        "-movflags", "+faststart", str(out),
    ]  # fmt: skip


def run_ours(cuts: list[media.ClipCut], out: Path) -> dict[str, Any]:
    cpu0, t0 = time.process_time(), time.perf_counter()
    report = media.stitch(cuts, out)
    return {
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - cpu0,
        "mode": report.mode,
        "audio_mode": report.audio_mode,
    }


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
        seen = {
            "frames": frames,
            "width": stream.codec_context.width,
            "height": stream.codec_context.height,
            "duration": round((container.duration or 0) / 1_000_000, 3),
            "codec": stream.codec_context.name,
            "bytes": path.stat().st_size,
            "audio_seconds": None,
        }
    with av.open(str(path)) as container:
        if container.streams.audio:
            audio = container.streams.audio[0]
            samples = sum(frame.samples for frame in container.decode(audio))
            seen["audio_seconds"] = round(samples / audio.codec_context.sample_rate, 3)
    return seen


def _case(
    raw: dict[str, Any],
    name: str,
    runs: int,
    cuts: list[media.ClipCut],
    command: list[str],
    ours_out: Path,
    ffmpeg_out: Path,
    expected_frames: int,
    mode: str,
    audio_mode: str = "none",
) -> None:
    case: dict[str, Any] = {"ffmpeg_command": subprocess.list2cmdline(command)}
    raw[name] = case
    case["warmup"] = {"ours": run_ours(cuts, ours_out), "ffmpeg": run_ffmpeg(command)}
    case["ours"], case["ffmpeg"] = [], []
    for i in range(runs):
        # Alternating who goes first, so neither always runs on the other's heels.
        for who in ("ours", "ffmpeg") if i % 2 == 0 else ("ffmpeg", "ours"):
            if who == "ours":
                case["ours"].append(run_ours(cuts, ours_out))
            else:
                case["ffmpeg"].append(run_ffmpeg(command))
    check = {"ours": describe(ours_out), "ffmpeg": describe(ffmpeg_out)}
    case["check"] = check
    expected_seconds = expected_frames / FPS
    for who, seen in check.items():
        if seen["frames"] != expected_frames or abs(seen["duration"] - expected_seconds) > 1 / FPS:
            raise RuntimeError(
                f"{name}: {who}'s video has {seen['frames']} frames and lasts "
                f"{seen['duration']} s; expected {expected_frames} frames, {expected_seconds} s"
            )
        if (seen["width"], seen["height"], seen["codec"]) != (WIDTH, HEIGHT, "h264"):
            raise RuntimeError(f"{name}: {who}'s video is not 720p H.264: {seen}")
        # Only ours: ffmpeg's concat plays every clip's encoder priming and padding, so its
        # sound comes out longer than the picture (recorded in the raw numbers).
        sound_off = abs((seen["audio_seconds"] or 0) - expected_seconds) > 1024 / 48_000
        if who == "ours" and audio_mode != "none" and sound_off:
            raise RuntimeError(f"{name}: {who}'s sound lasts {seen['audio_seconds']} s")
    modes = {(r["mode"], r["audio_mode"]) for r in case["ours"]}
    if modes != {(mode, audio_mode)}:
        raise RuntimeError(f"{name}: stitch() chose {modes}, not {(mode, audio_mode)}")
    case["check_passed"] = True
    ours_out.unlink()
    ffmpeg_out.unlink()


def body(result: Result) -> None:
    raw = result.raw
    t0 = time.perf_counter()
    clips = make_clips()
    raw["clips_ready_seconds"] = round(time.perf_counter() - t0, 1)
    raw["clip_bytes"] = [clip.stat().st_size for clip in clips]
    with workdir("stitching") as work:
        whole = [media.ClipCut(clip, SECONDS) for clip in clips]
        copy_command = ffmpeg_copy_command(clips, work / "list.txt", work / "ffmpeg-copy.mp4")
        _case(
            raw, "copy", COPY_RUNS, whole, copy_command,
            work / "ours-copy.mp4", work / "ffmpeg-copy.mp4", round(SECONDS * FPS) * CLIPS,
            "copy",
        )  # fmt: skip
        sounding = with_sound(clips)
        whole_sound = [media.ClipCut(clip, SECONDS) for clip in sounding]
        sound_command = ffmpeg_copy_command(
            sounding, work / "list-aac.txt", work / "ffmpeg-copy-aac.mp4"
        )
        _case(
            raw, "copy_aac", COPY_RUNS, whole_sound, sound_command,
            work / "ours-copy-aac.mp4", work / "ffmpeg-copy-aac.mp4",
            round(SECONDS * FPS) * CLIPS, "copy", "copy",
        )  # fmt: skip
        trimmed = [media.ClipCut(clip, TRIM) for clip in clips]
        counts = frame_counts([TRIM] * CLIPS, FPS)
        reencode_command = ffmpeg_reencode_command(clips, counts, work / "ffmpeg-reencode.mp4")
        _case(
            raw, "reencode", REENCODE_RUNS, trimmed, reencode_command,
            work / "ours-reencode.mp4", work / "ffmpeg-reencode.mp4", sum(counts),
            "reencode",
        )  # fmt: skip

    def med(case: str, who: str, key: str = "seconds") -> float:
        return median([r[key] for r in raw[case][who]])

    raw["cpu_seconds_median"] = {
        case: {who: med(case, who, "cpu_seconds") for who in ("ours", "ffmpeg")}
        for case in ("copy", "copy_aac", "reencode")
    }
    mib = sum(raw["clip_bytes"]) / 2**20
    result.add(
        Figure(
            f"Stitch 10 clips x 5 s, 720p24 H.264 ({mib:.0f} MiB), stream copy",
            "s",
            med("copy", "ours"),
            med("copy", "ffmpeg"),
            "ratio<=1.2",
            "stitch() in-process (probe, keyframe plan, remux, faststart) against ffmpeg's "
            f"concat demuxer with -c copy -movflags +faststart; 1,200 frames each, checked by "
            f"decoding; median of {COPY_RUNS}, interleaved",
        ),
        Figure(
            "Stitch the same 10 clips with AAC sound, stream copy",
            "s",
            med("copy_aac", "ours"),
            med("copy_aac", "ffmpeg"),
            "ratio<=1.2",
            "sound copied too, each clip's laid to its picture within half an AAC frame; "
            f"against the same ffmpeg command; sound length checked; median of {COPY_RUNS}, "
            "interleaved",
        ),
        Figure(
            f"Stitch 10 clips trimmed to {TRIM} s (off keyframes), re-encoded",
            "s",
            med("reencode", "ours"),
            med("reencode", "ffmpeg"),
            "ratio<=1.2",
            f"both decode the same {sum(counts)} frames and encode libx264 "
            f"{media.STITCH_PRESET} CRF {media.STITCH_CRF}, a keyframe every "
            f"{media.KEYFRAME_SECONDS} s, yuv420p, faststart; frame counts and durations "
            f"checked by decoding; median of {REENCODE_RUNS}, interleaved",
        ),
        Figure(
            f"Stitch 10 clips trimmed to {TRIM} s, re-encoded: CPU time",
            "s",
            med("reencode", "ours", "cpu_seconds"),
            med("reencode", "ffmpeg", "cpu_seconds"),
            "",
            "user + system CPU of our process and of ffmpeg's; on a machine shared with other "
            "work the wall time varies with the load, the CPU time much less",
        ),
    )


def main() -> None:
    run_bench("stitching", "Stitching scene clips against the ffmpeg command line", body)


if __name__ == "__main__":
    main()
