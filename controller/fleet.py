"""The fleet: devices as their MQTT messages describe them, and the labels operators give them.

A device appears with its first birth message (hardware profile, agent version) and is
updated by every state message (online or not, what it serves); `last_seen` moves with
each. Tags and groups are the operator's, changed through the API and audited.
"""

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, String, cast, func, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from slmops.errors import NotFound
from slmops.messages import Birth, DesiredState, DeviceState, Reported, TelemetryBatch

from . import audit
from .audit import Actor
from .db import BundleRow, DeviceRow, TelemetryRow
from .rollout_plan import hardware_class

Inbound = Birth | DeviceState | Reported | TelemetryBatch
"""What devices send that the fleet records."""


class Fleet:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def record(self, messages: Sequence[tuple[str, Inbound]]) -> list[tuple[str, DesiredState]]:
        """What devices sent, in order, in one transaction (controller/recorder.py batches them).
        Returns the devices to tell their desired state again (drifted, or born short of it).

        A birth registers a device with its profile; a state, report or telemetry batch from a
        device never born yet registers it without one. Telemetry records stored before (the
        same device and sequence number) are skipped. A report on another bundle than the one
        desired (an attempt superseded since) is not kept as the device's report, except a
        rollback, which the operator asked for; nor is a report sent before the one stored (_stale).
        A device that reached its desired state (reported
        healthy) and now serves something else has drifted (someone loaded another bundle on it,
        or a broker let a forged desired state through): it is audited, and told its desired
        state again. A device born without having reported its desired state healthy is told it
        again too (_owed).
        """
        drifted: list[tuple[str, DesiredState]] = []
        telemetry: list[dict[str, Any]] = []
        now = datetime.now(UTC)
        with Session(self.engine) as session, session.begin():
            # Telemetry, nearly all of the traffic, needs no device object: its devices' last_seen is one
            # UPDATE and its records one INSERT. Devices are loaded for what changes them.
            ids = {device_id for device_id, _ in messages}
            changing = {device_id for device_id, m in messages if not isinstance(m, TelemetryBatch)}
            insert = sqlite_insert if self.engine.dialect.name == "sqlite" else postgresql_insert
            # New devices registered first, by an insert that yields to another replica registering the same
            # device at the same moment (a plain INSERT lost that race: the message was dropped).
            new = ids - set(session.scalars(select(DeviceRow.id).where(DeviceRow.id.in_(ids))))
            if new:
                rows = [{"id": d, "tags": {}, "groups": [], "profile": {}, "last_seen": now} for d in sorted(new)]
                session.execute(insert(DeviceRow).on_conflict_do_nothing(index_elements=["id"]), rows)
            # Locked, in one order, until the commit: another replica recording the same devices waits, then
            # reads what this one wrote (its reports stay in the order the device sent them).
            locked = select(DeviceRow.id).where(DeviceRow.id.in_(ids)).order_by(DeviceRow.id).with_for_update()
            session.execute(locked)
            devices = {d.id: d for d in session.scalars(select(DeviceRow).where(DeviceRow.id.in_(changing)))}
            for device_id, message in messages:
                if isinstance(message, TelemetryBatch):
                    telemetry += _telemetry_rows(device_id, message, now)
                    continue
                device = devices[device_id]
                device.last_seen = now
                if isinstance(message, Birth):
                    device.profile = message.profile.model_dump(mode="json")
                    device.hardware_class = hardware_class(device.profile)
                    device.agent_version, device.online = message.agent_version, True
                    if (desired := _owed(device)) is not None:  # told again, not left to the broker's retained copy
                        drifted.append((device_id, desired))
                elif isinstance(message, DeviceState):
                    device.online = message.online
                    if message.agent_version:
                        device.agent_version = message.agent_version
                    device.serving = message.serving.model_dump() if message.serving else None
                    if message.online:  # the will says nothing of the slots, which stay on the device's disk
                        device.previous = message.previous.model_dump() if message.previous else None
                    # offline (the will, a goodbye), it serves nothing to compare
                    if message.online and (desired := _drift(device)) is not None:
                        drifted.append((device_id, desired))
                        audit.record(session, CONTROLLER, "device.drift", device_id, drift_detail(device) or {})
                else:
                    wanted = (device.desired or {}).get("digest")
                    if (message.status == "rolled_back" or wanted in (None, message.digest)) and not _stale(
                        message, device.reported
                    ):
                        device.reported = message.model_dump(mode="json", exclude={"schema_version"})
            session.flush()  # new devices first: telemetry rows refer to them
            if telemetry:
                reporting = {row["device_id"] for row in telemetry} - changing
                seen = update(DeviceRow).where(DeviceRow.id.in_(reporting)).values(last_seen=now)
                session.execute(seen, execution_options={"synchronize_session": False})
                session.connection().execute(insert(TelemetryRow).on_conflict_do_nothing(), telemetry)
        return drifted

    def set_desired(self, device_ids: Sequence[str], bundle: BundleRow, actor: Actor) -> tuple[DesiredState, list[str]]:
        """The same desired state for every device named, in one transaction: all of them or, when
        one is unknown, none (NotFound). Returns it, and the devices that will fetch it now (online,
        and not serving it already)."""
        desired = DesiredState(bundle=bundle.name, version=bundle.version, digest=bundle.digest)
        fetching = []
        with Session(self.engine) as session, session.begin():
            chosen = select(DeviceRow).where(DeviceRow.id.in_(set(device_ids))).order_by(DeviceRow.id).with_for_update()
            found = {d.id: d for d in session.scalars(chosen)}
            for device_id in device_ids:
                device = found.get(device_id)
                if device is None:
                    raise NotFound(f"no device {device_id!r} has reported to this controller")
                device.desired = desired.model_dump(mode="json", exclude={"schema_version", "sent_at"})
                device.reported = None
                audit.record(session, actor, "device.desired", device_id, device.desired, bundle.id)
                serving = device.serving or {}
                if device.online and (serving.get("bundle"), serving.get("version")) != (bundle.name, bundle.version):
                    fetching.append(device_id)
        return desired, fetching

    def group(self, name: str) -> list[str]:
        """The ids of the devices in a group (NotFound when none is)."""
        with Session(self.engine) as session:
            chosen = select(DeviceRow.id).where(*DeviceFilter(group=name).clauses()).order_by(DeviceRow.id)
            members = list(session.scalars(chosen))
        if not members:
            raise NotFound(f"no device is in group {name!r}")
        return members

    def record_command(self, device_id: str, command: str, actor: Actor) -> None:
        """Audit a command before it is sent. A rollback ends what the device's last report said of its
        desired state: what it serves next is the operator's doing, not drift."""
        with Session(self.engine) as session, session.begin():
            audit.record(session, actor, "device.command", device_id, {"command": command})
            if command == "rollback" and (device := session.get(DeviceRow, device_id)) is not None:
                device.reported = None

    def desired_states(self) -> dict[str, DesiredState]:
        """Every device's desired state, to publish again after a reconnect."""
        with Session(self.engine) as session:
            rows = session.scalars(select(DeviceRow).where(DeviceRow.desired.is_not(None)))
            return {row.id: DesiredState.model_validate(row.desired) for row in rows if row.desired}

    def telemetry(self, device_id: str, limit: int = 100) -> list[TelemetryRow]:
        with Session(self.engine) as session:
            query = (
                select(TelemetryRow)
                .where(TelemetryRow.device_id == device_id)
                .order_by(TelemetryRow.seq.desc())
                .limit(limit)
            )
            return list(session.scalars(query))

    def listing(self, chosen: "DeviceFilter", limit: int, offset: int) -> tuple[list[DeviceRow], int]:
        """One page of the devices `chosen` selects, by id, and how many it selects: in the database,
        so that neither grows with the fleet."""
        where = chosen.clauses()
        with Session(self.engine) as session:
            total = session.scalar(select(func.count()).select_from(DeviceRow).where(*where)) or 0
            page = select(DeviceRow).where(*where).order_by(DeviceRow.id).limit(limit).offset(offset)
            return list(session.scalars(page)), total

    def online(self) -> tuple[int, int]:
        """How many devices are online, of how many."""
        with Session(self.engine) as session:
            online = dict(session.execute(select(DeviceRow.online, func.count()).group_by(DeviceRow.online)).all())
        return online.get(True, 0), sum(online.values())

    def overview(self) -> "FleetOverview":
        """Devices counted: online, by hardware class, by what they serve; the groups in use."""
        online, total = self.online()
        with Session(self.engine) as session:
            classes = session.execute(
                select(DeviceRow.hardware_class, func.count()).group_by(DeviceRow.hardware_class)
            ).all()
            serving_text = cast(DeviceRow.serving, String)
            serving = session.execute(select(serving_text, func.count()).group_by(serving_text)).all()
            group_sets = session.scalars(select(cast(DeviceRow.groups, String)).distinct()).all()
        by_serving: dict[str, int] = {}
        for text, count in serving:
            what = serving_label(json.loads(text) if text else None)
            by_serving[what] = by_serving.get(what, 0) + count
        return FleetOverview(
            total=total,
            online=online,
            classes=sorted((c or "not born yet", n) for c, n in classes),
            serving=sorted(by_serving.items(), key=lambda kv: -kv[1]),
            groups=sorted({g for text in group_sets if text for g in json.loads(text)}),
        )

    def device(self, device_id: str) -> DeviceRow:
        with Session(self.engine) as session:
            device = session.get(DeviceRow, device_id)
        if device is None:
            raise NotFound(f"no device {device_id!r} has reported to this controller")
        return device

    def label(
        self, device_id: str, actor: Actor, tags: dict[str, str] | None = None, groups: list[str] | None = None
    ) -> DeviceRow:
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            device = session.get(DeviceRow, device_id)
            if device is None:
                raise NotFound(f"no device {device_id!r} has reported to this controller")
            change: dict[str, Any] = {}
            if tags is not None:
                device.tags, change["tags"] = dict(tags), tags
            if groups is not None:
                device.groups, change["groups"] = sorted(set(groups)), sorted(set(groups))
            audit.record(session, actor, "device.label", device_id, change)
            return device


CONTROLLER = Actor("controller", "admin")
"""The actor of what the controller does by itself (drift)."""


def _reached(device: DeviceRow) -> bool:
    """Whether the device reported its desired state healthy."""
    desired, reported = device.desired or {}, device.reported or {}
    return bool(desired) and (reported.get("digest"), reported.get("status")) == (desired.get("digest"), "healthy")


def drift_detail(device: DeviceRow) -> dict[str, Any] | None:
    """What a device serves against its desired state, when it reached that state and serves something
    else now; None otherwise (still on its way, failed, rolled back on command, or in step)."""
    desired, serving = device.desired, device.serving or {}
    if not desired or not _reached(device):
        return None
    if (serving.get("bundle"), serving.get("version")) == (desired["bundle"], desired["version"]):
        return None
    return {"desired": f"{desired['bundle']} {desired['version']}", "serving": serving or None}


def _stale(report: Reported, stored: dict[str, Any] | None) -> bool:
    """Whether the report was sent before the one stored for the same bundle: with controller replicas
    on a shared subscription, one device's consecutive reports can be recorded by different replicas,
    out of order (an `activating` after the `healthy` sent after it). The device's own clock orders them."""
    if not stored or stored.get("digest") != report.digest or "sent_at" not in stored:
        return False
    return datetime.fromisoformat(stored["sent_at"]) > report.sent_at


def _owed(device: DeviceRow) -> DesiredState | None:
    """The desired state of a device (re)connecting that has not reported reaching it. Sent again on its
    birth: a broker cluster may not have the retained copy on the node it reconnected to (NATS 2.9 did
    not, after another node died), and a device that has it ignores the same desired state twice."""
    if not device.desired or _reached(device):
        return None
    return DesiredState.model_validate(device.desired)


def _drift(device: DeviceRow) -> DesiredState | None:
    return None if drift_detail(device) is None else DesiredState.model_validate(device.desired)


def _telemetry_rows(device_id: str, batch: TelemetryBatch, received_at: datetime) -> list[dict[str, Any]]:
    return [
        {
            "device_id": device_id,
            "seq": r.seq,
            "created": datetime.fromtimestamp(r.created, UTC),
            "kind": r.kind,
            "payload": r.payload,
            "received_at": received_at,
        }
        for r in batch.records
    ]


def serving_label(serving: dict[str, Any] | None) -> str:
    """What a device reports it serves, as lists show it: "bundle version · variant · provider"."""
    if not serving or not serving.get("bundle"):
        return "nothing"
    return (f"{serving['bundle']} {serving.get('version', '')} · {serving.get('variant', '?')} · "
            f"{serving.get('provider', '?')}")  # fmt: skip


@dataclass(frozen=True)
class DeviceFilter:
    """What a list of devices is narrowed to; empty fields select everything."""

    status: str = ""
    """online or offline"""
    hardware_class: str = ""
    group: str = ""
    tag: str = ""
    """key=value"""
    text: str = ""
    """part of the id"""

    def clauses(self) -> list[Any]:
        """The filter as SQL. Groups and tags are matched in their JSON text, which SQLAlchemy writes with
        json.dumps on every database: a quoted name (or "key": "value") matches only a whole one."""
        where: list[Any] = []
        if self.status in ("online", "offline"):
            where.append(DeviceRow.online.is_(self.status == "online"))
        if self.hardware_class:
            where.append(DeviceRow.hardware_class == self.hardware_class)
        if self.text:
            where.append(func.lower(DeviceRow.id).contains(self.text.lower(), autoescape=True))
        if self.group:
            where.append(cast(DeviceRow.groups, String).contains(json.dumps(self.group), autoescape=True))
        if self.tag:
            key, _, value = self.tag.partition("=")
            pair = f"{json.dumps(key.strip())}: {json.dumps(value.strip())}"
            where.append(cast(DeviceRow.tags, String).contains(pair, autoescape=True))
        return where


@dataclass(frozen=True)
class FleetOverview:
    total: int
    online: int
    classes: list[tuple[str, int]]
    serving: list[tuple[str, int]]
    """serving_label → devices"""
    groups: list[str]
