"""jobs.expires_at and jobs.max_runtime_s: per-job deadlines

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28 18:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("expires_at", sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column("max_runtime_s", sa.Float(), nullable=True))
        batch_op.create_index("ix_jobs_status_expires_at", ["status", "expires_at"])


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_status_expires_at")
        batch_op.drop_column("max_runtime_s")
        batch_op.drop_column("expires_at")
