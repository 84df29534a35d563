"""The controller's configuration: one TOML file plus SLMOPS_CONTROLLER_* environment variables.

Defaults run everything embedded on one host: SQLite (WAL) and a bundle store under the
slmops home. `database_url` points at PostgreSQL (postgresql+psycopg://...) in production.
"""

import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from slmops import paths
from slmops.broker import BrokerUrls, with_credentials
from slmops.build.executors import ExecutorName
from slmops.errors import ConfigError
from slmops.settings import load_settings

from .chunks import DEVICE_BUDGET_BYTES

__all__ = ["ApiToken", "ConfigError", "ControllerConfig", "load"]


class ApiToken(BaseModel):
    name: str = Field(min_length=1)
    """Who uses it; recorded in the audit log for every change it makes."""
    token: str = Field(min_length=16)
    role: Literal["admin", "reader"]


class ControllerConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SLMOPS_CONTROLLER_", extra="forbid", env_nested_delimiter="__")

    host: str = "127.0.0.1"
    port: int = Field(default=8700, ge=0, le=65535)
    data_dir: Path = Field(default_factory=lambda: paths.home() / "controller")
    database_url: str | None = None
    """SQLAlchemy URL; unset: SQLite in the data folder."""
    trusted_keys: list[Path] = []
    """Keys pushed bundles must be signed with; empty: the trusted-keys folder of the slmops home."""
    tokens: list[ApiToken] = []
    """API bearer tokens. With none, the first start writes an admin token to data_dir/admin.token."""
    max_upload_bytes: int = Field(default=16 * 2**30, ge=1)
    broker_url: BrokerUrls | None = None
    """mqtt://[user:password@]host[:port], or mqtts:// for TLS; the nodes of a broker cluster separated
    by commas (tried in turn). Unset: the embedded broker."""
    broker_ca_file: Path | None = None
    broker_protocol: Literal["3.1.1", "5"] = "5"
    """MQTT version towards an external broker (the embedded one speaks 3.1.1)."""
    embedded_broker: bool = True
    """With no broker_url, run a Mosquitto of the controller's own (credentials, ACL), for one host."""
    embedded_broker_bind: str = Field(default="127.0.0.1:1883", pattern=r"^[^:]+:\d+$")
    device_chunk_budget_bytes: int = Field(default=DEVICE_BUDGET_BYTES, ge=1 << 20)
    """Chunk bytes one device may ask for, refilled at this much per hour; past it its requests are
    refused until it refills (no device can make the controller send a bundle over and over)."""
    rollout_tick_s: float = Field(default=2.0, gt=0, le=60)
    """How often active rollouts are moved a step (their devices' reports read, waves started)."""
    rollout_lease_s: float = Field(default=15.0, ge=1, le=3600)
    """How long the replica that decides rollouts holds its lease without renewing it (renewed every
    tick); when it dies another replica takes over after at most this long."""
    replica_name: str | None = Field(default=None, max_length=200)
    """This replica's name in the rollout lease; unset: host:port. A replica restarted under the same
    name takes its lease back at once."""
    build_signing_key: Path | None = None
    """The Ed25519 key build jobs sign their bundles with (slmops bundle keygen); none: a recipe with a
    bundle stage is refused."""
    builds: bool = True
    """Run build jobs on this replica (`slmops build submit`); they need the build extra installed."""
    build_executor: ExecutorName = "local"
    """Where a build job's stages run: local (in the job's process on this replica) or ray (each stage on
    the Ray cluster at ray_address, fine-tuning and distillation with Ray Train over ray_train_workers
    processes; the data_dir's builds/ folder must then be shared with the cluster's nodes)."""
    ray_address: str | None = None
    """The Ray cluster's address (HOST:PORT) for build_executor = ray."""
    ray_train_workers: int = Field(default=2, ge=1, le=4096)
    shared_subscriptions: bool = True
    """Receive what devices send through $share/slmops/... so that replicas split it (Mosquitto 2, EMQX);
    false for a broker without shared subscriptions, with a single controller."""
    device_broker_url: BrokerUrls | None = Field(default=None, pattern=r"^[^@]*$")
    """The broker as devices reach it, for their enrolment (no credentials in it). Unset: the
    embedded broker's address, or broker_url without its credentials."""

    @model_validator(mode="after")
    def _ray_needs_its_address(self) -> "ControllerConfig":
        if self.build_executor == "ray" and not self.ray_address:
            raise ValueError("build_executor = ray needs ray_address (the cluster's HOST:PORT)")
        return self

    @property
    def build_run_options(self) -> list[str]:
        """What `slmops build run` is given for a build job: where its stages run."""
        if self.build_executor == "local":
            return []
        assert self.ray_address is not None
        return ["--executor", "ray", "--ray-address", self.ray_address, "--train-workers", str(self.ray_train_workers)]

    @property
    def database(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'controller.sqlite'}"

    @property
    def devices_broker_url(self) -> str:
        if self.device_broker_url:
            return self.device_broker_url
        if self.broker_url:
            return with_credentials(self.broker_url, None)
        return f"mqtt://{self.embedded_broker_bind}"

    @property
    def replica(self) -> str:
        return self.replica_name or f"{socket.gethostname()}:{self.port}"

    @property
    def store_dir(self) -> Path:
        return self.data_dir / "store"


def load(config_file: Path | None = None, **overrides: Any) -> ControllerConfig:
    """Overrides (CLI flags) > SLMOPS_CONTROLLER_* environment > TOML file > defaults."""
    return load_settings(ControllerConfig, config_file, overrides, "controller")
