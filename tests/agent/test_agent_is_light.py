"""The agent must run where torch, transformers, peft and Olive are not installed."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from support import free_port

BLOCKER = """
import importlib.abc, sys
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in {'torch', 'transformers', 'peft', 'olive', 'accelerate'}:
            raise ImportError(f'{name} is not installed on this device')
sys.meta_path.insert(0, Refuse())
"""


def slmops_without_ml_frameworks(*argv: str) -> list[str]:
    script = BLOCKER + f"sys.argv = {['slmops', *argv]!r}\nfrom slmops.cli import main\nmain()\n"
    return [sys.executable, "-c", script]


def test_agent_chats_without_ml_frameworks(session_bundle: Path, signing_key) -> None:
    command = slmops_without_ml_frameworks(
        "agent", "chat", str(session_bundle), "Hello", "-k", str(signing_key[1]), "--max-tokens", "3"
    )
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "tokens/s" in result.stderr


def test_agent_modules_import_without_ml_frameworks() -> None:
    modules = [
        *("host", "telemetry", "hardware", "choice", "config", "daemon", "cli"),
        *("serve.api", "serve.engine", "serve.serving", "serve.runtime", "serve.metrics", "serve.protocol"),
        *("serve.openvino_runtime", "serve.qnn_runtime", "serve.prefix_cache"),
        *("fleet.uplink", "fleet.sync", "fleet.slots", "fleet.transfer"),
    ]
    imports = "\n".join(f"import slmops.agent.{m}" for m in modules)
    script = BLOCKER + f"import slmops.cli\n{imports}\nprint('ok')"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert result.stdout.strip() == "ok", result.stderr


def test_serve_runs_as_its_own_process_without_ml_frameworks(session_bundle: Path, signing_key, tmp_path: Path) -> None:
    from openai import OpenAI

    port = free_port()
    command = slmops_without_ml_frameworks(
        "agent", "serve", str(session_bundle), "-k", str(signing_key[1]), "--port", str(port)
    )
    env = {**os.environ, "SLMOPS_AGENT_DATA_DIR": str(tmp_path / "agent"), "SLMOPS_AGENT_TELEMETRY_INTERVAL_S": "0.2"}
    agent = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            deadline = time.monotonic() + 60
            while True:
                assert agent.poll() is None, agent.stdout.read() if agent.stdout else ""
                assert time.monotonic() < deadline, "the agent did not become ready"
                try:
                    if http.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
            with OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0) as client:
                reply = client.chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4
                )
            assert reply.usage.completion_tokens >= 1
            time.sleep(0.5)  # a couple of telemetry intervals
    finally:
        agent.send_signal(signal.SIGTERM)
        output, _ = agent.communicate(timeout=20)
    # uvicorn shuts down gracefully, then re-raises SIGTERM so supervisors see why it stopped
    assert agent.returncode in (0, -signal.SIGTERM), output
    assert "serving tiny:1.0.0 (cpu)" in output and "stopped: requests drained" in output
    shown = subprocess.run(
        slmops_without_ml_frameworks("agent", "telemetry", "--json"),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    kinds = [r["kind"] for r in json.loads(shown.stdout)["records"]]
    assert "system" in kinds and "inference" in kinds
