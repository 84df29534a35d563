"""Request and response models of the controller's REST API (slmops.client reads its answers into them)."""

from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from slmops.messages import CommandName, CommandReply, DesiredState

if TYPE_CHECKING:  # the models stand alone: slmops.client uses them without the database layer
    from .db import AuditRow, BuildJobRow, BundleRow, DeviceRow, RolloutDeviceRow, RolloutRow, TelemetryRow

TOTAL_HEADER = "X-Total-Count"
"""How many items a paged list route (`?limit=&offset=`: devices, rollouts, builds) holds in all."""


class BundleSummary(BaseModel):
    name: str
    version: str
    digest: str
    size_bytes: int
    variants: list[str]
    pushed_at: datetime
    pushed_by: str

    @classmethod
    def of(cls, row: "BundleRow") -> "BundleSummary":
        return cls(
            name=row.name,
            version=row.version,
            digest=row.digest,
            size_bytes=row.size_bytes,
            variants=[v["id"] for v in row.manifest["variants"]],
            pushed_at=row.pushed_at,
            pushed_by=row.pushed_by,
        )


class BundleDetail(BundleSummary):
    manifest: dict[str, Any]

    @classmethod
    def of(cls, row: "BundleRow") -> "BundleDetail":
        return cls(**BundleSummary.of(row).model_dump(), manifest=row.manifest)


class AuditEntry(BaseModel):
    at: datetime
    actor: str
    action: str
    target: str
    detail: dict[str, Any]

    @classmethod
    def of(cls, row: "AuditRow") -> "AuditEntry":
        return cls(at=row.at, actor=row.actor, action=row.action, target=row.target, detail=row.detail)


class DeviceSummary(BaseModel):
    id: str
    online: bool
    last_seen: datetime
    first_seen: datetime
    agent_version: str
    serving: dict[str, Any] | None
    previous: dict[str, Any] | None = None
    """Its other A/B slot (bundle, version, variant): what a rollback returns it to."""
    tags: dict[str, Any]
    groups: list[str]
    profile: dict[str, Any]
    desired: dict[str, Any] | None
    reported: dict[str, Any] | None
    drift: dict[str, Any] | None = None
    """Set when the device reached its desired state and serves something else now (it is told again)."""

    @classmethod
    def of(cls, row: "DeviceRow") -> "DeviceSummary":
        from .fleet import drift_detail

        return cls(
            id=row.id,
            online=row.online,
            last_seen=row.last_seen,
            first_seen=row.first_seen,
            agent_version=row.agent_version,
            serving=row.serving,
            previous=row.previous,
            tags=row.tags,
            groups=row.groups,
            profile=row.profile,
            desired=row.desired,
            reported=row.reported,
            drift=drift_detail(row),
        )


class TelemetryEntry(BaseModel):
    seq: int
    created: datetime
    kind: str
    payload: dict[str, Any]

    @classmethod
    def of(cls, row: "TelemetryRow") -> "TelemetryEntry":
        return cls(seq=row.seq, created=row.created, kind=row.kind, payload=row.payload)


class DesiredRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bundle: str
    version: str


class FleetDesiredRequest(DesiredRequest):
    """One bundle for many devices at once: listed by id, or a group (exactly one of the two)."""

    devices: list[str] | None = Field(default=None, min_length=1, max_length=100_000)
    group: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one_selector(self) -> "FleetDesiredRequest":
        if (self.devices is None) == (self.group is None):
            raise ValueError("give either devices or group")
        return self


class FleetDesired(BaseModel):
    bundle: str
    version: str
    digest: str
    devices: list[str]


class CommandRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    command: CommandName
    timeout_s: float = Field(default=30, gt=0, le=600)


class DeviceLabels(BaseModel):
    """An operator's change to a device's labels; a field left out stays as it is."""

    model_config = ConfigDict(extra="forbid")

    tags: dict[str, str] | None = None
    groups: list[str] | None = None


class DeviceEnrolment(BaseModel):
    """A device's broker credentials, shown once: the controller keeps only their hash."""

    device_id: str
    broker_url: str
    """mqtt://<device id>:<password>@host:port: the agent's `broker_url`."""
    username: str
    password: str


class DesiredView(BaseModel):
    """A device's desired state, as it was stored and published."""

    bundle: str
    version: str
    digest: str

    @classmethod
    def of(cls, desired: DesiredState) -> "DesiredView":
        return cls(bundle=desired.bundle, version=desired.version, digest=desired.digest)


class CommandAnswer(BaseModel):
    """The device's reply to a command."""

    correlation_id: str
    ok: bool
    result: dict[str, Any]
    error: str

    @classmethod
    def of(cls, reply: CommandReply) -> "CommandAnswer":
        return cls(correlation_id=reply.correlation_id, ok=reply.ok, result=reply.result, error=reply.error)


class BrokerHealth(BaseModel):
    running: bool
    restarts: int


class LeaseHealth(BaseModel):
    """This replica and the rollout lease (controller/lease.py)."""

    replica: str
    held: bool
    """Whether this replica decides rollouts now."""
    epoch: int | None


class ControllerHealth(BaseModel):
    status: str = "ok"
    mqtt: str
    """off (no broker configured), connected or disconnected."""
    mqtt_broker: str | None = None
    """host:port of the broker (of a cluster's nodes, the one) the controller is connected to or tries next."""
    mqtt_refused: str | None
    """Why the broker refused the controller's credentials, when it did."""
    dropped_messages: int
    chunks_sent: int
    embedded_broker: BrokerHealth | None
    rollout_lease: LeaseHealth | None = None
    """None before the controller's rollout timer started."""
    threads: dict[str, dict[str, Any]]


class RolloutRequest(BaseModel):
    """A rollout to create: which bundle, to which devices, in which waves, and what failure halts it."""

    model_config = ConfigDict(extra="forbid")

    bundle: str = Field(min_length=1, max_length=128)
    version: str = Field(min_length=1, max_length=64)
    target: str = Field(
        min_length=1,
        max_length=1024,
        description="Every term must hold: group=NAME, provider=NAME, tag:KEY=VALUE, min_memory=SIZE (e.g. 2GiB)",
    )
    waves: str = Field(
        default="5,10%,50%,100%",
        max_length=256,
        description="A canary count, then cumulative shares of the target, ending with 100%",
    )
    max_failure: str = Field(
        default="5%", max_length=16, description="Failed + timed out devices, as a share of those that answered"
    )
    min_reported: int = Field(default=5, ge=1, le=1_000_000, description="Healthy devices a wave needs to pass")
    soak_s: float = Field(default=120, ge=0, le=7 * 86400, description="How long a device stays healthy to pass")
    device_timeout_s: float = Field(default=1200, gt=0, le=30 * 86400, description="A device's time to a result")
    gates: list[str] = Field(
        default=[],
        max_length=8,
        description="Bounds on what each device measures while it soaks: tokens_per_s>=0.8x (of its own figure "
        "before the switch), ttft_ms_p95<=800, error_rate<=1%",
    )
    supersede: bool = Field(
        default=False, description="Take devices another rollout under way owns; that rollout is marked superseded"
    )


RolloutDeviceState = Literal[
    "pending", "notified", "unreached", "downloading", "activating", "soaking", "passed", "failed", "timed_out",
    "rolled_back",
]  # fmt: skip


class RolloutDeviceView(BaseModel):
    device_id: str
    wave: int
    hardware_class: str
    state: str
    """One of RolloutDeviceState."""
    state_at: datetime
    detail: str
    figures: dict[str, Any] | None = None
    """What its gates were judged on: figures during the soak and before the switch, each gate's verdict."""

    @classmethod
    def of(cls, row: "RolloutDeviceRow") -> "RolloutDeviceView":
        return cls(
            device_id=row.device_id,
            wave=row.wave,
            hardware_class=row.hardware_class,
            state=row.state,
            state_at=row.state_at,
            detail=row.detail,
            figures=row.figures,
        )


class RolloutView(BaseModel):
    id: int
    bundle: str
    version: str
    target: str
    waves: str
    max_failure: float
    min_reported: int
    soak_s: float
    device_timeout_s: float
    gates: list[str]
    status: str
    """active, paused, halted, completed, aborted, superseded"""
    reason: str
    """Why it is paused or halted."""
    wave: int
    wave_count: int
    created_at: datetime
    created_by: str
    updated_at: datetime
    states: dict[str, int]
    """How many devices are in each state (all of them, whatever page `devices` is)."""
    actions: list[str] = []
    """What an admin may do to it now: pause, resume, promote, abort, rollback (POST …/{action})."""
    devices: list[RolloutDeviceView] = []
    """One page of its devices, by wave and id (GET /v1/rollouts/{id}?state=&wave=&limit=&offset=)."""
    devices_total: int = 0
    """How many devices match the page's filters (state, wave); more pages while offset + limit is below it."""

    @classmethod
    def of(
        cls,
        row: "RolloutRow",
        bundle: "BundleRow",
        states: dict[str, int],
        page: list["RolloutDeviceRow"],
        total: int,
        actions: list[str],
    ) -> "RolloutView":
        return cls(
            id=row.id,
            bundle=bundle.name,
            version=bundle.version,
            target=row.target,
            waves=row.waves,
            max_failure=row.max_failure,
            min_reported=row.min_reported,
            soak_s=row.soak_s,
            device_timeout_s=row.device_timeout_s,
            gates=row.gates,
            status=row.status,
            reason=row.reason,
            wave=row.wave,
            wave_count=row.wave_count,
            created_at=row.created_at,
            created_by=row.created_by,
            updated_at=row.updated_at,
            states=states,
            devices=[RolloutDeviceView.of(m) for m in page],
            devices_total=total,
            actions=actions,
        )


class BuildJobView(BaseModel):
    """A build job: a recipe the controller runs (POST /v1/builds)."""

    id: int
    recipe: str
    status: str
    """queued, running, succeeded, failed, cancelled"""
    stage: str
    """The stage under way, or the last one that ran."""
    stages: dict[str, Any]
    """Each stage done so far: cached or run, its seconds."""
    detail: str
    """Why it failed, or what it made."""
    runner: str | None
    bundle_name: str | None
    bundle_version: str | None
    created_by: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def of(cls, row: "BuildJobRow") -> "BuildJobView":
        return cls(
            id=row.id, recipe=row.recipe, status=row.status, stage=row.stage, stages=row.stages or {},
            detail=row.detail, runner=row.runner, bundle_name=row.bundle_name, bundle_version=row.bundle_version,
            created_by=row.created_by, created_at=row.created_at, started_at=row.started_at,
            finished_at=row.finished_at,
        )  # fmt: skip


class BuildLog(BaseModel):
    text: str
    """The log from `offset`."""
    offset: int
    """Where the next read starts (`?offset=` it to follow the log)."""
    finished: bool
    """The job is over: nothing more will be written."""
