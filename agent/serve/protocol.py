"""Request and response models of the agent's HTTP API: OpenAI's and Ollama's.

Requests accept and ignore fields we do not implement (clients send many), but
validate the ones we use, strictly: `"n": 1.0`, `"include_usage": 0` or `"num_predict": false`
are 400s naming the field, not numbers and flags read into what the client did not write.
Responses follow the OpenAI and Ollama wire formats.
"""

import time
import uuid
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

STRICT_REQUEST = ConfigDict(extra="ignore", strict=True)
"""Every request model's: fields we do not know are ignored, those we know take their own JSON type."""

# --- OpenAI ------------------------------------------------------------------------------


class TextPart(BaseModel):
    model_config = STRICT_REQUEST

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = STRICT_REQUEST

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = STRICT_REQUEST

    include_usage: bool = False


INT32_MAX = 2**31 - 1


class SamplingFields(BaseModel):
    model_config = STRICT_REQUEST

    model: str = ""
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0, le=INT32_MAX)
    """0: no top-k; past the vocabulary it means the whole vocabulary."""
    seed: int | None = Field(default=None, ge=-INT32_MAX - 1, le=INT32_MAX)
    """onnxruntime-genai takes a 32-bit seed."""
    stop: str | list[str] | None = None
    ignore_eos: bool = False
    """vLLM's and llama.cpp's extension: generate exactly max_tokens (benchmarks)."""
    repetition_penalty: float = Field(default=1.0, gt=0, le=2)
    """vLLM's extension; > 1 discourages repeating tokens."""
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1, description="one choice per request")

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str] | None) -> list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop
        if stops is not None and (len(stops) > 4 or any(not s for s in stops)):
            raise ValueError("stop takes up to 4 non-empty sequences")
        return stops

    @property
    def stop_sequences(self) -> list[str]:
        return list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingFields):
    prompt: str | list[str]
    max_tokens: int | None = Field(default=16, ge=1)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list[str]) -> str | list[str]:
        if isinstance(prompt, list) and len(prompt) != 1:
            raise ValueError("one prompt per request")
        return prompt

    @property
    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0
    """Leading prompt tokens served from the prefix cache (an earlier request's KV), not prefilled again."""


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = PromptTokensDetails()


def completion_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "slmops"
    bundle: str
    version: str
    variant: str
    provider: str
    context_length: int
    adapter: str | None = None
    """The LoRA adapter this id selects on the variant; None for the base model."""


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str
    logprobs: None = None


class _Answer(BaseModel):
    id: str
    created: int
    model: str
    usage: Usage


class ChatCompletion(_Answer):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str
    logprobs: None = None


class Completion(_Answer):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


# --- Ollama ------------------------------------------------------------------------------


class OllamaOptions(BaseModel):
    model_config = STRICT_REQUEST

    temperature: float = Field(default=0.8, ge=0, le=2)
    top_p: float = Field(default=0.9, gt=0, le=1)
    top_k: int = Field(default=40, ge=0, le=INT32_MAX)
    seed: int | None = Field(default=None, ge=-INT32_MAX - 1, le=INT32_MAX)
    num_predict: int | None = Field(default=None, ge=-2)
    """Ollama: -1 unlimited, -2 fill the context; here both mean the agent's default_max_tokens."""
    stop: list[str] | None = None
    repeat_penalty: float = Field(default=1.1, gt=0, le=2)

    @property
    def max_tokens(self) -> int | None:
        return self.num_predict if self.num_predict and self.num_predict > 0 else None


class OllamaChatRequest(BaseModel):
    model_config = STRICT_REQUEST

    model: str = ""
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = True
    options: OllamaOptions = OllamaOptions()


class OllamaGenerateRequest(BaseModel):
    model_config = STRICT_REQUEST

    model: str = ""
    prompt: str
    system: str | None = None
    raw: bool = False
    stream: bool = True
    options: OllamaOptions = OllamaOptions()


class OllamaModelDetails(BaseModel):
    format: str
    family: str
    parameter_size: str
    quantization_level: str


class OllamaModel(BaseModel):
    name: str
    model: str
    modified_at: str
    size: int
    digest: str
    details: OllamaModelDetails


class OllamaTags(BaseModel):
    models: list[OllamaModel]


class OllamaVersion(BaseModel):
    version: str


class OllamaMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class OllamaAnswer(BaseModel):
    """The last (or only) line of an Ollama answer: the figures, in nanoseconds."""

    model: str
    created_at: str
    done: Literal[True] = True
    done_reason: str
    total_duration: int
    load_duration: int
    prompt_eval_count: int
    prompt_eval_duration: int
    eval_count: int
    eval_duration: int


class OllamaChatAnswer(OllamaAnswer):
    message: OllamaMessage


class OllamaGenerateAnswer(OllamaAnswer):
    response: str


# --- slmops ------------------------------------------------------------------------------


class Health(BaseModel):
    """What the agent is doing: 200 while it serves a model, 503 (same shape) while it does not."""

    status: Literal["ok", "empty", "loading", "ready", "failed"]
    """ok when a model serves; otherwise the loader's state."""
    state: Literal["empty", "loading", "ready", "failed"]
    message: str
    fallbacks: list[str]
    """Variants tried and passed over on the last load, with why."""
    fleet_link: dict[str, Any] | None
    """The MQTT link's state; null when the agent runs without a fleet."""
    threads: dict[str, dict[str, Any]]
    model: str | None = None
    bundle: str | None = None
    version: str | None = None
    variant: str | None = None
    provider: str | None = None
    queue_depth: int | None = None
    active_requests: int | None = None


class LoadAccepted(BaseModel):
    status: Literal["loading"] = "loading"
    bundle: str


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bundle: Path
    """A bundle folder on this device; it must verify against the agent's trusted keys."""
