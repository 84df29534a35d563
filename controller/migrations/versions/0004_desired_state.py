"""Desired state per device, and the device's last report on it.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("device") as table:
        table.add_column(sa.Column("desired", sa.JSON(), nullable=True))
        table.add_column(sa.Column("reported", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("device") as table:
        table.drop_column("reported")
        table.drop_column("desired")
