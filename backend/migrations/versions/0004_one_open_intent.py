"""One open intent per input: a partial unique index on the ledger.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 (commit 912bb6b)
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

OPEN = sa.text("state = 'intent'")


def upgrade() -> None:
    # Before this index each retry wrote an intent of its own, so a store may hold several
    # open intents for one input: the newest stands, the older ones are closed as abandoned,
    # or the index could not be made.
    op.execute(
        "UPDATE prediction_ledger SET state = 'abandoned' "
        "WHERE state = 'intent' AND id NOT IN ("
        "SELECT MAX(id) FROM prediction_ledger WHERE state = 'intent' GROUP BY input_digest)"
    )
    op.create_index(
        "uq_prediction_ledger_open_intent",
        "prediction_ledger",
        ["input_digest"],
        unique=True,
        sqlite_where=OPEN,
        postgresql_where=OPEN,
    )


def downgrade() -> None:
    op.drop_index("uq_prediction_ledger_open_intent", table_name="prediction_ledger")
