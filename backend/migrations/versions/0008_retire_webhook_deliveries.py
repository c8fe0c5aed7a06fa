"""Retire webhook_deliveries (its receipts move to webhook_receipts).

webhook_receipts replaced it in 0006. Stores made from 0006 on by create_all never had the
table; stores from before kept it, unused.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if not sa.inspect(op.get_bind()).has_table("webhook_deliveries"):
        return
    # A delivery acted on under the old key is still one acted on: Replicate may yet retry it.
    # A receipt needs the prediction its body named; rows without one carry nothing to keep.
    op.execute(
        "INSERT INTO webhook_receipts (webhook_id, prediction_id, received_at) "
        "SELECT d.webhook_id, d.prediction_id, d.received_at FROM webhook_deliveries d "
        "WHERE d.prediction_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM webhook_receipts r "
        "WHERE r.webhook_id = d.webhook_id AND r.prediction_id = d.prediction_id)"
    )
    op.drop_table("webhook_deliveries")


def downgrade() -> None:
    op.create_table(
        "webhook_deliveries",
        sa.Column("webhook_id", sa.String(length=200), nullable=False),
        sa.Column("prediction_id", sa.String(length=128), nullable=True),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("webhook_id"),
    )
