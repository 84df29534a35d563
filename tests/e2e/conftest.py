"""Helpers for tests that run slmops as real processes."""

import functools
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from controller_under_test import Controller, ControllerProcess
from link_proxy import LinkProxy
from support import SLMOPS, free_port, wait_for


@contextmanager
def running_controller(tmp_path: Path, *args: str) -> Iterator[tuple[str, dict[str, str]]]:
    """`slmops controller serve` in its own process; yields its URL and an environment with its admin token."""
    controller = ControllerProcess(tmp_path / "controller", *args)
    try:
        controller.start()
        yield controller.url, controller.env
    finally:
        if controller.process is not None and controller.process.poll() is None:
            controller.stop()


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


@pytest.fixture
def eventually() -> Callable[..., Any]:
    """eventually(condition, what, timeout_s=30): poll until truthy, or fail saying `what`."""

    def poll(condition: Callable[[], Any], what: str, timeout_s: float = 30) -> Any:
        return wait_for(condition, what, timeout_s, poll_s=0.1)

    return poll


@pytest.fixture
def fleet(controller_process, broker, signing_key, request: pytest.FixtureRequest):
    """A controller linked to a fresh broker, on SQLite or (parametrized) PostgreSQL; yields
    (Controller, broker URL)."""
    broker_url = f"mqtt://127.0.0.1:{broker.port}"
    args = ["--broker-url", broker_url, "-k", str(signing_key[1])]
    if getattr(request, "param", "sqlite") == "postgresql":
        args += ["--database-url", request.getfixturevalue("postgres_database")]
    with controller_process(*args) as (url, env):
        controller = Controller(url, env["SLMOPS_TOKEN"])
        yield controller, broker_url
        controller.api.close()


@pytest.fixture
def two_versions(fleet, tiny_export: Path, signing_key, tmp_path: Path) -> None:
    """tiny 1.0.0 and 2.0.0 (cpu-int4 only) pushed to the controller."""
    from slmops.build.bundle import create
    from slmops.bundle import write_archive

    controller, _ = fleet
    for version in ("1.0.0", "2.0.0"):
        bundle = create(tiny_export, tmp_path / version, "tiny", version, key=signing_key[0], variant_ids=["cpu-int4"])
        _, new = controller.api.push(write_archive(bundle, tmp_path / f"{version}.tar"))
        assert new


@pytest.fixture
def link_proxy(broker) -> Iterator[Callable[..., LinkProxy]]:
    """link_proxy(rate_bytes_per_s=None) → a LinkProxy in front of the test's broker."""
    proxies: list[LinkProxy] = []

    def make(rate_bytes_per_s: float | None = None) -> LinkProxy:
        proxies.append(LinkProxy(broker.port, rate_bytes_per_s))
        return proxies[-1]

    yield make
    for proxy in proxies:
        proxy.close()
