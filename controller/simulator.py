"""A fleet of simulated agents in one process, for rollouts and load at fleet scale without the hardware.

    FleetSimulator(broker_url, count, profile) ─► one asyncio event loop; each device is a paho client
    on that loop (paho's external-loop interface: the loop watches every socket, paho reads and
    writes when it says so; no thread per client), speaking protocol v1 as an agent does:

    connect (will: state offline, retained) ─► birth (a profile of its hardware class) ─► state online
    every telemetry_interval_s: a system and an inference record (the class's tokens/s and TTFT,
        scaled by what the profile says of the bundle served) queued with sequence numbers
        ─► one batch in flight at a time, deleted when telemetry_ack covers it, sent again when not
        acknowledged within ack_timeout_s (doubled at each resend, up to 8×, as the agent)
    desired ─► already served: healthy · its previous slot: back to it · otherwise downloading %
        (or, with --fetch, the bundle's chunks for real over MQTT) ─► verifying ─► activating
        ─► healthy, or failed with the smoke test's reason (the profile's fail_activation share of
        devices, chosen by a hash of device and bundle, so the same devices fail every time)
    cmd probe | reload | rollback ─► cmd_reply (rollback: back to the previous slot, reported rolled_back)
    churn: devices drop out (a goodbye, or a crash that leaves the will to the broker) and return

What a device does is a pure function of the profile, its id and a seed: two runs of one
profile give the same fleet. Everything runs on the loop's thread; the test helpers
(`start`, `set_online`, `stats`, `stop`) hand work to it.
"""

import asyncio
import concurrent.futures
import contextlib
import hashlib
import json
import logging
import random
import socket
import threading
import time
import tomllib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from slmops import __version__
from slmops.broker import backoff_s, fresh_client_id, parse_brokers
from slmops.errors import ConfigError, MessageInvalid, describe_validation
from slmops.manifest import Manifest
from slmops.messages import (
    DEFAULT_CHUNK_BYTES,
    Accelerator,
    Birth,
    ChunkHeader,
    ChunkRequest,
    Command,
    CommandReply,
    DesiredState,
    DeviceState,
    FetchRefused,
    HardwareProfile,
    Reported,
    Serving,
    SlotHeld,
    TelemetryAck,
    TelemetryBatch,
    TelemetryRecord,
    chunk_topic,
    device_topic,
    parse,
    parse_chunk,
    request_topic,
    resend_wait_s,
)

from ..agent.hardware import PROVIDERS
from .rollout_plan import parse_size

log = logging.getLogger(__name__)

KEEPALIVE_S = 30
ONNXRUNTIME_NAMES = {short: name for name, short in PROVIDERS.items()}
FETCH_STALL_S = 5.0
BATCH_RECORDS = 100
"""Records per telemetry batch, as the agent's telemetry_batch_records default."""


class DeviceClass(BaseModel):
    """One kind of hardware in the simulated fleet, and how fast a model runs on it."""

    model_config = ConfigDict(extra="forbid")

    name: str
    share: float = Field(default=1.0, gt=0)
    """Weight among the classes: devices are dealt to classes in these proportions."""
    cpu_model: str = "Simulated Cortex-A76"
    cores: int = Field(default=4, ge=1)
    memory: str = "8GiB"
    providers: list[str] = ["cpu"]
    tokens_per_s: float = Field(default=40.0, gt=0)
    tokens_per_s_sd: float = Field(default=1.0, ge=0)
    ttft_ms: float = Field(default=150.0, gt=0)
    ttft_ms_sd: float = Field(default=10.0, ge=0)


class BundleBehaviour(BaseModel):
    """How one bundle (NAME:VERSION in the profile) behaves on the simulated devices."""

    model_config = ConfigDict(extra="forbid")

    fail_activation: float = Field(default=0.0, ge=0, le=1)
    """Share of devices whose smoke test refuses it."""
    speed: float = Field(default=1.0, gt=0)
    """Its tokens/s against the class's usual figure."""
    ttft: float = Field(default=1.0, gt=0)
    """Its time to first token against the class's usual figure."""
    error_rate: float = Field(default=0.0, ge=0, le=1)


class Churn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    offline_per_hour: float = Field(default=0.0, ge=0)
    """How often a device drops out, on average."""
    offline_s: float = Field(default=30.0, gt=0)
    crash_share: float = Field(default=0.5, ge=0, le=1)
    """Of the drop-outs, the share without a goodbye (the broker publishes the will)."""


class Profile(BaseModel):
    """What the simulated fleet is made of: a TOML file (`--profile`), every key optional."""

    model_config = ConfigDict(extra="forbid")

    classes: list[DeviceClass] = [DeviceClass(name="cpu")]
    bundles: dict[str, BundleBehaviour] = {}
    telemetry_interval_s: float = Field(default=1.0, gt=0)
    ack_timeout_s: float = Field(default=10.0, gt=0)
    download_s: float = Field(default=2.0, ge=0)
    activate_s: float = Field(default=0.5, ge=0)
    requests_per_window: int = Field(default=3, ge=0)
    churn: Churn = Churn()

    @classmethod
    def load(cls, path: Path) -> "Profile":
        try:
            return cls.model_validate(tomllib.loads(path.read_text()))
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"{path}: {e}") from None
        except ValidationError as e:
            raise ConfigError(f"{path}: {describe_validation(e.errors())}") from None

    def behaviour(self, bundle: str | None, version: str | None) -> BundleBehaviour:
        return self.bundles.get(f"{bundle}:{version}", _USUAL)


_USUAL = BundleBehaviour()


def _unit(*parts: object) -> float:
    """A number in [0, 1) that depends only on `parts`: which devices fail, which class a device is."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


@dataclass
class _Fetch:
    """A bundle being fetched for real: its chunks as they come, checked against their headers."""

    desired: DesiredState
    wanted: dict[str, int] = field(default_factory=dict)
    """path → chunks still missing."""
    received: dict[str, set[int]] = field(default_factory=dict)
    """path → the chunks checked so far (a simulated device keeps no files)."""
    manifest: dict[int, bytes] = field(default_factory=dict)
    """The manifest's chunks, to read the variant's files from."""
    bytes: int = 0


@dataclass
class _Slot:
    bundle: str
    version: str
    digest: str | None


class SimulatedDevice:
    """One simulated agent: its paho client and what it runs; driven by its FleetSimulator's loop."""

    def __init__(self, sim: "FleetSimulator", device_id: str, hw: DeviceClass, fetches: bool, node: int) -> None:
        """`node`: the broker of the simulator's list this device tries first (devices are spread over a
        cluster's nodes); each failed or lost connection moves it to the next one."""
        self.sim, self.id, self.hw, self.fetches, self.node = sim, device_id, hw, fetches, node
        self.rng = random.Random(f"{sim.seed}/{device_id}")
        self.active: _Slot | None = sim.serving
        self.previous: _Slot | None = None
        self.online_wanted = True
        self.connected = False
        self.announced = False
        """Birth and state sent since the last connect."""
        self.failures = 0
        self.seq = 0
        self.queued: list[TelemetryRecord] = []
        self.in_flight: tuple[int, float] | None = None  # last seq sent, when
        self.ack_wait_s = sim.profile.ack_timeout_s
        """How long the batch in flight waits for its ack (doubled at each resend, as the agent's)."""
        self.working: DesiredState | None = None
        self.fetch: _Fetch | None = None
        self.client = self._client()

    def _client(self) -> mqtt.Client:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            protocol=mqtt.MQTTv311 if self.sim.protocol == "3.1.1" else mqtt.MQTTv5,
        )
        offline = DeviceState(online=False, agent_version=__version__).payload()
        client.will_set(device_topic(self.id, "state"), offline, qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_socket_open = self.sim.socket_opened
        client.on_socket_close = self.sim.socket_closed
        client.on_socket_register_write = self.sim.want_write
        client.on_socket_unregister_write = self.sim.wrote
        client.suppress_exceptions = True
        return client

    # --- the link ------------------------------------------------------------------------------

    def connect(self) -> None:
        if not self.online_wanted or self.connected:
            return
        address = self.sim.addresses[self.node]
        if address.username:
            self.client.username_pw_set(address.username, address.password)
        fresh_client_id(self.client, f"slmops-sim-{self.id}")
        try:
            self.client.connect(address.host, address.port, keepalive=KEEPALIVE_S)
        except (OSError, ValueError) as e:
            log.debug("%s could not connect to %s: %s", self.id, address, e)
            self._retry_connect()

    def _retry_connect(self) -> None:
        self.failures += 1
        self.node = (self.node + 1) % len(self.sim.addresses)
        self.later(backoff_s(self.failures - 1, self.rng), self.connect)

    def _on_connect(self, client: mqtt.Client, _u: object, _f: object, reason: Any, _p: object) -> None:
        if reason.is_failure:
            self.sim.counts["refused"] += 1
            return
        self.connected, self.failures, self.announced = True, 0, False
        self.sim.counts["connects"] += 1
        kinds = ("desired", "cmd", "telemetry_ack", "fetch_refused")
        client.subscribe([(device_topic(self.id, kind), 1) for kind in kinds])
        if self.fetch is not None:
            client.subscribe(chunk_topic(self.fetch.desired.digest), 1)

    def _on_subscribe(self, client: mqtt.Client, *_: object) -> None:
        """Its own topics confirmed (as the agent, which announces itself only then: a desired state the
        controller sends in answer to the birth must find the subscription in place)."""
        if self.announced:
            return
        self.announced = True
        birth = Birth(agent_version=__version__, profile=self.sim.hardware[self.hw.name])
        client.publish(device_topic(self.id, "birth"), birth.payload(), qos=1)
        self._publish_state()
        self.in_flight = None  # a batch unacknowledged before the drop goes again
        self._send_telemetry()

    def _on_disconnect(self, *_: object) -> None:
        was, self.connected = self.connected, False
        if was:
            self.sim.counts["disconnects"] += 1
        if self.online_wanted:
            self._retry_connect()

    def go_offline(self, crash: bool) -> None:
        """Leave: a goodbye (state offline) then a clean disconnect, or a crash (the socket just closes)."""
        self.online_wanted = False
        if not self.connected:
            return
        if crash:
            sock = self.client.socket()
            if isinstance(sock, socket.socket):
                sock.shutdown(socket.SHUT_RDWR)  # no DISCONNECT: the broker publishes the will
            self.sim.counts["crashes"] += 1
        else:
            offline = DeviceState(online=False, agent_version=__version__).payload()
            self.client.publish(device_topic(self.id, "state"), offline, qos=1, retain=True)
            self.client.disconnect()

    def come_back(self) -> None:
        if self.online_wanted:
            return
        self.online_wanted, self.failures = True, 0
        self.connect()

    def later(self, delay_s: float, call: Callable[[], None]) -> None:
        self.sim.loop.call_later(delay_s, call)

    def _publish(self, kind: str, message: Any, retain: bool = False) -> None:
        self.client.publish(device_topic(self.id, kind), message.payload(), qos=1, retain=retain)

    def _publish_state(self) -> None:
        provider = self.hw.providers[-1]
        variant = f"{provider}-int4"
        serving, previous = None, None
        if self.active is not None:
            serving = Serving(
                bundle=self.active.bundle, version=self.active.version, variant=variant, provider=provider
            )
        if self.previous is not None:
            previous = SlotHeld(bundle=self.previous.bundle, version=self.previous.version, variant=variant)
        state = DeviceState(online=True, agent_version=__version__, serving=serving, previous=previous)
        self._publish("state", state, retain=True)

    # --- telemetry -----------------------------------------------------------------------------

    def sample(self) -> None:
        """One telemetry interval: a system and an inference record, queued as the agent's disk queue does."""
        now = time.time()
        memory = self.sim.hardware[self.hw.name].memory_total_bytes
        self._queue(now, "system", {"cpu_percent": self.rng.uniform(5, 60), "memory_total_bytes": memory})
        self._queue(now, "inference", self._inference())
        if self.connected:
            self._send_telemetry()

    def _queue(self, now: float, kind: str, payload: dict[str, object]) -> None:
        self.seq += 1
        self.queued.append(TelemetryRecord(seq=self.seq, created=now, kind=kind, payload=payload))
        self.sim.counts["records"] += 1

    def _inference(self) -> dict[str, object]:
        active = self.active
        behaviour = self.sim.profile.behaviour(active.bundle if active else None, active.version if active else None)
        requests = self.sim.profile.requests_per_window if active else 0
        if not requests:
            return {"requests": 0, "errors": 0, "bundle": None, "version": None}
        tokens_per_s = max(0.1, self.rng.gauss(self.hw.tokens_per_s, self.hw.tokens_per_s_sd) * behaviour.speed)
        ttft = max(1.0, self.rng.gauss(self.hw.ttft_ms, self.hw.ttft_ms_sd) * behaviour.ttft)
        errors = sum(self.rng.random() < behaviour.error_rate for _ in range(requests))
        return {
            "requests": requests,
            "errors": errors,
            "generated_tokens": requests * 64,
            "ttft_ms_p50": ttft,
            "ttft_ms_p95": ttft * 1.3,
            "tokens_per_s_p50": tokens_per_s,
            "tokens_per_s_p95": tokens_per_s * 1.05,
            "bundle": active.bundle if active else None,
            "version": active.version if active else None,
            "provider": self.hw.providers[-1],
        }

    def _send_telemetry(self) -> None:
        if not self.queued:
            return
        if self.in_flight is not None and time.monotonic() - self.in_flight[1] < self.ack_wait_s:
            return  # one batch in flight at a time, as the agent
        if self.in_flight is not None:
            self.sim.counts["telemetry_resent"] += 1
            self.ack_wait_s = resend_wait_s(self.ack_wait_s, self.sim.profile.ack_timeout_s)
        records = self.queued[:BATCH_RECORDS]
        self._publish("telemetry", TelemetryBatch(records=records))
        self.in_flight = (records[-1].seq, time.monotonic())
        self.sim.counts["batches"] += 1

    def _acknowledged(self, ack: TelemetryAck) -> None:
        if self.in_flight is None:
            return
        up_to = min(ack.up_to_seq, self.in_flight[0])  # never past what was sent
        kept = [r for r in self.queued if r.seq > up_to]
        self.sim.counts["records_acked"] += len(self.queued) - len(kept)
        self.queued, self.in_flight = kept, None
        self.ack_wait_s = self.sim.profile.ack_timeout_s
        self._send_telemetry()

    # --- desired state and commands ------------------------------------------------------------

    def _on_message(self, _c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        topic = message.topic
        try:
            if topic.endswith("/chunk"):
                if self.fetch is not None and topic == chunk_topic(self.fetch.desired.digest):
                    self._chunk(*parse_chunk(message.payload, topic))
                return
            kind = topic.rsplit("/", 1)[-1]
            if topic != device_topic(self.id, kind) or not message.payload:
                return
            if kind == "telemetry_ack":
                self._acknowledged(parse(TelemetryAck, message.payload, topic))
            elif kind == "desired":
                self._desired(parse(DesiredState, message.payload, topic))
            elif kind == "cmd":
                self._command(parse(Command, message.payload, topic))
            elif kind == "fetch_refused":
                refused = parse(FetchRefused, message.payload, topic)
                if self.fetch is not None and refused.digest == self.fetch.desired.digest:
                    self._finish(self.fetch.desired, f"the controller refused {refused.path}: {refused.reason}")
        except MessageInvalid as e:
            self.sim.counts["dropped"] += 1
            log.warning("%s dropped a message: %s", self.id, e)

    def _desired(self, desired: DesiredState) -> None:
        self.sim.desired_at.setdefault(desired.digest, {}).setdefault(self.id, time.monotonic())
        self.sim.counts["desired"] += 1
        if self.working is not None and self.working.digest == desired.digest:
            return  # a retained copy of what is under way
        self.working = desired
        if self._is(self.active, desired):
            self._report(desired, "healthy")
            self.working = None
        elif self._is(self.previous, desired):  # its slot is still here: switch back
            self.later(self.sim.profile.activate_s, lambda: self._activate(desired))
        elif self.fetches:
            self._start_fetch(desired)
        else:
            self._download(desired, 0)

    @staticmethod
    def _is(slot: _Slot | None, desired: DesiredState) -> bool:
        return slot is not None and (slot.bundle, slot.version) == (desired.bundle, desired.version)

    def _download(self, desired: DesiredState, percent: int) -> None:
        if self.working is not desired:
            return  # superseded
        self._report(desired, "downloading", percent=percent)
        if percent < 100:
            step = self.sim.profile.download_s / 4
            self.later(step, lambda: self._download(desired, percent + 25))
        else:
            self._finish(desired)

    def _finish(self, desired: DesiredState, failure: str = "") -> None:
        """Downloaded (or failed to): verify, then activate after the profile's activation time."""
        self.fetch = None
        if failure:
            self._report(desired, "failed", reason=failure)
            self.working = None
            return
        self._report(desired, "verifying")
        self.later(self.sim.profile.activate_s, lambda: self._activate(desired))

    def _activate(self, desired: DesiredState) -> None:
        if self.working is not desired:
            return
        self._report(desired, "activating")
        if self._is(self.previous, desired):  # a slot that ran here before: no smoke test to fail
            self.active, self.previous = self.previous, self.active
        elif self.sim.fails(self.id, desired.bundle, desired.version):
            self._report(desired, "failed", reason="smoke test: the variant answered wrongly (simulated)")
            self.working = None
            return
        else:
            self.active, self.previous = _Slot(desired.bundle, desired.version, desired.digest), self.active
        self._publish_state()
        self._report(desired, "healthy")
        self.working = None

    def _report(self, desired: DesiredState, status: str, percent: float | None = None, reason: str = "") -> None:
        variant = f"{self.hw.providers[-1]}-int4"
        report = Reported(bundle=desired.bundle, version=desired.version, digest=desired.digest, status=status,  # type: ignore[arg-type]
                          variant=variant, percent=percent, reason=reason)  # fmt: skip
        self._publish("reported", report)  # paho keeps it (QoS 1) until the link is back
        self.sim.counts[f"reported_{status}"] += 1

    def _command(self, command: Command) -> None:
        if command.command == "rollback":
            if self.previous is None:
                reply = CommandReply(correlation_id=command.correlation_id, ok=False, error="no previous slot")
            else:
                self.active, self.previous = self.previous, self.active
                assert self.active is not None
                self._publish_state()
                rolled = DesiredState(bundle=self.active.bundle, version=self.active.version,
                                      digest=self.active.digest or "0" * 64)  # fmt: skip
                self._report(rolled, "rolled_back")
                reply = CommandReply(correlation_id=command.correlation_id, ok=True, result={"serving": rolled.bundle})
        else:
            profile = self.sim.hardware[self.hw.name].model_dump(mode="json")
            result: dict[str, object] = {"profile": profile} if command.command == "probe" else {}
            reply = CommandReply(correlation_id=command.correlation_id, ok=True, result=result)
        self._publish("cmd_reply", reply)

    # --- a real fetch (--fetch) ----------------------------------------------------------------

    def _start_fetch(self, desired: DesiredState) -> None:
        self.fetch = _Fetch(desired, wanted={"manifest.json": -1})
        self.client.subscribe(chunk_topic(desired.digest), 1)
        self._request(desired.digest, "manifest.json", None)
        self._report(desired, "downloading", percent=0)
        self.later(FETCH_STALL_S, lambda: self._watch_fetch(self.fetch, 0, 0))

    def _watch_fetch(self, fetch: "_Fetch | None", seen: int, stalls: int) -> None:
        """A fetch that got nothing for FETCH_STALL_S asks again for what it misses; after a few, it fails."""
        if fetch is None or fetch is not self.fetch:
            return
        if fetch.bytes == seen:
            if stalls >= 5:
                self._finish(fetch.desired, f"no chunks for {FETCH_STALL_S * 5:g} s")
                return
            for path, missing in fetch.wanted.items():
                if missing != 0:
                    self._request(fetch.desired.digest, path, None)
            stalls += 1
        else:
            stalls = 0
        received = fetch.bytes
        self.later(FETCH_STALL_S, lambda: self._watch_fetch(fetch, received, stalls))

    def _request(self, digest: str, path: str, chunks: list[int] | None) -> None:
        request = ChunkRequest(path=path, chunk_size=DEFAULT_CHUNK_BYTES, chunks=chunks)
        self.client.publish(request_topic(digest, self.id), request.payload(), qos=1)

    def _chunk(self, header: ChunkHeader, data: memoryview) -> None:
        fetch = self.fetch
        assert fetch is not None
        if header.path not in fetch.wanted or header.index in fetch.received.get(header.path, set()):
            return  # another device's file, or a chunk already here
        if hashlib.sha256(data).hexdigest() != header.sha256:
            self._finish(fetch.desired, f"chunk {header.index} of {header.path} does not match its sha256")
            return
        fetch.received.setdefault(header.path, set()).add(header.index)
        if header.path == "manifest.json":
            fetch.manifest[header.index] = bytes(data)
        fetch.wanted[header.path] = header.count - len(fetch.received[header.path])
        fetch.bytes += len(data)
        self.sim.counts["chunk_bytes"] += len(data)
        if fetch.wanted[header.path] > 0:
            return
        if header.path == "manifest.json":
            body = b"".join(fetch.manifest[i] for i in range(header.count))
            del fetch.wanted["manifest.json"]
            try:
                manifest = Manifest.model_validate(json.loads(body))
            except (ValueError, ValidationError) as e:
                self._finish(fetch.desired, f"the manifest does not parse: {e}")
                return
            variant = manifest.variants[0]
            for entry in variant.files:
                path = f"variants/{variant.id}/{entry.path}"
                fetch.wanted[path] = -1
                self._request(fetch.desired.digest, path, None)
            return
        if all(missing == 0 for missing in fetch.wanted.values()):
            self.client.unsubscribe(chunk_topic(fetch.desired.digest))
            self._report(fetch.desired, "downloading", percent=100)
            self.sim.counts["fetched"] += 1
            self._finish(fetch.desired)


class FleetSimulator:
    """`count` simulated devices named `{prefix}-00000`... on one event loop, against `broker_url`."""

    def __init__(
        self,
        broker_url: str,
        count: int,
        profile: Profile | None = None,
        *,
        prefix: str = "sim",
        serving: str | None = None,
        fetch_share: float = 0.0,
        seed: int = 0,
        connect_per_s: float = 500.0,
        protocol: str = "3.1.1",
    ) -> None:
        """`serving`: NAME:VERSION every device runs at the start (none: they serve nothing)."""
        self.addresses = parse_brokers(broker_url)
        self.profile = profile or Profile()
        self.seed, self.connect_per_s, self.protocol = seed, connect_per_s, protocol
        self.serving = None
        if serving is not None:
            name, _, version = serving.partition(":")
            if not name or not version:
                raise ConfigError(f"--serving {serving!r}: expected NAME:VERSION")
            self.serving = _Slot(name, version, None)
        self.hardware = {hw.name: _hardware(hw) for hw in self.profile.classes}
        self.counts: Counter[str] = Counter()
        self.desired_at: dict[str, dict[str, float]] = {}
        """digest → device id → when (monotonic) it was first told that bundle."""
        weights = [hw.share for hw in self.profile.classes]
        total = sum(weights)
        self.devices: dict[str, SimulatedDevice] = {}
        for index in range(count):
            device_id = f"{prefix}-{index:05d}"
            point, hw = _unit(seed, device_id, "class") * total, self.profile.classes[-1]
            for candidate, weight in zip(self.profile.classes, weights, strict=True):
                if point < weight:
                    hw = candidate
                    break
                point -= weight
            fetches = _unit(seed, device_id, "fetch") < fetch_share
            self.devices[device_id] = SimulatedDevice(self, device_id, hw, fetches, index % len(self.addresses))
        self.sampling = True
        """Whether devices take telemetry samples (a benchmark stops them to drain what is queued)."""
        self.loop = asyncio.new_event_loop()
        self._unwritten: set[mqtt.Client] = set()
        self._writing: set[mqtt.Client] = set()
        """Clients with a writer registered: their socket's buffer was full."""
        self._flushing = False
        self._stopping: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    def fails(self, device_id: str, bundle: str, version: str) -> bool:
        """Whether this device's smoke test refuses that bundle (the profile's fail_activation share, the
        same devices on every run of a seed)."""
        share = self.profile.behaviour(bundle, version).fail_activation
        return _unit(self.seed, device_id, bundle, version) < share

    # --- paho's external loop ------------------------------------------------------------------

    def socket_opened(self, client: mqtt.Client, _u: object, sock: Any) -> None:
        if isinstance(sock, socket.socket):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.loop.add_reader(sock, client.loop_read, 16)

    def socket_closed(self, client: mqtt.Client, _u: object, sock: Any) -> None:
        self._writing.discard(client)
        try:
            self.loop.remove_reader(sock)
            self.loop.remove_writer(sock)
        except (ValueError, OSError):  # already closed by a simulated crash
            pass

    def want_write(self, client: mqtt.Client, _u: object, _sock: Any) -> None:
        """paho has packets to send: written together, once this turn of the loop is done. Only a socket
        whose buffer is full gets a writer registered (an epoll change for every packet cost more than
        the packet)."""
        self._unwritten.add(client)
        if not self._flushing:
            self._flushing = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flushing = False
        clients, self._unwritten = self._unwritten, set()
        for client in clients:
            client.loop_write()
            if client.want_write() and (sock := client.socket()) is not None:
                self.loop.add_writer(sock, client.loop_write)
                self._writing.add(client)

    def wrote(self, client: mqtt.Client, _u: object, sock: Any) -> None:
        if client in self._writing:
            self._writing.discard(client)
            with contextlib.suppress(ValueError, OSError):  # a closed socket
                self.loop.remove_writer(sock)

    # --- running -------------------------------------------------------------------------------

    async def run(self, duration_s: float | None = None) -> None:
        """Connect every device (at connect_per_s), then run until stopped or `duration_s` is over."""
        self._stopping = asyncio.Event()
        tasks = [
            asyncio.ensure_future(self._housekeeping()),
            asyncio.ensure_future(self._telemetry()),
            asyncio.ensure_future(self._churn()),
        ]
        for index, device in enumerate(self.devices.values()):
            device.connect()
            if index % 50 == 49:
                await asyncio.sleep(50 / self.connect_per_s)
            if self._stopping.is_set():
                break
        with contextlib.suppress(TimeoutError):  # the duration is over
            await asyncio.wait_for(self._stopping.wait(), duration_s)
        for task in tasks:
            task.cancel()
        for device in self.devices.values():
            device.go_offline(crash=False)  # a goodbye, as an agent that stops says it
        await asyncio.sleep(0.5)
        for device in self.devices.values():
            if (sock := device.client.socket()) is not None:
                self.socket_closed(device.client, None, sock)
                sock.close()

    async def _housekeeping(self) -> None:
        """paho's keepalive pings and timeouts, for every client, once a second."""
        while True:
            await asyncio.sleep(1.0)
            for device in self.devices.values():
                if device.connected:
                    device.client.loop_misc()

    async def _telemetry(self) -> None:
        """Every device samples once per interval, spread over it (not all in the same millisecond)."""
        interval = self.profile.telemetry_interval_s
        devices = list(self.devices.values())
        slices = max(1, min(len(devices), int(interval * 50)))
        while True:
            started = time.monotonic()
            for part in range(slices):
                for device in devices[part::slices]:
                    if device.online_wanted and self.sampling:
                        device.sample()
                await asyncio.sleep(max(0.0, started + interval * (part + 1) / slices - time.monotonic()))

    async def _churn(self) -> None:
        churn, rng = self.profile.churn, random.Random(self.seed)
        if churn.offline_per_hour <= 0:
            return
        while True:
            await asyncio.sleep(1.0)
            for device in self.devices.values():
                if device.online_wanted and rng.random() < churn.offline_per_hour / 3600:
                    device.go_offline(crash=rng.random() < churn.crash_share)
                    self.loop.call_later(rng.expovariate(1 / churn.offline_s), device.come_back)

    # --- from another thread (tests, the CLI's display) --------------------------------------------

    def start(self, duration_s: float | None = None) -> None:
        """Run on a thread of its own until stop(), or for `duration_s`."""
        self._thread = threading.Thread(
            target=self.loop.run_until_complete, args=(self.run(duration_s),), name="slmops-sim"
        )
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        if self._stopping is not None and self.running:
            self.loop.call_soon_threadsafe(self._stopping.set)
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.loop.close()

    def call(self, work: Callable[[], Any]) -> Any:
        """Run `work` on the loop's thread and return what it returns; once the simulation is over,
        here (nothing else touches the devices then)."""
        if self.running:
            future: concurrent.futures.Future[Any] = asyncio.run_coroutine_threadsafe(_call(work), self.loop)
            while self.running:
                with contextlib.suppress(concurrent.futures.TimeoutError):
                    return future.result(timeout=0.5)
            future.cancel()
        return work()

    def set_online(self, device_ids: list[str], online: bool, crash: bool = False) -> None:
        def change() -> None:
            for device_id in device_ids:
                device = self.devices[device_id]
                device.come_back() if online else device.go_offline(crash)

        self.call(change)

    def stats(self) -> dict[str, Any]:
        def read() -> dict[str, Any]:
            devices = self.devices.values()
            return {
                **self.counts,
                "devices": len(self.devices),
                "connected": sum(d.connected for d in devices),
                "queued_records": sum(len(d.queued) for d in devices),
                "serving": dict(Counter(f"{d.active.bundle}:{d.active.version}" if d.active else "-" for d in devices)),
            }

        return self.call(read)


async def _call(work: Callable[[], Any]) -> Any:
    return work()


def _hardware(hw: DeviceClass) -> HardwareProfile:
    memory = parse_size(hw.memory)
    return HardwareProfile(
        cpu_model=hw.cpu_model,
        cpu_cores_physical=hw.cores,
        cpu_cores_logical=hw.cores,
        isa=["neon"] if "cortex" in hw.cpu_model.lower() else ["avx2"],
        memory_total_bytes=memory,
        memory_available_bytes=memory // 2,
        disk_free_bytes=32 << 30,
        os="Linux (simulated)",
        arch="aarch64" if "cortex" in hw.cpu_model.lower() else "x86_64",
        accelerators=[Accelerator(provider=p, onnxruntime_name=ONNXRUNTIME_NAMES.get(p, "")) for p in hw.providers],
    )
