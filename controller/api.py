"""The controller's REST API (OpenAPI docs at /docs): thin routers over the registry and the fleet.

Each surface is a router in `routes/`; this module assembles them with the one error envelope
of `slmops.http`, and the web dashboard at /ui (`dashboard/`). Auth: `Authorization: Bearer <token>`;
readers may GET, admins may change.
"""

from typing import Any

from fastapi import FastAPI

from slmops.http import document_errors, install_errors

from . import dashboard, metrics
from .bridge import MqttBridge
from .builds import Builds
from .config import ApiToken, ControllerConfig
from .control import FleetControl
from .embedded_broker import EmbeddedBroker
from .enrolment import Enrolment
from .fleet import Fleet
from .registry import Registry
from .rollouts import Rollouts
from .routes import builds, bundles, desired, devices, rollouts, service, store


def create_app(
    config: ControllerConfig,
    registry: Registry,
    fleet: Fleet,
    enrolment: Enrolment,
    tokens: list[ApiToken],
    bridge: MqttBridge | None = None,
    broker: EmbeddedBroker | None = None,
    lifespan: Any = None,
) -> FastAPI:
    app = FastAPI(
        title="slmops controller", description="Registry and fleet control for slmops bundles", lifespan=lifespan
    )
    app.state.config, app.state.registry, app.state.fleet, app.state.enrolment = config, registry, fleet, enrolment
    app.state.tokens, app.state.bridge, app.state.broker = tokens, bridge, broker
    app.state.control = FleetControl(fleet, bridge, broker)
    app.state.rollouts = Rollouts(registry.engine, registry, app.state.control)
    app.state.builds = Builds(
        registry.engine, config.data_dir / "builds", registry, config.build_signing_key, config.replica,
        config.build_run_options,
    )  # fmt: skip
    app.state.metrics = metrics.registry(registry.engine, bridge, app.state)
    routers = (bundles.router, devices.router, desired.router, rollouts.router, builds.router, store.router)
    for router in (*routers, service.router):
        app.include_router(router)
    dashboard.install(app)
    install_errors(app, "controller")
    document_errors(app)
    return app
