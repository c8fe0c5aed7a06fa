"""Real processes for the tests: workers, API servers and a restartable Temporal dev server as
subprocesses whose output lands in a log file, the waits that go with them, and throwaway
PostgreSQL databases."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psycopg
from sqlalchemy.engine import make_url
from temporalio.client import Client

from backend.cli import api_command, temporal_binary
from backend.settings import Settings

POSTGRES_URL = os.environ.get(
    "TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


@contextmanager
def throwaway_postgres() -> Iterator[str]:
    """The URL of a new, empty PostgreSQL database, dropped on exit."""
    url = make_url(POSTGRES_URL)
    name = f"renderer_test_{uuid.uuid4().hex[:8]}"
    admin = url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def run_script(
    script: str, *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -c script args...` in a process of its own, its output captured."""
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment `python -m worker` (or the API) needs to join this test's stack, plus
    `extra` settings.

    Every inherited variable that names a setting is dropped first (REPLICATE_API_TOKEN would
    send the worker to the real Replicate, PUBLIC_BASE_URL would switch on webhooks).
    """
    names = {name.upper() for name in Settings.model_fields}
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.upper().startswith("REPLICATE_") and key.upper() not in names
    }
    env.update(
        TEMPORAL_ADDRESS=settings.temporal_address,
        TASK_QUEUE=settings.task_queue,
        DATABASE_URL=settings.resolved_database_url,
        DATA_DIR=str(settings.data_dir),
        REPLICATE_BASE_URL=settings.provider_base_url,
        POLL_INTERVAL_SECONDS=str(settings.poll_interval_seconds),
        REPLICATE_MODEL=settings.replicate_model,
        RECONCILE_INTERVAL_SECONDS=str(settings.reconcile_interval_seconds),
        PYTHONUNBUFFERED="1",
    )
    if settings.public_base_url:
        env["PUBLIC_BASE_URL"] = settings.public_base_url
    if settings.model_extra_input:
        env["MODEL_EXTRA_INPUT"] = json.dumps(settings.model_extra_input)
    env.update(extra)
    return env


class LoggedProcess:
    """A subprocess whose output goes to a file in the test's directory (printed on teardown,
    so pytest shows it when a test fails)."""

    def __init__(self, name: str, args: list[str], log: Path, cwd: Path, env: dict[str, str]):
        self.name = name
        self.args = args
        self.log = log
        self.cwd = cwd
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.args, cwd=self.cwd, env=self.env, stdout=out, stderr=subprocess.STDOUT
            )

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill(self) -> None:
        """SIGKILL: no shutdown hook, no graceful drain, no cleanup of any kind."""
        assert self.proc is not None and self.alive, f"{self.name} is not running"
        self.proc.kill()
        self.proc.wait(timeout=10)

    def terminate(self) -> None:
        """SIGTERM, not waiting: the process shuts down as it would under an orchestrator."""
        assert self.proc is not None and self.alive, f"{self.name} is not running"
        self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        if self.proc is None or not self.alive:
            return
        self.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


class Workers:
    """Worker subprocesses for one stack; each `start()` is a fresh `python -m worker`."""

    def __init__(self, settings: Settings, folder: Path, **extra_env: str) -> None:
        self.settings = settings
        self.folder = folder
        self.extra_env = extra_env
        self.started: list[LoggedProcess] = []

    async def start(self, **extra_env: str) -> LoggedProcess:
        """A new worker; `extra_env` are settings of this one worker (its own DATA_DIR)."""
        n = len(self.started) + 1
        worker = LoggedProcess(
            f"worker {n}",
            [sys.executable, "-m", "worker"],
            self.folder / f"worker-{n}.log",
            # Not the repository: a developer's .env there must not configure the worker.
            cwd=self.folder,
            env=worker_env(self.settings, **{**self.extra_env, **extra_env}),
        )
        worker.start()
        self.started.append(worker)
        # Polling starts before this line is logged; waiting for it keeps the kill points
        # about the render rather than about the interpreter's start-up.
        await wait_until(
            lambda: "worker running" in worker.output() or not worker.alive,
            60,
            f"{worker.name} to start",
        )
        assert worker.alive, f"{worker.name} exited:\n{worker.output()}"
        return worker

    def stop_all(self) -> None:
        for worker in self.started:
            worker.stop()
            print(f"--- {worker.name} log ---\n{worker.output()[-6000:]}")


class ApiServer(LoggedProcess):
    """One API process (`uvicorn api.main:app`, as `render-video dev` runs it) on a port of its
    own, restartable on the same port."""

    def __init__(self, name: str, folder: Path, env: dict[str, str], port: int = 0) -> None:
        self.port = port or free_port()
        super().__init__(
            name, api_command("127.0.0.1", self.port), folder / f"{name}.log", folder, env
        )

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start_and_wait(self) -> None:
        self.start()
        # Ready, not only listening: /readyz answers 200 once the job store, Temporal and the
        # video storage all answer this process.
        await wait_until(lambda: self._ready() or not self.alive, 60, f"{self.name} to be ready")
        assert self.alive, f"{self.name} exited:\n{self.output()}"

    def _ready(self) -> bool:
        try:
            return httpx.get(f"{self.base_url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    async def restart(self) -> None:
        """SIGTERM (uvicorn finishes the requests it holds), then a new process on the port."""
        self.stop()
        await self.start_and_wait()


class TemporalDevServer(LoggedProcess):
    """`temporal server start-dev` persisting to a SQLite file, restartable on the same port."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.db_file = folder / "temporal.db"
        args = [
            temporal_binary(),
            "server",
            "start-dev",
            "--ip",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--db-filename",
            str(self.db_file),
            "--headless",
            "--log-level",
            "warn",
            "--search-attribute",
            "JobId=Keyword",
            "--search-attribute",
            "RenderStage=Keyword",
        ]
        super().__init__("temporal", args, folder / "temporal.log", folder, dict(os.environ))

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start_and_wait(self) -> None:
        self.start()
        await wait_until(
            lambda: port_open(self.port) or not self.alive, 60, "the Temporal dev server"
        )
        assert self.alive, f"temporal exited:\n{self.output()}"
        # The port opens before the frontend serves: a client connecting in between fails
        # with "Frontend is not healthy yet" (seen on a busy machine).
        deadline = time.monotonic() + 60
        while True:
            try:
                client = await Client.connect(self.address)
                if await client.service_client.check_health():
                    return
                raise RuntimeError("the health check says not serving")
            except Exception as exc:  # noqa: BLE001 - not serving yet, whatever the form
                if time.monotonic() > deadline:
                    raise AssertionError(f"the Temporal dev server is not healthy: {exc}") from exc
            assert self.alive, f"temporal exited:\n{self.output()}"
            await asyncio.sleep(0.1)


async def wait_until(
    predicate: Callable[[], Any], within: float, what: str, every: float = 0.05
) -> Any:
    """Polls `predicate` until it returns something truthy, and returns that."""
    deadline = time.monotonic() + within
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(every)


class MotoServer(LoggedProcess):
    """moto in server mode: a real S3-protocol server on loopback, for VIDEO_STORAGE_URL."""

    REGION = "us-east-1"
    # moto checks no signatures; any key pair works, and it is the one the processes get.
    ENV = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": REGION,
    }

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        args = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        super().__init__("moto", args, folder / "moto.log", folder, dict(os.environ))

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start_and_wait(self) -> None:
        self.start()
        deadline = time.monotonic() + 60
        while not port_open(self.port):
            assert self.alive, f"moto exited:\n{self.output()}"
            assert time.monotonic() < deadline, "moto did not start within 60 s"
            time.sleep(0.1)

    def client(self) -> Any:
        return s3_client(self.endpoint)

    def new_bucket(self) -> str:
        name = f"videos-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        listed = self.client().list_objects_v2(Bucket=bucket, Prefix=prefix)
        return sorted(item["Key"] for item in listed.get("Contents", []))


def s3_client(endpoint: str) -> Any:
    """A boto3 S3 client of moto at `endpoint`: the tests look in the bucket with a client of
    their own, not through the code under test."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=MotoServer.REGION,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
