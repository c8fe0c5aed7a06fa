"""The first release (issue 2): video_jobs.

The job table as that release's create_all made it.

Revision ID: 0001
Revises:
Create Date: 2026-11-24 (commit c9224aa; unchanged up to b1d590d)
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "video_jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("approved", sa.Boolean(), nullable=False),
        sa.Column("storyboard_data", sa.Text(), nullable=True),
        sa.Column("video_url", sa.String(), nullable=True),
        sa.Column("actual_cost", sa.Numeric(12, 2), nullable=True),
        sa.Column("current_stage", sa.String(), nullable=False),
        sa.Column("progress_message", sa.String(), nullable=False),
        sa.Column("scenes_total", sa.Integer(), nullable=False),
        sa.Column("scenes_completed", sa.Integer(), nullable=False),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("download_retries", sa.Integer(), nullable=False),
        sa.Column("prediction_id", sa.String(length=128), nullable=True),
        sa.Column("workflow_id", sa.String(length=128), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_video_jobs_status", "video_jobs", ["status"])


def downgrade() -> None:
    op.drop_index("ix_video_jobs_status", table_name="video_jobs")
    op.drop_table("video_jobs")
