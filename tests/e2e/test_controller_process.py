"""`slmops controller serve` as its own process, and `slmops bundle push` against it."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

SLMOPS = [sys.executable, "-P", "-m", "slmops"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_push_a_bundle_to_a_running_controller(
    session_bundle: Path, bundle_dir: Path, signing_key, tmp_path: Path
) -> None:
    port = free_port()
    data = tmp_path / "controller"
    env = {**os.environ, "SLMOPS_CONTROLLER_DATA_DIR": str(data)}
    controller = subprocess.Popen(
        [*SLMOPS, "controller", "serve", "--port", str(port), "-k", str(signing_key[1])],
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
        push_env = {**env, "SLMOPS_TOKEN": token, "SLMOPS_CONTROLLER_URL": url}

        pushed = subprocess.run(
            [*SLMOPS, "bundle", "push", str(session_bundle), "--json"], env=push_env, capture_output=True, text=True
        )
        assert pushed.returncode == 0, pushed.stderr
        reply = json.loads(pushed.stdout)
        assert reply["ok"] and reply["new"] and (reply["name"], reply["version"]) == ("tiny", "1.0.0")

        (bundle_dir / "variants" / "cpu-int4" / "chat_template.jinja").write_text("{{ tampered }}")
        refused = subprocess.run(
            [*SLMOPS, "bundle", "push", str(bundle_dir)], env=push_env, capture_output=True, text=True
        )
        assert refused.returncode == 1
        assert "refused" in refused.stderr and "chat_template.jinja" in refused.stderr

        listed = httpx.get(f"{url}/v1/bundles", headers={"Authorization": f"Bearer {token}"}, timeout=10).json()
        assert [(b["name"], b["version"]) for b in listed] == [("tiny", "1.0.0")]
        assert httpx.get(f"{url}/docs", timeout=10).status_code == 200
    finally:
        controller.terminate()
        controller.communicate(timeout=20)
