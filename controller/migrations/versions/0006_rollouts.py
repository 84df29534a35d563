"""Rollouts and their devices.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rollout",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("bundle_id", sa.Integer, sa.ForeignKey("bundle.id"), nullable=False),
        sa.Column("target", sa.String(1024), nullable=False),
        sa.Column("waves", sa.String(256), nullable=False),
        sa.Column("max_failure", sa.Double, nullable=False),
        sa.Column("min_reported", sa.Integer, nullable=False),
        sa.Column("soak_s", sa.Double, nullable=False),
        sa.Column("device_timeout_s", sa.Double, nullable=False),
        sa.Column("gates", sa.JSON, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(2048), nullable=False),
        sa.Column("wave", sa.Integer, nullable=False),
        sa.Column("wave_count", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(128), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "rollout_device",
        sa.Column("rollout_id", sa.Integer, sa.ForeignKey("rollout.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("device_id", sa.String(128), primary_key=True),
        sa.Column("wave", sa.Integer, nullable=False),
        sa.Column("hardware_class", sa.String(256), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("previous", sa.JSON, nullable=True),
        sa.Column("notified_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("soak_started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("state_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("detail", sa.String(1024), nullable=False),
        sa.Column("figures", sa.JSON, nullable=True),
    )
    op.create_index("ix_rollout_device_device", "rollout_device", ["device_id"])


def downgrade() -> None:
    op.drop_index("ix_rollout_device_device", "rollout_device")
    op.drop_table("rollout_device")
    op.drop_table("rollout")
