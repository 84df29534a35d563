"""Should the agent batch? onnxruntime-genai's request engine vs the agent's interleaving.

onnxruntime-genai 0.18 ships `og.Engine`, which schedules many requests into batched
forward passes. The agent's engine instead steps one single-sequence generator per
request in turn. Both run here on SmolLM2-135M-Instruct cpu-int4 with the same intra-op
threads, for N requests of NEW_TOKENS forced tokens submitted together:

    aggregate tokens/s   all generated tokens / wall time until the last request ends
    first token ms       submission → the first token of any request

Prints a table; writes benchmarks/results/batching.json.

    python benchmarks/batching.py [--requests 1,2,4,8] [--new-tokens 128]
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_report


def og_engine(
    variant: Path, threads: int, prompt_ids: list[int], requests: int, new_tokens: int
) -> tuple[float, float]:
    import numpy as np
    import onnxruntime_genai as og

    config = og.Config(str(variant))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    engine = og.Engine(og.Model(config))
    buffer = engine.create_event_buffer(256)
    ids = np.array(prompt_ids, dtype=np.int32)
    started = time.perf_counter()
    handles = []
    for _ in range(requests):
        request = engine.create_request()
        options = og.TurnOptions(request)
        options.set_max_generated_tokens(new_tokens)
        options.set_min_generated_tokens(new_tokens)
        options.set_do_sample(False)
        request.begin_turn(ids, options)
        handles.append(request)
    tokens, finished, first = 0, 0, 0.0
    while finished < requests:
        for event in engine.run(buffer) or []:
            flags = int(event.flags.value if hasattr(event.flags, "value") else event.flags)
            if flags & og.EngineEventFlags.TOKEN.value:
                tokens += 1
                first = first or time.perf_counter() - started
            if flags & og.EngineEventFlags.TURN_FINISHED.value:
                finished += 1
    wall = time.perf_counter() - started
    for request in handles:
        request.close()
    return tokens / wall, first


def interleaved(
    variant: Path, threads: int, prompt_ids: list[int], requests: int, new_tokens: int
) -> tuple[float, float]:
    from slmops.agent.serve.runtime import LoadedVariant, Sampling

    loaded = LoadedVariant.load(variant, threads)
    started = time.perf_counter()
    active = [loaded.start(prompt_ids, new_tokens, Sampling(ignore_eos=True)) for _ in range(requests)]
    tokens, first = 0, 0.0
    while active:
        for generation in list(active):
            if generation.step() is None:
                active.remove(generation)
            else:
                tokens += 1
                first = first or time.perf_counter() - started
    return tokens / (time.perf_counter() - started), first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", default="1,2,4,8")
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()
    levels = [int(n) for n in args.requests.split(",")]

    from rich.console import Console
    from rich.table import Table

    from slmops.agent import hardware
    from slmops.agent.serve.runtime import LoadedVariant
    from slmops.build.evaluate import BENCH_PROMPT

    variant = RESULTS / "export" / "variants" / "cpu-int4"
    if not (variant / "genai_config.json").is_file():
        sys.exit(f"no {variant}: run benchmarks/inference.py or serving.py first (they export it)")
    threads = hardware.inference_threads()
    probe = LoadedVariant.load(variant, threads)
    prompt_ids = probe.encode(probe.chat_prompt([{"role": "user", "content": BENCH_PROMPT}]))
    del probe

    console = Console()
    rows = []
    for n in levels:
        with console.status(f"{n} requests"):
            interleaved(variant, threads, prompt_ids, 1, 8)  # warm-up
            ours = interleaved(variant, threads, prompt_ids, n, args.new_tokens)
            og_engine(variant, threads, prompt_ids, 1, 8)
            batched = og_engine(variant, threads, prompt_ids, n, args.new_tokens)
        rows.append({"requests": n, "interleaved": ours, "og_engine": batched})

    table = Table(title=f"{args.new_tokens} forced tokens per request, {threads} threads, {hardware.describe()}")
    for column in ("requests", "interleaved tok/s", "first ms", "og.Engine tok/s", "first ms ", "og.Engine / ours"):
        table.add_column(column, justify="right")
    for r in rows:
        (ours_speed, ours_first), (og_speed, og_first) = r["interleaved"], r["og_engine"]
        table.add_row(
            str(r["requests"]),
            f"{ours_speed:.1f}",
            f"{ours_first * 1000:.0f}",
            f"{og_speed:.1f}",
            f"{og_first * 1000:.0f}",
            f"{og_speed / ours_speed:.2f}",
        )
    console.print(table)
    report = {
        "machine": hardware.describe(),
        "threads": threads,
        "new_tokens": args.new_tokens,
        "rows": [
            {
                "requests": r["requests"],
                "interleaved_tokens_per_s": r["interleaved"][0],
                "interleaved_first_token_s": r["interleaved"][1],
                "og_engine_tokens_per_s": r["og_engine"][0],
                "og_engine_first_token_s": r["og_engine"][1],
            }
            for r in rows
        ],
    }
    write_report("batching", report, console)


if __name__ == "__main__":
    main()
