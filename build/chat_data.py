"""Chat data for training: JSONL conversations, checked, and tokenized so that only answers are learned.

    chat.jsonl: one conversation a line, {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}
        ─► read_chat: every bad line named at once (its number and why), or ChatDataError
        ─► tokenize(tokenizer, conversation): the model's own chat template renders it; the labels are the
           tokens of each assistant turn (its text and the template's end-of-turn mark, so the model learns
           to stop) and -100 everywhere else (system, user, the template's scaffolding)

A template renders a conversation cut before an answer as a prefix of the whole (ChatML, Llama 3, SmolLM2
do); that prefix is where the answer starts. A template that does not is refused, naming the turn.
"""

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from slmops.errors import BuildError

IGNORE = -100
"""The label of a token that is not learned (torch's cross-entropy ignore index)."""


class ChatDataError(BuildError):
    pass


class Turn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str = Field(min_length=1)


class Conversation(BaseModel):
    model_config = ConfigDict(extra="allow")  # provenance fields (source, id, teacher...) ride along

    messages: list[Turn] = Field(min_length=2)


def read_chat(path: Path) -> list[Conversation]:
    """The conversations of a chat JSONL file. Every line that is not one (bad JSON, a field missing, no
    assistant turn) is reported together with its line number."""

    def learnable(_number: int, conversation: Conversation) -> tuple[Conversation | None, str]:
        if not any(turn.role == "assistant" for turn in conversation.messages):
            return None, "no assistant turn: nothing to learn"
        return conversation, ""

    conversations = _read_jsonl(path, Conversation, learnable)
    if not conversations:
        raise ChatDataError(f"{path}: no conversations")
    return conversations


class Prompt(BaseModel):
    """A conversation for a model to answer: it ends with the user's turn. `id` names it in the output
    (default: its line number)."""

    model_config = ConfigDict(extra="allow")

    id: str = ""
    messages: list[Turn] = Field(min_length=1)


def read_prompts(path: Path) -> list[Prompt]:
    """The prompts of a JSONL file, every bad line named at once (as read_chat)."""

    def answerable(number: int, prompt: Prompt) -> tuple[Prompt | None, str]:
        if prompt.messages[-1].role != "user":
            return None, f"the last turn is the {prompt.messages[-1].role}'s: nothing to answer"
        return (prompt if prompt.id else prompt.model_copy(update={"id": str(number)})), ""

    prompts = _read_jsonl(path, Prompt, answerable)
    ids = [p.id for p in prompts]
    if len(set(ids)) != len(ids):
        twice = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise ChatDataError(f"{path}: ids used more than once: {', '.join(twice)}")
    if not prompts:
        raise ChatDataError(f"{path}: no prompts")
    return prompts


M = TypeVar("M", bound=BaseModel)


def _read_jsonl(path: Path, model: type[M], check: Callable[[int, M], tuple[M | None, str]]) -> list[M]:
    """Each line of `path` as `model`, passed through `check` (the item kept, or why not); every bad line is
    named with its number in one ChatDataError."""
    items: list[M] = []
    problems: list[str] = []
    for number, line in _lines(path):
        try:
            item, why = check(number, model.model_validate(json.loads(line)))
        except json.JSONDecodeError as e:
            problems.append(f"line {number}: not JSON ({e.msg})")
            continue
        except ValidationError as e:
            problems.append(f"line {number}: {_why(e)}")
            continue
        if item is None:
            problems.append(f"line {number}: {why}")
        else:
            items.append(item)
    _refuse(path, problems)
    return items


def _lines(path: Path) -> list[tuple[int, str]]:
    if not path.is_file():
        raise ChatDataError(f"{path}: no such file")
    with path.open(encoding="utf-8") as lines:
        return [(number, line) for number, line in enumerate(lines, start=1) if line.strip()]


def _why(error: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in error.errors())


def _refuse(path: Path, problems: list[str]) -> None:
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise ChatDataError(f"{path}: {len(problems)} bad line(s):\n  {shown}")


def file_digest(path: Path) -> str:
    """sha256 of a data file, for provenance."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]

    def as_features(self) -> dict[str, list[int]]:
        return {"input_ids": self.input_ids, "attention_mask": [1] * len(self.input_ids), "labels": self.labels}


def tokenize(tokenizer: Any, conversation: Conversation, max_length: int) -> Example:
    """Token ids of the whole conversation and its labels: the assistant turns' tokens, IGNORE elsewhere.
    Cut to `max_length` tokens (an answer cut short still teaches its beginning)."""
    messages = [turn.model_dump() for turn in conversation.messages]
    text = _render(tokenizer, messages, generation_prompt=False)
    spans = _answer_spans(tokenizer, messages, text)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = encoded["input_ids"]
    labels = [
        token if any(start <= begin < end for start, end in spans) else IGNORE
        for token, (begin, _) in zip(ids, encoded["offset_mapping"], strict=True)
    ]
    return Example(ids[:max_length], labels[:max_length])


def _render(tokenizer: Any, messages: Sequence[dict[str, str]], generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ChatDataError("the model's tokenizer has no chat template: chat data cannot be rendered for it")
    return str(tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt))


def _answer_spans(tokenizer: Any, messages: list[dict[str, str]], text: str) -> list[tuple[int, int]]:
    """Character spans of `text` (the whole conversation rendered) that are assistant turns: from where
    the conversation cut before the turn (with the generation prompt) ends, to where it ends with the turn."""
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:index], generation_prompt=True)
        through = _render(tokenizer, messages[: index + 1], generation_prompt=False)
        if not (text.startswith(before) and text.startswith(through) and through.startswith(before)):
            raise ChatDataError(
                f"the chat template renders the conversation cut at turn {index + 1} differently from the whole: "
                "its answers cannot be told from the rest"
            )
        spans.append((len(before), len(through)))
    return spans
