"""The shipped deploy files work: the ACL on a real Mosquitto, the agent config parses."""

import getpass
import socket
import subprocess
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from slmops.messages import DeviceState, device_topic

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
USERS = {"controller": "controller-secret", "edge-a": "a-secret", "edge-b": "b-secret"}


@pytest.fixture
def secured_broker(tmp_path: Path):
    """Mosquitto with passwords and the shipped ACL (no TLS: the ACL is what is tested)."""
    passwords = tmp_path / "passwd"
    for i, (user, password) in enumerate(USERS.items()):
        subprocess.run(["mosquitto_passwd", "-b", *(["-c"] if i == 0 else []), passwords, user, password], check=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(
        # as root, mosquitto would switch to its own user, which cannot read pytest's 0700 folders
        f"user {getpass.getuser()}\nlistener {port} 127.0.0.1\nallow_anonymous false\npassword_file {passwords}\n"
        f"acl_file {DEPLOY / 'mosquitto' / 'slmops.acl'}\npersistence false\n"
    )
    broker = subprocess.Popen(["mosquitto", "-c", conf], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if broker.poll() is not None or time.monotonic() > deadline:
                output, _ = broker.communicate(timeout=10)
                pytest.fail(f"mosquitto did not start: {output}")
            time.sleep(0.05)
    yield port
    broker.terminate()
    broker.communicate(timeout=10)


def connect(port: int, user: str) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"acl-{user}", protocol=mqtt.MQTTv5)
    client.username_pw_set(user, USERS[user])
    connected = threading.Event()
    client.on_connect = lambda *_: connected.set()
    client.connect("127.0.0.1", port)
    client.loop_start()
    assert connected.wait(5), f"{user} could not connect"
    return client


def test_a_device_can_touch_only_its_own_topics(secured_broker: int) -> None:
    received: list[str] = []
    controller = connect(secured_broker, "controller")
    controller.on_message = lambda _c, _u, m: received.append(m.topic)
    subscribed = threading.Event()
    controller.on_subscribe = lambda *_: subscribed.set()
    controller.subscribe("slmops/v1/#", qos=1)
    assert subscribed.wait(5)

    device = connect(secured_broker, "edge-a")
    acks: dict[int, ReasonCode] = {}
    device.on_publish = lambda _c, _u, mid, reason, _p: acks.__setitem__(mid, reason)
    own = device.publish(device_topic("edge-a", "state"), DeviceState(online=True).payload(), qos=1)
    forged = device.publish(device_topic("edge-b", "state"), DeviceState(online=False).payload(), qos=1)
    into_desired = device.publish(device_topic("edge-a", "desired"), b"{}", qos=1)
    deadline = time.monotonic() + 5
    while len(acks) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not acks[own.mid].is_failure
    assert acks[forged.mid].getName() == "Not authorized"
    assert acks[into_desired.mid].getName() == "Not authorized"  # only the controller sets desired states

    # Reading is checked on delivery: a subscription to another device's topic receives nothing.
    delivered: list[str] = []
    device.on_message = lambda _c, _u, m: delivered.append(m.topic)
    device_subscribed = threading.Event()
    device.on_subscribe = lambda *_: device_subscribed.set()
    device.subscribe([(device_topic("edge-a", "desired"), 1), (device_topic("edge-b", "desired"), 1)])
    assert device_subscribed.wait(5)
    for target in ("edge-a", "edge-b"):
        controller.publish(device_topic(target, "desired"), b"{}", qos=1).wait_for_publish(5)
    wait = time.monotonic() + 5
    while not delivered and time.monotonic() < wait:
        time.sleep(0.02)
    time.sleep(0.3)
    assert delivered == [device_topic("edge-a", "desired")]

    time.sleep(0.3)
    assert [t for t in received if t.endswith("/state")] == [device_topic("edge-a", "state")]
    for client in (device, controller):
        client.disconnect()
        client.loop_stop()


def test_the_example_agent_config_parses() -> None:
    from slmops.agent import config as agent_config

    config = agent_config.load(DEPLOY / "agent.toml")
    assert config.device_id == "edge-17" and config.broker_url and config.broker_url.startswith("mqtts://")


def test_the_systemd_unit_runs_a_command_that_exists() -> None:
    from typer.testing import CliRunner

    from slmops.cli import app

    exec_start = next(
        line for line in (DEPLOY / "slmops-agent.service").read_text().splitlines() if line.startswith("ExecStart=")
    )
    argv = exec_start.split()[1:]
    assert argv[:2] == ["agent", "run"]
    assert CliRunner().invoke(app, [*argv[:2], "--help"]).exit_code == 0


def test_the_scale_out_compose_file_sets_only_settings_the_controller_has() -> None:
    import yaml

    from slmops.controller.config import ControllerConfig

    compose = yaml.safe_load((DEPLOY / "scale-out" / "compose.yaml").read_text())
    replicas = {name: service for name, service in compose["services"].items() if name.startswith("controller")}
    assert len(replicas) == 2
    fields = {name.upper() for name in ControllerConfig.model_fields}
    names = set()
    for service in replicas.values():
        names.add(service["environment"]["SLMOPS_CONTROLLER_REPLICA_NAME"])
        for key in service["environment"]:
            assert key.removeprefix("SLMOPS_CONTROLLER_") in fields, key
        assert service["build"]["dockerfile"] == "deploy/scale-out/controller.Dockerfile"
    assert len(names) == 2, "each replica its own name in the rollout lease"
    assert (DEPLOY.parent / "deploy/scale-out/controller.Dockerfile").is_file()
