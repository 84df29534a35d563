"""Ollama's API under /api: tags, version, chat and generate, whole or streamed (NDJSON)."""

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from slmops import __version__
from slmops.http import error_responses

from .. import streams
from ..engine import ServedModel
from ..protocol import (
    OllamaChatAnswer,
    OllamaChatRequest,
    OllamaGenerateAnswer,
    OllamaGenerateRequest,
    OllamaModel,
    OllamaModelDetails,
    OllamaOptions,
    OllamaTags,
    OllamaVersion,
    SamplingFields,
)
from ..serving import Finish, Piece, Serving
from . import Host, ServingOf

STREAMED = {
    200: {
        "content": {"application/x-ndjson": {"schema": {"type": "string"}}},
        "description": "The answer; "
        "with `stream: true` (Ollama's default), one JSON object per line, the last with `done: true`",
    }
}
router = APIRouter(prefix="/api", tags=["Ollama"], responses=error_responses(400, 401, 404, 429, 500, 503, ollama=True))
NS = 1_000_000_000


@router.get("/tags")
async def tags(host: Host) -> OllamaTags:
    """The served model, then the same model with each of its LoRA adapters (`bundle:adapter`)."""
    model = host.engine.current
    if model is None:
        return OllamaTags(models=[])
    size = sum(p.stat().st_size for p in model.variant.path.rglob("*") if p.is_file())
    details = OllamaModelDetails(
        format="onnx", family=model.bundle, parameter_size="", quantization_level=model.variant_id
    )
    modified = datetime.fromtimestamp(model.loaded_at, UTC).isoformat()
    return OllamaTags(
        models=[
            OllamaModel(
                name=choice.model_id, model=choice.model_id, modified_at=modified, size=size, digest="", details=details
            )
            for choice in model.choices()
        ]
    )


@router.get("/version")
async def version() -> OllamaVersion:
    return OllamaVersion(version=__version__)


@router.post("/chat", response_model=OllamaChatAnswer, responses=STREAMED)  # type: ignore[arg-type]
async def chat(body: OllamaChatRequest, request: Request, serving: ServingOf) -> Response:
    model = serving.model(body.model)
    prompt = await asyncio.to_thread(serving.chat_prompt, model, body.messages)  # off the event loop
    return await _answer(
        request, serving, model, prompt, body.options, body.stream, OllamaChatAnswer,
        lambda text: {"message": {"role": "assistant", "content": text}},
    )  # fmt: skip


@router.post("/generate", response_model=OllamaGenerateAnswer, responses=STREAMED)  # type: ignore[arg-type]
async def generate(body: OllamaGenerateRequest, request: Request, serving: ServingOf) -> Response:
    model = serving.model(body.model)
    if body.raw:
        prompt = body.prompt
    else:
        messages = [
            *([{"role": "system", "content": body.system}] if body.system else []),
            {"role": "user", "content": body.prompt},
        ]
        prompt = await asyncio.to_thread(serving.template, model, messages)
    return await _answer(
        request, serving, model, prompt, body.options, body.stream, OllamaGenerateAnswer,
        lambda text: {"response": text},
    )  # fmt: skip


async def _answer(
    request: Request,
    serving: Serving,
    model: ServedModel,
    prompt: str,
    options: OllamaOptions,
    stream: bool,
    answer: type[OllamaChatAnswer] | type[OllamaGenerateAnswer],
    wrap: Callable[[str], dict[str, Any]],
) -> Any:
    fields = SamplingFields(
        temperature=options.temperature,
        top_p=options.top_p,
        top_k=options.top_k,
        seed=options.seed,
        stop=options.stop,
        repetition_penalty=options.repeat_penalty,
    )
    model_id = model.model_id
    head, events = await serving.start(model, prompt, fields, options.max_tokens, request.url.path)

    def line(payload: dict[str, Any]) -> dict[str, Any]:
        return {"model": model_id, "created_at": datetime.now(UTC).isoformat(), **payload}

    def final(finish: Finish, text: str = "") -> dict[str, Any]:
        return line(
            {
                **wrap(text),
                "done": True,
                "done_reason": finish.reason,
                "total_duration": int(finish.total_s * NS),
                "load_duration": 0,
                "prompt_eval_count": finish.prompt_tokens,
                "prompt_eval_duration": int(finish.ttft_s * NS),
                "eval_count": finish.completion_tokens,
                "eval_duration": int(max(finish.total_s - finish.queued_s - finish.ttft_s, 0) * NS),
            }
        )

    if not stream:
        text, finish = await streams.collect(head, events, request)
        return answer.model_validate(final(finish, text))

    async def lines() -> AsyncIterator[dict[str, Any]]:
        async for event in streams.chain(head, events):
            yield line({**wrap(event.text), "done": False}) if isinstance(event, Piece) else final(event)

    return streams.ndjson(lines())
