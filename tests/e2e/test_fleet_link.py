"""An agent daemon, a controller and a Mosquitto broker, each a real process.

The agent joins the fleet (birth, presence), serves its bundle, and its telemetry reaches
the controller's database: every record once, none lost across a `kill -9` of the agent.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

SLMOPS = [sys.executable, "-P", "-m", "slmops"]


def wait_for(condition, what: str, timeout_s: float = 30):
    deadline = time.monotonic() + timeout_s
    while not (result := condition()):
        assert time.monotonic() < deadline, what
        time.sleep(0.1)
    return result


def test_agent_joins_the_fleet_and_its_telemetry_is_never_lost(
    controller_process, mosquitto: int, session_bundle: Path, signing_key, tmp_path: Path
) -> None:
    broker = f"mqtt://127.0.0.1:{mosquitto}"
    with controller_process("--broker-url", broker) as (url, env):
        headers = {"Authorization": f"Bearer {env['SLMOPS_TOKEN']}"}
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            agent_port = s.getsockname()[1]
        agent_env = {
            **os.environ,
            "SLMOPS_AGENT_DEVICE_ID": "edge-e2e",
            "SLMOPS_AGENT_BROKER_URL": broker,
            "SLMOPS_AGENT_BUNDLE": str(session_bundle),
            "SLMOPS_AGENT_TRUSTED_KEYS": f'["{signing_key[1]}"]',
            "SLMOPS_AGENT_PORT": str(agent_port),
            "SLMOPS_AGENT_DATA_DIR": str(tmp_path / "agent"),
            "SLMOPS_AGENT_TELEMETRY_INTERVAL_S": "0.2",
            "SLMOPS_AGENT_TELEMETRY_ACK_TIMEOUT_S": "2",
        }

        def start_agent() -> subprocess.Popen:
            return subprocess.Popen(
                [*SLMOPS, "agent", "run"], env=agent_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )

        def device() -> dict | None:
            response = httpx.get(f"{url}/v1/devices/edge-e2e", headers=headers, timeout=5)
            return response.json() if response.status_code == 200 else None

        def stored_seqs() -> list[int]:
            records = httpx.get(f"{url}/v1/devices/edge-e2e/telemetry?limit=100000", headers=headers, timeout=5)
            return sorted(r["seq"] for r in records.json())

        agent = start_agent()
        try:
            serving = wait_for(lambda: (d := device()) and d["online"] and d["serving"] and d, "the agent never served")
            assert serving["serving"] == {
                "bundle": "tiny",
                "version": "1.0.0",
                "variant": "cpu-int4",
                "provider": "cpu",
            }
            assert serving["profile"]["cpu_cores_logical"] >= 1
            reply = httpx.post(
                f"http://127.0.0.1:{agent_port}/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
                timeout=30,
            )
            assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] >= 1
            wait_for(lambda: len(stored_seqs()) >= 6, "telemetry did not reach the controller")

            agent.send_signal(signal.SIGKILL)  # no goodbye
            agent.communicate(timeout=10)
            wait_for(lambda: not device()["online"], "the broker's will did not mark the agent offline")
            before = stored_seqs()

            agent = start_agent()  # same data folder: the queue and its sequence numbers survive
            wait_for(lambda: device()["online"], "the restarted agent did not come back")
            wait_for(lambda: len(stored_seqs()) >= len(before) + 4, "telemetry did not resume")
            seqs = stored_seqs()
            assert seqs == list(range(1, seqs[-1] + 1)), "every record arrived, once, without gaps"

            agent.send_signal(signal.SIGTERM)  # a goodbye this time
            output, _ = agent.communicate(timeout=30)
            assert "stopped" in output, output
            wait_for(lambda: not device()["online"], "the agent's goodbye did not mark it offline")
        finally:
            agent.kill()
            agent.communicate(timeout=10)


def test_desired_state_is_fetched_verified_smoke_tested_and_activated(
    controller_process, mosquitto: int, tiny_export: Path, signing_key, tmp_path: Path
) -> None:
    from slmops.build.bundle import create
    from slmops.bundle import write_archive

    broker = f"mqtt://127.0.0.1:{mosquitto}"
    with controller_process("--broker-url", broker, "-k", str(signing_key[1])) as (url, env):
        headers = {"Authorization": f"Bearer {env['SLMOPS_TOKEN']}"}
        for version in ("1.0.0", "2.0.0"):
            bundle = create(
                tiny_export, tmp_path / version, "tiny", version, key=signing_key[0], variant_ids=["cpu-int4"]
            )
            archive = write_archive(bundle, tmp_path / f"{version}.tar").read_bytes()
            assert httpx.post(f"{url}/v1/bundles", content=archive, headers=headers, timeout=30).status_code == 201
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            agent_port = s.getsockname()[1]
        agent_env = {
            **os.environ,
            "SLMOPS_AGENT_DEVICE_ID": "edge-ab",
            "SLMOPS_AGENT_BROKER_URL": broker,
            "SLMOPS_AGENT_CONTROLLER_URL": url,
            "SLMOPS_AGENT_CONTROLLER_TOKEN": env["SLMOPS_TOKEN"],
            "SLMOPS_AGENT_TRUSTED_KEYS": f'["{signing_key[1]}"]',
            "SLMOPS_AGENT_PORT": str(agent_port),
            "SLMOPS_AGENT_DATA_DIR": str(tmp_path / "agent"),
            "SLMOPS_AGENT_SMOKE_MIN_SPEED_FRACTION": "0.05",
        }

        def start_agent(**extra: str) -> subprocess.Popen:
            return subprocess.Popen(
                [*SLMOPS, "agent", "run"],
                env={**agent_env, **extra},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )

        def device() -> dict:
            return httpx.get(f"{url}/v1/devices/edge-ab", headers=headers, timeout=5).json()

        def desire(version: str) -> None:
            body = {"bundle": "tiny", "version": version}
            response = httpx.put(f"{url}/v1/devices/edge-ab/desired", json=body, headers=headers, timeout=10)
            assert response.status_code == 202, response.text

        def chat_model() -> str:
            body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
            return httpx.post(f"http://127.0.0.1:{agent_port}/v1/chat/completions", json=body, timeout=30).json()[
                "model"
            ]

        agent = start_agent()
        try:
            wait_for(
                lambda: (
                    (r := httpx.get(f"{url}/v1/devices/edge-ab", headers=headers, timeout=5)).status_code == 200
                    and r.json()["online"]
                ),
                "the agent did not join",
            )
            assert device()["serving"] is None  # started empty
            desire("1.0.0")
            healthy = wait_for(
                lambda: (d := device())["reported"] and d["reported"]["status"] == "healthy" and d,
                "v1 never became healthy",
            )
            assert healthy["reported"]["variant"] == "cpu-int4"
            wait_for(
                lambda: device()["serving"] and device()["serving"]["version"] == "1.0.0", "the state does not show v1"
            )
            assert chat_model() == "tiny:1.0.0"
            refused = httpx.delete(f"{url}/v1/bundles/tiny/1.0.0", headers=headers, timeout=10)
            assert refused.status_code == 409 and "edge-ab" in refused.json()["error"]["message"]

            agent.terminate()
            agent.communicate(timeout=30)
            # Restarted with an impossible speed bar: it serves the active slot, and refuses v2.
            agent = start_agent(SLMOPS_AGENT_SMOKE_MIN_SPEED_FRACTION="1000")
            wait_for(lambda: device()["online"] and device()["serving"], "the agent did not come back serving")
            assert chat_model() == "tiny:1.0.0"
            desire("2.0.0")
            failed = wait_for(
                lambda: (d := device())["reported"] and d["reported"]["status"] == "failed" and d, "v2 was not refused"
            )
            assert "smoke test" in failed["reported"]["reason"] and failed["reported"]["version"] == "2.0.0"
            assert chat_model() == "tiny:1.0.0"  # still the previous bundle
            slots = sorted(p.name for p in (tmp_path / "agent" / "slots").iterdir())
            assert len(slots) == 1, slots  # the refused slot was dropped, the active one kept

            agent.terminate()
            agent.communicate(timeout=30)
            # A disk too small for v2 (the retained desired state arrives again on connect).
            agent = start_agent(SLMOPS_AGENT_DISK_RESERVE_BYTES=str(2**60))
            wait_for(
                lambda: (r := device()["reported"]) and r["status"] == "failed" and "not enough disk" in r["reason"],
                "a full disk was not reported",
            )
            # Garbage on the topics the agent reads: logged, dropped, the agent serves on.
            import paho.mqtt.client as mqtt
            from paho.mqtt.enums import CallbackAPIVersion

            rogue = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="rogue")
            rogue.connect("127.0.0.1", mosquitto)
            rogue.loop_start()
            for kind, payload in (("desired", b"{not json"), ("telemetry_ack", b'{"schema": 1, "up_to_seq": -4}')):
                rogue.publish(f"slmops/v1/devices/edge-ab/{kind}", payload, qos=1).wait_for_publish(5)
            rogue.disconnect()
            rogue.loop_stop()
            time.sleep(0.5)
            assert agent.poll() is None and chat_model() == "tiny:1.0.0"
            agent.terminate()
            output, _ = agent.communicate(timeout=30)
            assert output.count("dropped a message from the broker") == 2, output
        finally:
            agent.kill()
            agent.communicate(timeout=10)


def test_a_broker_restart_loses_no_telemetry(
    controller_process, broker, session_bundle: Path, signing_key, tmp_path: Path
) -> None:
    url_broker = f"mqtt://127.0.0.1:{broker.port}"
    with controller_process("--broker-url", url_broker) as (url, env):
        headers = {"Authorization": f"Bearer {env['SLMOPS_TOKEN']}"}
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            agent_port = s.getsockname()[1]
        agent_env = {
            **os.environ,
            "SLMOPS_AGENT_DEVICE_ID": "edge-restart",
            "SLMOPS_AGENT_BROKER_URL": url_broker,
            "SLMOPS_AGENT_BUNDLE": str(session_bundle),
            "SLMOPS_AGENT_TRUSTED_KEYS": f'["{signing_key[1]}"]',
            "SLMOPS_AGENT_PORT": str(agent_port),
            "SLMOPS_AGENT_DATA_DIR": str(tmp_path / "agent"),
            "SLMOPS_AGENT_TELEMETRY_INTERVAL_S": "0.2",
            "SLMOPS_AGENT_TELEMETRY_ACK_TIMEOUT_S": "2",
        }
        agent = subprocess.Popen(
            [*SLMOPS, "agent", "run"], env=agent_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )

        def stored_seqs() -> list[int]:
            response = httpx.get(f"{url}/v1/devices/edge-restart/telemetry?limit=100000", headers=headers, timeout=5)
            return sorted(r["seq"] for r in response.json()) if response.status_code == 200 else []

        try:
            wait_for(lambda: len(stored_seqs()) >= 4, "telemetry did not flow")
            broker.stop()
            time.sleep(2)  # the agent keeps serving and queueing; the controller waits
            assert httpx.get(f"{url}/health", timeout=5).json()["mqtt"] == "disconnected"
            during = len(stored_seqs())
            broker.start()
            wait_for(
                lambda: httpx.get(f"{url}/health", timeout=5).json()["mqtt"] == "connected",
                "the controller did not reconnect",
                60,
            )
            wait_for(
                lambda: len(stored_seqs()) >= during + 10, "telemetry did not resume after the broker came back", 60
            )
            device = httpx.get(f"{url}/v1/devices/edge-restart", headers=headers, timeout=5).json()
            assert device["online"] and device["serving"]["bundle"] == "tiny"
            seqs = stored_seqs()
            assert seqs == list(range(1, seqs[-1] + 1)), "every record arrived once, without gaps"
        finally:
            agent.terminate()
            agent.communicate(timeout=30)
