"""The controller's database: tables, engine, migrations.

SQLite (WAL, foreign keys on) on one host, PostgreSQL when outgrown; the same SQLAlchemy 2
models and Alembic migrations (controller/migrations) serve both. `open_database` brings
the schema to the newest revision before anything uses it.
"""

from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Engine,
    ForeignKey,
    Index,
    String,
    TypeDecorator,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def utcnow() -> datetime:
    return datetime.now(UTC)


class UtcDateTime(TypeDecorator[datetime]):
    """Timestamps in UTC, aware on the way out on every database (SQLite keeps no zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, _dialect: Any) -> datetime | None:
        return value.astimezone(UTC) if value is not None and value.tzinfo else value

    def process_result_value(self, value: datetime | None, _dialect: Any) -> datetime | None:
        return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


class Base(DeclarativeBase):
    type_annotation_map: ClassVar = {dict[str, Any]: JSON, datetime: UtcDateTime}


class BundleRow(Base):
    """A bundle in the registry: verified on ingest, its files in the store under `digest`."""

    __tablename__ = "bundle"
    __table_args__ = (UniqueConstraint("name", "version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    version: Mapped[str] = mapped_column(String(64))
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    """sha256 of the manifest's canonical JSON, which lists every file's sha256."""
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    manifest: Mapped[dict[str, Any]]
    pushed_at: Mapped[datetime] = mapped_column(default=utcnow)
    pushed_by: Mapped[str] = mapped_column(String(128))


class AuditRow(Base):
    """One change made through the API, by whom, to what."""

    __tablename__ = "audit"
    __table_args__ = (Index("ix_audit_target", "target"),)  # one device's or rollout's trail

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(256))
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)
    bundle_id: Mapped[int | None] = mapped_column(ForeignKey("bundle.id", ondelete="SET NULL"), default=None)


class DeviceRow(Base):
    """A device, registered from its first birth message; tags and groups are set by operators."""

    __tablename__ = "device"
    __table_args__ = (Index("ix_device_hardware_class", "hardware_class"),)  # the dashboard's filter and counts

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    first_seen: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen: Mapped[datetime] = mapped_column(default=utcnow)
    online: Mapped[bool] = mapped_column(default=False)
    agent_version: Mapped[str] = mapped_column(String(64), default="")
    profile: Mapped[dict[str, Any]] = mapped_column(default=dict)
    hardware_class: Mapped[str] = mapped_column(String(256), default="")
    """rollout_plan.hardware_class of the profile, kept with it: what lists filter and count by."""
    serving: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    """bundle, version, variant and provider the device reports it serves."""
    previous: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    """bundle, version and variant in its other A/B slot, as it reports it: what a rollback returns it to."""
    tags: Mapped[dict[str, Any]] = mapped_column(default=dict)
    """key → value labels, e.g. {"site": "plant-3"}"""
    groups: Mapped[list[str]] = mapped_column(JSON, default=list)
    desired: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    """The DesiredState last set for it (bundle, version, digest)."""
    reported: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    """Its last report on the desired state (status, percent, reason, variant)."""


class DeviceCredentialRow(Base):
    """A device's broker credentials (its MQTT user name is its id), made by enrolment."""

    __tablename__ = "device_credential"

    device_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    password_hash: Mapped[str] = mapped_column(String(256))
    """As Mosquitto's password file holds it ($7$: PBKDF2-SHA512); the password itself is kept nowhere."""
    enrolled_at: Mapped[datetime] = mapped_column(default=utcnow)
    enrolled_by: Mapped[str] = mapped_column(String(128))


class TelemetryRow(Base):
    """One telemetry record of one device; (device, seq) is unique, so a batch sent twice is stored once."""

    __tablename__ = "telemetry"

    device_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    created: Mapped[datetime]
    kind: Mapped[str] = mapped_column(String(32))
    payload: Mapped[dict[str, Any]]
    received_at: Mapped[datetime] = mapped_column(default=utcnow)


class RolloutRow(Base):
    """One bundle rolled out to a target in waves (controller/rollouts.py says how it moves)."""

    __tablename__ = "rollout"

    id: Mapped[int] = mapped_column(primary_key=True)
    bundle_id: Mapped[int] = mapped_column(ForeignKey("bundle.id"))
    target: Mapped[str] = mapped_column(String(1024))
    """The selector as given, e.g. group=lab,provider=cpu."""
    waves: Mapped[str] = mapped_column(String(256))
    """The waves as given, e.g. 5,10%,50%,100%."""
    max_failure: Mapped[float]
    min_reported: Mapped[int]
    soak_s: Mapped[float]
    device_timeout_s: Mapped[float]
    gates: Mapped[list[str]] = mapped_column(JSON, default=list)
    """The gates as given, e.g. tokens_per_s>=0.8x."""
    status: Mapped[str] = mapped_column(String(16))
    """active, paused, halted, completed, aborted."""
    reason: Mapped[str] = mapped_column(String(2048), default="")
    """Why it is paused or halted."""
    wave: Mapped[int] = mapped_column(default=0)
    """The wave under way (1-based); 0 before the first."""
    wave_count: Mapped[int]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str] = mapped_column(String(128))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class RolloutDeviceRow(Base):
    """A device's part in a rollout: its wave, where it is, and what it ran before (for rollback)."""

    __tablename__ = "rollout_device"
    __table_args__ = (Index("ix_rollout_device_device", "device_id"),)  # which rollouts a device is in

    rollout_id: Mapped[int] = mapped_column(ForeignKey("rollout.id", ondelete="CASCADE"), primary_key=True)
    device_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    wave: Mapped[int]
    hardware_class: Mapped[str] = mapped_column(String(256))
    state: Mapped[str] = mapped_column(String(16), default="pending")
    previous: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    """The desired state it had before the rollout (bundle, version, digest), if any."""
    notified_at: Mapped[datetime | None] = mapped_column(default=None)
    soak_started_at: Mapped[datetime | None] = mapped_column(default=None)
    state_at: Mapped[datetime] = mapped_column(default=utcnow)
    detail: Mapped[str] = mapped_column(String(1024), default="")
    """The device's reason for a failure, or what decided its state."""
    figures: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    """What its gates were judged on: its figures during the soak and before the switch, each gate's
    value, limit and verdict."""
    told_digest: Mapped[str | None] = mapped_column(String(64), default=None)
    """The bundle the rollout last published to it (its own, or the previous one on a rollback): what a
    decision meant to tell and a stop left untold differs from it."""


class BuildJobRow(Base):
    """A recipe the controller runs (controller/builds.py): queued, running, succeeded, failed, cancelled."""

    __tablename__ = "build_job"
    __table_args__ = (Index("ix_build_job_status", "status"),)  # the queue

    id: Mapped[int] = mapped_column(primary_key=True)
    recipe: Mapped[str] = mapped_column(String(256))
    """The recipe file's name, as submitted."""
    status: Mapped[str] = mapped_column(String(16), default="queued")
    stage: Mapped[str] = mapped_column(String(32), default="")
    """The stage under way, or the last one that ran."""
    stages: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    """Each stage done so far: cached or run, its seconds (from the pipeline's record)."""
    detail: Mapped[str] = mapped_column(String(4096), default="")
    """Why it failed, or what it made."""
    runner: Mapped[str | None] = mapped_column(String(256), default=None)
    """The replica running it."""
    pid: Mapped[int | None] = mapped_column(default=None)
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    bundle_name: Mapped[str | None] = mapped_column(String(128), default=None)
    bundle_version: Mapped[str | None] = mapped_column(String(64), default=None)
    created_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)


class LeaseRow(Base):
    """A lease one controller replica holds at a time (controller/lease.py)."""

    __tablename__ = "controller_lease"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(256))
    epoch: Mapped[int]
    """Goes up by one at every takeover: a decision commits only under the epoch it was taken under."""
    expires_at: Mapped[datetime]


def open_database(url: str) -> Engine:
    """An engine on `url` with the schema migrated to the newest revision."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, pool_pre_ping=True)
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(connection: Any, _record: Any) -> None:
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

    migrate(engine)
    return engine


def migrate(engine: Engine, revision: str = "head") -> None:
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
