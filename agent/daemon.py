"""The agent process: the local server, telemetry, and (with a broker) the fleet link.

    bind the port (a taken port is one clear error, before anything starts)
    lifespan start: load the bundle (background) · telemetry collector · uplink (MQTT)
    lifespan stop (SIGINT/SIGTERM, after uvicorn drained the requests): uplink says goodbye,
        collector and engine stop

`slmops agent serve BUNDLE` and `slmops agent run --config agent.toml` both run this.
"""

import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import uvicorn

from slmops.errors import PortTaken
from slmops.http import header_deadline
from slmops.terminal import err_console

from .config import AgentConfig
from .fleet.slots import Slots
from .host import ModelHost
from .serve.api import create_app
from .telemetry import TelemetryCollector


def run(config: AgentConfig, bundle: Path | None = None) -> None:
    try:
        family = socket.getaddrinfo(config.host, config.port, type=socket.SOCK_STREAM)[0][0]
        listener = socket.create_server((config.host, config.port), family=family)
    except OSError as e:
        raise PortTaken(f"cannot listen on {config.host}:{config.port}: {e.strerror or e}") from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = ModelHost(config)
    collector = TelemetryCollector(server, config)
    uplink, sync = None, None
    if config.broker_url:
        from .fleet.sync import Sync
        from .fleet.transfer import MqttFetcher
        from .fleet.uplink import Uplink

        uplink = Uplink(config, server, collector.queue)
        fetcher = MqttFetcher(uplink, config.chunk_size_bytes, config.transfer_timeout_s)
        sync = Sync(config, server, uplink.publish_reported, uplink.publish_reply, fetcher)
        uplink.on_work = sync.submit
    slots = Slots(config.data_dir)
    active = slots.active()

    @asynccontextmanager
    async def lifespan(_app: object) -> AsyncIterator[None]:
        server.start()
        if bundle is not None:
            server.load_bundle_in_background(bundle)
        elif active is not None:  # what the fleet activated last, verified again as it loads
            server.load_bundle_in_background(slots.path(active.digest), active.variant)
        elif config.bundle is not None:
            server.load_bundle_in_background(config.bundle)
        collector.start()
        if sync is not None:
            sync.start()
        if uplink is not None:
            uplink.start()
        what = bundle or (active and f"slot {active.bundle} {active.version}") or config.bundle or "nothing yet"
        brokers = ", ".join(map(str, uplink.client.addresses)) if uplink else ""  # no password in logs
        fleet = f", fleet link {brokers} as {config.device_id}" if uplink else ""
        err_console.print(f"serving {what} on http://{config.host}:{config.port}/v1 (health: /health){fleet}")
        try:
            yield
        finally:
            if uplink is not None:
                uplink.stop()
            if sync is not None:
                sync.stop()
            collector.stop()
            server.close()
            err_console.print("stopped: requests drained, telemetry closed")

    threads = [collector.thread, *([uplink.sender, sync.thread] if uplink is not None and sync is not None else [])]
    app = create_app(server, lifespan, uplink, threads)
    web = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=30, http=header_deadline())
    uvicorn.Server(web).run(sockets=[listener])
