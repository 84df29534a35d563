"""Device credentials for the broker, made by enrolment.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "device_credential",
        sa.Column("device_id", sa.String(128), primary_key=True),
        sa.Column("password_hash", sa.String(256), nullable=False),
        sa.Column("enrolled_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("enrolled_by", sa.String(128), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("device_credential")
