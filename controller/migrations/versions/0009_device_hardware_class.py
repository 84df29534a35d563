"""A device's hardware class kept beside its profile, and the audit trail indexed by target: the
dashboard's lists filter, count and page in the database.

Revision ID: 0009
Revises: 0008
"""

import json

import sqlalchemy as sa
from alembic import op

from slmops.controller.rollout_plan import hardware_class

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("device", sa.Column("hardware_class", sa.String(256), nullable=False, server_default=""))
    device = sa.table("device", sa.column("id", sa.String), sa.column("profile", sa.JSON),
                      sa.column("hardware_class", sa.String))  # fmt: skip
    connection = op.get_bind()
    for device_id, profile in connection.execute(sa.select(device.c.id, device.c.profile)).all():
        if isinstance(profile, str):  # SQLite hands some drivers' JSON back as text
            profile = json.loads(profile)
        if profile:
            known = hardware_class(profile)
            connection.execute(device.update().where(device.c.id == device_id).values(hardware_class=known))
    op.create_index("ix_device_hardware_class", "device", ["hardware_class"])
    op.create_index("ix_audit_target", "audit", ["target"])


def downgrade() -> None:
    op.drop_index("ix_audit_target", "audit")
    op.drop_index("ix_device_hardware_class", "device")
    op.drop_column("device", "hardware_class")
