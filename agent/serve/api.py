"""HTTP routes: thin. OpenAI's API under /v1, Ollama's under /api, /health, /metrics.

Every error has one shape, `{"error": {"message", "type", "param", "code"}}` (Ollama
routes: `{"error": "..."}`), mapped in one place; FastAPI's validation errors are
reshaped to it. Streams end with `data: [DONE]`; an error mid-stream is a data event.
"""

import asyncio
import json
import logging
import secrets
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from slmops.errors import describe_validation
from slmops.supervision import Supervised

from ..host import ModelHost
from .engine import ServedModel
from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    LoadRequest,
    OllamaChatRequest,
    OllamaGenerateRequest,
    OllamaOptions,
    SamplingFields,
    Usage,
    completion_id,
    error_body,
    now,
)
from .serving import Finish, Piece, RequestError, Serving


class FleetLink(Protocol):
    def status(self) -> dict[str, object]: ...


log = logging.getLogger(__name__)


def create_app(
    server: ModelHost, lifespan: Any = None, link: FleetLink | None = None, threads: Sequence[Supervised] = ()
) -> FastAPI:
    """The HTTP app over the model `server` hosts; `lifespan` starts and stops what lives beside it (telemetry);
    /health shows the fleet `link` and the worker `threads`."""
    app = FastAPI(title="slmops agent", description="OpenAI- and Ollama-compatible local inference", lifespan=lifespan)
    serving = Serving(server.engine, server.config, server.metrics)

    if server.config.api_key is not None:
        app.add_middleware(ApiKeyGate, key=server.config.api_key, metrics=server.metrics)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, e: RequestError) -> JSONResponse:
        server.metrics.requests.labels(request.url.path, str(e.status)).inc()
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": e.message}, status_code=e.status, headers=e.headers)
        return JSONResponse(error_body(e.message, e.type, e.code, e.param), status_code=e.status, headers=e.headers)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, _e: ClientGone) -> Response:
        server.metrics.requests.labels(request.url.path, "499").inc()  # nginx's code for it
        return Response(status_code=499)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"][1:]) or None
        message = describe_validation(e.errors(), skip=1, root="body")
        return await request_error(request, RequestError(400, message, "invalid_request_error", None, param))

    @app.exception_handler(ValidationError)
    async def model_error(request: Request, e: ValidationError) -> JSONResponse:
        """A request field that passed the route's model but not a model built from it (Ollama's options)."""
        param = ".".join(str(p) for p in e.errors()[0]["loc"]) or None
        return await request_error(
            request, RequestError(400, describe_validation(e.errors()), "invalid_request_error", None, param)
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        """Starlette's own answers (no such route, a method the route does not take) in the envelope."""
        return await request_error(request, RequestError(e.status_code, str(e.detail), "invalid_request_error"))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=e)
        return await request_error(
            request, RequestError(500, "internal error; the agent's log has the details", "server_error")
        )

    @app.get("/health")
    async def health() -> JSONResponse:
        model = server.engine.current
        body: dict[str, Any] = {
            "status": server.status.state,
            "state": server.status.state,
            "message": server.status.message,
            "fallbacks": server.status.fallbacks,
            "fleet_link": None if link is None else link.status(),
            "threads": {thread.name: thread.status() for thread in threads},
        }
        if model is None:
            return JSONResponse(body, status_code=503)
        body.update(
            status="ok",
            model=model.model_id,
            bundle=model.bundle,
            version=model.version,
            variant=model.variant_id,
            provider=model.provider,
            queue_depth=server.engine.queue_depth,
            active_requests=server.engine.active_count,
        )
        return JSONResponse(body)

    @app.post("/admin/load", status_code=202)
    async def admin_load(body: LoadRequest) -> dict[str, Any]:
        """Switch to another bundle (hot swap): in-flight requests finish on the current model."""
        if not body.bundle.is_dir():
            raise RequestError(400, f"{body.bundle} is not a bundle folder on this device", "invalid_request_error")
        if server.status.state == "loading":
            raise RequestError(409, f"already {server.status.message}", "invalid_request_error", "busy")
        server.load_bundle_in_background(body.bundle)
        return {"status": "loading", "bundle": str(body.bundle)}

    @app.get("/metrics")
    async def metrics() -> Response:
        server.metrics.queue_depth.set(server.engine.queue_depth)
        server.metrics.active.set(server.engine.active_count)
        return PlainTextResponse(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        model = server.engine.current
        data = (
            []
            if model is None
            else [
                {
                    "id": model.model_id,
                    "object": "model",
                    "created": int(model.loaded_at),
                    "owned_by": "slmops",
                    "bundle": model.bundle,
                    "version": model.version,
                    "variant": model.variant_id,
                    "provider": model.provider,
                    "context_length": model.variant.context_length,
                }
            ]
        )
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        model = serving.model(body.model)
        prompt = await asyncio.to_thread(serving.chat_prompt, model, body.messages)  # off the event loop
        events = serving.generate(model, prompt, body, body.requested_max_tokens)
        first = await _first(events)  # errors before the first token still get a status code
        ident, created = completion_id("chatcmpl"), now()
        server.metrics.requests.labels(request.url.path, "200").inc()
        if body.stream:
            envelope = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model.model_id}
            chunks = _sse_chunks(
                first,
                events,
                envelope,
                lambda text: {"delta": {"content": text} if text else {}},
                body.include_usage,
                opening={"delta": {"role": "assistant", "content": ""}},
            )
            return _sse(chunks)
        text, finish = await _collect(first, events, request)
        return JSONResponse(
            {
                "id": ident,
                "object": "chat.completion",
                "created": created,
                "model": model.model_id,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": finish.reason,
                        "logprobs": None,
                    }
                ],
                "usage": _usage(finish).model_dump(),
            }
        )

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        model = serving.model(body.model)
        events = serving.generate(model, body.prompt_text, body, body.requested_max_tokens)
        first = await _first(events)
        ident, created = completion_id("cmpl"), now()
        prefix = body.prompt_text if body.echo else ""
        server.metrics.requests.labels(request.url.path, "200").inc()
        if body.stream:
            envelope = {"id": ident, "object": "text_completion", "created": created, "model": model.model_id}
            chunks = _sse_chunks(
                first,
                events,
                envelope,
                lambda text: {"text": text},
                body.include_usage,
                opening={"text": prefix} if prefix else None,
            )
            return _sse(chunks)
        text, finish = await _collect(first, events, request)
        return JSONResponse(
            {
                "id": ident,
                "object": "text_completion",
                "created": created,
                "model": model.model_id,
                "choices": [{"index": 0, "text": prefix + text, "finish_reason": finish.reason, "logprobs": None}],
                "usage": _usage(finish).model_dump(),
            }
        )

    # --- Ollama ---------------------------------------------------------------------------

    @app.get("/api/tags")
    async def ollama_tags() -> dict[str, Any]:
        model = server.engine.current
        if model is None:
            return {"models": []}
        size = sum(p.stat().st_size for p in model.variant.path.rglob("*") if p.is_file())
        modified = datetime.fromtimestamp(model.loaded_at, UTC).isoformat()
        return {
            "models": [
                {
                    "name": model.model_id,
                    "model": model.model_id,
                    "modified_at": modified,
                    "size": size,
                    "digest": "",
                    "details": {
                        "format": "onnx",
                        "family": model.bundle,
                        "parameter_size": "",
                        "quantization_level": model.variant_id,
                    },
                }
            ]
        }

    @app.get("/api/version")
    async def ollama_version() -> dict[str, str]:
        from slmops import __version__

        return {"version": __version__}

    @app.post("/api/chat")
    async def ollama_chat(body: OllamaChatRequest, request: Request) -> Response:
        model = serving.model(body.model)
        prompt = await asyncio.to_thread(serving.chat_prompt, model, body.messages)  # off the event loop
        return await _ollama(
            request,
            model,
            prompt,
            body.options,
            body.stream,
            lambda text: {"message": {"role": "assistant", "content": text}},
        )

    @app.post("/api/generate")
    async def ollama_generate(body: OllamaGenerateRequest, request: Request) -> Response:
        model = serving.model(body.model)
        if body.raw:
            prompt = body.prompt
        else:
            messages = [
                *([{"role": "system", "content": body.system}] if body.system else []),
                {"role": "user", "content": body.prompt},
            ]
            prompt = await asyncio.to_thread(serving.template, model, messages)
        return await _ollama(request, model, prompt, body.options, body.stream, lambda text: {"response": text})

    async def _ollama(
        request: Request, model: ServedModel, prompt: str, options: OllamaOptions, stream: bool, wrap: Any
    ) -> Response:
        fields = SamplingFields(
            temperature=options.temperature,
            top_p=options.top_p,
            top_k=options.top_k,
            seed=options.seed,
            stop=options.stop,
            repetition_penalty=options.repeat_penalty,
        )
        model_id = model.model_id
        events = serving.generate(model, prompt, fields, options.max_tokens)
        first = await _first(events)
        server.metrics.requests.labels(request.url.path, "200").inc()

        def line(payload: dict[str, Any]) -> dict[str, Any]:
            return {"model": model_id, "created_at": datetime.now(UTC).isoformat(), **payload}

        def final(finish: Finish) -> dict[str, Any]:
            ns = 1_000_000_000
            return line(
                {
                    **wrap(""),
                    "done": True,
                    "done_reason": finish.reason,
                    "total_duration": int(finish.total_s * ns),
                    "load_duration": 0,
                    "prompt_eval_count": finish.prompt_tokens,
                    "prompt_eval_duration": int(finish.ttft_s * ns),
                    "eval_count": finish.completion_tokens,
                    "eval_duration": int(max(finish.total_s - finish.queued_s - finish.ttft_s, 0) * ns),
                }
            )

        if not stream:
            text, finish = await _collect(first, events, request)
            return JSONResponse({**final(finish), **wrap(text)})

        async def ndjson() -> AsyncIterator[str]:
            async for event in _chain(first, events):
                if isinstance(event, Piece):
                    yield json.dumps(line({**wrap(event.text), "done": False})) + "\n"
                else:
                    yield json.dumps(final(event)) + "\n"

        return StreamingResponse(_guard(ndjson(), ollama=True), media_type="application/x-ndjson")

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
        message = "missing or wrong API key (Authorization: Bearer ...)"
        self.metrics.requests.labels(scope["path"], "401").inc()
        body = (
            {"error": message}
            if scope["path"].startswith("/api/")
            else error_body(message, "invalid_request_error", "invalid_api_key", None)
        )
        await JSONResponse(body, status_code=401)(scope, receive, send)


async def _first(events: AsyncIterator[Piece | Finish]) -> Piece | Finish:
    return await events.__anext__()


async def _chain(first: Piece | Finish, events: AsyncIterator[Piece | Finish]) -> AsyncIterator[Piece | Finish]:
    yield first
    if isinstance(first, Piece):
        async for event in events:
            yield event


async def _collect(
    first: Piece | Finish, events: AsyncIterator[Piece | Finish], request: Request
) -> tuple[str, Finish]:
    """The whole answer of a non-streaming request. A client that leaves meanwhile (its request
    body is read, so the next ASGI message is the disconnect) ends the generation at once:
    Starlette cancels only streaming responses by itself."""

    async def text() -> tuple[str, Finish]:
        parts: list[str] = []
        async for event in _chain(first, events):
            if isinstance(event, Piece):
                parts.append(event.text)
            else:
                return "".join(parts), event
        raise RuntimeError("generation ended without a finish event")

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    answer, gone = asyncio.ensure_future(text()), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait((answer, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (answer, gone):
            task.cancel()
        await asyncio.gather(answer, gone, return_exceptions=True)
        await events.aclose()  # type: ignore[attr-defined]  # ends the engine job, counted as cancelled
    if not answer.done() or answer.cancelled():
        raise ClientGone()
    return answer.result()


class ClientGone(Exception):
    """The client left before its non-streaming answer was ready; nobody is there to answer."""


def _usage(finish: Finish) -> Usage:
    return Usage(
        prompt_tokens=finish.prompt_tokens,
        completion_tokens=finish.completion_tokens,
        total_tokens=finish.prompt_tokens + finish.completion_tokens,
    )


async def _sse_chunks(
    first: Piece | Finish,
    events: AsyncIterator[Piece | Finish],
    envelope: dict[str, Any],
    body: Callable[[str], dict[str, Any]],
    include_usage: bool,
    opening: dict[str, Any] | None = None,
) -> AsyncIterator[str]:
    """Events as SSE chunks: `envelope` (id, object, created, model) around one choice each,
    `body(text)` making the choice's payload; the finish reason, then usage when asked for."""

    def chunk(payload: dict[str, Any] | None, finish: str | None = None, **extra: Any) -> str:
        choices = [] if payload is None else [{"index": 0, **payload, "finish_reason": finish, "logprobs": None}]
        return f"data: {json.dumps({**envelope, 'choices': choices, **extra})}\n\n"

    if opening is not None:
        yield chunk(opening)
    async for event in _chain(first, events):
        if isinstance(event, Piece):
            yield chunk(body(event.text))
        else:
            yield chunk(body(""), event.reason)
            if include_usage:
                yield chunk(None, usage=_usage(event).model_dump())


def _sse(body: AsyncIterator[str]) -> StreamingResponse:
    async def with_done() -> AsyncIterator[str]:
        async for part in body:
            yield part
        yield "data: [DONE]\n\n"

    return StreamingResponse(_guard(with_done()), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _guard(body: AsyncIterator[str], ollama: bool = False) -> AsyncIterator[str]:
    """Turn a failure after the stream began into a final event, and always close the generation.

    A client that leaves is noticed by Starlette, which cancels this stream; closing `body`
    then closes the generation, which cancels its engine job.
    """
    try:
        async for part in body:
            yield part
    except Exception as e:  # the status line is sent: the error goes as the stream's last event
        if not isinstance(e, RequestError):
            log.error("a stream failed after it began", exc_info=e)
            e = RequestError(500, "internal error; the agent's log has the details", "server_error")
        if ollama:
            yield json.dumps({"error": e.message}) + "\n"
        else:
            yield f"data: {json.dumps(error_body(e.message, e.type, e.code, e.param))}\n\n"
            yield "data: [DONE]\n\n"
    finally:
        await body.aclose()  # type: ignore[attr-defined]
