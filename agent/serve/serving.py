"""Turns validated API requests into engine jobs and their events into text.

    request ─► prompt (chat template) ─► tokens ─► context check (400 naming the limit)
            ─► Job (KV cache sized for prompt + max_tokens) ─► engine ─► pieces ─► stop sequences
            ─► Piece… then Finish(reason, usage, timings); metrics observed once per request

A client that goes away cancels its job: the generator is closed, the engine drops it.
"""

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from slmops.errors import HttpError

from ..config import AgentConfig
from .engine import Engine, Job, QueueFull, ServedModel
from .metrics import AgentMetrics
from .protocol import ChatMessage, SamplingFields
from .runtime import Sampling


@dataclass
class Piece:
    text: str


@dataclass
class Finish:
    reason: str
    """OpenAI's finish_reason: stop | length (cancelled requests never reach a client)."""
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float
    total_s: float
    queued_s: float
    cached_prompt_tokens: int = 0
    """Leading prompt tokens whose KV came from the prefix cache."""


class Serving:
    def __init__(self, engine: Engine, config: AgentConfig, metrics: AgentMetrics) -> None:
        self.engine = engine
        self.config = config
        self.metrics = metrics

    def model(self, requested: str) -> ServedModel:
        """The served model a request names: `bundle`, `bundle:version` or `default` (or nothing) for the
        base; `bundle:adapter` or `bundle:version:adapter` for one of its LoRA adapters."""
        model = self.engine.current
        if model is None:
            raise HttpError(503, "the model is still loading", "service_unavailable", "model_loading")
        if not requested or requested in (model.model_id, model.bundle, "default"):
            return model
        for prefix in (f"{model.model_id}:", f"{model.bundle}:"):
            adapter = requested.removeprefix(prefix)
            if adapter != requested and adapter in model.variant.adapters:
                return model.with_adapter(adapter)
        served = ", ".join(repr(choice.model_id) for choice in model.choices())
        raise HttpError(
            404,
            f"model {requested!r} is not served here; this agent serves {served}",
            "invalid_request_error",
            "model_not_found",
            "model",
        )

    def chat_prompt(self, model: ServedModel, messages: list[ChatMessage]) -> str:
        roles = {"developer": "system"}
        return self.template(model, [{"role": roles.get(m.role, m.role), "content": m.text()} for m in messages])

    def template(self, model: ServedModel, messages: list[dict[str, str]]) -> str:
        """Messages through the model's chat template; text that is not valid Unicode is a 400."""
        for message in messages:
            _check_unicode(message["content"], "messages")
        return model.variant.chat_prompt(messages)

    async def start(
        self, model: ServedModel, prompt: str, fields: SamplingFields, requested_max: int | None, path: str
    ) -> tuple[Piece | Finish, AsyncIterator[Piece | Finish]]:
        """Generate, and wait for the first event: a request refused before its first token still
        gets its status code. From then on it is a 200, counted as one for `path`."""
        events = self.generate(model, prompt, fields, requested_max)
        head = await events.__anext__()
        self.metrics.requests.labels(path, "200").inc()
        return head, events

    async def generate(
        self,
        model: ServedModel,
        prompt: str,
        fields: SamplingFields,
        requested_max: int | None,
    ) -> AsyncIterator[Piece | Finish]:
        _check_unicode(prompt, "prompt")
        prompt_ids = await asyncio.to_thread(model.variant.encode, prompt)  # a 20 MB prompt took the loop for 2 s
        if not prompt_ids:
            raise HttpError(400, "the prompt is empty", "invalid_request_error", None, "prompt")
        context = model.variant.context_length
        if len(prompt_ids) >= context:
            raise HttpError(
                400,
                f"the prompt has {len(prompt_ids)} tokens; this model's context is {context} tokens",
                "invalid_request_error",
                "context_length_exceeded",
                "messages",
            )
        room = context - len(prompt_ids)
        if requested_max is not None and requested_max > room:
            raise HttpError(
                400,
                f"this model's context is {context} tokens; the prompt has {len(prompt_ids)} and max_tokens "
                f"asks for {requested_max} more",
                "invalid_request_error",
                "context_length_exceeded",
                "max_tokens",
            )
        max_new = min(requested_max or self.config.default_max_tokens, room)
        sampling = Sampling(
            temperature=fields.temperature,
            top_p=fields.top_p,
            top_k=fields.top_k,
            seed=fields.seed,
            ignore_eos=fields.ignore_eos,
            repetition_penalty=fields.repetition_penalty,
        )
        job = Job(prompt_ids, max_new, sampling, asyncio.get_running_loop(), adapter=model.adapter)
        try:
            self.engine.submit(job)
        except QueueFull as e:
            self.metrics.error("queue_full")
            headers = {"Retry-After": str(e.retry_after_s)}
            raise HttpError(429, str(e), "rate_limit_exceeded", "queue_full", headers=headers) from None
        started = time.perf_counter()
        stops = StopMatcher(fields.stop_sequences)
        finish: str | None = None
        error: str | None = None
        try:
            while finish is None and error is None:
                # Take every event already waiting: a client that fell behind gets one piece for
                # several tokens instead of paying HTTP framing per token.
                events = [await job.events.get()]
                while not job.events.empty():
                    events.append(job.events.get_nowait())
                text: list[str] = []
                for kind, value in events:
                    if kind == "text":
                        piece, stopped = stops.feed(value)
                        text.append(piece)
                        if stopped:
                            finish = "stop"
                            break
                    elif kind == "done":
                        text.append(stops.flush())
                        finish = "stop" if value == "stop" else "length"
                        break
                    else:
                        error = value
                        break
                if joined := "".join(text):
                    yield Piece(joined)
            if error is not None:
                raise HttpError(500, f"generation failed: {error}", "server_error")
        finally:
            # Also reached when the client left (GeneratorExit, CancelledError): the engine
            # drops the job at its next turn, and the request is counted as cancelled.
            job.cancelled.set()
            stats = job.stats
            self.metrics.observe(
                "error" if error is not None else "ok" if finish else "cancelled",
                len(prompt_ids),
                stats.new_tokens,
                stats.time_to_first_token_s,
                stats.decode_tokens_per_s,
                time.perf_counter() - started,
                stats.cached_prompt_tokens,
            )
        assert finish is not None
        total = time.perf_counter() - started
        yield Finish(
            finish,
            len(prompt_ids),
            stats.new_tokens,
            stats.time_to_first_token_s,
            total,
            queued_s=max(0.0, total - stats.total_s),
            cached_prompt_tokens=stats.cached_prompt_tokens,
        )


def _check_unicode(text: str, param: str) -> None:
    """JSON can carry a lone surrogate ("\\ud800") that UTF-8, the tokenizer and the template refuse."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise HttpError(
            400, f"{param}: not valid Unicode text ({e.reason})", "invalid_request_error", None, param
        ) from None


class StopMatcher:
    """Cuts the stream at the first stop sequence, holding back text that may begin one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.pending = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        if not self.stops:
            return piece, False
        self.pending += piece
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            text, self.pending = self.pending[: min(hits)], ""
            return text, True
        keep = max((self._partial(s) for s in self.stops), default=0)
        cut = len(self.pending) - keep
        text, self.pending = self.pending[:cut], self.pending[cut:]
        return text, False

    def _partial(self, stop: str) -> int:
        for size in range(min(len(stop) - 1, len(self.pending)), 0, -1):
            if self.pending.endswith(stop[:size]):
                return size
        return 0

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text
