"""The registry: which bundles the controller holds, who changed what (audit).

Every change goes through here, in one transaction with its audit row. Errors carry the
HTTP status the API answers with.
"""

import logging
from pathlib import Path
from typing import IO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from slmops.errors import Conflict, NotFound

from . import audit
from .audit import Actor
from .db import AuditRow, BundleRow, DeviceRow
from .store import BundleStore

log = logging.getLogger(__name__)


class Registry:
    def __init__(self, engine: Engine, store: BundleStore, keys: list[Ed25519PublicKey]) -> None:
        self.engine = engine
        self.store = store
        self.keys = keys

    def push(self, archive: Path | IO[bytes], actor: Actor) -> tuple[BundleRow, bool]:
        """Verify and register a bundle archive. Returns the row and whether it is new.

        Pushing the same content again is a no-op; other content under a name and version
        already taken is refused (versions are immutable).
        """
        manifest, staging = self.store.stage(archive, self.keys)
        digest, kept = manifest.digest, False
        try:
            with Session(self.engine, expire_on_commit=False) as session, session.begin():
                existing = session.scalars(
                    select(BundleRow).where(BundleRow.name == manifest.name, BundleRow.version == manifest.version)
                ).one_or_none()
                if existing is not None:
                    if existing.digest == digest:
                        return existing, False
                    raise Conflict(
                        f"{manifest.name} {manifest.version} is registered with other content "
                        f"(digest {existing.digest[:12]}); versions are immutable: push a new version"
                    )
                row = BundleRow(
                    name=manifest.name,
                    version=manifest.version,
                    digest=digest,
                    size_bytes=sum(v.size_bytes for v in manifest.variants),
                    manifest=manifest.model_dump(mode="json"),
                    pushed_by=actor.name,
                )
                session.add(row)
                session.flush()
                audit.record(session, actor, "bundle.push", f"{row.name}:{row.version}", {"digest": digest}, row.id)
                kept = self.store.keep(manifest, staging)  # before the commit: a row never names a missing bundle
            return row, True
        except BaseException:
            if kept:  # the commit failed: the files go with the row
                self.store.delete(digest)
            raise
        finally:
            self.store.discard(staging)

    def sweep_store(self) -> None:
        """What the store holds beyond the registry (an interrupted push, a bundle without its row) goes."""
        with Session(self.engine) as session:
            registered = set(session.scalars(select(BundleRow.digest)))
        for left in self.store.sweep(registered):
            log.warning("removed %s from the bundle store: no registered bundle has it", left)

    def bundles(self) -> list[BundleRow]:
        with Session(self.engine) as session:
            return list(session.scalars(select(BundleRow).order_by(BundleRow.name, BundleRow.pushed_at)))

    def bundle(self, name: str, version: str) -> BundleRow:
        with Session(self.engine) as session:
            row = session.scalars(
                select(BundleRow).where(BundleRow.name == name, BundleRow.version == version)
            ).one_or_none()
        if row is None:
            raise NotFound(f"no bundle {name} {version} in the registry")
        return row

    def delete(self, name: str, version: str, actor: Actor) -> None:
        """Unregister a bundle and drop its files; refused (Conflict) while a device is told to run it."""
        with Session(self.engine) as session, session.begin():
            row = session.scalars(
                select(BundleRow).where(BundleRow.name == name, BundleRow.version == version)
            ).one_or_none()
            if row is None:
                raise NotFound(f"no bundle {name} {version} in the registry")
            digest = row.digest
            desired = session.scalars(select(DeviceRow).where(DeviceRow.desired.is_not(None)))
            if wanted_by := sorted(d.id for d in desired if d.desired and d.desired.get("digest") == digest):
                raise Conflict(f"{name} {version} is the desired state of {', '.join(wanted_by)}")
            audit.record(session, actor, "bundle.delete", f"{name}:{version}", {"digest": digest})
            session.delete(row)
        self.store.delete(digest)

    def audit_log(self, limit: int = 100, target: str | None = None) -> list[AuditRow]:
        """The newest audit rows, of one target (a device id, rollout/N, build/N) when given."""
        query = select(AuditRow).order_by(AuditRow.id.desc()).limit(limit)
        if target is not None:
            query = query.where(AuditRow.target == target)
        with Session(self.engine) as session:
            return list(session.scalars(query))
