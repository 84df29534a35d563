"""Agent daemons, a controller and a Mosquitto broker, each a real process.

Agents join the fleet (birth, presence), serve, send telemetry that reaches the controller's
database (every record once, none lost across a `kill -9` or a broker restart), follow their
desired state into A/B slots, and answer commands.
"""

import signal
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from slmops.errors import ControllerError


@pytest.mark.parametrize("fleet", ["sqlite", "postgresql"], indirect=True)
def test_telemetry_is_never_lost_across_kill_9(fleet, agent_process, session_bundle: Path, eventually) -> None:
    controller, broker_url = fleet
    agent = agent_process("edge-e2e", broker_url, bundle=str(session_bundle))
    serving = eventually(lambda: (d := controller.device("edge-e2e")) and d["serving"] and d, "the agent never served")
    assert serving["serving"] == {"bundle": "tiny", "version": "1.0.0", "variant": "cpu-int4", "provider": "cpu"}
    assert serving["profile"]["cpu_cores_logical"] >= 1 and agent.chat_model() == "tiny:1.0.0"
    eventually(lambda: len(controller.telemetry_seqs("edge-e2e")) >= 6, "telemetry did not reach the controller")

    agent.stop(signal.SIGKILL)  # no goodbye
    eventually(lambda: not controller.device("edge-e2e")["online"], "the broker's will did not mark it offline")
    before = controller.telemetry_seqs("edge-e2e")
    agent.start()  # same data folder: the queue and its sequence numbers survive
    eventually(lambda: controller.device("edge-e2e")["online"], "the restarted agent did not come back")
    eventually(lambda: len(controller.telemetry_seqs("edge-e2e")) >= len(before) + 4, "telemetry did not resume")
    seqs = controller.telemetry_seqs("edge-e2e")
    assert seqs == list(range(1, seqs[-1] + 1)), "every record arrived, once, without gaps"

    assert "stopped" in agent.stop(signal.SIGTERM)  # a goodbye this time
    eventually(lambda: not controller.device("edge-e2e")["online"], "the goodbye did not mark it offline")


def test_a_broker_restart_loses_no_telemetry(fleet, broker, agent_process, session_bundle: Path, eventually) -> None:
    controller, broker_url = fleet
    agent_process("edge-restart", broker_url, bundle=str(session_bundle))
    eventually(lambda: len(controller.telemetry_seqs("edge-restart")) >= 4, "telemetry did not flow")
    broker.stop()
    eventually(lambda: controller.api.health().mqtt == "disconnected", "the controller did not notice")
    during = len(controller.telemetry_seqs("edge-restart"))
    broker.start()  # empty: no retained messages survive (persistence off)
    eventually(lambda: controller.api.health().mqtt == "connected", "the controller did not reconnect", 60)
    eventually(lambda: len(controller.telemetry_seqs("edge-restart")) >= during + 10, "telemetry did not resume", 60)
    device = controller.device("edge-restart")
    assert device["online"] and device["serving"]["bundle"] == "tiny"
    seqs = controller.telemetry_seqs("edge-restart")
    assert seqs == list(range(1, seqs[-1] + 1)), "every record arrived once, without gaps"


def test_desired_state_is_fetched_verified_smoke_tested_and_activated(
    fleet, two_versions, agent_process, broker, eventually, tmp_path: Path
) -> None:
    controller, broker_url = fleet
    agent = agent_process(
        "edge-ab",
        broker_url,
        controller_url=controller.url,
        controller_token=controller.token,
        smoke_min_speed_fraction="0.05",
    )
    eventually(lambda: controller.device("edge-ab").get("online"), "the agent did not join")
    assert controller.device("edge-ab")["serving"] is None  # started empty
    controller.desire("edge-ab", "1.0.0")
    healthy = eventually(lambda: controller.reported("edge-ab", "healthy", "1.0.0"), "v1 never became healthy")
    assert healthy["variant"] == "cpu-int4"
    assert controller.api.health().chunks_sent > 0  # the files came as chunks over MQTT
    eventually(lambda: (controller.device("edge-ab")["serving"] or {}).get("version") == "1.0.0", "state shows no v1")
    assert agent.chat_model() == "tiny:1.0.0"
    with pytest.raises(ControllerError) as refused:
        controller.api.delete_bundle("tiny", "1.0.0")
    assert refused.value.status == 409 and "edge-ab" in refused.value.message

    agent.stop()
    # Restarted with an impossible speed bar: it serves the active slot again, and refuses v2.
    agent.start(SLMOPS_AGENT_SMOKE_MIN_SPEED_FRACTION="1000")
    eventually(lambda: controller.device("edge-ab")["serving"], "the agent did not come back serving")
    assert agent.chat_model() == "tiny:1.0.0"
    controller.desire("edge-ab", "2.0.0")
    failed = eventually(lambda: controller.reported("edge-ab", "failed", "2.0.0"), "v2 was not refused")
    assert "smoke test" in failed["reason"] and agent.chat_model() == "tiny:1.0.0"
    slots = sorted(p.name for p in (tmp_path / "agent-edge-ab" / "slots").iterdir())
    assert len(slots) == 1, slots  # the refused slot was dropped, the active one kept

    agent.stop()
    agent.start(SLMOPS_AGENT_DISK_RESERVE_BYTES=str(2**60))  # the retained v2 arrives again on connect
    eventually(
        lambda: "not enough disk" in controller.reported("edge-ab", "failed", "2.0.0").get("reason", "x"),
        "a full disk was not reported",
    )
    # Garbage on the topics the agent reads: logged, dropped, and the agent serves on.
    rogue = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="rogue")
    rogue.connect("127.0.0.1", broker.port)
    rogue.loop_start()
    for kind, payload in (
        ("desired", b"{not json"),
        ("telemetry_ack", b'{"schema": 1, "up_to_seq": -4}'),
        ("cmd", b'{"schema": 1, "correlation_id": "0123456789", "command": "format-disk"}'),
    ):
        rogue.publish(f"slmops/v1/devices/edge-ab/{kind}", payload, qos=1).wait_for_publish(5)
    rogue.disconnect()
    rogue.loop_stop()
    eventually(lambda: agent.chat_model() == "tiny:1.0.0", "the agent stopped serving")
    output = agent.stop()
    assert output.count("dropped a message from the broker") == 3, output


def test_commands_probe_rollback_and_reload(fleet, two_versions, agent_process, eventually) -> None:
    controller, broker_url = fleet
    agent = agent_process(
        "edge-cmd",
        broker_url,
        transfer="http",  # the plain download, the alternative to chunks over MQTT
        controller_url=controller.url,
        controller_token=controller.token,
        smoke_min_speed_fraction="0",
    )
    eventually(lambda: controller.device("edge-cmd").get("online"), "the agent did not join")
    for version in ("1.0.0", "2.0.0"):
        controller.desire("edge-cmd", version)
        eventually(lambda v=version: controller.reported("edge-cmd", "healthy", v), f"{version} never became healthy")
    assert agent.chat_model() == "tiny:2.0.0"
    assert controller.api.health().chunks_sent == 0

    probe = controller.api.command("edge-cmd", "probe")
    assert probe.ok and probe.result["cpu_cores_logical"] >= 1
    rollback = controller.api.command("edge-cmd", "rollback")
    assert rollback.ok and rollback.result["serving"] == "tiny:1.0.0", rollback
    assert agent.chat_model() == "tiny:1.0.0"
    eventually(lambda: controller.reported("edge-cmd", "rolled_back", "1.0.0"), "the rollback was not reported")
    assert controller.device("edge-cmd")["drift"] is None  # the operator's rollback is not drift
    assert controller.api.command("edge-cmd", "reload").result["serving"] == "tiny:1.0.0"
    with pytest.raises(ControllerError) as unknown:
        controller.api.command("nobody", "probe")
    assert unknown.value.status == 404
    audit = [e.action for e in controller.api.audit()]
    assert audit.count("device.command") == 3

    agent.stop(signal.SIGKILL)
    eventually(lambda: not controller.device("edge-cmd")["online"], "the will did not mark it offline")
    with pytest.raises(ControllerError) as late:
        controller.api.command("edge-cmd", "probe", timeout_s=1)
    assert late.value.status == 504 and "did not answer" in late.value.message


def test_three_agents_fetch_the_same_bundle_at_once(fleet, two_versions, agent_process, eventually) -> None:
    controller, broker_url = fleet
    devices = [f"edge-{i}" for i in range(3)]
    agents = [agent_process(d, broker_url, smoke_min_speed_fraction="0") for d in devices]
    for device in devices:
        eventually(lambda d=device: controller.device(d).get("online"), f"{device} did not join")
    controller.desire_at_once(devices, "1.0.0")  # their chunks share the bundle's topic
    for device in devices:
        eventually(lambda d=device: controller.reported(d, "healthy", "1.0.0"), f"{device} never became healthy", 90)
    assert [a.chat_model() for a in agents] == ["tiny:1.0.0"] * 3
    for device in devices:
        eventually(lambda d=device: controller.telemetry_seqs(d), f"no telemetry from {device}")
