"""Distillation, stage 1: the teacher answers every prompt, and its answers become the student's data.

    prompts.jsonl (build/chat_data.read_prompts: conversations ending with the user's turn)
        ─► the same conversation twice is answered once (the second counted as a duplicate)
        ─► batches, left-padded, through transformers' generate: greedy, or sampled at a temperature
           (and top-p), seeded; with --top-k-logprobs K, each answer token's K most likely tokens and
           their log-probabilities under the teacher (its raw distribution, before temperature)
        ─► an empty answer, or one cut by max_new_tokens before the teacher ended it, is filtered
           (kept with --keep-truncated) and counted
    OUT/answers.jsonl   chat JSONL (the prompt's turns + the teacher's answer, its id; with top-k:
                        `answer_ids`, the tokens it generated, and `top_logprobs`, per such token
                        [[token id, log-probability], ...])
    OUT/filtered.jsonl  what was filtered and why
    OUT/generate.json   provenance: the teacher and its digest, the settings, the counts

Resumable: every answer is appended and flushed as its batch ends; a run started again on the same OUT
skips the prompts already in either file (a line torn by the interruption is dropped first).
"""

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from slmops.build.chat_data import Prompt, file_digest, read_prompts
from slmops.errors import BuildError

ANSWERS, FILTERED, PROVENANCE = "answers.jsonl", "filtered.jsonl", "generate.json"

OnBatch = Callable[[int, int], None]
"""Called after each batch with (prompts done, prompts in all)."""


class GenerateSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(default=0.0, ge=0, le=5)
    """0: greedy."""
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_new_tokens: int = Field(default=256, ge=1, le=8192)
    batch_size: int = Field(default=8, ge=1, le=1024)
    top_k_logprobs: int = Field(default=0, ge=0, le=100)
    keep_truncated: bool = False
    seed: int = 0


def generate(
    teacher: str, prompts_file: Path, out: Path, settings: GenerateSettings, on_batch: OnBatch | None = None
) -> dict[str, Any]:
    """Answer the prompts not answered yet in OUT; returns the provenance record (also in generate.json)."""
    prompts = read_prompts(prompts_file)
    out.mkdir(parents=True, exist_ok=True)
    answers_path, filtered_path = out / ANSWERS, out / FILTERED
    settings_path = out / PROVENANCE
    if settings_path.is_file():
        before = json.loads(settings_path.read_text())
        if before.get("settings") != settings.model_dump(mode="json"):
            raise BuildError(f"{out} holds answers made with other settings: answer into another folder")
    done = _done(answers_path) | _done(filtered_path)

    counts: Counter[str] = Counter()
    seen: set[str] = set()
    todo: list[Prompt] = []
    for prompt in prompts:
        shape = json.dumps([turn.model_dump() for turn in prompt.messages], sort_keys=True)
        if prompt.id in done:
            seen.add(shape)
            continue
        if shape in seen:
            counts["duplicate"] += 1
            _append(filtered_path, [{"id": prompt.id, "why": "duplicate"}])
            continue
        seen.add(shape)
        todo.append(prompt)

    from slmops.build import models

    models.quiet_transformers()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = models.resolve(teacher)
    tokenizer = AutoTokenizer.from_pretrained(source, padding_side="left")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    torch.manual_seed(settings.seed)
    record = {
        "teacher": {"model": teacher, "path": str(source), "digest": models.weights_digest(source)},
        "prompts": {"path": str(prompts_file), "sha256": file_digest(prompts_file), "count": len(prompts)},
        "settings": settings.model_dump(mode="json"),
    }
    settings_path.write_text(json.dumps(record, indent=2) + "\n")

    finished = len(prompts) - len(todo)
    for start in range(0, len(todo), settings.batch_size):
        batch = todo[start : start + settings.batch_size]
        kept, dropped = answer_batch(model, tokenizer, batch, settings)
        _append(answers_path, kept)
        _append(filtered_path, dropped)
        finished += len(batch)
        if on_batch is not None:
            on_batch(finished, len(prompts))

    totals = Counter(row["why"] for row in _rows(filtered_path))
    record["counts"] = {"prompts": len(prompts), "kept": len(_rows(answers_path)), **dict(sorted(totals.items()))}
    settings_path.write_text(json.dumps(record, indent=2) + "\n")
    return record


def answer_batch(
    model: Any, tokenizer: Any, batch: list[Prompt], settings: GenerateSettings
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    import torch

    texts = [
        tokenizer.apply_chat_template([t.model_dump() for t in p.messages], tokenize=False, add_generation_prompt=True)
        for p in batch
    ]
    inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    sampled = settings.temperature > 0
    with torch.no_grad():
        output = model.generate(
            **inputs,
            max_new_tokens=settings.max_new_tokens,
            do_sample=sampled,
            temperature=settings.temperature if sampled else None,
            top_p=settings.top_p if sampled else None,
            top_k=None,
            pad_token_id=tokenizer.pad_token_id,
            return_dict_in_generate=True,
            output_logits=settings.top_k_logprobs > 0,
        )
    new = output.sequences[:, inputs["input_ids"].shape[1] :]
    stops = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")} - {tokenizer.unk_token_id, None}
    kept, dropped = [], []
    for row, prompt in enumerate(batch):
        tokens = new[row].tolist()
        end = next((i for i, token in enumerate(tokens) if token in stops), None)
        answer = tokenizer.decode(tokens[:end], skip_special_tokens=True).strip()
        if not answer:
            dropped.append({"id": prompt.id, "why": "empty"})
            continue
        if end is None and not settings.keep_truncated:
            dropped.append({"id": prompt.id, "why": "truncated", "answer": answer})
            continue
        item: dict[str, Any] = {
            **prompt.model_dump(exclude={"messages"}),
            "messages": [*(t.model_dump() for t in prompt.messages), {"role": "assistant", "content": answer}],
        }
        if settings.top_k_logprobs:
            length = len(tokens) if end is None else end + 1  # the end-of-turn token is learned too
            item["answer_ids"] = tokens[:length]  # the positions the log-probabilities belong to
            item["top_logprobs"] = _top_logprobs(output.logits, row, length, settings.top_k_logprobs)
        kept.append(item)
    return kept, dropped


def _top_logprobs(logits: tuple[Any, ...], row: int, length: int, k: int) -> list[list[list[float]]]:
    import torch

    steps = []
    for step in logits[:length]:
        values, ids = torch.log_softmax(step[row].float(), dim=-1).topk(k)
        steps.append([[int(i), round(float(v), 5)] for i, v in zip(ids, values, strict=True)])
    return steps


def _done(path: Path) -> set[str]:
    return {str(row["id"]) for row in _rows(path)}


def _rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSONL file this module writes; a last line torn by an interruption is cut off."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        path.write_bytes(data)
    return [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]


def _append(path: Path, rows: list[dict[str, Any]]) -> None:
    if rows:
        with path.open("a", encoding="utf-8") as f:
            f.write("".join(json.dumps(row) + "\n" for row in rows))
            f.flush()
