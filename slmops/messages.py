"""The MQTT protocol (v1): topic names and message models, shared by agent and controller.

    slmops/v1/devices/{id}/state      agent → all, retained; the will sets it offline
    slmops/v1/devices/{id}/birth      agent → controller, on every connect: the hardware profile
    slmops/v1/devices/{id}/telemetry      agent → controller: a batch from the disk queue (seq numbers)
    slmops/v1/devices/{id}/telemetry_ack  controller → agent: stored up to seq N, delete them
    slmops/v1/devices/{id}/desired        controller → agent, retained: bundle, version, digest
    slmops/v1/devices/{id}/reported       agent → controller: downloading %, verifying, activating,
                                          healthy, failed (reason), rolled_back
    slmops/v1/devices/{id}/cmd            controller → agent: probe | reload | rollback, a correlation id
    slmops/v1/devices/{id}/cmd_reply      agent → controller: ok, result or error, the same id
    slmops/v1/devices/{id}/fetch_refused  controller → agent: a chunk request it will not serve, why
    slmops/v1/bundles/{digest}/request/{id}  agent → controller: chunks of one file of a stored bundle
    slmops/v1/bundles/{digest}/chunk         controller → agents: one chunk, its header, its bytes

Every payload is JSON with `schema` = 1 and is validated on receipt: `parse` raises
`MessageInvalid` naming the topic and every bad field, and the receiver logs and drops it.
Nothing a sender controls can make parsing raise anything else: a payload past its kind's
size bound is refused unread, JSON nested deeper than `MAX_JSON_DEPTH` or holding an integer
of more than `MAX_INT_DIGITS` digits is refused (json's own limits would raise RecursionError
or ValueError), and a device id comes from the topic, never from a payload.
"""

import json
import re
from datetime import UTC, datetime
from typing import Annotated, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from slmops.errors import MessageInvalid, describe_validation

PREFIX = "slmops/v1"
DEVICE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"

MAX_MESSAGE_BYTES = 64 << 10
"""Control messages (state, birth, desired, reported, cmd, cmd_reply, acks, chunk requests)."""
MAX_TELEMETRY_BYTES = 8 << 20
"""A telemetry batch: up to 10,000 records."""
MAX_CHUNK_HEADER_BYTES = 4 << 10
MAX_JSON_DEPTH = 32
"""Objects and arrays inside each other; no message of the protocol needs more than a few."""
MAX_INT_DIGITS = 40
"""Digits of any integer in a payload (2**64 has 20)."""


class Accelerator(BaseModel):
    provider: str
    """Short provider name, e.g. cuda."""
    onnxruntime_name: str
    device: str = ""
    memory_bytes: int | None = None


class HardwareProfile(BaseModel):
    cpu_model: str
    cpu_cores_physical: int | None
    cpu_cores_logical: int
    isa: list[str]
    memory_total_bytes: int
    memory_available_bytes: int
    disk_free_bytes: int
    os: str
    arch: str
    accelerators: list[Accelerator]

    @property
    def providers(self) -> list[str]:
        return [a.provider for a in self.accelerators]


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = Field(default=1, alias="schema")
    sent_at: datetime = Field(default_factory=lambda: datetime.now(UTC))

    def payload(self) -> bytes:
        return self.model_dump_json(by_alias=True).encode()


class Serving(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bundle: str
    version: str
    variant: str
    provider: str


class SlotHeld(BaseModel):
    """A bundle a device keeps in one of its A/B slots, and the variant of it it runs."""

    model_config = ConfigDict(extra="forbid")

    bundle: str
    version: str
    variant: str


class DeviceState(Message):
    """Presence (retained). The agent's will publishes it with online = false."""

    online: bool
    agent_version: str = ""
    serving: Serving | None = None
    previous: SlotHeld | None = None
    """Its other A/B slot: what a rollback returns it to (none before its second bundle)."""


class Birth(Message):
    agent_version: str
    profile: HardwareProfile


class TelemetryRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seq: int = Field(ge=1)
    created: float
    kind: str = Field(max_length=32)
    payload: dict[str, object]


class TelemetryBatch(Message):
    """Records from the agent's disk queue, oldest first; sent again until acknowledged."""

    records: list[TelemetryRecord] = Field(min_length=1, max_length=10_000)


RESEND_BACKOFF_MAX = 8
"""A batch's ack wait grows to at most this many times the configured one."""


def resend_wait_s(current_s: float, base_s: float) -> float:
    """The ack wait after a batch went unacknowledged: doubled, up to RESEND_BACKOFF_MAX × `base_s`. A
    controller that fell behind gets fewer copies of what it has not stored yet, not more."""
    return min(current_s * 2, base_s * RESEND_BACKOFF_MAX)


class TelemetryAck(Message):
    """The controller stored every record up to this sequence number: the agent may delete them."""

    up_to_seq: int = Field(ge=0)


class DesiredState(Message):
    """What a device should run (retained): a bundle from the controller's store, by digest."""

    bundle: str
    version: str
    digest: str = Field(pattern=r"^[0-9a-f]{64}$")
    """sha256 of the manifest's canonical JSON: the bundle's content address in the store."""


ActivationStatus = Literal["downloading", "verifying", "activating", "healthy", "failed", "rolled_back"]


class Reported(Message):
    """Progress of the desired state on the device."""

    bundle: str
    version: str
    digest: str
    status: ActivationStatus
    variant: str | None = None
    percent: float | None = Field(default=None, ge=0, le=100)
    reason: str = ""


CommandName = Literal["probe", "reload", "rollback"]


class Command(Message):
    """An operator's command to one device; the reply carries the same correlation id."""

    correlation_id: str = Field(min_length=8, max_length=64)
    command: CommandName


class CommandReply(Message):
    correlation_id: str = Field(min_length=8, max_length=64)
    ok: bool
    result: dict[str, object] = {}
    error: str = ""


MIN_CHUNK_BYTES, MAX_CHUNK_BYTES = 16 << 10, 4 << 20
DEFAULT_CHUNK_BYTES = 256 << 10
"""The agents' chunk size unless configured; the controller hashes bundles in it when they are pushed."""


def check_chunk_size(size: int) -> int:
    """A power of two from 16 KiB to 4 MiB: nine sizes in all, so requests in ever new chunk sizes
    cannot make the controller open, hash and send a bundle over and over."""
    if not (MIN_CHUNK_BYTES <= size <= MAX_CHUNK_BYTES and size & (size - 1) == 0):
        raise ValueError(f"a chunk size is a power of two from {MIN_CHUNK_BYTES} to {MAX_CHUNK_BYTES} bytes")
    return size


ChunkSize = Annotated[int, AfterValidator(check_chunk_size)]


class ChunkRequest(Message):
    """A device asks for chunks of one file of a stored bundle (all of them when `chunks` is None).
    The device is the one the topic names (bundles/{digest}/request/{id}), which the broker's ACL
    ties to its credentials."""

    path: str = Field(min_length=1, max_length=512)
    """Bundle-relative: manifest.json, signature.json or variants/<id>/<file>."""
    chunk_size: ChunkSize
    chunks: list[int] | None = Field(default=None, max_length=100_000)
    """Chunk indices (at most 100,000: 25 GB in 256 KiB chunks); None: the whole file."""


class ChunkHeader(BaseModel):
    """Leads every chunk message; the chunk's bytes follow it."""

    model_config = ConfigDict(extra="forbid")

    path: str
    index: int = Field(ge=0)
    count: int = Field(ge=1)
    chunk_size: ChunkSize
    file_size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class FetchRefused(Message):
    """The controller will not serve what a device asked for (devices/{id}/fetch_refused): no such
    stored bundle or file. The device's fetch fails at once with the reason, instead of asking
    again and again."""

    digest: str = Field(pattern=r"^[0-9a-f]{64}$")
    path: str = Field(max_length=512)
    reason: str = Field(max_length=1024)


def chunk_count(size: int, chunk_size: int) -> int:
    """Chunks of a `size`-byte file, as both sides count them; an empty file is one empty chunk."""
    return max(1, -(-size // chunk_size))


def chunk_payload(header: ChunkHeader, data: bytes) -> bytes:
    """4-byte big-endian header length, the header's JSON, the raw bytes (no base64)."""
    head = header.model_dump_json().encode()
    return len(head).to_bytes(4, "big") + head + data


def parse_chunk(payload: bytes | bytearray, topic: str) -> tuple[ChunkHeader, memoryview]:
    """Header and bytes of a chunk message. The bytes are a view into `payload`, not a copy (a copy
    of each 256 KiB chunk cost as much as its sha256), and not checked here: a receiver checks only
    the chunks it keeps, not every one on the shared topic (agent/fleet/transfer.py)."""
    if len(payload) < 4 or (size := int.from_bytes(payload[:4], "big")) > len(payload) - 4:
        raise MessageInvalid(f"{topic}: not a chunk message")
    if size > MAX_CHUNK_HEADER_BYTES or len(payload) - 4 - size > MAX_CHUNK_BYTES:
        raise MessageInvalid(f"{topic}: a chunk message larger than the protocol allows")
    header = parse_model(ChunkHeader, payload[4 : 4 + size], topic)
    return header, memoryview(payload)[4 + size :]


def chunk_topic(digest: str) -> str:
    """slmops/v1/bundles/{digest}/chunk: the controller's chunks of a bundle, for every device fetching it."""
    return f"{PREFIX}/bundles/{digest}/chunk"


def request_topic(digest: str, device_id: str) -> str:
    """slmops/v1/bundles/{digest}/request/{id}: a device's chunk requests."""
    return f"{PREFIX}/bundles/{digest}/request/{device_id}"


def parse_request_topic(topic: str) -> tuple[str, str]:
    """(digest, device id) of a chunk request's topic; MessageInvalid for anything else."""
    parts = topic.split("/")
    if len(parts) != 6 or "/".join(parts[:3]) != f"{PREFIX}/bundles" or parts[4] != "request":
        raise MessageInvalid(f"{topic!r} is not a chunk request topic of protocol v1")
    if not re.fullmatch(r"[0-9a-f]{64}", parts[3]):
        raise MessageInvalid(f"{topic!r}: {parts[3]!r} is not a bundle digest")
    if not re.fullmatch(DEVICE_ID_PATTERN, parts[5]):
        raise MessageInvalid(f"{topic!r}: {parts[5]!r} is not a valid device id")
    return parts[3], parts[5]


M = TypeVar("M", bound=Message)
KINDS: dict[str, type[Message]] = {
    "state": DeviceState,
    "birth": Birth,
    "telemetry": TelemetryBatch,
    "telemetry_ack": TelemetryAck,
    "desired": DesiredState,
    "reported": Reported,
    "cmd": Command,
    "cmd_reply": CommandReply,
    "fetch_refused": FetchRefused,
}


def device_topic(device_id: str, kind: str) -> str:
    return f"{PREFIX}/devices/{device_id}/{kind}"


def parse_topic(topic: str) -> tuple[str, str]:
    """(device id, kind) of a device topic; MessageInvalid for anything else."""
    parts = topic.split("/")
    if len(parts) != 5 or "/".join(parts[:3]) != f"{PREFIX}/devices" or parts[4] not in KINDS:
        raise MessageInvalid(f"{topic!r} is not a device topic of protocol v1")
    if not re.fullmatch(DEVICE_ID_PATTERN, parts[3]):
        raise MessageInvalid(f"{topic!r}: {parts[3]!r} is not a valid device id")
    return parts[3], parts[4]


def parse(model: type[M], payload: bytes | bytearray, topic: str) -> M:
    limit = MAX_TELEMETRY_BYTES if model is TelemetryBatch else MAX_MESSAGE_BYTES
    return parse_model(model, payload, topic, limit)


B = TypeVar("B", bound=BaseModel)


def parse_model(model: type[B], payload: bytes | bytearray, topic: str, max_bytes: int = MAX_MESSAGE_BYTES) -> B:
    """`payload` as `model`; MessageInvalid, and nothing else, for anything that is not one."""
    if len(payload) > max_bytes:
        raise MessageInvalid(f"{topic}: {len(payload)} bytes, more than the {max_bytes} this kind of message may have")
    if _nesting(payload) > MAX_JSON_DEPTH:
        raise MessageInvalid(f"{topic}: JSON nested more than {MAX_JSON_DEPTH} deep")
    try:
        data = json.loads(payload, parse_int=_bounded_int, parse_constant=_not_json)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise MessageInvalid(f"{topic}: payload is not JSON this protocol accepts ({e})") from None
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise MessageInvalid(f"{topic}: {describe_validation(e.errors())}") from None


_STRUCTURE = re.compile(rb'"(?:[^"\\]++|\\.)*+"|[\[\]{}]', re.DOTALL)
"""A JSON string (skipped whole, brackets inside it included) or a bracket."""


def _nesting(payload: bytes | bytearray) -> int:
    """How deep objects and arrays nest in `payload` (up to one past MAX_JSON_DEPTH), read off its
    brackets outside strings before json.loads, whose C scanner recurses once per level. Payloads
    with few brackets skip the scan."""
    if payload.count(b"[") + payload.count(b"{") <= MAX_JSON_DEPTH:
        return 0
    depth = deepest = 0
    for match in _STRUCTURE.finditer(payload):
        char = match.group()
        if char in (b"[", b"{"):
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > MAX_JSON_DEPTH:
                    break
        elif char in (b"]", b"}"):
            depth -= 1
    return deepest


def _not_json(text: str) -> None:
    raise ValueError(f"{text} is not JSON")


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text)} digits")
    return int(text)
