"""How well answers do a task: exact match on the key fact, and ROUGE-L against the reference answer,
each with a bootstrap 95 % interval.

    exact match  the item's `key` (the fact a right answer must state), normalised (lower case, no
                 punctuation, single spaces), is found in the normalised answer: 1 or 0
    ROUGE-L      F1 of the longest common subsequence of words (rouge-score, not `evaluate.load`,
                 which reaches for a hub)
    interval     the 2.5th and 97.5th percentiles of the mean over `resamples` resamples of the items
                 with replacement (seeded): how far the figure could move on another draw of questions
"""

import random
import re
import string
from collections.abc import Sequence

from pydantic import BaseModel

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
