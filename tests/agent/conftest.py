"""A real agent server on a free loopback port, in this process, for the official clients.

uvicorn serves the FastAPI app from a thread on a socket bound here, so tests reach
it over real HTTP and can still look inside (the engine, the status) to assert on.
"""

import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families
from support import wait_for

from slmops.agent import config as agent_config
from slmops.agent.host import ModelHost
from slmops.agent.serve.api import create_app


@dataclass
class RunningAgent:
    server: ModelHost
    url: str
    clients: list = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def openai(self, api_key: str = "unused", **kwargs):
        from openai import OpenAI

        client = OpenAI(base_url=self.base_url, api_key=api_key, max_retries=0, timeout=60, **kwargs)
        self.clients.append(client)
        return client

    def http(self, **kwargs) -> httpx.Client:
        client = httpx.Client(base_url=self.url, timeout=60, **kwargs)
        self.clients.append(client)
        return client

    def wait_idle(self, timeout_s: float = 10) -> None:
        engine = self.server.engine
        wait_for(lambda: not (engine.active_count or engine.queue_depth), "the engine did not go idle", timeout_s, 0.01)

    def generations(self, outcome: str) -> float:
        """slmops_agent_generations_total{outcome} as /metrics reports it."""
        for family in text_string_to_metric_families(self.http().get("/metrics").text):
            for sample in family.samples:
                if sample.name == "slmops_agent_generations_total" and sample.labels["outcome"] == outcome:
                    return sample.value
        return 0.0

    def wait_generations(self, outcome: str, count: int, timeout_s: float) -> None:
        """Until `count` generations ended with `outcome`. An idle engine is not enough: a handler can
        still be on its way to the engine, or counting the generation it just ended."""
        wait_for(
            lambda: self.generations(outcome) >= count, f"fewer than {count} generations ended {outcome}", timeout_s
        )
        seen = self.generations(outcome)
        assert seen == count, f"{seen:.0f} generations ended {outcome}, {count} expected"


@pytest.fixture
def start_agent(signing_key: tuple[Path, Path], tmp_path: Path) -> Iterator[Callable[..., RunningAgent]]:
    """start_agent(bundle=None, **config) → a running agent; stopped at the end of the test."""
    started: list[tuple[uvicorn.Server, threading.Thread, RunningAgent]] = []

    def start(bundle: Path | None = None, **overrides) -> RunningAgent:
        overrides.setdefault("trusted_keys", [signing_key[1]])
        overrides.setdefault("data_dir", tmp_path / f"agent-{len(started)}")
        server = ModelHost(agent_config.load(**overrides))
        server.start()
        if bundle is not None:
            server.load_bundle(bundle)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        web = uvicorn.Server(uvicorn.Config(create_app(server), log_level="warning", lifespan="off"))
        thread = threading.Thread(target=web.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        while not web.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.01)
        agent = RunningAgent(server, f"http://127.0.0.1:{port}")
        started.append((web, thread, agent))
        return agent

    yield start
    for web, thread, agent in started:
        for client in agent.clients:
            client.close()
        web.should_exit = True
        thread.join(timeout=10)
        agent.server.close()


@pytest.fixture(scope="session")
def second_bundle(tiny_export: Path, signing_key: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Version 2.0.0 of the tiny bundle, only its cpu-fp32 variant: a different model to swap to."""
    from slmops.build.bundle import create

    out = tmp_path_factory.mktemp("bundle-v2") / "tiny"
    create(tiny_export, out, name="tiny", version="2.0.0", key=signing_key[0], variant_ids=["cpu-fp32"])
    return out


@pytest.fixture(scope="session")
def gpu_and_cpu_bundle(
    tiny_model: Path, signing_key: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A tiny bundle with cuda-int4 (which this CPU-only onnxruntime-genai cannot load) and cpu-int4."""
    from slmops.build.bundle import create
    from slmops.build.export import Recipe, export

    build = tmp_path_factory.mktemp("tiny-gpu-export")
    export(Recipe(source=str(tiny_model), targets=["cuda-int4", "cpu-int4"]), build, force=True)
    out = tmp_path_factory.mktemp("bundle-gpu") / "tiny-gpu"
    create(build, out, name="tiny-gpu", version="1.0.0", key=signing_key[0])
    return out
