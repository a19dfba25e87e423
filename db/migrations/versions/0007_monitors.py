"""monitors: sentiment monitors, their items, window evaluations and alerts

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-29 01:50:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _monitor_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["monitor_id"],
        ["monitors.id"],
        name=op.f(f"fk_{table}_monitor_id_monitors"),
        ondelete="CASCADE",
    )


def upgrade() -> None:
    op.create_table(
        "monitors",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("model", sa.String(length=255), nullable=False),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.Column("negative_label", sa.String(length=255), nullable=False),
        sa.Column("window_items", sa.Integer(), nullable=True),
        sa.Column("window_seconds", sa.Integer(), nullable=True),
        sa.Column("share_above", sa.Float(), nullable=True),
        sa.Column("rise_above", sa.Float(), nullable=True),
        sa.Column("min_items", sa.Integer(), nullable=False),
        sa.Column("webhook_url", sa.Text(), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("recover_at_or_below", sa.Float(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_monitors_tenant_id_tenants")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_monitors")),
    )
    op.create_index(
        "ix_monitors_tenant_id_created_at", "monitors", ["tenant_id", "created_at"], unique=False
    )
    op.create_table(
        "monitor_items",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("monitor_id", sa.String(length=40), nullable=False),
        sa.Column("job_id", sa.String(length=40), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("label", sa.String(length=255), nullable=True),
        sa.Column("score", sa.Float(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("classified_at", sa.DateTime(), nullable=True),
        _monitor_fk("monitor_items"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_monitor_items")),
    )
    op.create_index(
        "ix_monitor_items_monitor_id_id", "monitor_items", ["monitor_id", "id"], unique=False
    )
    op.create_index(
        "ix_monitor_items_monitor_id_created_at",
        "monitor_items",
        ["monitor_id", "created_at"],
        unique=False,
    )
    op.create_index("ix_monitor_items_job_id", "monitor_items", ["job_id"], unique=False)
    op.create_table(
        "monitor_stats",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("monitor_id", sa.String(length=40), nullable=False),
        sa.Column("job_id", sa.String(length=40), nullable=False),
        sa.Column("items", sa.Integer(), nullable=False),
        sa.Column("negative_share", sa.Float(), nullable=False),
        sa.Column("previous_share", sa.Float(), nullable=True),
        sa.Column("shares", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("alerted", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        _monitor_fk("monitor_stats"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_monitor_stats")),
    )
    op.create_index(
        "ix_monitor_stats_monitor_id_id", "monitor_stats", ["monitor_id", "id"], unique=False
    )
    op.create_table(
        "monitor_alerts",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("monitor_id", sa.String(length=40), nullable=False),
        sa.Column("stat_id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.String(length=40), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("negative_share", sa.Float(), nullable=False),
        sa.Column("previous_share", sa.Float(), nullable=True),
        sa.Column("items", sa.Integer(), nullable=False),
        sa.Column("delivery_id", sa.String(length=40), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        _monitor_fk("monitor_alerts"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_monitor_alerts")),
    )
    op.create_index(
        "ix_monitor_alerts_monitor_id_created_at",
        "monitor_alerts",
        ["monitor_id", "created_at"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index("ix_monitor_alerts_monitor_id_created_at", table_name="monitor_alerts")
    op.drop_table("monitor_alerts")
    op.drop_index("ix_monitor_stats_monitor_id_id", table_name="monitor_stats")
    op.drop_table("monitor_stats")
    op.drop_index("ix_monitor_items_job_id", table_name="monitor_items")
    op.drop_index("ix_monitor_items_monitor_id_created_at", table_name="monitor_items")
    op.drop_index("ix_monitor_items_monitor_id_id", table_name="monitor_items")
    op.drop_table("monitor_items")
    op.drop_index("ix_monitors_tenant_id_created_at", table_name="monitors")
    op.drop_table("monitors")
