"""Ledger rows name their workflow and scene.

The workflow (and scene) that waits on the row's prediction, which its webhook is relayed to.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30 (commit 4976536)
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Both nullable: older rows are routed by their job id (workflow_id_for).
    with op.batch_alter_table("prediction_ledger") as ledger:
        ledger.add_column(sa.Column("workflow_id", sa.String(length=200), nullable=True))
        ledger.add_column(sa.Column("scene", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("prediction_ledger") as ledger:
        ledger.drop_column("scene")
        ledger.drop_column("workflow_id")
