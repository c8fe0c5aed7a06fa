"""API keys and tenants; webhook_receipts.

API keys of tenants, each job's tenant, and webhook receipts keyed by webhook id and prediction.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 (merge 7bbe66f)
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("key_id", sa.String(length=16), nullable=False),
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("label", sa.String(length=200), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("key_id"),
    )
    op.create_index("ix_api_keys_tenant", "api_keys", ["tenant"])
    op.create_table(
        "webhook_receipts",
        sa.Column("webhook_id", sa.String(length=200), nullable=False),
        sa.Column("prediction_id", sa.String(length=128), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("webhook_id", "prediction_id"),
    )
    with op.batch_alter_table("video_jobs") as jobs:
        # Jobs made before tenants belong to the default tenant (whose key `render-video dev`
        # prints), as the release that added the column decided.
        jobs.add_column(
            sa.Column(
                "tenant", sa.String(length=64), nullable=False, server_default=sa.text("'default'")
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("video_jobs") as jobs:
        jobs.drop_column("tenant")
    op.drop_table("webhook_receipts")
    op.drop_index("ix_api_keys_tenant", table_name="api_keys")
    op.drop_table("api_keys")
