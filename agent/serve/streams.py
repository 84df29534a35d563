"""How an answer leaves: collected whole (and abandoned when the client leaves), or streamed as
server-sent events or Ollama's NDJSON, with a failure after the first byte sent as the last event."""

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from slmops.errors import HttpError
from slmops.http import error_body, http_error

from .protocol import PromptTokensDetails, Usage
from .serving import Finish, Piece

log = logging.getLogger(__name__)

Events = AsyncIterator[Piece | Finish]


class ClientGone(Exception):
    """The client left before its non-streaming answer was ready; nobody is there to answer."""


async def chain(head: Piece | Finish, events: Events) -> Events:
    yield head
    if isinstance(head, Piece):
        async for event in events:
            yield event


async def collect(head: Piece | Finish, events: Events, request: Request) -> tuple[str, Finish]:
    """The whole answer of a non-streaming request. A client that leaves meanwhile (its request
    body is read, so the next ASGI message is the disconnect) ends the generation at once:
    Starlette cancels only streaming responses by itself."""

    async def text() -> tuple[str, Finish]:
        parts: list[str] = []
        async for event in chain(head, events):
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


def usage(finish: Finish) -> Usage:
    return Usage(
        prompt_tokens=finish.prompt_tokens,
        completion_tokens=finish.completion_tokens,
        total_tokens=finish.prompt_tokens + finish.completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=finish.cached_prompt_tokens),
    )


def sse(
    head: Piece | Finish,
    events: Events,
    envelope: dict[str, Any],
    body: Callable[[str], dict[str, Any]],
    include_usage: bool,
    opening: dict[str, Any] | None = None,
) -> StreamingResponse:
    """Events as OpenAI's SSE chunks: `envelope` (id, object, created, model) around one choice each,
    `body(text)` making the choice's payload; the finish reason, usage when asked for, `[DONE]`."""

    def chunk(payload: dict[str, Any] | None, finish: str | None = None, **extra: Any) -> str:
        choices = [] if payload is None else [{"index": 0, **payload, "finish_reason": finish, "logprobs": None}]
        return f"data: {json.dumps({**envelope, 'choices': choices, **extra})}\n\n"

    async def chunks() -> AsyncIterator[str]:
        if opening is not None:
            yield chunk(opening)
        async for event in chain(head, events):
            if isinstance(event, Piece):
                yield chunk(body(event.text))
            else:
                yield chunk(body(""), event.reason)
                if include_usage:
                    yield chunk(None, usage=usage(event).model_dump())
        yield "data: [DONE]\n\n"

    return StreamingResponse(guard(chunks()), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def ndjson(lines: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    """Ollama's stream: one JSON object per line."""

    async def text() -> AsyncIterator[str]:
        async for line in lines:
            yield json.dumps(line) + "\n"

    return StreamingResponse(guard(text(), ollama=True), media_type="application/x-ndjson")


async def guard(body: AsyncIterator[str], ollama: bool = False) -> AsyncIterator[str]:
    """Turn a failure after the stream began into a final event, and always close the generation.

    A client that leaves is noticed by Starlette, which cancels this stream; closing `body`
    then closes the generation, which cancels its engine job.
    """
    try:
        async for part in body:
            yield part
    except Exception as e:  # the status line is sent: the error goes as the stream's last event
        answer: HttpError = http_error(e, "agent", "a stream after it began")
        if ollama:
            yield json.dumps({"error": answer.message}) + "\n"
        else:
            yield f"data: {json.dumps(error_body(answer))}\n\n"
            yield "data: [DONE]\n\n"
    finally:
        await body.aclose()  # type: ignore[attr-defined]
