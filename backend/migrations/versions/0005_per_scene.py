"""Per-scene rendering: job_scenes, ledger takes, billed seconds, video length.

The scenes of a job, retakes in the ledger, the seconds billed and the finished video's length.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 (commit 1e8121b)
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "job_scenes",
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("prediction_id", sa.String(length=128), nullable=True),
        sa.Column("billed_seconds", sa.Numeric(12, 3), nullable=False, server_default="0"),
        sa.Column("clip", sa.String(length=200), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("job_id", "number"),
    )
    with op.batch_alter_table("prediction_ledger") as ledger:
        # Every prediction written before retakes existed was a first take.
        ledger.add_column(sa.Column("take", sa.Integer(), nullable=False, server_default="1"))
    with op.batch_alter_table("video_jobs") as jobs:
        jobs.add_column(sa.Column("billed_seconds", sa.Numeric(12, 3), nullable=True))
        jobs.add_column(sa.Column("duration_seconds", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("video_jobs") as jobs:
        jobs.drop_column("duration_seconds")
        jobs.drop_column("billed_seconds")
    with op.batch_alter_table("prediction_ledger") as ledger:
        ledger.drop_column("take")
    op.drop_table("job_scenes")
