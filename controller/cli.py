"""`slmops controller ...`: run the fleet controller."""

from pathlib import Path
from typing import Annotated

import typer

from slmops.errors import SlmopsError
from slmops.terminal import err_console, fail

app = typer.Typer(
    help="The fleet controller: bundle registry and device fleet with a REST API (OpenAPI docs at /docs), "
    "on SQLite or PostgreSQL, linked to the devices over MQTT (an embedded Mosquitto by default): desired "
    "state, bundle transfer as chunks, commands, telemetry.",
    no_args_is_help=True,
)


@app.command("serve")
def serve_cmd(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="Controller TOML (SLMOPS_CONTROLLER_* override it).")
    ] = None,
    host: Annotated[str | None, typer.Option(help="Listen address (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 8700).")] = None,
    database_url: Annotated[
        str | None, typer.Option(help="SQLAlchemy URL, e.g. postgresql+psycopg://user@host/db (default SQLite).")
    ] = None,
    trusted_key: Annotated[
        list[Path] | None, typer.Option("--trusted-key", "-k", help="Public key pushed bundles must match.")
    ] = None,
    broker_url: Annotated[
        str | None, typer.Option(help="MQTT broker, mqtt://[user:pass@]host:port or mqtts:// (TLS).")
    ] = None,
) -> None:
    """Run the controller: REST API, registry, bundle store."""
    import logging

    import uvicorn

    from slmops.controller import config as controller_config
    from slmops.controller.service import build_app
    from slmops.http import header_deadline

    try:
        settings = controller_config.load(
            config,
            host=host,
            port=port,
            database_url=database_url,
            trusted_keys=trusted_key,
            broker_url=broker_url,
        )
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        web = build_app(settings)
    except SlmopsError as e:
        fail(str(e), code=2)
    err_console.print(
        f"controller on http://{settings.host}:{settings.port} (docs: /docs), data in {settings.data_dir}"
    )
    uvicorn.run(web, host=settings.host, port=settings.port, log_level="warning", http=header_deadline())
