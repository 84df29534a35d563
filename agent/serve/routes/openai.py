"""OpenAI's API under /v1: models, chat completions and completions, whole or streamed (SSE)."""

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from slmops.http import error_responses

from .. import streams
from ..engine import ServedModel
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
from ..serving import Serving
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
    """The served model, then the same model with each of its LoRA adapters (`bundle:adapter`)."""
    model = host.engine.current
    if model is None:
        return ModelList(data=[])
    cards = [
        ModelCard(
            id=choice.model_id,
            created=int(choice.loaded_at),
            bundle=choice.bundle,
            version=choice.version,
            variant=choice.variant_id,
            provider=choice.provider,
            context_length=choice.variant.context_length,
            adapter=choice.adapter,
        )
        for choice in model.choices()
    ]
    return ModelList(data=cards)


@router.post("/chat/completions", response_model=ChatCompletion, responses=STREAMED)  # type: ignore[arg-type]
async def chat_completions(
    body: ChatCompletionRequest, request: Request, serving: ServingOf
) -> ChatCompletion | Completion | StreamingResponse:
    model = serving.model(body.model)
    prompt = await asyncio.to_thread(serving.chat_prompt, model, body.messages)  # off the event loop
    return await _answer(request, serving, model, prompt, body, chat=True)


@router.post("/completions", response_model=Completion, responses=STREAMED)  # type: ignore[arg-type]
async def completions(
    body: CompletionRequest, request: Request, serving: ServingOf
) -> ChatCompletion | Completion | StreamingResponse:
    model = serving.model(body.model)
    prefix = body.prompt_text if body.echo else ""
    return await _answer(request, serving, model, body.prompt_text, body, chat=False, prefix=prefix)


def _delta(text: str) -> dict[str, Any]:
    return {"delta": {"content": text} if text else {}}


def _text(text: str) -> dict[str, Any]:
    return {"text": text}


async def _answer(
    request: Request,
    serving: Serving,
    model: ServedModel,
    prompt: str,
    body: ChatCompletionRequest | CompletionRequest,
    chat: bool,
    prefix: str = "",
) -> ChatCompletion | Completion | StreamingResponse:
    """The answer in OpenAI's shape: a chat completion or a text completion (after `prefix`, the
    echoed prompt), whole or streamed."""
    head, events = await serving.start(model, prompt, body, body.requested_max_tokens, request.url.path)
    ident, created = completion_id("chatcmpl" if chat else "cmpl"), now()
    if body.stream:
        envelope = {
            "id": ident,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created,
            "model": model.model_id,
        }
        opening = {"delta": {"role": "assistant", "content": ""}} if chat else {"text": prefix} if prefix else None
        return streams.sse(head, events, envelope, _delta if chat else _text, body.include_usage, opening)
    text, finish = await streams.collect(head, events, request)
    usage = streams.usage(finish)
    if chat:
        choice = ChatChoice(message=AssistantMessage(content=text), finish_reason=finish.reason)
        return ChatCompletion(id=ident, created=created, model=model.model_id, choices=[choice], usage=usage)
    text_choice = CompletionChoice(text=prefix + text, finish_reason=finish.reason)
    return Completion(id=ident, created=created, model=model.model_id, choices=[text_choice], usage=usage)
