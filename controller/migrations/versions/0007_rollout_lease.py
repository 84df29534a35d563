"""The rollout lease (one deciding replica, fenced by an epoch) and what each rollout device was told.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "controller_lease",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("holder", sa.String(256), nullable=False),
        sa.Column("epoch", sa.Integer, nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )
    with op.batch_alter_table("rollout_device") as table:
        table.add_column(sa.Column("told_digest", sa.String(64), nullable=True))
    # Rows from before this revision: what the rollout told is what its state says it told.
    op.execute(
        "UPDATE rollout_device SET told_digest = (SELECT bundle.digest FROM rollout JOIN bundle ON bundle.id = "
        "rollout.bundle_id WHERE rollout.id = rollout_device.rollout_id) WHERE state NOT IN ('pending', 'rolled_back')"
    )


def downgrade() -> None:
    with op.batch_alter_table("rollout_device") as table:
        table.drop_column("told_digest")
    op.drop_table("controller_lease")
