"""Scenes show the provider's status of their prediction.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30 (commit 36f68fd)
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("job_scenes") as scenes:
        scenes.add_column(sa.Column("prediction_status", sa.String(length=16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("job_scenes") as scenes:
        scenes.drop_column("prediction_status")
