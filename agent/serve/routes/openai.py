"""OpenAI's API under /v1: models, chat completions and completions, whole or streamed (SSE)."""

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from slmops.http import error_responses

from .. import streams
from ..protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    ModelCard,
    ModelList,
    completion_id,
    now,
)
from . import Host, ServingOf

SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {
            "type": "string",
            "description": "A JSON chunk (chat.completion.chunk or text_completion), the error envelope "
            "when generation fails after the stream began, or [DONE] last",
        },
        "event": {"type": "string"},
    },
}
STREAMED = {
    200: {
        "content": {"text/event-stream": {"schema": SSE_EVENT}},
        "description": "The answer; with `stream: true`, server-sent events ending with `data: [DONE]`",
    }
}
router = APIRouter(prefix="/v1", tags=["OpenAI"], responses=error_responses(400, 401, 404, 429, 500, 503))


@router.get("/models")
async def models(host: Host) -> ModelList:
    model = host.engine.current
    if model is None:
        return ModelList(data=[])
    card = ModelCard(
        id=model.model_id,
        created=int(model.loaded_at),
        bundle=model.bundle,
        version=model.version,
        variant=model.variant_id,
        provider=model.provider,
        context_length=model.variant.context_length,
    )
    return ModelList(data=[card])


@router.post("/chat/completions", response_model=ChatCompletion, responses=STREAMED)  # type: ignore[arg-type]
async def chat_completions(
    body: ChatCompletionRequest, request: Request, host: Host, serving: ServingOf
) -> ChatCompletion | StreamingResponse:
    model = serving.model(body.model)
    prompt = await asyncio.to_thread(serving.chat_prompt, model, body.messages)  # off the event loop
    events = serving.generate(model, prompt, body, body.requested_max_tokens)
    head = await streams.first(events)
    ident, created = completion_id("chatcmpl"), now()
    host.metrics.requests.labels(request.url.path, "200").inc()
    if body.stream:
        envelope = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model.model_id}
        return streams.sse(
            head,
            events,
            envelope,
            lambda text: {"delta": {"content": text} if text else {}},
            body.include_usage,
            opening={"delta": {"role": "assistant", "content": ""}},
        )
    text, finish = await streams.collect(head, events, request)
    choice = ChatChoice(message=AssistantMessage(content=text), finish_reason=finish.reason)
    return ChatCompletion(
        id=ident, created=created, model=model.model_id, choices=[choice], usage=streams.usage(finish)
    )


@router.post("/completions", response_model=Completion, responses=STREAMED)  # type: ignore[arg-type]
async def completions(
    body: CompletionRequest, request: Request, host: Host, serving: ServingOf
) -> Completion | StreamingResponse:
    model = serving.model(body.model)
    events = serving.generate(model, body.prompt_text, body, body.requested_max_tokens)
    head = await streams.first(events)
    ident, created = completion_id("cmpl"), now()
    prefix = body.prompt_text if body.echo else ""
    host.metrics.requests.labels(request.url.path, "200").inc()
    if body.stream:
        envelope = {"id": ident, "object": "text_completion", "created": created, "model": model.model_id}
        return streams.sse(
            head,
            events,
            envelope,
            lambda text: {"text": text},
            body.include_usage,
            opening={"text": prefix} if prefix else None,
        )
    text, finish = await streams.collect(head, events, request)
    choice = CompletionChoice(text=prefix + text, finish_reason=finish.reason)
    return Completion(id=ident, created=created, model=model.model_id, choices=[choice], usage=streams.usage(finish))
