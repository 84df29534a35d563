"""Build jobs: recipes the controller runs.

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "build_job",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("recipe", sa.String(256), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("stage", sa.String(32), nullable=False),
        sa.Column("stages", sa.JSON, nullable=False),
        sa.Column("detail", sa.String(4096), nullable=False),
        sa.Column("runner", sa.String(256), nullable=True),
        sa.Column("pid", sa.Integer, nullable=True),
        sa.Column("cancel_requested", sa.Boolean, nullable=False),
        sa.Column("bundle_name", sa.String(128), nullable=True),
        sa.Column("bundle_version", sa.String(64), nullable=True),
        sa.Column("created_by", sa.String(128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_build_job_status", "build_job", ["status"])


def downgrade() -> None:
    op.drop_index("ix_build_job_status", "build_job")
    op.drop_table("build_job")
