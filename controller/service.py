"""One controller process: configuration in, the app with its database, store and registry out."""

import logging
import os
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool

from slmops.signing import trusted_keys

from .api import create_app
from .bridge import MqttBridge
from .builds import BuildRunner
from .config import ApiToken, ControllerConfig
from .db import open_database
from .embedded_broker import EmbeddedBroker
from .enrolment import Enrolment
from .fleet import Fleet
from .lease import Lease
from .registry import Registry
from .rollouts import RolloutTimer
from .store import BundleStore

log = logging.getLogger(__name__)


def api_tokens(config: ControllerConfig) -> list[ApiToken]:
    """The configured tokens, or one admin token kept in data_dir/admin.token (made on first start)."""
    if config.tokens:
        return config.tokens
    path = config.data_dir / "admin.token"
    if not path.is_file():
        config.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # a replica on the same data folder made it a moment ago
            time.sleep(0.5)
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32) + "\n")
            log.warning("no API tokens configured: wrote an admin token to %s", path)
    return [ApiToken(name="admin", token=path.read_text().strip(), role="admin")]


def build_app(config: ControllerConfig) -> FastAPI:
    engine = open_database(config.database)
    store = BundleStore(config.store_dir)
    registry = Registry(engine, store, trusted_keys(config.trusted_keys))
    registry.sweep_store()
    fleet = Fleet(engine)
    broker, bridge, budget = None, None, config.device_chunk_budget_bytes
    if config.broker_url:
        ca_file = str(config.broker_ca_file) if config.broker_ca_file else None
        bridge = MqttBridge(
            config.broker_url, fleet, ca_file, config.broker_protocol, store, budget, config.shared_subscriptions
        )
    elif config.embedded_broker:
        broker = EmbeddedBroker(
            config.data_dir / "broker",
            config.embedded_broker_bind,
            lambda: enrolment.password_hashes(),
            lambda: [(device_id, desired.digest) for device_id, desired in fleet.desired_states().items()],
        )
        bridge = MqttBridge(broker.url, fleet, protocol="5", store=store, device_chunk_budget_bytes=budget)
    else:
        log.warning("no broker: the MQTT link is off (the REST API and registry work without it)")
    enrolment = Enrolment(engine, broker.reload if broker is not None else lambda: None)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        lease = Lease(engine, "rollouts", config.replica, config.rollout_lease_s)
        timer = RolloutTimer(app.state.rollouts, lease, config.rollout_tick_s)
        app.state.lease, app.state.rollout_timer = lease, timer
        runner = BuildRunner(app.state.builds) if config.builds else None
        app.state.build_runner = runner
        try:  # a start that fails (the broker's port taken) still gives the database's connections back
            if broker is not None:
                await run_in_threadpool(broker.start)
            if bridge is not None:
                bridge.start()
            timer.start()
            if runner is not None:
                await run_in_threadpool(runner.start)
            yield
        finally:
            if runner is not None:
                await run_in_threadpool(runner.stop)
            await run_in_threadpool(timer.stop)
            if bridge is not None:
                bridge.stop()
            if broker is not None:
                await run_in_threadpool(broker.stop)
            engine.dispose()

    return create_app(config, registry, fleet, enrolment, api_tokens(config), bridge, broker, lifespan)
