"""The whole fleet path on one host, on the embedded defaults (`make demo` runs it).

controller (SQLite, bundle store, embedded MQTT broker) ◄── slmops bundle push
    │ slmops fleet enrol: the device's own broker credentials  │
    │ desired state (retained)                                │
    ▼                                                         │
agent daemon: fetch its variant, verify, smoke-test, activate ─┘ reports healthy
    ▼
a chat completion through the agent's OpenAI API; the device and its telemetry

python -P examples/fleet_demo.py BUNDLE PUBLIC_KEY [--work out/demo/fleet]
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from openai import OpenAI
from rich.console import Console
from rich.table import Table

from slmops.client import ControllerClient
from slmops.errors import ControllerError

SLMOPS = [sys.executable, "-P", "-m", "slmops"]
console = Console()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, what: str, timeout_s: float = 120):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if result := condition():
                return result
        except ControllerError as e:
            if e.status is not None:
                sys.exit(f"demo failed: {e}")
        if time.monotonic() > deadline:
            sys.exit(f"demo failed: {what}")
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("public_key", type=Path)
    parser.add_argument("--work", type=Path, default=Path("out/demo/fleet"))
    args = parser.parse_args()
    work = args.work.resolve()
    if work.exists():
        import shutil

        shutil.rmtree(work)
    controller_port, broker_port, agent_port = free_port(), free_port(), free_port()
    url = f"http://127.0.0.1:{controller_port}"
    env = {
        **os.environ,
        "SLMOPS_CONTROLLER_DATA_DIR": str(work / "controller"),
        "SLMOPS_CONTROLLER_EMBEDDED_BROKER_BIND": f"127.0.0.1:{broker_port}",
        "SLMOPS_CONTROLLER_URL": url,
    }
    processes: list[subprocess.Popen] = []
    logs = work / "logs"
    logs.mkdir(parents=True)
    try:
        console.rule("controller: SQLite, bundle store, embedded MQTT broker")
        controller_log = (logs / "controller.log").open("w")
        processes.append(
            subprocess.Popen(
                [*SLMOPS, "controller", "serve", "--port", str(controller_port), "-k", str(args.public_key)],
                env=env,
                stdout=controller_log,
                stderr=subprocess.STDOUT,
            )
        )
        with ControllerClient(url) as anonymous:
            wait_for(lambda: anonymous.health().mqtt == "connected", "the controller did not start")
        token = (work / "controller" / "admin.token").read_text().strip()
        env["SLMOPS_TOKEN"] = token
        controller = ControllerClient(url, token)
        console.print(f"controller on {url} (docs: {url}/docs), broker on 127.0.0.1:{broker_port}")

        console.rule("slmops bundle push")
        subprocess.run([*SLMOPS, "bundle", "push", str(args.bundle)], env=env, check=True)
        pushed = controller.bundles()[0]

        console.rule("slmops fleet enrol: the device's own broker credentials")
        enrolment = work / "demo-device.toml"
        subprocess.run([*SLMOPS, "fleet", "enrol", "demo-device", "--out", str(enrolment)], env=env, check=True)

        console.rule("agent daemon (slmops agent run), empty")
        agent_env = {
            **os.environ,
            "SLMOPS_AGENT_CONTROLLER_URL": url,
            "SLMOPS_AGENT_CONTROLLER_TOKEN": token,
            "SLMOPS_AGENT_TRUSTED_KEYS": f'["{args.public_key.resolve()}"]',
            "SLMOPS_AGENT_PORT": str(agent_port),
            "SLMOPS_AGENT_DATA_DIR": str(work / "agent"),
            "SLMOPS_AGENT_TELEMETRY_INTERVAL_S": "1",
        }
        agent_log = (logs / "agent.log").open("w")
        processes.append(
            subprocess.Popen(
                [*SLMOPS, "agent", "run", "--config", str(enrolment)],
                env=agent_env,
                stdout=agent_log,
                stderr=subprocess.STDOUT,
            )
        )
        device = "demo-device"

        def status() -> dict:
            try:
                return controller.device(device).model_dump()
            except ControllerError as e:
                if e.status != 404:  # not there until its birth message
                    raise
                return {}

        wait_for(lambda: status().get("online"), "the agent did not join the fleet")
        console.print("demo-device is online (birth and presence over MQTT)")

        console.rule(f"desired state: {pushed.name} {pushed.version}")
        controller.desire(device, pushed.name, pushed.version)
        seen = None
        deadline = time.monotonic() + 300
        while (reported := status().get("reported") or {}).get("status") not in ("healthy", "failed"):
            step = (reported.get("status"), reported.get("percent"))
            if reported and step != seen:
                seen = step
                percent = f" {reported['percent']:.0f} %" if reported.get("percent") is not None else ""
                console.print(f"  {reported['status']}{percent}")
            if time.monotonic() > deadline:
                sys.exit("demo failed: the desired state was not applied in 300 s")
            time.sleep(0.2)
        if reported["status"] == "failed":
            sys.exit(f"demo failed: the device reports {reported['reason']}")
        console.print(f"  [green]healthy[/]: {reported['variant']} verified, smoke-tested and switched in")

        console.rule("chat through the agent's OpenAI API")
        client = OpenAI(base_url=f"http://127.0.0.1:{agent_port}/v1", api_key="-")
        question = "What is the capital of France?"
        console.print(f"[bold]user:[/] {question}")
        console.print("[bold]assistant:[/] ", end="")
        stream = client.chat.completions.create(
            model="",
            messages=[{"role": "user", "content": question}],
            max_tokens=64,
            temperature=0,
            stream=True,
            extra_body={"repetition_penalty": 1.1},
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                console.print(chunk.choices[0].delta.content, end="", highlight=False, markup=False)
        console.print()

        console.rule("slmops fleet devices")

        def chat_counted() -> bool:
            records = controller.telemetry(device)
            return any(r.kind == "inference" and r.payload["requests"] >= 1 for r in records)

        wait_for(chat_counted, "the chat never showed in the telemetry")
        subprocess.run([*SLMOPS, "fleet", "devices"], env=env, check=True)
        records = controller.telemetry(device, limit=6)
        table = Table(title="telemetry stored by the controller (newest first)")
        for column in ("seq", "kind", "figures"):
            table.add_column(column)
        for r in records:
            figures = {k: v for k, v in r.payload.items() if v is not None and k in KEY_FIGURES}
            table.add_row(str(r.seq), r.kind, ", ".join(f"{k}={_short(v)}" for k, v in figures.items()))
        console.print(table)
        console.print(f"logs in {logs}")
    finally:
        for process in reversed(processes):
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


KEY_FIGURES = (
    "cpu_percent",
    "memory_available_bytes",
    "process_rss_bytes",
    "requests",
    "generated_tokens",
    "ttft_ms_p50",
    "tokens_per_s_p50",
    "variant",
)


def _short(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.1f}"
    if isinstance(value, int) and value > 10**6:
        return f"{value / 2**20:.0f}MiB"
    return str(value)


if __name__ == "__main__":
    main()
