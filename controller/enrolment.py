"""Enrolment: each device's own broker credentials, made by the controller, never shared.

    POST /v1/devices/{id}/enrolment (admin, audited) ─► a new random password, returned once;
        its hash is kept (device_credential) ─► the embedded broker's password file, reloaded
    DELETE /v1/devices/{id}/enrolment ─► the credentials are gone; the broker drops the device

A device's MQTT user name is its id, which the broker's ACL ties to its own topics. Enrolling
a device again replaces its password (a lost or leaked one is rotated this way).
"""

import secrets
from collections.abc import Callable

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from slmops.errors import NotFound, Rejected

from . import audit
from .audit import Actor
from .db import DeviceCredentialRow
from .embedded_broker import CONTROLLER_USER, password_hash


class Enrolment:
    def __init__(self, engine: Engine, on_change: Callable[[], None] = lambda: None) -> None:
        """`on_change` runs after every change is committed (the embedded broker reloads)."""
        self.engine, self.on_change = engine, on_change

    def enrol(self, device_id: str, actor: Actor) -> str:
        """New credentials for `device_id` (replacing any it had); returns the password."""
        if device_id == CONTROLLER_USER:
            raise Rejected(f"{CONTROLLER_USER!r} is the controller's own broker user; name the device otherwise")
        password = secrets.token_urlsafe(32)
        with Session(self.engine) as session, session.begin():
            row = session.get(DeviceCredentialRow, device_id)
            audit.record(session, actor, "device.enrol", device_id, {"rotated": row is not None})
            if row is not None:
                session.delete(row)
                session.flush()
            session.add(
                DeviceCredentialRow(device_id=device_id, password_hash=password_hash(password), enrolled_by=actor.name)
            )
        self.on_change()
        return password

    def revoke(self, device_id: str, actor: Actor) -> None:
        with Session(self.engine) as session, session.begin():
            row = session.get(DeviceCredentialRow, device_id)
            if row is None:
                raise NotFound(f"device {device_id!r} is not enrolled")
            session.delete(row)
            audit.record(session, actor, "device.revoke", device_id, {})
        self.on_change()

    def password_hashes(self) -> list[tuple[str, str]]:
        """(device id, password hash) of every enrolled device, for the broker's password file."""
        with Session(self.engine) as session:
            rows = session.scalars(select(DeviceCredentialRow).order_by(DeviceCredentialRow.device_id))
            return [(row.device_id, row.password_hash) for row in rows]
