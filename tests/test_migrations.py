"""The job store's schema under Alembic, on real SQLite files and real PostgreSQL databases: stores
made by earlier releases upgrade in place with their data (`render-video migrate`, run as a
user runs it), the API and the worker refuse a store that is behind, and the migrations make
exactly what the models say."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from alembic import command
from legacy_stores import FIRST_RELEASE_JOBS, make_first_release_store
from processes import run_script
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool
from sqlmodel import SQLModel
from temporalio.testing import WorkflowEnvironment

from api.main import create_app
from backend.auth import KeyStore
from backend.database import JobStore, make_engine, migrate_store
from backend.schema import (
    HEAD_REVISION,
    LEGACY_RELEASES,
    StoreBehind,
    StoreNotReady,
    alembic_config,
    differences,
    head_revision,
    safe_url,
    schema_lock,
)
from backend.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
HEAD = head_revision()
SCENES = {"scenes": [{"image_url": "https://images.example.com/3.jpg", "duration_seconds": 2}]}


@pytest.fixture(params=["sqlite", "postgresql"])
def new_store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], str]:
    """Makes URLs of new, empty databases of the parameter's kind."""
    if request.param == "postgresql":
        return request.getfixturevalue("new_postgres_url")
    numbers = itertools.count(1)
    return lambda: f"sqlite:///{tmp_path / f'jobs-{next(numbers)}.db'}"


def migrate(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`render-video migrate` as a deploy script runs it: DATABASE_URL in the environment."""
    env = {k: v for k, v in os.environ.items() if k != "DATA_DIR"}
    env["DATABASE_URL"] = url
    return subprocess.run(
        [str(BIN / "render-video"), "migrate", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def upgrade_to(url: str, revision: str) -> None:
    """Runs the migrations on `url` up to `revision`, as Alembic does."""
    engine = sqlalchemy.create_engine(url, poolclass=NullPool)
    try:
        with schema_lock(engine) as connection:
            command.upgrade(alembic_config(connection), revision)
    finally:
        engine.dispose()


def sql(url: str, statement: str, **params: Any) -> list[Any]:
    engine = sqlalchemy.create_engine(url, poolclass=NullPool)
    try:
        with engine.begin() as conn:
            result = conn.execute(sqlalchemy.text(statement), params)
            return result.all() if result.returns_rows else []
    finally:
        engine.dispose()


def schema_of(url: str) -> dict[str, Any]:
    """Every table as the database reports it: columns (type, nullable, server default),
    indexes (with a partial index's predicate, which Alembic's comparison ignores), unique
    constraints and primary keys. Columns by name: ALTER adds them at the end."""
    engine = sqlalchemy.create_engine(url, poolclass=NullPool)
    try:
        inspector = sqlalchemy.inspect(engine)
        tables: dict[str, Any] = {}
        for table in inspector.get_table_names():
            if table == "alembic_version":
                continue
            columns = sorted(
                (c["name"], str(c["type"]), c["nullable"], str(c.get("default")))
                for c in inspector.get_columns(table)
            )
            indexes = sorted(
                (
                    i["name"],
                    tuple(i["column_names"]),
                    bool(i["unique"]),
                    sorted((k, str(v)) for k, v in i.get("dialect_options", {}).items()),
                )
                for i in inspector.get_indexes(table)
            )
            uniques = sorted(
                tuple(u["column_names"]) for u in inspector.get_unique_constraints(table)
            )
            primary = inspector.get_pk_constraint(table)["constrained_columns"]
            tables[table] = (columns, indexes, uniques, primary)
        return tables
    finally:
        engine.dispose()


def model_differences(url: str) -> list[Any]:
    """What `alembic check` compares, in this process."""
    engine = sqlalchemy.create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return differences(conn, SQLModel.metadata)
    finally:
        engine.dispose()


def alembic_check(url: str) -> subprocess.CompletedProcess[str]:
    """`alembic check` from the repository root (pyproject.toml's [tool.alembic]), as a
    developer runs it before committing a model change."""
    return subprocess.run(
        [str(BIN / "alembic"), "-x", f"url={url}", "check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_first_release_store_upgrades_in_place_with_its_data(
    new_store_url: Callable[[], str],
) -> None:
    url = new_store_url()
    make_first_release_store(url)

    check = migrate(url, "--check")
    assert check.returncode == 1, check.stdout + check.stderr
    assert f"is at revision 0001 (unstamped), behind this release's {HEAD}" in check.stdout
    assert "run `render-video migrate`" in check.stdout

    done = migrate(url)
    assert done.returncode == 0, done.stderr
    assert f"Stamped the job store at {safe_url(url)} at revision 0001" in done.stdout
    assert f"from revision 0001 to {HEAD}:" in done.stdout
    assert sql(url, "SELECT version_num FROM alembic_version") == [(HEAD,)]

    store = JobStore(make_engine(url))
    completed, failed = store.get(1), store.get(2)
    old = FIRST_RELEASE_JOBS[0]
    assert (completed["status"], completed["actual_cost"], completed["video_url"]) == (
        "completed",
        1.01,
        "/api/videos/1/data",
    )
    assert completed["storyboard_data"] == old["storyboard_data"]
    assert (completed["prediction_id"], completed["workflow_id"]) == (
        "first-release-prediction",
        "render-video-1",
    )
    assert completed["download_retries"] == 1 and completed["approved"] is True
    assert completed["created_at"] == "2026-11-24T21:40:00+00:00"
    assert (failed["status"], failed["actual_cost"], failed["error_message"]) == (
        "failed",
        None,
        "Scene 1 is missing image",
    )
    # What later releases added reads as their defaults.
    for job in (completed, failed):
        assert job["tenant"] == "default" and job["over_budget"] is False
        assert job["max_cost"] is None and job["estimated_cost"] is None
        assert job["billed_seconds"] is None and job["scenes"] == []

    # The current store works on it: a new job, a scene rendered and billed, a ledger intent
    # under the one-open-intent index, a key.
    job_id = store.create(SCENES, max_cost=Decimal("5.00"))
    assert job_id == 3
    store.plan_scenes(job_id, {1: "a" * 64}, keep=set())
    store.record_scene(
        job_id,
        [1],
        "completed",
        prediction_id="p-3",
        billed_seconds=Decimal("2"),
        clip="scene-1.mp4",
        prediction_status="succeeded",
    )
    job = store.get(job_id)
    assert job["progress"]["scenes_completed"] == 1 and job["billed_seconds"] == 2.0
    [scene] = job["scenes"]
    assert (scene["number"], scene["status"], scene["billed_seconds"]) == (1, "completed", 2.0)
    assert scene["prediction_status"] == "succeeded"
    held = store.claim_intent(job_id, "run-a", "b" * 64)
    assert store.claim_intent(job_id, "run-b", "b" * 64)["id"] == held["id"]
    assert KeyStore(store.engine).create("default").tenant == "default"

    # A migrated store is the schema a new store gets.
    assert model_differences(url) == []
    fresh = new_store_url()
    make_engine(fresh)
    assert schema_of(url) == schema_of(fresh)

    # Once is enough.
    again = migrate(url)
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith(f"Nothing to do: the job store at {safe_url(url)} is at")
    assert migrate(url, "--check").returncode == 0
    assert store.get(1) == completed


def test_the_baseline_is_the_first_release_schema(new_store_url: Callable[[], str]) -> None:
    first_release, baseline = new_store_url(), new_store_url()
    make_first_release_store(first_release)
    upgrade_to(baseline, "0001")
    assert schema_of(baseline) == schema_of(first_release)


@pytest.mark.parametrize("release", [r.revision for r in LEGACY_RELEASES])
def test_a_store_of_any_release_before_migrations_is_recognised_and_upgraded(
    new_store_url: Callable[[], str], release: str
) -> None:
    """Each revision up to 0007 makes what one release's create_all made (checked against the
    releases' own code in git when they were written; the baseline is pinned above). Such a
    store has no alembic_version: its tables say which release it is."""
    url = new_store_url()
    upgrade_to(url, release)
    sql(url, "DROP TABLE alembic_version")
    sql(
        url,
        "INSERT INTO video_jobs (status, approved, current_stage, progress_message, "
        "scenes_total, scenes_completed, download_retries, created_at, updated_at, actual_cost) "
        "VALUES ('completed', true, 'completed', 'Video ready', 1, 1, 0, :at, :at, 0.55)",
        at="2026-11-30 00:00:00+00:00",
    )
    with pytest.raises(StoreBehind, match=rf"at revision {release} \(unstamped\), behind"):
        make_engine(url)

    done = migrate_store(url)
    assert (done.before, done.after, done.stamped) == (release, HEAD, False)
    later = [r.revision for r in LEGACY_RELEASES if r.revision > release]
    assert list(done.applied[: len(later)]) == later and done.applied[-1] == HEAD
    assert JobStore(make_engine(url)).get(1)["actual_cost"] == 0.55
    assert model_differences(url) == []


def test_old_open_intents_are_closed_and_old_webhook_deliveries_kept_as_receipts(
    new_store_url: Callable[[], str],
) -> None:
    """A store at 0003 (before one open intent per input): each retry wrote an intent of its
    own. The newest per input stays open, the older ones are abandoned; the webhook deliveries
    already acted on stay known."""
    url = new_store_url()
    upgrade_to(url, "0003")
    rows = [
        ("run-1", "a" * 64, "intent", None),
        ("run-1", "a" * 64, "intent", None),
        ("run-2", "b" * 64, "intent", None),
        ("run-1", "a" * 64, "created", "pred-a"),
        ("run-3", "a" * 64, "intent", None),
    ]
    for run_id, digest, state, prediction in rows:
        sql(
            url,
            "INSERT INTO prediction_ledger (job_id, run_id, input_digest, state, prediction_id, "
            "intent_at, updated_at) VALUES (1, :run, :digest, :state, :prediction, :at, :at)",
            run=run_id,
            digest=digest,
            state=state,
            prediction=prediction,
            at="2026-11-25 00:00:00+00:00",
        )
    sql(
        url,
        "INSERT INTO webhook_deliveries (webhook_id, prediction_id, received_at) VALUES "
        "('msg_1', 'pred-a', :at), ('msg_2', NULL, :at)",
        at="2026-11-25 00:00:00+00:00",
    )

    assert migrate(url).returncode == 0

    ledger = sql(url, "SELECT id, state FROM prediction_ledger ORDER BY id")
    assert ledger == [
        (1, "abandoned"),
        (2, "abandoned"),
        (3, "intent"),
        (4, "created"),
        (5, "intent"),
    ]
    store = JobStore(make_engine(url))
    # The newest intent for the input is the one open: a new run waits for it.
    assert store.claim_intent(1, "run-4", "a" * 64)["id"] == 5
    assert store.seen_webhook("msg_1", "pred-a")
    assert "webhook_deliveries" not in sqlalchemy.inspect(store.engine).get_table_names()


def test_migrations_from_an_empty_database_make_what_the_models_say(
    new_store_url: Callable[[], str],
) -> None:
    """Every migration run in order gives the models' schema (`alembic check` finds nothing to
    add), and the same one a new store gets from make_engine, partial index predicates
    included: a model change without its migration fails here."""
    migrated, created = new_store_url(), new_store_url()
    upgrade_to(migrated, "head")
    check = alembic_check(migrated)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "No new upgrade operations detected" in check.stdout
    make_engine(created)
    assert schema_of(migrated) == schema_of(created)
    assert sql(created, "SELECT version_num FROM alembic_version") == [(HEAD,)]


def test_the_check_finds_a_model_change_without_its_migration(tmp_path: Path) -> None:
    # A store one migration short of head is what the models look like with a change that
    # has no migration.
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    upgrade_to(url, "0008")
    sql(url, "UPDATE alembic_version SET version_num = :head", head=HEAD)
    check = alembic_check(url)
    assert check.returncode != 0
    assert "add_table" in check.stdout + check.stderr
    differences = model_differences(url)
    assert {diff[1].name for diff in differences if diff[0] == "add_table"} == {
        "callback_attempts",
        "idempotency_keys",
        "tenants",
    }


def test_migrate_check_exit_codes(new_store_url: Callable[[], str]) -> None:
    url = new_store_url()
    empty = migrate(url, "--check")
    assert empty.returncode == 1
    assert "run `render-video migrate`" in empty.stdout

    make_engine(url)
    current = migrate(url, "--check")
    assert current.returncode == 0, current.stdout + current.stderr
    assert f"is at revision {HEAD} " in current.stdout

    # A newer release's store: this one cannot tell what it holds.
    sql(url, "UPDATE alembic_version SET version_num = '9999'")
    ahead = migrate(url, "--check")
    assert ahead.returncode == 2
    assert "at revision 9999, which this release does not know" in ahead.stderr
    with pytest.raises(StoreNotReady, match="does not know"):
        migrate_store(url)
    with pytest.raises(StoreNotReady, match="does not know"):
        make_engine(url)


def test_a_store_that_matches_no_release_is_left_alone(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'odd.db'}"
    make_first_release_store(url)
    # Half of what 0005 added, without what 0002 to 0004 did.
    sql(url, "CREATE TABLE job_scenes (job_id INTEGER, number INTEGER)")
    with pytest.raises(StoreNotReady, match="matches no release's schema") as refused:
        make_engine(url, upgrade=True)
    assert "it has table job_scenes but lacks table prediction_ledger" in str(refused.value)
    result = migrate(url)
    assert result.returncode == 1 and "matches no release's schema" in result.stderr
    assert sorted(sqlalchemy.inspect(sqlalchemy.create_engine(url)).get_table_names()) == [
        "job_scenes",
        "video_jobs",
    ]


async def test_the_api_refuses_a_store_behind_head_until_it_is_migrated(
    new_store_url: Callable[[], str], tmp_path: Path
) -> None:
    url = new_store_url()
    if url.startswith("postgresql"):
        # Trust auth takes any password; the message must not show it.
        url = make_url(url).set(password="s3cret").render_as_string(hide_password=False)
    make_first_release_store(url)
    settings = Settings(_env_file=None, data_dir=tmp_path, database_url=url)  # type: ignore[call-arg]
    app = create_app(settings)
    with pytest.raises(StoreBehind) as refused:
        async with app.router.lifespan_context(app):
            pass
    assert str(refused.value) == (
        f"The job store at {safe_url(url)} is at revision 0001 (unstamped), behind this "
        f"release's {HEAD}: run `render-video migrate`"
    )
    assert "s3cret" not in str(refused.value)

    assert migrate(url).returncode == 0
    async with app.router.lifespan_context(app):
        assert app.state.store.get(1)["status"] == "completed"


def test_the_worker_refuses_a_store_behind_head_until_it_is_migrated(
    temporal_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    make_first_release_store(url)
    env = dict(
        os.environ,
        DATA_DIR=str(tmp_path),
        TEMPORAL_ADDRESS=temporal_env.client.service_client.config.target_host,
        TASK_QUEUE=f"migrations-{tmp_path.name}",
        RECONCILE_INTERVAL_SECONDS="0",
    )
    env.pop("DATABASE_URL", None)
    refused = subprocess.run(
        [sys.executable, "-m", "worker"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 1
    assert (
        f"The job store at {url} is at revision 0001 (unstamped), behind this release's "
        f"{HEAD}: run `render-video migrate`" in refused.stderr
    )

    assert migrate(url).returncode == 0
    worker = subprocess.Popen(
        [sys.executable, "-m", "worker"], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True
    )
    assert worker.stderr is not None
    started = False
    deadline = time.monotonic() + 60
    for line in worker.stderr:
        if "worker running" in line:
            started = True
            break
        if time.monotonic() > deadline:
            break
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0
    assert started, "the worker did not start on the migrated store"


def test_processes_creating_a_fresh_postgres_store_at_once_all_succeed(
    new_postgres_url: Callable[[], str],
) -> None:
    # The API and several workers start together on a new database: the advisory lock lets
    # one create it while the others wait, then find it at head.
    url = new_postgres_url()
    code = "import sys; from backend.database import make_engine; make_engine(sys.argv[1])"
    procs = [
        subprocess.Popen([sys.executable, "-c", code, url], stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    assert sql(url, "SELECT version_num FROM alembic_version") == [(HEAD,)]
    assert JobStore(make_engine(url)).create() == 1


def test_the_release_knows_its_head_without_alembic(tmp_path: Path) -> None:
    """A store at head is recognised by HEAD_REVISION, without loading Alembic (11 MB of every
    API and worker process); a migration added without moving it fails here."""
    assert HEAD_REVISION == HEAD
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    make_engine(url).dispose()  # created at head
    probe = (
        "import sys\n"
        "import worker, api.main\n"
        "from backend.database import make_engine\n"
        f"make_engine({url!r}).dispose()\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'alembic'))\n"
    )
    done = run_script(probe, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
