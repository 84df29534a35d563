"""The agent's configuration: one TOML file plus SLMOPS_AGENT_* environment variables.

Defaults work out of the box (localhost, port 8765, no API key, data under the slmops
home). A bad value stops start-up with an error naming the key.
"""

import re
import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from slmops import paths
from slmops.broker import BrokerUrls
from slmops.errors import ConfigError
from slmops.messages import DEFAULT_CHUNK_BYTES, DEVICE_ID_PATTERN, ChunkSize
from slmops.settings import load_settings

ProviderName = Literal["cpu", "cuda", "dml", "webgpu", "qnn", "openvino", "coreml", "tensorrt", "trt-rtx", "rocm"]


__all__ = ["AgentConfig", "ConfigError", "load"]


class AgentConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SLMOPS_AGENT_", extra="forbid", env_nested_delimiter="__")

    host: str = "127.0.0.1"
    """Listen address. Only loopback by default: the model is for this device's apps."""
    port: int = Field(default=8765, ge=0, le=65535)
    api_key: str | None = None
    """When set, every request needs `Authorization: Bearer <key>` (health excepted)."""
    data_dir: Path = Field(default_factory=lambda: paths.home() / "agent")
    trusted_keys: list[Path] = []
    """Public keys bundles must be signed with; empty: the trusted-keys folder of the slmops home."""

    prefer_providers: list[ProviderName] = []
    """Tried first, in this order, before the default NPU > GPU > CPU ranking."""
    forbid_providers: list[ProviderName] = []

    threads: int | None = Field(default=None, ge=1, le=1024)
    """onnxruntime intra-op threads; unset: the usable CPUs, at most the physical cores."""
    max_active_requests: int = Field(default=4, ge=1, le=256)
    """Requests generating at once (interleaved token by token)."""
    max_queued_requests: int = Field(default=16, ge=0, le=10_000)
    """Waiting requests beyond the active ones; past this a request gets 429."""
    default_max_tokens: int = Field(default=512, ge=1)
    stream_interval_ms: int = Field(default=20, ge=0, le=1000)
    """A reply's text is handed over at most this often (ms; the first piece at once), so a streamed
    reply sends one chunk per interval, not one per token: each chunk costs this device and the
    client CPU the model would use. 20 ms is 50 updates a second; 0 sends every token."""
    prefix_cache_mib: int = Field(default=256, ge=0, le=1_000_000)
    """KV caches of finished requests kept (MiB) for prompts that start the same way: a chat's next
    turn, a shared system prompt. 0 turns it off."""
    prefix_cache_replies: bool = False
    """Also keep the KV of the replies generated (as llama.cpp's server does): a chat's next turn then
    prefills only its new message, but its tokens may differ slightly from a cold request's, since
    onnxruntime rounds decoding and prefilling differently. Off: follow-ups are bit-exact."""

    device_id: str = Field(
        default_factory=lambda: re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:128] or "device",
        pattern=DEVICE_ID_PATTERN,
    )
    """This device's name in the fleet (its MQTT topics); the host name by default."""
    broker_url: BrokerUrls | None = None
    """mqtt://[user:password@]host[:port] or mqtts://, or the nodes of a broker cluster separated by commas
    (tried in turn); unset: no fleet link, serve locally only."""
    broker_ca_file: Path | None = None
    broker_protocol: Literal["3.1.1", "5"] = "3.1.1"
    """3.1.1 works with every broker, the controller's embedded one included."""
    bundle: Path | None = None
    """A bundle folder to serve at start when no fleet-activated slot exists yet."""
    transfer: Literal["mqtt", "http"] = "mqtt"
    """How desired bundles arrive: chunks over MQTT, or HTTP from controller_url."""
    chunk_size_bytes: ChunkSize = DEFAULT_CHUNK_BYTES
    """A power of two from 16 KiB to 4 MiB."""
    transfer_timeout_s: float = Field(default=10.0, gt=0)
    """Without a chunk for this long, the missing chunks are requested again."""
    controller_url: str | None = Field(default=None, pattern=r"^https?://")
    """Where desired bundles are downloaded from with transfer = http (the controller's /v1/store)."""
    controller_token: str | None = None
    """A reader token of the controller, for downloads."""
    retry_min_s: float = Field(default=5.0, gt=0)
    """A desired state that failed (a full disk, a lost link, a failed smoke test) is tried again
    after this, then after twice as long each time, up to retry_max_s."""
    retry_max_s: float = Field(default=300.0, gt=0)
    disk_reserve_bytes: int = Field(default=64 * 2**20, ge=0)
    """Free disk a download must leave; a bundle that does not fit is a reported failure."""
    smoke_test_tokens: int = Field(default=16, ge=1, le=512)
    smoke_min_speed_fraction: float = Field(default=0.5, ge=0)
    """A new variant must decode at least this fraction of its build-time tokens/s to be switched in."""

    telemetry_interval_s: float = Field(default=10.0, gt=0)
    telemetry_max_rows: int = Field(default=100_000, ge=100)
    telemetry_retention_s: float = Field(default=7 * 24 * 3600, gt=0)
    telemetry_batch_records: int = Field(default=500, ge=1, le=10_000)
    telemetry_ack_timeout_s: float = Field(default=10.0, gt=0)
    """A batch not acknowledged in this time is sent again (the controller stores it once); each further
    wait is doubled, up to 8× this, until an ack comes."""

    @property
    def prefix_cache_bytes(self) -> int:
        return self.prefix_cache_mib * 2**20

    @property
    def telemetry_db(self) -> Path:
        return self.data_dir / "telemetry.sqlite"


def load(config_file: Path | None = None, **overrides: Any) -> AgentConfig:
    """Overrides (CLI flags) > SLMOPS_AGENT_* environment > TOML file > defaults."""
    return load_settings(AgentConfig, config_file, overrides, "agent")
