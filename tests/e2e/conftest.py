"""Helpers for tests that run slmops as real processes."""

import functools
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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
    env = {**os.environ, "SLMOPS_CONTROLLER_DATA_DIR": str(data)}
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
