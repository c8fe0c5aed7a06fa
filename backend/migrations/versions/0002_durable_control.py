"""Durable control (issue 3): prediction_ledger, webhook_deliveries, budget columns.

The prediction ledger, webhook deliveries, and the budget and approval columns of a job.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24 (commit 6314bd9)
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "prediction_ledger",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.String(length=64), nullable=False),
        sa.Column("input_digest", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=24), nullable=False),
        sa.Column("prediction_id", sa.String(length=128), nullable=True),
        sa.Column("intent_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        # Unnamed, as create_all made it (PostgreSQL names it prediction_ledger_prediction_id_key).
        sa.UniqueConstraint("prediction_id"),
    )
    op.create_index("ix_prediction_ledger_job_id", "prediction_ledger", ["job_id"])
    op.create_index("ix_prediction_ledger_run_id", "prediction_ledger", ["run_id"])
    # Retired by 0008 (webhook_receipts replaced it in 0006).
    op.create_table(
        "webhook_deliveries",
        sa.Column("webhook_id", sa.String(length=200), nullable=False),
        sa.Column("prediction_id", sa.String(length=128), nullable=True),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("webhook_id"),
    )
    with op.batch_alter_table("video_jobs") as jobs:
        jobs.add_column(sa.Column("max_cost", sa.Numeric(12, 2), nullable=True))
        jobs.add_column(sa.Column("estimated_cost", sa.Numeric(12, 2), nullable=True))
        # NOT NULL on a table that has rows: existing jobs read false.
        jobs.add_column(
            sa.Column("over_budget", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        jobs.add_column(sa.Column("approved_by", sa.String(length=200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("video_jobs") as jobs:
        jobs.drop_column("approved_by")
        jobs.drop_column("over_budget")
        jobs.drop_column("estimated_cost")
        jobs.drop_column("max_cost")
    op.drop_table("webhook_deliveries")
    op.drop_index("ix_prediction_ledger_run_id", table_name="prediction_ledger")
    op.drop_index("ix_prediction_ledger_job_id", table_name="prediction_ledger")
    op.drop_table("prediction_ledger")
