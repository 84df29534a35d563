"""Rollouts: one bundle to a target of devices in waves, each gated on its devices' own reports,
halted and rolled back when too many fail.

    create ─► the target's devices (rollout_plan.Selector, now: membership never changes)
           ─► waves (rollout_plan.plan_waves: the first covers every hardware class)
           ─► a row per device: its wave, and the desired state it had before (for rollback)
    advance(now), for each active rollout:
        the next wave is started: its devices are told the bundle (FleetControl.desire)
        each started device follows its reports:
            notified | unreached (offline: it gets the retained desired state when it returns)
            ─► downloading ─► activating ─► soaking (healthy) ─► passed once the soak time is over
            ─► failed (its reason kept) · timed_out (no result within the device timeout)
        failed + timed_out > max_failure of the devices that answered ─► halted: every device it
            told is told its previous bundle again (rolled_back)
        every device of the wave done ─► fewer than min_reported passed: paused, inconclusive
                                        ─► otherwise the next wave, or completed

Every state is a row; `advance` decides in one transaction per rollout and tells devices after
it commits, so a restart carries on from the rows.
"""

import logging
import statistics
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import Engine, String, case, cast, func, select, update
from sqlalchemy.orm import Session

from slmops.errors import Conflict, NotFound, Rejected
from slmops.supervision import Supervised

from . import audit
from .audit import Actor
from .control import FleetControl
from .db import BundleRow, DeviceRow, RolloutDeviceRow, RolloutRow, TelemetryRow
from .fleet import CONTROLLER
from .lease import Lease, LeaseLost
from .protocol import RolloutDeviceView, RolloutRequest, RolloutView
from .registry import Registry
from .rollout_plan import Gate, Selector, WaveSize, hardware_class, parse_share, parse_waves, plan_waves

log = logging.getLogger(__name__)

ACTIVE, PAUSED, HALTED, COMPLETED, ABORTED = "active", "paused", "halted", "completed", "aborted"
SUPERSEDED = "superseded"
REPAIR_S = 3600.0
"""How long after its halt a rollout's rollbacks are checked for devices not told (a restart between)."""
DEVICE_PAGE = 1000
"""Devices in a rollout view unless the request asks for another page size."""
OWNING = (ACTIVE, PAUSED)
"""Statuses of a rollout that owns its devices: no other rollout nor a hand-set desired state may take them."""
FINISHED = ("passed", "failed", "timed_out", "rolled_back")
"""A device's states after which it waits for nothing."""
ACTIONS = ("pause", "resume", "promote", "abort", "rollback")
"""What an operator may do to a rollout (Rollouts.act); which of them a rollout takes now: `permitted_actions`."""
STATUS_AFTER = {"pause": PAUSED, "resume": ACTIVE, "abort": ABORTED}
"""The status each of the ACTIONS that only changes a rollout's status leaves it in."""
ROLLED_BACK_AFTER = "; then "
"""Between why a device failed and its rollback, in the detail of a device rolled back after it failed."""
ANSWERED = ("downloading", "activating", "soaking", "passed", "failed", "timed_out")
"""States of devices that reported (or ran out of time): the failure rate's denominator."""
REPORTED_STATE = {"downloading": "downloading", "verifying": "downloading", "activating": "activating"}


Fence = Callable[[Session], None]
"""Checks, inside a decision's transaction, that this replica may still decide (controller/lease.py)."""


@dataclass(frozen=True)
class _Parsed:
    """A rollout request's target, waves, failure bound and gates, parsed once."""

    selector: Selector
    waves: list[WaveSize]
    max_failure: float
    gates: list[Gate]


def _parse(request: RolloutRequest) -> _Parsed:
    """A bad target, waves, bound or gate is a Rejected naming it, before anything is stored."""
    return _Parsed(
        Selector.parse(request.target),
        parse_waves(request.waves),
        parse_share(request.max_failure, "max_failure"),
        [Gate.parse(g) for g in request.gates],
    )


@dataclass
class _Told:
    """Devices of a rollout to tell a bundle once the decision has committed."""

    rollout_id: int
    bundle: BundleRow
    device_ids: list[str] = field(default_factory=list)


class _DeviceNow(NamedTuple):
    """What a decision reads of a device (its row less the profile and telemetry it does not need)."""

    id: str
    online: bool
    desired: dict[str, Any] | None
    reported: dict[str, Any] | None


class Rollouts:
    def __init__(self, engine: Engine, registry: Registry, control: FleetControl) -> None:
        self.engine, self.registry, self.control = engine, registry, control

    def create(self, spec: RolloutRequest, actor: Actor) -> RolloutView:
        parsed = _parse(spec)
        bundle = self.registry.bundle(spec.bundle, spec.version)
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            devices = [
                d for d in session.scalars(select(DeviceRow)) if parsed.selector.matches(d.groups, d.tags, d.profile)
            ]
            if not devices:
                raise Rejected(f"the target {spec.target!r} matches no device")
            owners = _owners(session, [d.id for d in devices])
            if owners and not spec.supersede:
                raise Conflict(_owned_message(owners) + "; finish or abort it first, or supersede it")
            rollout = RolloutRow(
                bundle_id=bundle.id,
                target=spec.target,
                waves=spec.waves,
                max_failure=parsed.max_failure,
                min_reported=spec.min_reported,
                soak_s=spec.soak_s,
                device_timeout_s=spec.device_timeout_s,
                gates=[gate.text for gate in parsed.gates],
                status=ACTIVE,
                wave_count=0,
                created_by=actor.name,
            )
            session.add(rollout)
            session.flush()  # its id salts the order of the waves
            for owner in sorted(set(owners.values())):
                old = self._row(session, owner)
                old.status, old.reason = SUPERSEDED, f"superseded by rollout {rollout.id} ({actor.name})"
                audit.record(session, actor, "rollout.supersede", f"rollout/{owner}", {"by": rollout.id})
            classes = {d.id: hardware_class(d.profile) for d in devices}
            plan = plan_waves(classes, parsed.waves, salt=f"rollout/{rollout.id}")
            rollout.wave_count = len(plan)
            by_id = {d.id: d for d in devices}
            registered = self._registered(session, devices)
            for wave, device_ids in enumerate(plan, start=1):
                for device_id in device_ids:
                    serving = by_id[device_id].serving or {}
                    running = registered.get((serving.get("bundle"), serving.get("version")))
                    # what it returns to on a rollback: never the rollout's own bundle (a device told it
                    # by hand before), then nothing (it keeps what it has)
                    previous = next(
                        (p for p in (by_id[device_id].desired, running) if p and p["digest"] != bundle.digest), None
                    )
                    session.add(
                        RolloutDeviceRow(
                            rollout_id=rollout.id,
                            device_id=device_id,
                            wave=wave,
                            hardware_class=classes[device_id],
                            previous=previous,
                        )
                    )
            detail = {"target": spec.target, "waves": [len(w) for w in plan], "devices": len(devices)}
            audit.record(session, actor, "rollout.create", f"rollout/{rollout.id}", detail, bundle.id)
        return self.get(rollout.id)

    def get(
        self,
        rollout_id: int,
        state: str | None = None,
        wave: int | None = None,
        limit: int = DEVICE_PAGE,
        offset: int = 0,
    ) -> RolloutView:
        """The rollout, its devices counted by state, and one page of its devices (by wave and id) of
        those in `state` and `wave` when given."""
        with Session(self.engine) as session:
            return _view(session, self._row(session, rollout_id), state, wave, limit, offset)

    def failures(self, rollout_id: int, limit: int) -> list[RolloutDeviceView]:
        """Its devices that failed or timed out, those rolled back after they did (ROLLED_BACK_AFTER keeps
        their reason), by wave and id: what an operator looks at first on a halted rollout."""
        failed = RolloutDeviceRow.state.in_(("failed", "timed_out")) | (
            (RolloutDeviceRow.state == "rolled_back") & RolloutDeviceRow.detail.contains(ROLLED_BACK_AFTER)
        )
        return self._members_where(rollout_id, failed, (RolloutDeviceRow.wave, RolloutDeviceRow.device_id), limit)

    def judged(self, rollout_id: int, limit: int) -> list[RolloutDeviceView]:
        """Its devices whose gates were judged (the figures they were judged on kept): those that broke one
        first, then the newest wave's, by id. What the dashboard charts against the gates' bounds."""
        kept = RolloutDeviceRow.figures.is_not(None) & (cast(RolloutDeviceRow.figures, String) != "null")
        failed_first = case((RolloutDeviceRow.state.in_(("failed", "rolled_back")), 0), else_=1)
        order = (failed_first, RolloutDeviceRow.wave.desc(), RolloutDeviceRow.device_id)
        return self._members_where(rollout_id, kept, order, limit)

    def _members_where(
        self, rollout_id: int, condition: Any, order: tuple[Any, ...], limit: int
    ) -> list[RolloutDeviceView]:
        """Up to `limit` of the rollout's devices that meet `condition`, in `order` (NotFound for an unknown
        rollout)."""
        chosen = (
            select(RolloutDeviceRow)
            .where(RolloutDeviceRow.rollout_id == rollout_id, condition)
            .order_by(*order)
            .limit(limit)
        )
        with Session(self.engine) as session:
            self._row(session, rollout_id)
            return [RolloutDeviceView.of(row) for row in session.scalars(chosen)]

    def listing(self, limit: int, offset: int = 0) -> tuple[list[RolloutView], int]:
        """One page of the rollouts, newest first, each with its devices counted by state, and how many
        rollouts there are."""
        with Session(self.engine) as session:
            total = session.scalar(select(func.count()).select_from(RolloutRow)) or 0
            rows = session.scalars(select(RolloutRow).order_by(RolloutRow.id.desc()).limit(limit).offset(offset))
            return [_view(session, row, limit=0) for row in rows], total

    def act(self, rollout_id: int, action: str, actor: Actor) -> RolloutView:
        """One of the operator's ACTIONS, as the API and the dashboard take it."""
        if action == "rollback":
            return self.roll_back(rollout_id, actor)
        if action == "promote":
            return self.promote(rollout_id, actor)
        return self._set_status(rollout_id, action, actor)

    def _set_status(self, rollout_id: int, action: str, actor: Actor) -> RolloutView:
        """pause (active → paused), resume (paused → active), abort (stops where it is, no rollback)."""
        status = STATUS_AFTER[action]
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            rollout = self._row(session, rollout_id, lock=True)
            if action not in permitted_actions(rollout.status, rollout.wave):
                raise Conflict(f"rollout {rollout_id} is {rollout.status}: it cannot become {status}")
            rollout.status, rollout.updated_at = status, datetime.now(UTC)
            rollout.reason = "" if status == ACTIVE else f"{status} by {actor.name}"
            audit.record(session, actor, f"rollout.{status}", f"rollout/{rollout_id}", {})
        return self.get(rollout_id)

    def refuse_owned(self, device_ids: Sequence[str]) -> None:
        """A Conflict when a rollout under way owns any of these devices (a desired state set by hand
        would fight it)."""
        with Session(self.engine) as session:
            if owners := _owners(session, device_ids):
                raise Conflict(_owned_message(owners) + "; pause or abort it, or let it finish")

    def roll_back(self, rollout_id: int, actor: Actor) -> RolloutView:
        """Every device the rollout switched is told its previous bundle; the rollout is halted."""
        told: list[_Told] = []
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            rollout = self._row(session, rollout_id, lock=True)
            if "rollback" not in permitted_actions(rollout.status, rollout.wave):
                raise Conflict(f"rollout {rollout_id} is {rollout.status} at wave {rollout.wave}: nothing to roll back")
            members = _members(session, rollout_id)
            started = [m for m in members if m.wave <= rollout.wave and m.state != "rolled_back"]
            told = self._roll_back(session, rollout, started, f"rolled back by {actor.name}", actor, datetime.now(UTC))
        self._tell(told)
        return self.get(rollout_id)

    def promote(self, rollout_id: int, actor: Actor) -> RolloutView:
        """The current wave's healthy devices pass now, without the rest of their soak."""
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            rollout = self._row(session, rollout_id, lock=True)
            if "promote" not in permitted_actions(rollout.status, rollout.wave):
                raise Conflict(f"rollout {rollout_id} is {rollout.status}: there is no wave to promote")
            now = datetime.now(UTC)
            soaking = [m for m in _members(session, rollout_id) if m.wave == rollout.wave and m.state == "soaking"]
            for member in soaking:
                _set(member, "passed", now)
                member.detail = f"promoted by {actor.name}"
            detail = {"wave": rollout.wave, "devices": len(soaking)}
            audit.record(session, actor, "rollout.promote", f"rollout/{rollout_id}", detail)
        return self.get(rollout_id)

    def advance(self, now: datetime | None = None, fence: Fence | None = None) -> None:
        """One decision step for every active rollout (the controller runs it on a timer); rollouts
        halted within the last REPAIR_S are looked at too, for rollbacks not told yet. `fence` is
        called in each decision's transaction before it commits (controller/lease.py): when it raises,
        nothing of that decision is kept or told."""
        now = now or datetime.now(UTC)
        with Session(self.engine) as session:
            recently_halted = (RolloutRow.status == HALTED) & (
                RolloutRow.updated_at >= now - timedelta(seconds=REPAIR_S)
            )
            ids = list(session.scalars(select(RolloutRow.id).where((RolloutRow.status == ACTIVE) | recently_halted)))
        for rollout_id in ids:
            self._advance(rollout_id, now, fence)

    # --- one rollout ------------------------------------------------------------------------------

    def _advance(self, rollout_id: int, now: datetime, fence: Fence | None) -> None:
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            rollout = self._row(session, rollout_id, lock=True)
            bundle = session.get(BundleRow, rollout.bundle_id)
            assert bundle is not None  # the foreign key keeps it
            members = _members(session, rollout_id)
            devices = _devices_now(session, [m for m in members if _waiting(m, rollout)])
            started = [m for m in members if m.wave <= rollout.wave]
            told = self._untold(rollout, started, devices, bundle)
            if rollout.status == ACTIVE:
                judge = _Judge(session, rollout, bundle, members)
                for member in started:
                    _follow(member, devices.get(member.device_id), bundle, rollout, now, judge)
                answered = [m for m in started if m.state in ANSWERED]
                failures = [m for m in answered if m.state in ("failed", "timed_out")]
                if failures and len(failures) > rollout.max_failure * len(answered):
                    told += self._halt(session, rollout, started, failures, len(answered), now)
                else:
                    wave = [m for m in started if m.wave == rollout.wave]
                    if all(m.state in FINISHED for m in wave):
                        told += self._next_wave(session, rollout, bundle, members, wave, devices, now)
                rollout.updated_at = now
            if fence is not None:
                fence(session)
        self._tell(told)

    def _tell(self, told: Sequence[_Told]) -> None:
        """After the decision committed: the devices get their desired states (and the broker's ACL), and
        their rows say so."""
        for batch in told:
            self.control.desire(batch.device_ids, batch.bundle, CONTROLLER)
            with Session(self.engine) as session, session.begin():
                session.execute(
                    update(RolloutDeviceRow)
                    .where(
                        RolloutDeviceRow.rollout_id == batch.rollout_id,
                        RolloutDeviceRow.device_id.in_(batch.device_ids),
                    )
                    .values(told_digest=batch.bundle.digest)
                )

    def _untold(
        self,
        rollout: RolloutRow,
        started: Sequence[RolloutDeviceRow],
        devices: dict[str, _DeviceNow],
        bundle: BundleRow,
    ) -> list[_Told]:
        """Devices a decision meant to tell and that were not told: the controller stopped between the
        decision's commit and storing their desired state. A desired state stored is as good as told (the
        bridge publishes every stored one again when it connects), so a device is told again only when
        neither its row says it was told (told_digest) nor its desired state is what it was to be told.
        A rolled-back device whose desired state someone else changed since (a later rollout, an operator)
        is left alone: only while it still desires this rollout's bundle is the rollback owed."""
        forward = _Told(rollout.id, bundle)
        back: dict[tuple[str, str], _Told] = {}
        for member in started:
            device = devices.get(member.device_id)
            desired = ((device.desired if device is not None else None) or {}).get("digest")
            if member.state in ("notified", "unreached"):
                if member.told_digest != bundle.digest and desired != bundle.digest:
                    forward.device_ids.append(member.device_id)
            elif (
                member.state == "rolled_back"
                and member.previous
                and member.told_digest != member.previous["digest"]
                and desired == bundle.digest
            ):
                self._tell_previous(back, rollout.id, member)
        return [batch for batch in (forward, *back.values()) if batch.device_ids]

    def _next_wave(
        self,
        session: Session,
        rollout: RolloutRow,
        bundle: BundleRow,
        members: Sequence[RolloutDeviceRow],
        wave: Sequence[RolloutDeviceRow],
        devices: dict[str, _DeviceNow],
        now: datetime,
    ) -> list[_Told]:
        passed = sum(
            m.state == "passed" and (not rollout.gates or bool((m.figures or {}).get("complete"))) for m in wave
        )
        if wave and passed < min(rollout.min_reported, len(wave)):
            rollout.status = PAUSED
            measured = " with figures for every gate" if rollout.gates else ""
            rollout.reason = (
                f"inconclusive: wave {rollout.wave} has {passed} healthy device(s){measured} after its soak, fewer "
                f"than the {min(rollout.min_reported, len(wave))} it needs to decide; resume to go on regardless"
            )
            audit.record(session, CONTROLLER, "rollout.pause", f"rollout/{rollout.id}", {"reason": rollout.reason})
            return []
        if rollout.wave >= rollout.wave_count:
            rollout.status, rollout.reason = COMPLETED, ""
            audit.record(session, CONTROLLER, "rollout.complete", f"rollout/{rollout.id}", {})
            return []
        rollout.wave += 1
        starting = [m for m in members if m.wave == rollout.wave]
        for member in starting:
            device = devices.get(member.device_id)
            _set(member, "notified" if device is not None and device.online else "unreached", now)
            member.notified_at = now
        detail = {"wave": rollout.wave, "devices": len(starting)}
        audit.record(session, CONTROLLER, "rollout.wave", f"rollout/{rollout.id}", detail, bundle.id)
        return [_Told(rollout.id, bundle, [m.device_id for m in starting])]

    def _halt(
        self,
        session: Session,
        rollout: RolloutRow,
        started: Sequence[RolloutDeviceRow],
        failures: Sequence[RolloutDeviceRow],
        answered: int,
        now: datetime,
    ) -> list[_Told]:
        examples = "; ".join(f"{m.device_id}: {m.state} {m.detail}".strip() for m in failures[:5])
        reason = (
            f"{len(failures)} of {answered} devices that answered failed or timed out, past max_failure "
            f"{rollout.max_failure:.0%} ({examples}); the devices it switched are told their previous bundle"
        )
        return self._roll_back(session, rollout, started, reason, CONTROLLER, now)

    def _roll_back(
        self,
        session: Session,
        rollout: RolloutRow,
        started: Sequence[RolloutDeviceRow],
        reason: str,
        actor: Actor,
        now: datetime,
    ) -> list[_Told]:
        """Halt `rollout` for `reason`; every started device is to be told the bundle it had before."""
        rollout.status, rollout.reason, rollout.updated_at = HALTED, reason, now
        told: dict[tuple[str, str], _Told] = {}
        for member in started:
            previous = member.previous
            if not previous:
                member.detail = "nothing to roll back to: it had no bundle before this rollout"
                continue
            self._tell_previous(told, rollout.id, member)
            why = f"{member.detail}{ROLLED_BACK_AFTER}" if member.state in ("failed", "timed_out") else ""
            _set(member, "rolled_back", now)
            member.detail = f"{why}told to return to {previous['bundle']} {previous['version']}"[-1024:]
        audit.record(session, actor, "rollout.halt", f"rollout/{rollout.id}", {"reason": reason})
        return list(told.values())

    def _tell_previous(self, told: dict[tuple[str, str], _Told], rollout_id: int, member: RolloutDeviceRow) -> None:
        """Add `member` to the batch that tells its previous bundle (one batch per bundle)."""
        assert member.previous is not None
        key = (member.previous["bundle"], member.previous["version"])
        if key not in told:
            told[key] = _Told(rollout_id, self.registry.bundle(*key))
        told[key].device_ids.append(member.device_id)

    @staticmethod
    def _row(session: Session, rollout_id: int, lock: bool = False) -> RolloutRow:
        """The rollout; `lock`: its row locked until the transaction ends (PostgreSQL), for a change that
        must not interleave with another replica's decision or an operator's action on it."""
        rollout = session.get(RolloutRow, rollout_id, with_for_update=lock)
        if rollout is None:
            raise NotFound(f"no rollout {rollout_id}")
        return rollout

    @staticmethod
    def _registered(session: Session, devices: Sequence[DeviceRow]) -> dict[tuple[Any, Any], dict[str, Any]]:
        """(name, version) → that bundle as a desired state, for what the devices serve and the registry has
        (a device's previous bundle, to roll back to, when its desired state is none or the rollout's)."""
        served = {((d.serving or {}).get("bundle"), (d.serving or {}).get("version")) for d in devices}
        names = {name for name, _ in served if name}
        rows: Sequence[BundleRow] = session.scalars(select(BundleRow).where(BundleRow.name.in_(names))).all()
        return {
            (row.name, row.version): {"bundle": row.name, "version": row.version, "digest": row.digest}
            for row in rows
            if (row.name, row.version) in served
        }


class RolloutTimer:
    """The `slmops-rollouts` thread: each `tick_s`, the lease held or renewed and, while this replica
    holds it, every active rollout moved a step, each decision fenced by the lease's epoch."""

    def __init__(self, rollouts: Rollouts, lease: Lease, tick_s: float) -> None:
        self.rollouts, self.lease, self.tick_s = rollouts, lease, tick_s
        self._stop = threading.Event()
        self.thread = Supervised("slmops-rollouts", self._loop)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.wait(self.tick_s):
            if self.lease.hold() is None:
                continue  # another replica decides
            try:
                self.rollouts.advance(fence=self.lease.fence)
            except LeaseLost as e:
                log.warning("%s; another replica decides from now on", e)


def permitted_actions(status: str, wave: int) -> list[str]:
    """The ACTIONS a rollout in `status` at `wave` takes: pause an active one, resume a paused one, promote
    or abort either; roll back any that switched devices (a wave told) unless aborted or superseded, a
    completed one included."""
    taken = {
        "pause": status == ACTIVE,
        "resume": status == PAUSED,
        "promote": status in OWNING,
        "abort": status in OWNING,
        "rollback": status not in (SUPERSEDED, ABORTED) and wave > 0,
    }
    return [action for action in ACTIONS if taken[action]]


def _view(
    session: Session,
    rollout: RolloutRow,
    state: str | None = None,
    wave: int | None = None,
    limit: int = DEVICE_PAGE,
    offset: int = 0,
) -> RolloutView:
    """Counted and paged in the database: a 10,000-device rollout's status costs one page, not all."""
    bundle = session.get(BundleRow, rollout.bundle_id)
    assert bundle is not None  # the foreign key keeps it
    mine = RolloutDeviceRow.rollout_id == rollout.id
    counted = session.execute(select(RolloutDeviceRow.state, func.count()).where(mine).group_by(RolloutDeviceRow.state))
    states = {name: count for name, count in counted}
    chosen = select(RolloutDeviceRow).where(mine)
    if state is not None:
        chosen = chosen.where(RolloutDeviceRow.state == state)
    if wave is not None:
        chosen = chosen.where(RolloutDeviceRow.wave == wave)
    total = session.scalar(select(func.count()).select_from(chosen.subquery())) or 0
    page: list[RolloutDeviceRow] = []
    if limit:
        ordered = chosen.order_by(RolloutDeviceRow.wave, RolloutDeviceRow.device_id).limit(limit).offset(offset)
        page = list(session.scalars(ordered))
    return RolloutView.of(rollout, bundle, states, page, total, permitted_actions(rollout.status, rollout.wave))


def _waiting(member: RolloutDeviceRow, rollout: RolloutRow) -> bool:
    """Whether a decision step may need the member's device: it is started and not finished, it is
    rolled back (a rollback owed), or it starts with the next wave. A 5,000-device wave is read whole
    only while its devices are under way."""
    return (
        (member.wave <= rollout.wave and member.state not in FINISHED)
        or member.state == "rolled_back"
        or member.wave == rollout.wave + 1
    )


def _devices_now(session: Session, members: Sequence[RolloutDeviceRow]) -> dict[str, _DeviceNow]:
    ids = [m.device_id for m in members]
    columns = select(DeviceRow.id, DeviceRow.online, DeviceRow.desired, DeviceRow.reported)
    found: dict[str, _DeviceNow] = {}
    for start in range(0, len(ids), 5000):  # SQLite binds at most 32,766 parameters
        for row in session.execute(columns.where(DeviceRow.id.in_(ids[start : start + 5000]))):
            found[row.id] = _DeviceNow(*row)
    return found


def _members(session: Session, rollout_id: int) -> list[RolloutDeviceRow]:
    """A rollout's devices, by wave and id."""
    query = (
        select(RolloutDeviceRow)
        .where(RolloutDeviceRow.rollout_id == rollout_id)
        .order_by(RolloutDeviceRow.wave, RolloutDeviceRow.device_id)
    )
    return list(session.scalars(query))


def _owners(session: Session, device_ids: Sequence[str]) -> dict[str, int]:
    """Device id → the rollout under way (active or paused) that owns it, for those of `device_ids` owned."""
    rows = session.execute(
        select(RolloutDeviceRow.device_id, RolloutDeviceRow.rollout_id)
        .join(RolloutRow, RolloutRow.id == RolloutDeviceRow.rollout_id)
        .where(RolloutRow.status.in_(OWNING), RolloutDeviceRow.device_id.in_(list(device_ids)))
    )
    return {device_id: rollout_id for device_id, rollout_id in rows}


def _owned_message(owners: dict[str, int]) -> str:
    examples = ", ".join(f"{d} (rollout {r})" for d, r in sorted(owners.items())[:5])
    rollouts = ", ".join(str(r) for r in sorted(set(owners.values())))
    return f"{len(owners)} device(s) belong to rollout {rollouts} under way: {examples}"


BASELINE = timedelta(days=1)
"""How far back before the switch a device's own figures are looked for."""


class _Judge:
    """Decides a device whose soak is over: passed, or failed on a gate, with the figures it was judged on.
    A relative gate scales the device's own figure before the switch or, without one, what its hardware
    class measured on the first wave; a gate without figures is unjudged (the wave may be inconclusive)."""

    def __init__(
        self, session: Session, rollout: RolloutRow, bundle: BundleRow, members: Sequence[RolloutDeviceRow]
    ) -> None:
        self.session, self.bundle, self.members = session, bundle, members
        self.gates = [Gate.parse(g) for g in rollout.gates]
        self._by_class: dict[str, dict[str, float]] | None = None

    def __call__(self, member: RolloutDeviceRow, now: datetime) -> None:
        if not self.gates:
            _set(member, "passed", now)
            return
        assert member.soak_started_at is not None and member.notified_at is not None
        during = _figures(self._inference(member.device_id, self.bundle.name, self.bundle.version,
                                          _aware(member.soak_started_at), now))  # fmt: skip
        before: dict[str, float] = {}
        if previous := member.previous:
            switched = _aware(member.notified_at)
            records = self._inference(
                member.device_id, previous["bundle"], previous["version"], switched - BASELINE, switched
            )
            before = _figures(records)
        class_figures = self._class_figures().get(member.hardware_class, {})
        verdicts: dict[str, dict[str, Any]] = {}
        for gate in self.gates:
            value = during.get(gate.metric)
            limit = gate.limit(before.get(gate.metric, class_figures.get(gate.metric)))
            held = None if value is None or limit is None else gate.holds(value, limit)
            verdicts[gate.text] = {"value": value, "limit": limit, "held": held}
        complete = all(v["held"] is not None for v in verdicts.values())
        member.figures = {"during": during, "before": before, "gates": verdicts, "complete": complete}
        broken = [f"gate {text}: {v['value']:.4g} against {v['limit']:.4g}" for text, v in verdicts.items()
                  if v["held"] is False]  # fmt: skip
        if broken:
            _set(member, "failed", now)
            member.detail = "; ".join(broken)[:1024]
            return
        _set(member, "passed", now)
        if not complete:
            unjudged = [text for text, v in verdicts.items() if v["held"] is None]
            member.detail = f"passed without figures for {', '.join(unjudged)}"

    def _inference(
        self, device_id: str, bundle: str, version: str, since: datetime, until: datetime
    ) -> list[dict[str, Any]]:
        rows = self.session.scalars(
            select(TelemetryRow)
            .where(
                TelemetryRow.device_id == device_id,
                TelemetryRow.kind == "inference",
                TelemetryRow.created >= since,
                TelemetryRow.created <= until,
            )
            .order_by(TelemetryRow.seq.desc())
            .limit(1000)
        )
        return [r.payload for r in rows if (r.payload.get("bundle"), r.payload.get("version")) == (bundle, version)]

    def _class_figures(self) -> dict[str, dict[str, float]]:
        """Per hardware class, the median of what its first-wave devices measured during their soak."""
        if self._by_class is None:
            samples: dict[str, dict[str, list[float]]] = {}
            for m in self.members:
                if m.wave == 1 and m.state == "passed" and m.figures:
                    for metric, value in m.figures["during"].items():
                        samples.setdefault(m.hardware_class, {}).setdefault(metric, []).append(value)
            self._by_class = {
                hw: {metric: statistics.median(values) for metric, values in metrics.items()}
                for hw, metrics in samples.items()
            }
        return self._by_class


def _figures(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """A device's figures from its inference telemetry: medians of the windows that served requests, and
    errors over requests."""
    served = [r for r in records if r.get("requests")]
    figures: dict[str, float] = {}
    for metric, field_name in (("tokens_per_s", "tokens_per_s_p50"), ("ttft_ms_p50", "ttft_ms_p50"),
                               ("ttft_ms_p95", "ttft_ms_p95")):  # fmt: skip
        values = [r[field_name] for r in served if isinstance(r.get(field_name), int | float)]
        if values:
            figures[metric] = statistics.median(values)
    if served:
        figures["error_rate"] = sum(r.get("errors") or 0 for r in served) / sum(r["requests"] for r in served)
    return figures


def _follow(
    member: RolloutDeviceRow,
    device: _DeviceNow | None,
    bundle: BundleRow,
    rollout: RolloutRow,
    now: datetime,
    judge: Callable[[RolloutDeviceRow, datetime], None],
) -> None:
    """A started device's state from its last report, its presence and the clock; `judge` decides it
    once its soak is over."""
    if member.state in FINISHED:
        return
    reported = (device.reported if device is not None else None) or {}
    status = reported.get("status") if reported.get("digest") == bundle.digest else None
    if status == "healthy":
        if member.soak_started_at is None:
            member.soak_started_at = now
        if now - _aware(member.soak_started_at) >= timedelta(seconds=rollout.soak_s):
            judge(member, now)
        else:
            _set(member, "soaking", now)
        return
    if status in ("failed", "rolled_back"):
        _set(member, "failed", now)
        member.detail = str(reported.get("reason") or status)[:1024]
        return
    if status in REPORTED_STATE:
        _set(member, REPORTED_STATE[status], now)
    elif member.state in ("notified", "unreached"):
        _set(member, "notified" if device is not None and device.online else "unreached", now)
    if member.notified_at and now - _aware(member.notified_at) > timedelta(seconds=rollout.device_timeout_s):
        _set(member, "timed_out", now)
        member.detail = f"no result within {rollout.device_timeout_s:g} s (last: {status or member.state})"


def _set(member: RolloutDeviceRow, state: str, now: datetime) -> None:
    if member.state != state:
        member.state, member.state_at = state, now


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
