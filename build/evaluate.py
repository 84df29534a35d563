"""Measure a variant on the runtime that serves it, and hold it to gates.

    variant ─► fresh child process (its peak RSS is the variant's, not the pipeline's)
       ├─ perplexity on the held-out text shipped in slmops.build (data/heldout.txt)
       │    (the float source's own perplexity, by transformers on the same text and
       │    windows, is the reference an accuracy gate compares with)
       ├─ decode: greedy, N new tokens forced (EOS ignored), after a warm-up, median of runs
       ├─ time to first token (prompt → first token, median)
       └─ peak RSS, size on disk ─► Evaluation (the manifest's per-variant figures)

Gates (`Gates`) compare the figures with bounds and name each figure that misses.
"""

import json
import re
import resource
import statistics
import subprocess
import sys
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from slmops.agent import hardware
from slmops.agent.serve.runtime import GenerationStats, LoadedVariant
from slmops.errors import BuildError, GateFailed
from slmops.manifest import Evaluation

PERPLEXITY_WINDOW_TOKENS = 512
LOGSOFTMAX_ROWS = 32
BENCH_PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
"""Decode speed is measured after this chat prompt; any prompt works, a fixed one compares."""


def heldout_text() -> str:
    return resources.files("slmops.build").joinpath("data/heldout.txt").read_text(encoding="utf-8")


def evaluate(
    variant: Path, runs: int = 5, new_tokens: int = 128, perplexity: bool = True, speed: bool = True
) -> Evaluation:
    """Evaluate in a fresh process; see the module docstring for what is measured.

    A plain child (`python -m slmops.build.evaluate`) rather than multiprocessing: it works
    from any caller (scripts without a main guard, notebooks, daemons) and starts light.
    """
    request = json.dumps(
        {
            "variant_dir": str(variant),
            "runs": runs,
            "new_tokens": new_tokens,
            "perplexity": perplexity,
            "speed": speed,
        }
    )
    result = subprocess.run(
        [sys.executable, "-P", "-m", "slmops.build.evaluate", request],
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        reply = json.loads(result.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        raise BuildError(
            f"evaluation of {variant} crashed (exit {result.returncode}): {result.stderr.strip()[-2000:]}"
        ) from None
    if "error" in reply:
        raise BuildError(f"evaluation of {variant} failed: {reply['error']}")
    return Evaluation.model_validate(reply)


def _measure(variant_dir: str, runs: int, new_tokens: int, perplexity: bool, speed: bool) -> dict[str, object]:
    """Runs in the child process started by `evaluate`."""
    path = Path(variant_dir)
    variant = LoadedVariant.load(path)
    figures: dict[str, object] = {"new_tokens": new_tokens, "runs": max(runs, 1)}
    if speed:
        prompt = variant.encode(variant.chat_prompt([{"role": "user", "content": BENCH_PROMPT}]))
        samples = []
        for _ in range(runs + 1):  # the first run warms caches and is dropped
            stats = GenerationStats()
            for _token in variant.generate(prompt, new_tokens, stats, ignore_eos=True):
                pass
            samples.append(stats)
        measured = samples[1:]
        figures["decode_tokens_per_s"] = statistics.median(s.decode_tokens_per_s for s in measured)
        figures["time_to_first_token_ms"] = statistics.median(s.time_to_first_token_s for s in measured) * 1000
    # Peak RSS of load + generation, as a server sees it; taken before perplexity's scoring buffers.
    figures["peak_rss_bytes"] = peak_rss_bytes()
    if perplexity:
        ppl, count = _perplexity(variant, heldout_text())
        figures.update(perplexity=ppl, perplexity_tokens=count)
    figures["size_bytes"] = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    figures["measured_on"] = hardware.describe()
    figures["runtime"] = variant.runtime
    return figures


def vm_hwm_bytes(pid: int | str = "self") -> int | None:
    """A process's peak resident memory since it was exec'd (Linux's VmHWM); None where /proc has none."""
    status = Path(f"/proc/{pid}/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


def peak_rss_bytes() -> int:
    """This process's peak resident memory since it started (exec'd). VmHWM, not getrusage's
    ru_maxrss, which carries the forking parent's peak over an exec, so that a child of a big
    process (an export holding torch) would report the parent's."""
    if (peak_bytes := vm_hwm_bytes()) is not None:
        return peak_bytes
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def _perplexity(variant: LoadedVariant, text: str) -> tuple[float, int]:
    window = min(PERPLEXITY_WINDOW_TOKENS, variant.context_length - 1)
    return perplexity(variant.encode(text), variant.token_logits, window)


def reference_perplexity(source: Path) -> tuple[float, int]:
    """The float source checkpoint's perplexity on the held-out text, in float32 with transformers:
    the same tokens and windows as a variant's, so that the two compare (an fp32 variant scores the
    same to 1e-6). Returns the perplexity and the number of scored tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .models import quiet_transformers

    quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    ids = tokenizer(heldout_text(), add_special_tokens=False)["input_ids"]
    window = min(PERPLEXITY_WINDOW_TOKENS, model.config.max_position_embeddings - 1)
    with torch.inference_mode():
        return perplexity(ids, lambda chunk: model(torch.tensor([chunk])).logits[0].numpy(), window)


def perplexity(
    ids: list[int], window_logits: Callable[[list[int]], np.ndarray], window: int = PERPLEXITY_WINDOW_TOKENS
) -> tuple[float, int]:
    """exp(mean next-token NLL) over non-overlapping windows; any engine that gives logits per window.

    Returns the perplexity and the number of scored tokens.
    """
    nll_sum, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start : start + window]
        if len(chunk) < 2:
            break
        logits = window_logits(chunk)
        targets = np.asarray(chunk[1:])
        # Row blocks keep the temporaries small: a full [window, vocab] float64 copy is hundreds of MB.
        for row in range(0, len(targets), LOGSOFTMAX_ROWS):
            block = np.asarray(logits[row : min(row + LOGSOFTMAX_ROWS, len(targets))], dtype=np.float64)
            peak = block.max(axis=-1)
            log_sum = peak + np.log(np.exp(block - peak[:, None]).sum(axis=-1))
            picked = block[np.arange(len(block)), targets[row : row + len(block)]]
            nll_sum += float((log_sum - picked).sum())
        count += len(targets)
    return float(np.exp(nll_sum / count)), count


def parse_fraction(value: str | float) -> float:
    """`15%` or `0.15` → 0.15."""
    if isinstance(value, float | int):
        return float(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(%?)\s*", value)
    if not match:
        raise ValueError(f"{value!r} is not a fraction such as 15% or 0.15")
    number = float(match.group(1))
    return number / 100 if match.group(2) else number


class Gates(BaseModel):
    """Bounds a variant must meet; a bound left out is not checked."""

    model_config = ConfigDict(extra="forbid")

    max_ppl_increase: float | None = Field(default=None, ge=0)
    """Largest perplexity increase over the reference, as a fraction (0.15 = 15 %)."""
    reference_perplexity: float | None = Field(default=None, gt=0)
    """Where None, the evaluation's own reference (the float source's, recorded at export)."""
    min_tokens_per_s: float | None = Field(default=None, gt=0)
    max_ttft_ms: float | None = Field(default=None, gt=0)
    max_peak_rss_mb: float | None = Field(default=None, gt=0)
    max_size_mb: float | None = Field(default=None, gt=0)

    @field_validator("max_ppl_increase", mode="before")
    @classmethod
    def _fraction(cls, value: str | float | None) -> float | None:
        return None if value is None else parse_fraction(value)

    def failures(self, e: Evaluation) -> list[str]:
        """Each figure outside its bound, named with the figure and the bound."""
        failed: list[str] = []
        if self.max_ppl_increase is not None:
            reference = self.reference_perplexity or e.reference_perplexity
            if reference is None or e.perplexity is None:
                failed.append("max-ppl-increase needs a reference perplexity (--reference) and a measured one")
            else:
                increase = e.perplexity / reference - 1
                if increase > self.max_ppl_increase:
                    failed.append(
                        f"perplexity {e.perplexity:.3f} is {increase:.1%} above the reference "
                        f"{reference:.3f}; the bound is {self.max_ppl_increase:.1%}"
                    )
        if self.min_tokens_per_s is not None:
            if e.decode_tokens_per_s is None:
                failed.append("min-tokens-per-s: decode speed was not measured")
            elif e.decode_tokens_per_s < self.min_tokens_per_s:
                failed.append(
                    f"decode speed {e.decode_tokens_per_s:.1f} tokens/s is below the bound {self.min_tokens_per_s:g}"
                )
        if self.max_ttft_ms is not None:
            if e.time_to_first_token_ms is None:
                failed.append("max-ttft-ms: time to first token was not measured")
            elif e.time_to_first_token_ms > self.max_ttft_ms:
                failed.append(
                    f"time to first token {e.time_to_first_token_ms:.1f} ms is above the bound {self.max_ttft_ms:g} ms"
                )
        if self.max_peak_rss_mb is not None and e.peak_rss_bytes / 2**20 > self.max_peak_rss_mb:
            failed.append(
                f"peak RSS {e.peak_rss_bytes / 2**20:.1f} MiB is above the bound {self.max_peak_rss_mb:g} MiB"
            )
        if self.max_size_mb is not None and e.size_bytes / 2**20 > self.max_size_mb:
            failed.append(f"size {e.size_bytes / 2**20:.1f} MiB is above the bound {self.max_size_mb:g} MiB")
        return failed

    def check(self, e: Evaluation, variant: str) -> None:
        failed = self.failures(e)
        if failed:
            raise GateFailed(f"{variant} fails {len(failed)} gate(s):\n  - " + "\n  - ".join(failed))


def save(evaluation: Evaluation, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(evaluation.model_dump(mode="json"), indent=2) + "\n")


if __name__ == "__main__":
    # The child side of evaluate(): one JSON request in argv, one JSON line out.
    try:
        print(json.dumps(_measure(**json.loads(sys.argv[1]))))
    except Exception as e:  # reported to the parent, which raises it as a BuildError
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
        sys.exit(1)
