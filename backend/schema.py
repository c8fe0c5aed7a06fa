"""The job store's schema, kept by Alembic (migrations in backend/migrations/).

`prepare_store` is what `make_engine` runs: it creates a new, empty store at head, leaves a store
at head alone, and upgrades a store that is behind only when asked to (`render-video migrate`,
and `render-video dev`/`demo`, which own their local store); otherwise it refuses with
`StoreBehind`, whose message names the command. It works under a lock (PostgreSQL: an advisory
lock; SQLite: the file's write lock), so processes starting together on one store do not race.

Stores made before Alembic (by a release that ran `create_all`) have no `alembic_version`:
`legacy_revision` tells from their tables and columns which release made them, and that
revision is stamped before the upgrade, so they upgrade in place with their data.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import MetaData, create_engine, event, inspect, text
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.engine.reflection import Inspector
from sqlalchemy.pool import NullPool

# Alembic is loaded only when a store is not at head (or a command asks): loading it is 11 MB
# of every API and worker process's memory, and a store already at head needs none of it.
if TYPE_CHECKING:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

# Alembic says "Context impl SQLiteImpl." and "Will assume non-transactional DDL." at INFO for
# every look at a store: every process's log would start with them. What a migration did is
# printed by `render-video migrate` instead.
logging.getLogger("alembic.runtime.migration").setLevel(logging.WARNING)

MIGRATIONS = Path(__file__).parent / "migrations"
# This release's newest revision, known without loading Alembic for the common start (a store
# already there); tests/test_migrations.py checks it is Alembic's head.
HEAD_REVISION = "0009"
# How a store is compared with the models (env.py's autogenerate and `alembic check`, and
# `differences`): column types and server defaults too, so a NOT NULL column added without
# its default shows up.
COMPARE = {"compare_type": True, "compare_server_default": True}
# pg_advisory_xact_lock key for schema changes of the job store ("rvschema" in ASCII).
_PG_LOCK_KEY = 0x7276736368656D61
UPGRADE_COMMAND = "render-video migrate"


class StoreNotReady(RuntimeError):
    """The job store cannot be used by this release as it is."""


class StoreBehind(StoreNotReady):
    """The store is at an older revision than this release's head."""

    def __init__(self, url: str, current: str, head: str) -> None:
        super().__init__(
            f"The job store at {url} is at revision {current}, behind this release's {head}: "
            f"run `{UPGRADE_COMMAND}`"
        )
        self.url = url
        self.current = current
        self.head = head


@dataclass(frozen=True)
class Release:
    """What one revision added, as the release that made it left a store's tables: a store
    without `alembic_version` that has all of it (and all of what came before) is at least at
    this revision."""

    revision: str
    tables: frozenset[str] = frozenset()
    columns: dict[str, frozenset[str]] = field(default_factory=dict)
    indexes: dict[str, frozenset[str]] = field(default_factory=dict)

    def features(self) -> list[tuple[str, str, str]]:
        found = [("table", name, "") for name in sorted(self.tables)]
        found += [("column", t, c) for t, cols in self.columns.items() for c in sorted(cols)]
        found += [("index", t, i) for t, names in self.indexes.items() for i in sorted(names)]
        return found


def _release(revision: str, tables: tuple[str, ...] = (), **parts: Any) -> Release:
    return Release(
        revision,
        frozenset(tables),
        {t: frozenset(c) for t, c in parts.get("columns", {}).items()},
        {t: frozenset(i) for t, i in parts.get("indexes", {}).items()},
    )


# The releases that made stores with create_all, oldest first. Frozen: every store made from
# revision 0008 on is stamped, so migrations after 0008 need no entry here.
# (webhook_deliveries is no marker: 0002 made it, but stores made fresh from 0006 on lack it.)
LEGACY_RELEASES = (
    _release("0001", ("video_jobs",)),
    _release(
        "0002",
        ("prediction_ledger",),
        columns={"video_jobs": ("max_cost", "estimated_cost", "over_budget", "approved_by")},
    ),
    _release("0003", columns={"prediction_ledger": ("workflow_id", "scene")}),
    _release("0004", indexes={"prediction_ledger": ("uq_prediction_ledger_open_intent",)}),
    _release(
        "0005",
        ("job_scenes",),
        columns={
            "prediction_ledger": ("take",),
            "video_jobs": ("billed_seconds", "duration_seconds"),
        },
    ),
    _release("0006", ("api_keys", "webhook_receipts"), columns={"video_jobs": ("tenant",)}),
    _release("0007", columns={"job_scenes": ("prediction_status",)}),
)
_LEGACY_TABLES = {"webhook_deliveries"}.union(*(r.tables for r in LEGACY_RELEASES))


def safe_url(url: str | URL) -> str:
    """The URL to show: no password."""
    return make_url(url).render_as_string(hide_password=True)


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic's settings for the packaged migrations; with `connection`, env.py migrates
    over it (in its transaction) instead of opening its own."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


@lru_cache
def script_directory() -> ScriptDirectory:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    head = script_directory().get_current_head()
    assert head is not None, "backend/migrations has no revisions"
    return head


def describe(revision: str | None) -> str:
    """A revision with the first line of its docstring: `0004 "One open intent per input..."`."""
    if revision is None:
        return "none (empty)"
    script = script_directory().get_revision(revision)
    title = script.doc.strip().splitlines()[0].rstrip(".") if script and script.doc else ""
    return f'{revision} "{title}"' if title else revision


def _present(inspector: Inspector, kind: str, table: str, name: str) -> bool:
    tables = set(inspector.get_table_names())
    if kind == "table":
        return table in tables
    if table not in tables:
        return False
    if kind == "column":
        return name in {col["name"] for col in inspector.get_columns(table)}
    return name in {index["name"] for index in inspector.get_indexes(table)}


def legacy_revision(inspector: Inspector, url: str) -> str:
    """The revision whose schema a store made before migrations has: the newest release all of
    whose additions (and all earlier ones') are there. A store that also has part of a later
    release's additions matches no release and is refused."""
    matched: str | None = None
    for position, release in enumerate(LEGACY_RELEASES):
        missing = [f for f in release.features() if not _present(inspector, *f)]
        if not missing:
            matched = release.revision
            continue
        later = [f for r in LEGACY_RELEASES[position:] for f in r.features()]
        extra = [f for f in later if _present(inspector, *f)]
        if extra or matched is None:
            have = ", ".join(_feature(f) for f in extra) or "no video_jobs table"
            raise StoreNotReady(
                f"The job store at {url} has no alembic_version and matches no release's schema: "
                f"it has {have} but lacks {', '.join(_feature(f) for f in missing)}. Restore it "
                f"from a backup, or fix its tables by hand and run `{UPGRADE_COMMAND}`."
            )
        break
    assert matched is not None
    return matched


def _feature(feature: tuple[str, str, str]) -> str:
    kind, table, name = feature
    return f"table {table}" if kind == "table" else f"{kind} {table}.{name}"


@dataclass(frozen=True)
class StoreState:
    revision: str | None  # None: an empty store (none of its tables)
    stamped: bool  # False: no alembic_version; `revision` was recognised from the tables


def store_state(connection: Connection, url: str) -> StoreState:
    from alembic.runtime.migration import MigrationContext
    from alembic.util import CommandError

    current = MigrationContext.configure(connection).get_current_revision()
    if current is not None:
        try:
            script_directory().get_revision(current)
        except CommandError:
            raise StoreNotReady(
                f"The job store at {url} is at revision {current}, which this release does not "
                f"know (a newer release migrated it): run that release or a later one"
            ) from None
        return StoreState(current, stamped=True)
    inspector = inspect(connection)
    if not _LEGACY_TABLES & set(inspector.get_table_names()):
        return StoreState(None, stamped=False)
    return StoreState(legacy_revision(inspector, url), stamped=False)


def _stamped_at(connection: Connection) -> str | None:
    """The revision in `alembic_version` when it holds exactly one (Alembic's own reading
    decides every other case)."""
    if not inspect(connection).has_table("alembic_version"):
        return None
    rows = connection.execute(text("SELECT version_num FROM alembic_version")).all()
    return rows[0][0] if len(rows) == 1 else None


@contextmanager
def schema_lock(engine: Engine, lock_timeout: float = 30.0) -> Iterator[Connection]:
    """A connection in a transaction that holds the store's schema lock until it commits.

    PostgreSQL: a transaction-scoped advisory lock (its DDL is transactional). SQLite: the
    file's write lock, taken at BEGIN IMMEDIATE on a connection of its own, since pysqlite
    would otherwise commit before each DDL statement; another process waits up to
    `lock_timeout` for it.
    """
    url = engine.url
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        locking = create_engine(url, poolclass=NullPool, connect_args={"timeout": lock_timeout})

        @event.listens_for(locking, "connect")
        def _manual_transactions(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None
            dbapi_conn.execute("PRAGMA journal_mode=WAL")

        @event.listens_for(locking, "begin")
        def _begin_immediate(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        try:
            with locking.begin() as connection:
                yield connection
        finally:
            locking.dispose()
        return
    with engine.begin() as connection:
        if url.get_backend_name() == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
        yield connection


@dataclass(frozen=True)
class Migration:
    """What `prepare_store` found and did."""

    before: str | None  # the revision found (None: an empty store)
    after: str
    stamped: bool  # False: the store had no alembic_version (made before migrations)
    applied: tuple[str, ...] = ()  # the revisions upgraded through, in order
    created: bool = False  # an empty store, created at head

    @property
    def changed(self) -> bool:
        return self.created or bool(self.applied) or not self.stamped


def prepare_store(
    engine: Engine, metadata: MetaData, *, upgrade: bool, lock_timeout: float = 30.0
) -> Migration:
    """Makes the store ready for this release (see the module's docstring).

    An empty store gets `metadata.create_all` and is stamped at head, which is what running
    every migration would make (tests/test_migrations.py checks that) at a fraction of the
    cost. Raises StoreBehind when the store is behind and `upgrade` is False, StoreNotReady when
    it is ahead of this release or matches no release.
    """
    url = safe_url(engine.url)
    with schema_lock(engine, lock_timeout) as connection:
        if _stamped_at(connection) == HEAD_REVISION:
            return Migration(HEAD_REVISION, HEAD_REVISION, stamped=True)
        from alembic import command
        from alembic.runtime.migration import MigrationContext

        head = head_revision()
        state = store_state(connection, url)
        if state.revision == head and state.stamped:
            return Migration(head, head, stamped=True)
        context = MigrationContext.configure(connection)
        if state.revision is None:
            metadata.create_all(connection)
            context.stamp(script_directory(), head)
            return Migration(None, head, stamped=False, created=True)
        if not upgrade:
            current = state.revision if state.stamped else f"{state.revision} (unstamped)"
            raise StoreBehind(url, current, head)
        if not state.stamped:
            context.stamp(script_directory(), state.revision)
        applied = tuple(
            reversed(
                [
                    script.revision
                    for script in script_directory().iterate_revisions(head, state.revision)
                ]
            )
        )
        command.upgrade(alembic_config(connection), "head")
        return Migration(state.revision, head, stamped=state.stamped, applied=applied)


def differences(connection: Connection, metadata: MetaData) -> list[Any]:
    """What a migration would have to do to make the store what `metadata` says (Alembic's
    autogenerate comparison, as `alembic check` runs it); empty when they agree."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    context = MigrationContext.configure(connection, opts=dict(COMPARE))
    return list(compare_metadata(context, metadata))


def check_store(engine: Engine) -> tuple[StoreState, str]:
    """The store's state and this release's head, read without changing anything."""
    url = safe_url(engine.url)
    with engine.connect() as connection:
        return store_state(connection, url), head_revision()
