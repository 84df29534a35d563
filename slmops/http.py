"""What the agent's and the controller's HTTP services share: the one error envelope, the one
exception → status mapping, the catch-all handler, and an OpenAPI document that says so.

Every error answers `{"error": {"message", "type", "param", "code"}}` (OpenAI's shape); routes
under an Ollama prefix answer Ollama's `{"error": "..."}`. Validation errors are 400s, as
OpenAI's are, and the OpenAPI document lists them as 400s in the envelope (not FastAPI's 422).
"""

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from uvicorn.protocols.http.h11_impl import H11Protocol

from .errors import (
    BundleError,
    Conflict,
    HttpError,
    NotFound,
    Rejected,
    SlmopsError,
    Unanswered,
    Unavailable,
    describe_validation,
)

log = logging.getLogger(__name__)


class ErrorDetail(BaseModel):
    message: str
    type: str
    """OpenAI's error type: invalid_request_error, authentication_error, server_error, ..."""
    param: str | None = None
    """The request field at fault, where one is."""
    code: str | None = None


class ErrorResponse(BaseModel):
    """The one error shape of both services' APIs."""

    error: ErrorDetail


class OllamaErrorResponse(BaseModel):
    """Ollama's error shape, on the agent's /api routes."""

    error: str


def error_body(e: HttpError) -> dict[str, Any]:
    return ErrorResponse(error=ErrorDetail(message=e.message, type=e.type, param=e.param, code=e.code)).model_dump()


def http_error(e: Exception, service: str, doing: str = "a request") -> HttpError:
    """The answer to an exception a route raised: the one mapping of both services. One it does
    not know is a 500, logged with its traceback as `service`'s failure while `doing` it."""
    match e:
        case HttpError():
            return e
        case RequestValidationError():
            errors = e.errors()
            param = ".".join(str(p) for p in errors[0]["loc"][1:]) or None
            return HttpError(
                400, describe_validation(errors, skip=1, root="body"), "invalid_request_error", None, param
            )
        case ValidationError():  # a request field that passed the route's model but not one built from it
            param = ".".join(str(p) for p in e.errors()[0]["loc"]) or None
            return HttpError(400, describe_validation(e.errors()), "invalid_request_error", None, param)
        case StarletteHTTPException():  # Starlette's own: no such route, a method the route does not take
            return HttpError(e.status_code, str(e.detail), "invalid_request_error", headers=dict(e.headers or {}))
        case NotFound():
            return HttpError(404, str(e), "not_found_error", type(e).__name__)
        case Conflict():
            return HttpError(409, str(e), "conflict", type(e).__name__)
        case Rejected():
            return HttpError(400, str(e), "invalid_request_error", type(e).__name__)
        case BundleError():
            return HttpError(422, str(e), "invalid_bundle", type(e).__name__)
        case Unanswered():
            return HttpError(504, str(e), "timeout")
        case Unavailable():
            return HttpError(503, str(e), "unavailable")
    log.error("%s: %s failed", service, doing, exc_info=e)
    return HttpError(500, f"internal error; the {service}'s log has the details", "server_error")


def install_errors(
    app: FastAPI,
    service: str,
    ollama_prefix: str | None = None,
    answered: Callable[[Request, int], None] | None = None,
) -> None:
    """Answer every exception in the envelope (Ollama's shape under `ollama_prefix`); `answered`
    sees each error's status (the agent counts them)."""

    async def handle(request: Request, e: Exception) -> JSONResponse:
        answer = http_error(e, service, f"{request.method} {request.url.path}")
        if answer.status == 405:  # Starlette's Allow names one route's methods; the path may have more
            answer.headers["Allow"] = ", ".join(_allowed_methods(request))
        if answered is not None:
            answered(request, answer.status)
        if ollama_prefix is not None and request.url.path.startswith(ollama_prefix):
            return JSONResponse({"error": answer.message}, status_code=answer.status, headers=answer.headers)
        return JSONResponse(error_body(answer), status_code=answer.status, headers=answer.headers)

    # SlmopsError and the others are answered inside the app; Exception by Starlette's outermost
    # middleware, which answers, then re-raises for the server's log.
    for kind in (RequestValidationError, ValidationError, StarletteHTTPException, SlmopsError, Exception):
        app.add_exception_handler(kind, handle)


def _allowed_methods(request: Request) -> list[str]:
    methods: set[str] = set()
    for route in request.app.router.routes:
        if isinstance(route, APIRoute) and route.matches(request.scope)[0] != Match.NONE:
            methods |= route.methods or set()
    return sorted(methods)


def error_responses(*statuses: int, ollama: bool = False) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for routes: these statuses, and any other error, answer the envelope."""
    model = OllamaErrorResponse if ollama else ErrorResponse
    described: dict[int | str, dict[str, Any]] = {status: {"model": model} for status in statuses}
    described["default"] = {"model": model, "description": "Any other error, in the same envelope"}
    return described


def document_errors(app: FastAPI) -> None:
    """Make /openapi.json say what the service answers: FastAPI's 422 for request validation becomes
    the 400 the handler really sends, in the envelope the route documents for its errors."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    responses = operation.get("responses", {})
                    if responses.pop("422", None) is not None and "default" in responses:
                        responses.setdefault("400", {**responses["default"], "description": "Invalid request"})
            schemas = schema.get("components", {}).get("schemas", {})
            for unused in ("HTTPValidationError", "ValidationError"):
                schemas.pop(unused, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


HEADER_TIMEOUT_S = 10.0
"""How long a connection may take to send a request's headers (nginx's client_header_timeout)."""


def header_deadline(seconds: float = HEADER_TIMEOUT_S) -> type[H11Protocol]:
    """uvicorn's HTTP protocol (`uvicorn.Config(http=...)`) with a deadline on each request's headers.

    uvicorn times out a connection idle between requests, but not one that opened and sends
    nothing, or trickles its headers a byte at a time (each byte restarts the keep-alive timer):
    a few hundred such sockets (slowloris) would hold every connection the service has. Here a
    connection that has not sent a whole request head `seconds` after it opened, or after its
    last response, is closed."""

    class HeaderDeadline(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None
        _waiting_for: object = None  # the request cycle before the headers we wait for

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._deadline is not None and self.cycle is not self._waiting_for:  # a request head arrived
                self._deadline.cancel()
                self._deadline = None

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            self._waiting_for = self.cycle
            self._deadline = self.loop.call_later(seconds, self._too_slow)

        def _too_slow(self) -> None:
            self._deadline = None
            if not self.transport.is_closing():
                log.warning("closed a connection from %s that sent no request head in %g s", self.client, seconds)
                self.transport.close()

    return HeaderDeadline
