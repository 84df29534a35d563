"""`slmops controller serve` as its own process, and `slmops bundle push` against it."""

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

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


def test_push_a_bundle_to_a_running_controller(
    session_bundle: Path, bundle_dir: Path, signing_key, tmp_path: Path
) -> None:
    with running_controller(tmp_path, "-k", str(signing_key[1])) as (url, env):
        pushed = subprocess.run(
            [*SLMOPS, "bundle", "push", str(session_bundle), "--json"], env=env, capture_output=True, text=True
        )
        assert pushed.returncode == 0, pushed.stderr
        reply = json.loads(pushed.stdout)
        assert reply["ok"] and reply["new"] and (reply["name"], reply["version"]) == ("tiny", "1.0.0")

        (bundle_dir / "variants" / "cpu-int4" / "chat_template.jinja").write_text("{{ tampered }}")
        refused = subprocess.run([*SLMOPS, "bundle", "push", str(bundle_dir)], env=env, capture_output=True, text=True)
        assert refused.returncode == 1
        assert "refused" in refused.stderr and "chat_template.jinja" in refused.stderr

        headers = {"Authorization": f"Bearer {env['SLMOPS_TOKEN']}"}
        listed = httpx.get(f"{url}/v1/bundles", headers=headers, timeout=10).json()
        assert [(b["name"], b["version"]) for b in listed] == [("tiny", "1.0.0")]
        assert httpx.get(f"{url}/docs", timeout=10).status_code == 200


def test_fleet_devices_and_labels_from_the_cli(mosquitto: int, tmp_path: Path) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from slmops.agent.hardware import probe
    from slmops.messages import Birth, device_topic

    with running_controller(tmp_path, "--broker-url", f"mqtt://127.0.0.1:{mosquitto}") as (url, env):
        deadline = time.monotonic() + 10
        while httpx.get(f"{url}/health", timeout=2).json()["mqtt"] != "connected":
            assert time.monotonic() < deadline, "the controller did not connect to the broker"
            time.sleep(0.05)
        device = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="edge-cli")
        device.connect("127.0.0.1", mosquitto)
        device.loop_start()
        birth = Birth(agent_version="0.1.0", profile=probe())
        device.publish(device_topic("edge-cli", "birth"), birth.payload(), qos=1).wait_for_publish()
        device.disconnect()
        device.loop_stop()

        def devices() -> list[dict]:
            listed = subprocess.run([*SLMOPS, "fleet", "devices", "--json"], env=env, capture_output=True, text=True)
            assert listed.returncode == 0, listed.stderr
            return json.loads(listed.stdout)

        while not devices():
            assert time.monotonic() < deadline + 10, "the device did not appear"
            time.sleep(0.1)
        assert [(d["id"], d["online"]) for d in devices()] == [("edge-cli", True)]
        labelled = subprocess.run(
            [*SLMOPS, "fleet", "label", "edge-cli", "--tag", "site=lab", "--group", "canary"],
            env=env,
            capture_output=True,
            text=True,
        )
        assert labelled.returncode == 0, labelled.stderr
        table = subprocess.run([*SLMOPS, "fleet", "devices"], env=env, capture_output=True, text=True)
        assert "edge-cli" in table.stdout and "canary" in table.stdout and "online" in table.stdout
