"""What every benchmark shares: figures and their targets, results on disk, the machine, RSS,
and calls to the API that are safe to retry."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"


@dataclass
class Figure:
    """One row of RESULTS.md. `ratio` is ours / baseline; the target says which way is good."""

    name: str
    unit: str
    ours: float
    baseline: float | None = None
    # "ratio<=1.3", "ratio>=0.75", "ours<=300", "ours==0", or "" for a figure that is only reported
    target: str = ""
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.baseline in (None, 0):
            return None
        return self.ours / self.baseline

    @property
    def met(self) -> bool | None:
        if not self.target:
            return None
        subject, op, limit = _parse_target(self.target)
        value = self.ratio if subject == "ratio" else self.ours
        if value is None:
            return None
        return {"<=": value <= limit, ">=": value >= limit, "==": value == limit}[op]

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio, "met": self.met}


def _parse_target(target: str) -> tuple[str, str, float]:
    for op in ("<=", ">=", "=="):
        subject, found, limit = target.partition(op)
        if found:
            return subject.strip(), op, float(limit)
    raise ValueError(f"bad target {target!r}")


@dataclass
class Result:
    bench: str
    title: str
    figures: list[Figure] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    started: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    seconds: float = 0.0

    def add(self, *figures: Figure) -> None:
        self.figures.extend(figures)

    def save(self) -> Path:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        path = RESULTS_DIR / f"{self.bench}.json"
        body = {
            "bench": self.bench,
            "title": self.title,
            "started": self.started,
            "seconds": round(self.seconds, 1),
            "machine": machine(),
            "figures": [f.to_json() for f in self.figures],
            "raw": self.raw,
        }
        path.write_text(json.dumps(body, indent=2, default=str) + "\n")
        return path

    def print(self) -> None:
        for f in self.figures:
            ratio = f"{f.ratio:.2f}x" if f.ratio is not None else "-"
            base = _num(f.baseline) if f.baseline is not None else "-"
            verdict = {True: "met", False: "MISSED", None: ""}[f.met]
            print(
                f"  {f.name:<52} ours {_num(f.ours):>10} {f.unit:<12} baseline {base:>10}  "
                f"ratio {ratio:>7}  {f.target:<12} {verdict}",
                flush=True,
            )


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    if value == 0 or abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def run_bench(bench: str, title: str, body: Any) -> Result:
    """Runs `body(result)` and saves what it measured; the entry point of every benchmark."""
    result = Result(bench=bench, title=title)
    print(f"== {bench}: {title}", flush=True)
    t0 = time.monotonic()
    body(result)
    result.seconds = time.monotonic() - t0
    path = result.save()
    result.print()
    print(f"   ({result.seconds:.0f} s; raw numbers in {path.relative_to(ROOT)})", flush=True)
    return result


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(mem_gib, 1),
        "python": platform.python_version(),
        "system": f"{platform.system()} {platform.release()}",
    }


def machine_label(m: dict[str, Any]) -> str:
    return f"{m['cpus']} CPU {m['cpu']}, {m['memory_gib']:g} GiB, Python {m['python']}"


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(p / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def median(values: list[float]) -> float:
    return statistics.median(values)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_port(port: int, proc: subprocess.Popen[Any] | None = None, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} while starting")
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port} after {timeout:g}s")


def rss_kib(pid: int, field_name: str = "VmRSS") -> int:
    """VmRSS (now) or VmHWM (peak so far) of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/status has no {field_name}")


class RssSampler:
    """Samples a process's RSS in a thread; `peak` also reads the kernel's VmHWM high-water mark,
    so a spike between samples is not missed."""

    def __init__(self, pid: int, every: float = 0.1) -> None:
        self.pid = pid
        self.every = every
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self.start_kib = rss_kib(self.pid)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self.hwm_kib = rss_kib(self.pid, "VmHWM")
        except (OSError, RuntimeError):
            self.hwm_kib = max(self.samples, default=self.start_kib)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.samples.append(rss_kib(self.pid))
            except (OSError, RuntimeError):
                return

    @property
    def peak_sampled_kib(self) -> int:
        return max(self.samples, default=self.start_kib)


def mib(kib: float) -> float:
    return kib / 1024


def python() -> str:
    return sys.executable


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


class CpuMeter:
    """CPU seconds each named process spends between `start()` and `stop()`."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.before: dict[str, float] = {}

    def start(self) -> None:
        self.before = {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def stop(self) -> dict[str, float]:
        return {
            name: round(cpu_seconds(pid) - self.before[name], 3) for name, pid in self.pids.items()
        }


# -- calls that create or change something, retried safely --

# A POST that got no answer (seen for real: httpx.ReadError on a keep-alive connection the
# server closed as the client reused it) may or may not have been done. It is retried with
# the same Idempotency-Key, so the API answers a retry of a done request with its first
# answer instead of doing it twice; each logical request gets a fresh key.
SEND_ATTEMPTS = 4
RETRY_DELAY_SECONDS = 0.25


def _keyed(method: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    headers = dict(kwargs.pop("headers", None) or {})
    if method.upper() == "POST":
        headers["Idempotency-Key"] = str(uuid.uuid4())
    return {**kwargs, "headers": headers}


def _in_progress(response: httpx.Response) -> float | None:
    """Seconds to wait when the API says this key's first attempt is still being processed."""
    if response.status_code != 409 or "retry-after" not in response.headers:
        return None
    try:
        return float(response.headers["retry-after"])
    except ValueError:
        return 1.0


async def send(client: httpx.AsyncClient, method: str, url: str, **kwargs: Any) -> httpx.Response:
    """`client.request(method, url, **kwargs)`, retried on transport errors; a POST carries
    one Idempotency-Key across its attempts. Other methods of this API (PUT) are idempotent
    already."""
    kwargs = _keyed(method, kwargs)
    for attempt in range(1, SEND_ATTEMPTS + 1):
        try:
            response = await client.request(method, url, **kwargs)
        except httpx.TransportError:
            if attempt == SEND_ATTEMPTS:
                raise
            await asyncio.sleep(RETRY_DELAY_SECONDS * attempt)
            continue
        wait = _in_progress(response) if attempt > 1 else None
        if wait is None or attempt == SEND_ATTEMPTS:
            return response
        await asyncio.sleep(wait)
    raise AssertionError("unreachable")


def send_sync(client: httpx.Client, method: str, url: str, **kwargs: Any) -> httpx.Response:
    """`send` for a blocking client."""
    kwargs = _keyed(method, kwargs)
    for attempt in range(1, SEND_ATTEMPTS + 1):
        try:
            response = client.request(method, url, **kwargs)
        except httpx.TransportError:
            if attempt == SEND_ATTEMPTS:
                raise
            time.sleep(RETRY_DELAY_SECONDS * attempt)
            continue
        wait = _in_progress(response) if attempt > 1 else None
        if wait is None or attempt == SEND_ATTEMPTS:
            return response
        time.sleep(wait)
    raise AssertionError("unreachable")
