"""How well answers do a task: exact match on the key fact, and ROUGE-L against the reference answer,
each with a bootstrap 95 % interval.

    exact match  the item's `key` (the fact a right answer must state), normalised (lower case, no
                 punctuation, single spaces), is found in the normalised answer: 1 or 0
    ROUGE-L      F1 of the longest common subsequence of words (rouge-score, not `evaluate.load`,
                 which reaches for a hub)
    interval     the 2.5th and 97.5th percentiles of the mean over `resamples` resamples of the items
                 with replacement (seeded): how far the figure could move on another draw of questions

`answers(model, conversations)` has a model answer each test conversation's question, greedy: a variant
folder (an exported ONNX/OpenVINO/QNN variant) through the runtime that serves it, or a Hugging Face
folder through transformers (what a user would run without us); `score_model` scores what it answered.
"""

import random
import re
import string
from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import BaseModel

from slmops.build.chat_data import Conversation, Prompt

_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


class Figure(BaseModel):
    mean: float
    low: float
    high: float
    """The bootstrap 95 % interval of the mean."""


class TaskScore(BaseModel):
    items: int
    exact_match: Figure
    rouge_l: Figure


def normalise(text: str) -> str:
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


def exact_match(answer: str, key: str) -> float:
    return 1.0 if normalise(key) in normalise(answer) else 0.0


def score(
    answers: Sequence[str], references: Sequence[str], keys: Sequence[str], resamples: int = 1000, seed: int = 0
) -> TaskScore:
    """The task score of `answers` against the reference answers and key facts, item by item."""
    if not (len(answers) == len(references) == len(keys)) or not answers:
        raise ValueError(f"{len(answers)} answers, {len(references)} references and {len(keys)} keys: need as many")
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    matches = [exact_match(a, k) for a, k in zip(answers, keys, strict=True)]
    rouge = [scorer.score(r, a)["rougeL"].fmeasure for a, r in zip(answers, references, strict=True)]
    return TaskScore(
        items=len(answers), exact_match=bootstrap(matches, resamples, seed), rouge_l=bootstrap(rouge, resamples, seed)
    )


def bootstrap(values: Sequence[float], resamples: int = 1000, seed: int = 0) -> Figure:
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    return Figure(
        mean=sum(values) / n, low=means[int(0.025 * (resamples - 1))], high=means[int(0.975 * (resamples - 1))]
    )


def answers(
    model: Path,
    conversations: Sequence[Conversation],
    max_new_tokens: int = 128,
    batch_size: int = 8,
    on_answer: Callable[[int], None] | None = None,
    adapter: str | None = None,
) -> list[str]:
    """Greedy answers to each conversation's turns before its last (the reference answer); `adapter`: one
    of a variant's LoRA adapters (build/adapters.py), active for every answer."""
    questions = [Prompt(id=str(i), messages=c.messages[:-1]) for i, c in enumerate(conversations)]
    if (model / "genai_config.json").is_file() or (model / "openvino_model.xml").is_file():
        return _variant_answers(model, questions, max_new_tokens, on_answer, adapter)
    if adapter is not None:
        raise ValueError(f"{model} is a Hugging Face folder: an adapter is picked on an exported variant")
    return _transformers_answers(model, questions, max_new_tokens, batch_size, on_answer)


class ScoredModel(BaseModel):
    model: str
    score: TaskScore
    answers: list[str]


def score_model(
    model: Path,
    conversations: Sequence[Conversation],
    max_new_tokens: int = 128,
    on_answer: Callable[[int], None] | None = None,
    adapter: str | None = None,
) -> ScoredModel:
    """`model`'s answers to the conversations (with `adapter` active), scored against their last turns and
    their `key` fields."""
    missing = [i for i, c in enumerate(conversations) if not (c.model_extra or {}).get("key")]
    if missing:
        raise ValueError(f"conversation(s) {missing[:5]} have no `key` (the fact a right answer states)")
    said = answers(model, conversations, max_new_tokens, on_answer=on_answer, adapter=adapter)
    references = [c.messages[-1].content for c in conversations]
    keys = [str((c.model_extra or {})["key"]) for c in conversations]
    return ScoredModel(model=str(model), score=score(said, references, keys), answers=said)


def _variant_answers(
    variant: Path,
    questions: list[Prompt],
    max_new_tokens: int,
    on_answer: Callable[[int], None] | None,
    adapter: str | None,
) -> list[str]:
    from slmops.agent.serve.runtime import LoadedVariant

    loaded = LoadedVariant.load(variant)
    said = []
    for index, question in enumerate(questions):
        prompt = loaded.chat_prompt([t.model_dump() for t in question.messages])
        tokens = loaded.generate(loaded.encode(prompt), max_new_tokens, adapter=adapter)
        said.append("".join(loaded.stream_text(tokens)).strip())
        if on_answer is not None:
            on_answer(index + 1)
    return said


def _transformers_answers(
    model: Path, questions: list[Prompt], max_new_tokens: int, batch_size: int, on_answer: Callable[[int], None] | None
) -> list[str]:
    from slmops.build import models
    from slmops.build.teacher import GenerateSettings, answer_batch

    models.quiet_transformers()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model, padding_side="left")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    network = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    settings = GenerateSettings(max_new_tokens=max_new_tokens, batch_size=batch_size, keep_truncated=True)
    said: dict[str, str] = {}
    for start in range(0, len(questions), batch_size):
        kept, _dropped = answer_batch(network, tokenizer, questions[start : start + batch_size], settings)
        said.update({item["id"]: item["messages"][-1]["content"] for item in kept})  # an empty answer stays ""
        if on_answer is not None:
            on_answer(min(start + batch_size, len(questions)))
    return [said.get(q.id, "") for q in questions]
