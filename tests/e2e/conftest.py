"""Helpers for tests that run slmops as real processes."""

import functools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

SLMOPS = [sys.executable, "-P", "-m", "slmops"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_controller(tmp_path: Path, *args: str) -> Iterator[tuple[str, dict[str, str]]]:
    """`slmops controller serve` in its own process; yields its URL and an environment with its admin token."""
    port = free_port()
    data = tmp_path / "controller"
    env = {
        **os.environ,
        "SLMOPS_CONTROLLER_DATA_DIR": str(data),
        "SLMOPS_CONTROLLER_EMBEDDED_BROKER_BIND": f"127.0.0.1:{free_port()}",
    }
    controller = subprocess.Popen(
        [*SLMOPS, "controller", "serve", "--port", str(port), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert controller.poll() is None, controller.stdout.read() if controller.stdout else ""
            assert time.monotonic() < deadline, "the controller did not start"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        token = (data / "admin.token").read_text().strip()  # written on first start: no tokens configured
        yield url, {**env, "SLMOPS_TOKEN": token, "SLMOPS_CONTROLLER_URL": url}
    finally:
        controller.terminate()
        controller.communicate(timeout=20)


@pytest.fixture
def controller_process(tmp_path: Path):
    """controller_process(*serve_args) → a context manager running `slmops controller serve`."""
    return functools.partial(running_controller, tmp_path)


@dataclass
class AgentProcess:
    """`slmops agent run` for one device: restartable, with its own data folder and port."""

    env: dict[str, str]
    port: int
    process: subprocess.Popen | None = None

    def start(self, **overrides: str) -> "AgentProcess":
        self.process = subprocess.Popen(
            [*SLMOPS, "agent", "run"],
            env={**self.env, **overrides},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        return self

    def stop(self, sig: int = signal.SIGTERM) -> str:
        """Stop it (SIGTERM: a clean goodbye; SIGKILL: none) and return its output."""
        assert self.process is not None
        self.process.send_signal(sig)
        output, _ = self.process.communicate(timeout=30)
        self.process = None
        return output

    def chat_model(self) -> str:
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        return httpx.post(f"http://127.0.0.1:{self.port}/v1/chat/completions", json=body, timeout=30).json()["model"]


@pytest.fixture
def agent_process(tmp_path: Path, signing_key) -> Iterator[Callable[..., AgentProcess]]:
    """agent_process(device_id, broker_url, **SLMOPS_AGENT_overrides) → a started AgentProcess."""
    agents: list[AgentProcess] = []

    def make(device_id: str, broker_url: str, **settings: str) -> AgentProcess:
        env = {
            **os.environ,
            "SLMOPS_AGENT_DEVICE_ID": device_id,
            "SLMOPS_AGENT_BROKER_URL": broker_url,
            "SLMOPS_AGENT_TRUSTED_KEYS": f'["{signing_key[1]}"]',
            "SLMOPS_AGENT_DATA_DIR": str(tmp_path / f"agent-{device_id}"),
            "SLMOPS_AGENT_TELEMETRY_INTERVAL_S": "0.2",
            "SLMOPS_AGENT_TELEMETRY_ACK_TIMEOUT_S": "2",
            **{f"SLMOPS_AGENT_{k.upper()}": v for k, v in settings.items()},
        }
        port = free_port()
        env["SLMOPS_AGENT_PORT"] = str(port)
        agent = AgentProcess(env, port).start()
        agents.append(agent)
        return agent

    yield make
    for agent in agents:
        if agent.process is not None:
            agent.stop(signal.SIGKILL)


def wait_for(condition: Callable[[], Any], what: str, timeout_s: float = 30) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (result := condition()):
        assert time.monotonic() < deadline, what
        time.sleep(0.1)
    return result


@pytest.fixture
def eventually() -> Callable[..., Any]:
    """eventually(condition, what, timeout_s=30): poll until truthy, or fail saying `what`."""
    return wait_for
