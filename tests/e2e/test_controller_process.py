"""`slmops controller serve` as its own process; `slmops bundle push` and `slmops fleet` against it."""

import json
import signal
import subprocess
import time
from pathlib import Path

import httpx
from support import SLMOPS


def test_push_a_bundle_to_a_running_controller(
    controller_process, session_bundle: Path, bundle_dir: Path, signing_key
) -> None:
    with controller_process("-k", str(signing_key[1])) as (url, env):
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


def test_fleet_devices_and_labels_from_the_cli(controller_process, mosquitto: int) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from slmops.agent.hardware import probe
    from slmops.messages import Birth, device_topic

    with controller_process("--broker-url", f"mqtt://127.0.0.1:{mosquitto}") as (url, env):
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
        for chosen, title in (
            (["--group", "canary", "--tag", "site=lab"], "1 device"),
            (["--status", "offline"], "0 devices"),
        ):
            narrowed = subprocess.run([*SLMOPS, "fleet", "devices", *chosen], env=env, capture_output=True, text=True)
            assert narrowed.returncode == 0 and narrowed.stdout.split("\n")[0].strip() == title, narrowed


def test_a_controller_killed_with_sigkill_starts_again_on_its_data_and_its_embedded_broker_port(
    tmp_path: Path, signing_key
) -> None:
    """Its Mosquitto outlives it (a session of its own, holding the port); the next start stops that one."""
    import psutil
    from controller_under_test import ControllerProcess

    process = ControllerProcess(tmp_path / "controller", "-k", str(signing_key[1])).start()
    orphan = next(p for p in psutil.Process(process.process.pid).children() if p.name() == "mosquitto")
    process.stop(signal.SIGKILL)
    assert orphan.is_running(), "SIGKILL leaves the broker behind"
    try:
        process.start()
        health = httpx.get(f"{process.url}/health", timeout=10).json()
        assert health["embedded_broker"]["running"] and health["mqtt"] in ("connected", "disconnected")
        orphan.wait(timeout=10)
    finally:
        process.stop()
