"""The agent's HTTP app: OpenAI's API under /v1, Ollama's under /api, /health, /metrics, /admin.

Each surface is a router in `routes/`; this module assembles them over the hosted model, with
the one error envelope of `slmops.http` (Ollama routes: `{"error": "..."}`), the API key gate,
and request counting.
"""

import secrets
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from slmops.errors import HttpError
from slmops.http import document_errors, error_body, install_errors
from slmops.supervision import Supervised

from ..host import ModelHost
from .routes import FleetLink, admin, ollama, openai
from .serving import Serving
from .streams import ClientGone

OLLAMA_PREFIX = "/api/"


def create_app(
    host: ModelHost, lifespan: Any = None, link: FleetLink | None = None, threads: Sequence[Supervised] = ()
) -> FastAPI:
    """The HTTP app over the model `host` serves; `lifespan` starts and stops what lives beside it
    (telemetry); /health shows the fleet `link` and the worker `threads`."""
    app = FastAPI(title="slmops agent", description="OpenAI- and Ollama-compatible local inference", lifespan=lifespan)
    app.state.host, app.state.serving = host, Serving(host.engine, host.config, host.metrics)
    app.state.link, app.state.threads = link, threads
    for router in (openai.router, ollama.router, admin.router):
        app.include_router(router)

    def answered(request: Request, status: int) -> None:
        host.metrics.requests.labels(request.url.path, str(status)).inc()

    install_errors(app, "agent", OLLAMA_PREFIX, answered)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, _e: ClientGone) -> Response:
        answered(request, 499)  # nginx's code for it
        return Response(status_code=499)

    document_errors(app)
    if host.config.api_key is not None:
        app.add_middleware(ApiKeyGate, key=host.config.api_key, metrics=host.metrics)
    return app


class ApiKeyGate:
    """With an api_key set, every path but /health needs `Authorization: Bearer <key>`: the API,
    /metrics, /admin, and the OpenAPI document and its pages. Plain ASGI (not BaseHTTPMiddleware),
    so streams and the disconnects that cancel them pass through untouched."""

    def __init__(self, app: Any, key: str, metrics: Any) -> None:
        self.app, self.expected, self.metrics = app, f"Bearer {key}".encode(), metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] == "/health":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        if secrets.compare_digest(given, self.expected):
            return await self.app(scope, receive, send)
        refusal = HttpError(401, "missing or wrong API key (Authorization: Bearer ...)", "invalid_request_error",
                            "invalid_api_key")  # fmt: skip
        self.metrics.requests.labels(scope["path"], "401").inc()
        body = {"error": refusal.message} if scope["path"].startswith(OLLAMA_PREFIX) else error_body(refusal)
        await JSONResponse(body, status_code=401)(scope, receive, send)
