"""The agent's MQTT link against a real Mosquitto."""

import sys
import threading
import time
from pathlib import Path

import pytest

from slmops.agent import config as agent_config
from slmops.agent.fleet.uplink import Uplink
from slmops.agent.host import ModelHost
from slmops.agent.telemetry import TelemetryQueue
from slmops.messages import DesiredState, chunk_topic, device_topic, resend_wait_s


@pytest.fixture
def uplink(mosquitto: int, tmp_path: Path):
    config = agent_config.load(
        device_id="uplink-test", broker_url=f"mqtt://127.0.0.1:{mosquitto}", data_dir=tmp_path, transfer_timeout_s=2
    )
    server = ModelHost(config)
    link = Uplink(config, server, TelemetryQueue(tmp_path / "telemetry.db"))
    link.start()
    assert link.connected.wait(10), "the uplink did not connect"
    yield link
    link.stop()
    server.close()


def test_watch_bundle_sees_the_broker_confirm_every_subscription(uplink: Uplink) -> None:
    """A SUBACK can come back before subscribe() has returned its message id; none may be missed
    (a missed one used to stall a fetch for the whole transfer timeout)."""
    switch, done = sys.getswitchinterval(), threading.Event()

    def contend() -> None:  # a third thread wanting the GIL: the subscriber is preempted more often
        while not done.is_set():
            pass

    contender = threading.Thread(target=contend)
    sys.setswitchinterval(1e-6)  # and the GIL changes hands as often as it can: the race shows up
    contender.start()
    try:
        confirmed = [
            uplink.watch_bundle(f"{i:064x}", lambda header, data: None, lambda path, reason: None) for i in range(200)
        ]
    finally:
        done.set()
        contender.join()
        sys.setswitchinterval(switch)
    assert all(confirmed), f"{confirmed.count(False)} of 200 subscriptions seen as unconfirmed"


@pytest.fixture
def rogue(publisher):
    """Any other client of the broker (the embedded broker's ACL keeps devices out of here)."""
    return publisher


DESIRED = DesiredState(bundle="tiny", version="2.0.0", digest="ab" * 32)
HOSTILE = [
    b"[" * 10_000 + b"]" * 10_000,  # RecursionError in json.loads
    b'{"schema": 1, "up_to_seq": ' + b"9" * 5000 + b"}",  # ValueError: past Python's int digits limit
    b"\xff\xfe\x00",
    b'{"schema": 1, "bundle": "' + b"x" * (1 << 20) + b'"}',
    b"",
]


def test_hostile_payloads_on_every_topic_leave_the_link_working(uplink: Uplink, rogue) -> None:
    """Finding 3: one 20 KB message used to kill paho's network thread; the device then never
    again received a desired state, a command or an ack."""
    work: list[object] = []
    uplink.on_work = work.append
    for kind in ("desired", "cmd", "telemetry_ack"):
        for payload in HOSTILE:
            rogue.publish(device_topic("uplink-test", kind), payload, qos=1).wait_for_publish(5)
    rogue.publish(chunk_topic("cd" * 32), b"\x00\x00\x00\x05{}", qos=1).wait_for_publish(5)  # not being fetched
    rogue.publish(device_topic("uplink-test", "desired"), DESIRED.payload(), qos=1).wait_for_publish(5)
    deadline = time.monotonic() + 10
    while not work and time.monotonic() < deadline:
        time.sleep(0.05)
    assert work == [DESIRED], "the link is dead: a valid desired state after the hostile ones was not obeyed"
    # each hostile payload on each topic, but an empty desired or cmd is a cleared retained message
    assert uplink.dropped == 3 * (len(HOSTILE) - 1) + 1
    assert uplink.client.is_connected()


def test_a_message_for_another_device_is_not_obeyed(uplink: Uplink) -> None:
    """Finding 1: a broker may deliver another device's retained desired state (amqtt did)."""
    import paho.mqtt.client as mqtt

    work: list[object] = []
    uplink.on_work = work.append
    for topic in (device_topic("other", "desired"), device_topic("uplink-test-2", "cmd"), "slmops/v1/devices/x"):
        message = mqtt.MQTTMessage(topic=topic.encode())
        message.payload = DESIRED.payload()
        uplink._on_message(uplink.client, None, message)
    assert work == [] and uplink.dropped == 3


def test_an_impostor_with_the_agents_own_client_id_does_not_deafen_it(uplink: Uplink, rogue, mosquitto: int) -> None:
    """Finding 4: a client that connected with the agent's client id for a while and left made it
    deaf for good (on amqtt). The id is new for each connection now; and should an impostor learn it,
    the broker's takeover is a disconnect the agent reconnects from (under another id), subscribing again."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    taken = uplink.status()["client_id"]
    assert taken.startswith("slmops-agent-uplink-test-") and taken != "slmops-agent-uplink-test"
    impostor = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=taken)
    impostor.connect("127.0.0.1", mosquitto)
    impostor.loop_start()
    time.sleep(2)
    impostor.disconnect()
    impostor.loop_stop()
    work: list[object] = []
    uplink.on_work = work.append
    deadline = time.monotonic() + 15
    while not work and time.monotonic() < deadline:  # until the agent is back and subscribed again
        rogue.publish(device_topic("uplink-test", "desired"), DESIRED.payload(), qos=1).wait_for_publish(5)
        time.sleep(0.5)
    assert work and work[0] == DESIRED, "the agent stayed deaf after the impostor left"
    assert uplink.status()["connected"] and uplink.status()["client_id"] != taken


def test_an_unacknowledged_batch_waits_longer_each_time_up_to_eight_times() -> None:
    waits = [10.0]
    for _ in range(5):
        waits.append(resend_wait_s(waits[-1], 10.0))
    assert waits == [10, 20, 40, 80, 80, 80]
