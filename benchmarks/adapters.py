"""What runtime LoRA adapters cost on SmolLM2-135M-Instruct cpu-int4, in one run: the variant built
without adapters, the same variant carrying two adapters with none active (the LoRA branches fed their
empty defaults), and with one active (r 8 on every linear). Decode tokens/s and time to first token of a
greedy 128-token answer, each in a fresh process, --rounds rounds interleaved (median and range); the
size each adapter adds. Prints a table; writes benchmarks/results/adapters.json.

    python benchmarks/adapters.py [--rounds 3] [--new-tokens 128]
"""

import argparse
import statistics
import time
from pathlib import Path

from common import RESULTS, write_report
from inference import in_child

MODEL = "smollm2-135m-instruct"


def decode(variant: str, adapter: str | None, new_tokens: int) -> dict:
    from slmops.agent.serve.runtime import GenaiVariant, Sampling
    from slmops.build.evaluate import BENCH_PROMPT

    loaded = GenaiVariant.open(Path(variant), threads=2)
    prompt = loaded.encode(loaded.chat_prompt([{"role": "user", "content": BENCH_PROMPT}]))
    best: dict = {}
    for _ in range(2):  # the first warms the caches
        generation = loaded.start(prompt, new_tokens, Sampling(ignore_eos=True), adapter)
        while generation.step() is not None:
            pass
        generation.release()
        best = {"decode_tokens_per_s": generation.stats.decode_tokens_per_s,
                "ttft_ms": generation.stats.time_to_first_token_s * 1000}  # fmt: skip
    return best


def random_adapter(source: Path, out: Path, seed: int) -> Path:
    """A LoRA adapter of r 8 on every linear with random A and B: its cost does not depend on what it learned."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    network = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    get_peft_model(network, config).save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    from slmops.build import models
    from slmops.build.export import Recipe, export

    console = Console()
    work = RESULTS / "adapters-work"
    source = models.resolve(MODEL, console=console)
    plain, carrying = work / "plain", work / "with-adapters"
    if not (plain / "build.json").is_file():
        export(Recipe(source=MODEL, targets=["cpu-int4"]), plain, force=True, console=console)
    if not (carrying / "build.json").is_file():
        adapters = {
            name: str(random_adapter(source, work / f"peft-{name}", seed)) for name, seed in (("a", 1), ("b", 2))
        }
        export(Recipe(source=MODEL, targets=["cpu-int4"], adapters=adapters), carrying, force=True, console=console)
    contenders = {
        "built without adapters": (plain / "variants" / "cpu-int4", None),
        "two adapters, none active": (carrying / "variants" / "cpu-int4", None),
        "adapter a active": (carrying / "variants" / "cpu-int4", "a"),
    }
    runs: dict[str, list[dict]] = {name: [] for name in contenders}
    started = time.monotonic()
    for r in range(args.rounds):
        for name, (variant, adapter) in contenders.items():
            console.print(f"round {r + 1}: {name}")
            runs[name].append(in_child(decode, str(variant), adapter, args.new_tokens))

    def spread(values: list[float]) -> dict:
        return {"median": statistics.median(values), "low": min(values), "high": max(values)}

    figures = {
        name: {key: spread([run[key] for run in measured]) for key in ("decode_tokens_per_s", "ttft_ms")}
        for name, measured in runs.items()
    }
    adapter_file = carrying / "variants" / "cpu-int4" / "adapters" / "a.onnx_adapter"
    table = Table(title=f"SmolLM2-135M cpu-int4, {args.new_tokens} tokens, {args.rounds} rounds, median (range)")
    for column in ("variant", "decode tokens/s", "TTFT ms"):
        table.add_column(column, justify="right")
    for name, f in figures.items():
        speed, ttft = f["decode_tokens_per_s"], f["ttft_ms"]
        table.add_row(name, f"{speed['median']:.1f} ({speed['low']:.1f}–{speed['high']:.1f})",
                      f"{ttft['median']:.1f} ({ttft['low']:.1f}–{ttft['high']:.1f})")  # fmt: skip
    console.print(table)
    console.print(f"one adapter (r 8, every linear): {adapter_file.stat().st_size / 2**20:.2f} MiB")
    report = {"new_tokens": args.new_tokens, "rounds": args.rounds, "figures": figures, "runs": runs,
              "adapter_bytes": adapter_file.stat().st_size, "seconds": time.monotonic() - started}  # fmt: skip
    write_report("adapters", report, console)


if __name__ == "__main__":
    main()
