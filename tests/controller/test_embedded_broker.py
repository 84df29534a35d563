"""The embedded broker (no broker_url): a Mosquitto of the controller's own, with enrolled
credentials and the shipped ACL, tested with real paho clients (issue 11, findings 1, 2 and 4)."""

import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psutil
import pytest
from fastapi.testclient import TestClient
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode
from support import free_port, wait_for

from slmops.agent.hardware import probe
from slmops.controller.embedded_broker import acl_text
from slmops.controller.service import build_app
from slmops.errors import BrokerStartError
from slmops.messages import (
    Birth,
    ChunkHeader,
    ChunkRequest,
    Command,
    DeviceState,
    TelemetryAck,
    chunk_payload,
    chunk_topic,
    device_topic,
    request_topic,
)

ADMIN = {"Authorization": "Bearer admin-token-0123456789"}
READER = {"Authorization": "Bearer reader-token-0123456789"}
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def embedded(controller_config) -> Iterator[tuple[TestClient, int]]:
    """A controller running its embedded broker; yields its client and the broker's port."""
    port = free_port()
    config = controller_config.model_copy(update={"embedded_broker": True, "embedded_broker_bind": f"127.0.0.1:{port}"})
    with TestClient(build_app(config)) as client:
        wait_for(lambda: client.get("/health").json()["mqtt"] == "connected", "the bridge did not connect")
        yield client, port


class Device:
    """A paho client as a device would be: MQTT 5 (reason codes show what the broker refused)."""

    def __init__(self, port: int, username: str | None, password: str | None, client_id: str = "") -> None:
        self.username = username
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        if username is not None:
            self.client.username_pw_set(username, password)
        self.received: list[tuple[str, bytes]] = []
        self.acks: dict[int, ReasonCode] = {}
        self.connack: ReasonCode | None = None
        self.answered = threading.Event()
        self.subscribed = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda _c, _u, m: self.received.append((m.topic, m.payload))
        self.client.on_publish = lambda _c, _u, mid, reason, _p: self.acks.__setitem__(mid, reason)
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self.answered.wait(10), "no CONNACK"

    def _on_connect(self, _c: object, _u: object, _f: object, reason: ReasonCode, _p: object) -> None:
        self.connack = reason
        self.answered.set()

    @property
    def connected(self) -> bool:
        return self.connack is not None and not self.connack.is_failure

    def subscribe(self, *topics: str) -> None:
        self.subscribed.clear()
        self.client.subscribe([(t, 1) for t in topics])
        assert self.subscribed.wait(10)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> ReasonCode:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        return wait_for(lambda: self.acks.get(info.mid), f"no PUBACK for {topic}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def enrol(client: TestClient, device_id: str) -> dict[str, Any]:
    response = client.post(f"/v1/devices/{device_id}/enrolment", headers=ADMIN)
    assert response.status_code == 201, response.text
    return response.json()


def connect(port: int, enrolment: dict[str, Any]) -> Device:
    device = Device(port, enrolment["username"], enrolment["password"], f"{enrolment['username']}-test")
    assert device.connected, device.connack
    return device


def assert_heard(client: TestClient, device: Device) -> None:
    """The device's birth reaches the controller's registry (then the device disconnects)."""
    try:
        device.publish(device_topic(device.username, "birth"), Birth(agent_version="0.1", profile=probe()).payload())
        wait_for(lambda: client.get(f"/v1/devices/{device.username}", headers=READER).status_code == 200, "deaf")
    finally:
        device.close()


def test_the_embedded_broker_runs_the_acl_deploy_ships() -> None:
    assert (REPO / "deploy" / "mosquitto" / "slmops.acl").read_text() == acl_text()


def test_anonymous_wrong_and_revoked_credentials_are_refused(embedded) -> None:
    client, port = embedded
    for username, password in ((None, None), ("edge-a", "guess"), ("controller", "guess")):
        refused = Device(port, username, password)
        assert not refused.connected and refused.connack is not None
        refused.close()
    first = enrol(client, "edge-a")
    assert first["broker_url"] == f"mqtt://edge-a:{first['password']}@127.0.0.1:{port}"
    rotated = enrol(client, "edge-a")  # enrolling again replaces the password
    stale = Device(port, "edge-a", first["password"])
    assert not stale.connected
    stale.close()
    device = connect(port, rotated)
    assert client.delete("/v1/devices/edge-a/enrolment", headers=ADMIN).status_code == 204
    wait_for(lambda: not device.client.is_connected(), "a revoked device stayed connected")
    again = Device(port, "edge-a", rotated["password"])
    assert not again.connected
    again.close()
    device.close()
    actions = [(e["action"], e["target"]) for e in client.get("/v1/audit", headers=ADMIN).json()]
    assert actions[:3] == [("device.revoke", "edge-a"), ("device.enrol", "edge-a"), ("device.enrol", "edge-a")]


def test_enrolment_needs_an_admin_and_a_valid_device_id(embedded) -> None:
    client, _ = embedded
    assert client.post("/v1/devices/edge-a/enrolment", headers=READER).status_code == 403
    assert client.post("/v1/devices/edge-a/enrolment").status_code == 401
    assert client.post("/v1/devices/-bad/enrolment", headers=ADMIN).status_code == 400
    reserved = client.post("/v1/devices/controller/enrolment", headers=ADMIN)
    assert reserved.status_code == 400 and "the controller's own broker user" in reserved.json()["error"]["message"]
    assert client.delete("/v1/devices/nobody/enrolment", headers=ADMIN).status_code == 404


def test_a_device_cannot_publish_for_another_device_or_as_the_controller(embedded) -> None:
    client, port = embedded
    a, b = connect(port, enrol(client, "edge-a")), connect(port, enrol(client, "edge-b"))
    try:
        b.subscribe(*(device_topic("edge-b", kind) for kind in ("desired", "cmd", "telemetry_ack")))
        digest = "ab" * 32
        b.subscribe(chunk_topic(digest))
        desired = json.dumps({"schema": 1, "bundle": "evil", "version": "0.0.1", "digest": digest}).encode()
        command = Command(correlation_id="c0ffee00c0ffee00", command="rollback").payload()
        header = ChunkHeader(path="manifest.json", index=0, count=1, chunk_size=16 << 10, file_size=2, sha256="0" * 64)
        forged = {
            device_topic("edge-b", "desired"): desired,
            device_topic("edge-a", "desired"): desired,  # its own desired state is the controller's to set
            device_topic("edge-b", "cmd"): command,
            device_topic("edge-b", "telemetry_ack"): TelemetryAck(up_to_seq=10**12).payload(),
            device_topic("edge-b", "state"): DeviceState(online=False).payload(),
            device_topic("edge-b", "birth"): Birth(agent_version="evil", profile=probe()).payload(),
            chunk_topic(digest): chunk_payload(header, b"{}"),
            request_topic(digest, "edge-b"): ChunkRequest(path="manifest.json", chunk_size=16 << 10).payload(),
        }
        for topic, payload in forged.items():
            assert a.publish(topic, payload).getName() == "Not authorized", topic
        own = a.publish(device_topic("edge-a", "state"), DeviceState(online=True).payload(), retain=True)
        assert not own.is_failure
        wait_for(lambda: client.get("/v1/devices/edge-a", headers=READER).status_code == 200, "edge-a's own state")
        time.sleep(0.5)
        assert b.received == [], b.received
        assert client.get("/v1/devices/edge-b", headers=READER).status_code == 404  # no forged state recorded
    finally:
        a.close()
        b.close()


def test_a_device_reads_and_asks_for_the_chunks_of_only_the_bundle_it_is_told_to_run(embedded, archive: bytes) -> None:
    client, port = embedded
    pushed = client.post("/v1/bundles", content=archive, headers=ADMIN).json()
    digest, other = pushed["digest"], "cd" * 32
    told, idle = connect(port, enrol(client, "edge-a")), connect(port, enrol(client, "edge-b"))
    try:
        for device in (told, idle):
            device.publish(device_topic(device.username, "state"), DeviceState(online=True).payload())
        wait_for(lambda: client.get("/v1/devices/edge-b", headers=READER).status_code == 200, "no devices")
        body = {"bundle": pushed["name"], "version": pushed["version"], "devices": ["edge-a"]}
        assert client.put("/v1/desired", json=body, headers=ADMIN).status_code == 202
        request = ChunkRequest(path="manifest.json", chunk_size=16 << 10).payload()
        assert idle.publish(request_topic(digest, "edge-b"), request).getName() == "Not authorized"
        assert told.publish(request_topic(other, "edge-a"), request).getName() == "Not authorized"
        for device in (told, idle):
            device.subscribe(chunk_topic(digest))
        assert not told.publish(request_topic(digest, "edge-a"), request).is_failure
        wait_for(lambda: any(topic == chunk_topic(digest) for topic, _ in told.received), "edge-a got no chunk")
        time.sleep(0.3)
        assert idle.received == []
    finally:
        told.close()
        idle.close()


def test_a_new_device_gets_no_other_devices_retained_desired_states(embedded, archive: bytes) -> None:
    """Finding 1: on amqtt, a device that connected was sent the retained messages of every other
    client's subscriptions and applied the desired states of three other devices."""
    client, port = embedded
    pushed = client.post("/v1/bundles", content=archive, headers=ADMIN).json()
    devices = {name: connect(port, enrol(client, name)) for name in ("edge-a", "edge-b")}
    try:
        for name, device in devices.items():
            device.subscribe(device_topic(name, "desired"))
            device.publish(device_topic(name, "state"), DeviceState(online=True).payload(), retain=True)
        wait_for(lambda: all(client.get(f"/v1/devices/{n}", headers=READER).status_code == 200 for n in devices), "")
        body = {"bundle": pushed["name"], "version": pushed["version"], "devices": list(devices)}
        assert client.put("/v1/desired", json=body, headers=ADMIN).status_code == 202
        for name, device in devices.items():
            wait_for(lambda d=device: d.received, f"{name} did not get its desired state")
        third = connect(port, enrol(client, "edge-c"))
        third.subscribe(device_topic("edge-c", "desired"), device_topic("+", "desired"), "slmops/v1/#")
        time.sleep(0.5)
        assert third.received == [], [topic for topic, _ in third.received]
        third.close()
    finally:
        for device in devices.values():
            device.close()


def test_a_client_id_impostor_does_not_deafen_the_controller(embedded) -> None:
    """Finding 4: connecting with the controller's old fixed client id for 5 s used to leave it
    deaf. An impostor without credentials is refused before any session is touched, and the
    controller's id is its own per process."""
    client, port = embedded
    for client_id in ("slmops-controller", "slmops-agent-edge-a"):
        impostor = Device(port, None, None, client_id)
        assert not impostor.connected
        impostor.close()
    assert_heard(client, connect(port, enrol(client, "edge-a")))


def test_the_broker_is_started_again_when_it_dies_and_the_link_comes_back(embedded) -> None:
    client, port = embedded
    device_enrolment = enrol(client, "edge-a")
    mosquitto = [p for p in psutil.Process().children() if p.name() == "mosquitto"]
    assert len(mosquitto) == 1
    mosquitto[0].send_signal(signal.SIGKILL)
    wait_for(lambda: client.get("/health").json()["embedded_broker"]["restarts"] == 1, "not restarted", 20)
    wait_for(lambda: client.get("/health").json()["mqtt"] == "connected", "the bridge did not reconnect", 40)
    assert_heard(client, connect(port, device_enrolment))  # the enrolment survived the restart


def test_devices_join_and_their_will_reaches_the_controller(embedded) -> None:
    client, port = embedded
    enrolment = enrol(client, "edge-embedded")
    device = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="edge-embedded-1")  # MQTT 3.1.1, as agents
    device.username_pw_set(enrolment["username"], enrolment["password"])
    device.will_set(device_topic("edge-embedded", "state"), DeviceState(online=False).payload(), qos=1, retain=True)
    device.connect("127.0.0.1", port)
    device.loop_start()
    birth = Birth(agent_version="0.1.0", profile=probe())
    device.publish(device_topic("edge-embedded", "birth"), birth.payload(), qos=1).wait_for_publish(5)
    online = lambda: client.get("/v1/devices/edge-embedded", headers=READER).json().get("online")  # noqa: E731
    wait_for(online, "the device did not register through the embedded broker")
    device.loop_stop()
    device.socket().close()  # dies without a goodbye: the broker sends the will
    wait_for(lambda: not online(), "the will did not reach the controller", 20)


def test_a_taken_port_is_a_clear_start_up_error(controller_config) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        bind = f"127.0.0.1:{taken.getsockname()[1]}"
        config = controller_config.model_copy(update={"embedded_broker": True, "embedded_broker_bind": bind})
        with pytest.raises(BrokerStartError, match="set embedded_broker_bind"), TestClient(build_app(config)):
            pass
