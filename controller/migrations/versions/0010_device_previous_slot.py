"""A device's other A/B slot, as its state reports it (what a rollback returns it to).

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("device", sa.Column("previous", sa.JSON, nullable=True))


def downgrade() -> None:
    op.drop_column("device", "previous")
