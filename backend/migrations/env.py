"""Alembic's environment for the job store.

Run two ways:
- by `render-video migrate` (backend/schema.py), which passes the connection it holds, in a
  transaction under the store's schema lock, as `config.attributes["connection"]`;
- by the `alembic` command from the repository root (its settings are pyproject.toml's
  [tool.alembic]), to write a migration (`alembic revision --autogenerate -m "..."`) or compare
  the models with a store (`alembic check`). The store is `-x url=...` if given, else the one
  the settings name (DATABASE_URL, or DATA_DIR/jobs.db).
"""

from __future__ import annotations

from typing import Any

from alembic import context
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection
from sqlmodel import SQLModel
from sqlmodel.sql.sqltypes import AutoString

# Every table of the store registers itself with SQLModel.metadata on import.
import backend.database  # noqa: F401
from backend.schema import COMPARE, schema_lock

config = context.config
target_metadata = SQLModel.metadata


def _render_item(kind: str, obj: Any, _autogen: Any) -> str | bool:
    # A model's `str` field is SQLModel's AutoString, a VARCHAR: written as sa.String, a
    # migration needs no sqlmodel import and stays valid whatever sqlmodel becomes.
    if kind == "type" and isinstance(obj, AutoString):
        return f"sa.String(length={obj.length})" if obj.length else "sa.String()"
    return False


def _number_the_revision(context: Any, _revision: Any, directives: list[Any]) -> None:
    """New revisions are numbered after the head (0009 after 0008) unless --rev-id says
    otherwise, so the files sort in the order they apply; an autogenerate that finds nothing
    to do writes no file."""
    if not directives:
        return
    script = directives[0]
    cmd_opts = getattr(config, "cmd_opts", None)
    if getattr(cmd_opts, "autogenerate", False) and script.upgrade_ops.is_empty():
        directives[:] = []
        print("No change between the models and the store: no migration written.")
        return
    if getattr(cmd_opts, "rev_id", None):
        return
    head = ScriptDirectory.from_config(config).get_current_head()
    if head is None:
        script.rev_id = "0001"
    elif head.isdigit():
        script.rev_id = f"{int(head) + 1:04d}"


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite alters a table by copying it: batch mode does that where ALTER cannot.
        render_as_batch=connection.dialect.name == "sqlite",
        **COMPARE,
        render_item=_render_item,
        process_revision_directives=_number_the_revision,
    )
    with context.begin_transaction():
        context.run_migrations()


def _url() -> str:
    given = context.get_x_argument(as_dictionary=True).get("url")
    if given:
        return given
    from backend.settings import Settings

    return Settings().resolved_database_url


if context.is_offline_mode():
    raise SystemExit(
        "The job store's migrations look at the store as they run (which release made it, "
        "which tables it has): run them against a database, not as --sql."
    )

given_connection = config.attributes.get("connection")
if given_connection is not None:
    _run(given_connection)
else:
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    engine = create_engine(_url(), poolclass=NullPool)
    try:
        with schema_lock(engine) as connection:
            _run(connection)
    finally:
        engine.dispose()
