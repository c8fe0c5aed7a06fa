"""The product's processes, started the way `render-video dev` starts them, on free ports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from backend.auth import KeyStore
from backend.cli import api_command, temporal_dev_command
from backend.database import make_engine

from .common import free_port, wait_port


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    port: int | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid


def _spawn(
    name: str, args: list[str], env: dict[str, str], log_dir: Path, port: int | None
) -> Proc:
    log = (log_dir / f"{name}.log").open("ab")
    try:
        popen = subprocess.Popen(args, stdout=log, stderr=log, env=env, start_new_session=True)
    finally:
        log.close()
    proc = Proc(name, popen, port)
    if port is not None:
        wait_port(port, popen)
    return proc


def _stop(proc: Proc) -> None:
    if proc.popen.poll() is None:
        proc.popen.send_signal(signal.SIGTERM)
        try:
            proc.popen.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.popen.kill()
            proc.popen.wait()


@contextmanager
def temporal_server(log_dir: Path, *, db_file: bool = False) -> Iterator[str]:
    """A Temporal dev server with the flags `render-video dev` uses, but in memory unless
    `db_file`: a file costs an fsync per transaction, which would be most of what is measured."""
    log_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    db = log_dir / "temporal.db" if db_file else None
    args = temporal_dev_command("127.0.0.1", port, db_file=db)
    proc = _spawn("temporal", args, dict(os.environ), log_dir, port)
    (log_dir / "temporal.pid").write_text(str(proc.pid))
    time.sleep(0.5)  # the frontend answers a moment after the port binds
    try:
        yield f"127.0.0.1:{port}"
    finally:
        _stop(proc)


def temporal_pid(log_dir: Path) -> int:
    return int((log_dir / "temporal.pid").read_text())


@dataclass
class Stack:
    """API, local render server and worker of one deployment (one job store, one task queue)."""

    dir: Path
    temporal_address: str
    api_port: int = field(default_factory=free_port)
    render_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    procs: dict[str, Proc] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    key: str = ""  # an API key of the tenant `bench`

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def headers(self) -> dict[str, str]:
        """What every request to the API sends: its key."""
        return {"Authorization": f"Bearer {self.key}"}

    @property
    def render_server(self) -> str:
        return f"http://127.0.0.1:{self.render_port}"

    @property
    def worker(self) -> Proc:
        return self.procs["worker"]


@contextmanager
def product_stack(
    dir: Path,
    temporal_address: str,
    *,
    webhooks: bool = True,
    start_delay: float = 0.0,
    min_processing: float = 0.0,
    task_queue: str = "render-video",
    metrics: bool = False,
    extra_env: dict[str, str] | None = None,
    render_args: list[str] | None = None,
) -> Iterator[Stack]:
    """Starts the API, the render server and the worker as `render-video dev` does, each in its
    own process with its log in `dir`."""
    dir.mkdir(parents=True, exist_ok=True)
    stack = Stack(dir=dir, temporal_address=temporal_address)
    env = dict(
        os.environ,
        DATA_DIR=str(dir / "data"),
        TEMPORAL_ADDRESS=temporal_address,
        TASK_QUEUE=task_queue,
        API_PORT=str(stack.api_port),
        LOCAL_RENDER_PORT=str(stack.render_port),
        PYTHONUNBUFFERED="1",
    )
    env.pop("REPLICATE_API_TOKEN", None)
    if webhooks:
        env["PUBLIC_BASE_URL"] = stack.api
    else:
        env.pop("PUBLIC_BASE_URL", None)
    if metrics:
        env["WORKER_METRICS_ADDRESS"] = f"127.0.0.1:{stack.metrics_port}"
    env.update(extra_env or {})
    stack.env = env
    # The job store the API will open (DATA_DIR/jobs.db), with a key in it for the load.
    jobs_db = (dir / "data" / "jobs.db").resolve()
    stack.key = KeyStore(make_engine(f"sqlite:///{jobs_db}")).create("bench").key
    py = sys.executable
    with ExitStack() as stop:
        for name, args, port in (
            (
                "api",
                # As `render-video dev` serves it.
                api_command("127.0.0.1", stack.api_port),
                stack.api_port,
            ),
            (
                "render-server",
                [
                    py,
                    "-m",
                    "local_replicate",
                    "--port",
                    str(stack.render_port),
                    "--data-dir",
                    str(dir / "render-server"),
                    "--start-delay",
                    str(start_delay),
                    "--min-processing",
                    str(min_processing),
                    # the benchmarks read /_admin/stats and queue faults
                    "--admin",
                    *(render_args or []),
                ],
                stack.render_port,
            ),
            ("worker", [py, "-m", "worker"], stack.metrics_port if metrics else None),
        ):
            proc = _spawn(name, args, env, dir, port)
            stack.procs[name] = proc
            stop.callback(_stop, proc)
        if not metrics:
            _wait_worker_polling(dir / "worker.log", stack.worker)
        yield stack


def _wait_worker_polling(log: Path, proc: Proc, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and "worker running" in log.read_text(errors="replace"):
            return
        if proc.popen.poll() is not None:
            raise RuntimeError(f"the worker exited with {proc.popen.returncode}; see {log}")
        time.sleep(0.05)
    raise TimeoutError(f"the worker did not start within {timeout:g}s; see {log}")


@contextmanager
def workdir(name: str) -> Iterator[Path]:
    """A scratch directory under bench/.work (kept for the logs until the next run)."""
    base = Path(__file__).resolve().parent / ".work"
    base.mkdir(exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=base))
    yield path
