"""Devices over MQTT: a real Mosquitto, real paho clients, the controller's bridge, recorder and REST API."""

import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import text
from support import wait_for

from slmops.controller.db import migrate, open_database
from slmops.controller.fleet import Fleet
from slmops.controller.recorder import Recorder
from slmops.controller.service import build_app
from slmops.errors import NotFound
from slmops.messages import (
    Birth,
    ChunkRequest,
    DeviceState,
    HardwareProfile,
    Serving,
    TelemetryBatch,
    TelemetryRecord,
    chunk_topic,
    device_topic,
    request_topic,
)

ADMIN = {"Authorization": "Bearer admin-token-0123456789"}
READER = {"Authorization": "Bearer reader-token-0123456789"}
PROFILE = HardwareProfile(
    cpu_model="test CPU",
    cpu_cores_physical=4,
    cpu_cores_logical=8,
    isa=["avx2"],
    memory_total_bytes=8 << 30,
    memory_available_bytes=6 << 30,
    disk_free_bytes=100 << 30,
    os="Linux 6.1",
    arch="x86_64",
    accelerators=[{"provider": "cpu", "onnxruntime_name": "CPUExecutionProvider"}],
)


@pytest.fixture
def fleet_client(mosquitto: int, controller_config):
    from fastapi.testclient import TestClient

    config = controller_config.model_copy(update={"broker_url": f"mqtt://127.0.0.1:{mosquitto}"})
    with TestClient(build_app(config)) as client:
        wait_for(lambda: client.get("/health").json()["mqtt"] == "connected", "the bridge did not connect")
        yield client


def device(client, device_id: str) -> dict | None:
    response = client.get(f"/v1/devices/{device_id}", headers=READER)
    return response.json() if response.status_code == 200 else None


def test_birth_registers_a_device_and_state_updates_it(fleet_client, publisher) -> None:
    publisher.publish(device_topic("edge-1", "birth"), Birth(agent_version="0.1.0", profile=PROFILE).payload(), qos=1)
    born = wait_for(lambda: device(fleet_client, "edge-1"), "the birth did not register the device")
    assert born["online"] and born["agent_version"] == "0.1.0" and born["profile"]["cpu_model"] == "test CPU"

    serving = Serving(bundle="tiny", version="1.0.0", variant="cpu-int4", provider="cpu")
    publisher.publish(device_topic("edge-1", "state"), DeviceState(online=True, serving=serving).payload(), qos=1)
    updated = wait_for(
        lambda: (d := device(fleet_client, "edge-1")) and d["serving"] and d, "the state did not update the device"
    )
    assert updated["serving"] == serving.model_dump() and updated["last_seen"] >= born["last_seen"]
    assert [d["id"] for d in fleet_client.get("/v1/devices", headers=READER).json()] == ["edge-1"]


AGENT_THAT_DIES = """
import sys, time
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from slmops.messages import DeviceState, device_topic
port = int(sys.argv[1])
client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="edge-2")
client.will_set(device_topic("edge-2", "state"), DeviceState(online=False).payload(), qos=1, retain=True)
client.connect("127.0.0.1", port, keepalive=5)
client.loop_start()
online = DeviceState(online=True).payload()
client.publish(device_topic("edge-2", "state"), online, qos=1, retain=True).wait_for_publish()
print("online", flush=True)
time.sleep(60)
"""


def test_a_device_that_dies_is_marked_offline_by_its_will(fleet_client, mosquitto: int) -> None:
    agent = subprocess.Popen([sys.executable, "-c", AGENT_THAT_DIES, str(mosquitto)], stdout=subprocess.PIPE, text=True)
    try:
        assert agent.stdout is not None and agent.stdout.readline().strip() == "online"
        wait_for(lambda: (d := device(fleet_client, "edge-2")) and d["online"], "the device never came online")
        agent.kill()  # no goodbye: the broker publishes the will
        agent.wait(timeout=10)
        wait_for(lambda: (d := device(fleet_client, "edge-2")) and not d["online"], "the will did not mark it offline")
    finally:
        agent.kill()
        agent.communicate(timeout=10)


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        (device_topic("edge-3", "birth"), b"{not json", "payload is not JSON"),
        (device_topic("edge-3", "birth"), b'{"schema": 1, "agent_version": "x"}', "profile: Field required"),
        (device_topic("edge-3", "state"), b'{"schema": 2, "online": true}', "schema: Input should be 1"),
        (
            device_topic("edge-3", "state"),
            b'{"schema": 1, "online": "maybe"}',
            "online: Input should be a valid boolean",
        ),
        (device_topic("edge-3", "state"), b'{"schema": 1, "online": true, "rm": "-rf"}', "rm: Extra inputs"),
        (device_topic("edge-3", "state"), b"\xff\xfe", "payload is not JSON"),
        ("slmops/v1/devices/../state", b'{"schema": 1, "online": true}', "not a valid device id"),
        (device_topic("edge-3", "telemetry"), b'{"schema": 1, "records": []}', "records: List should have at least 1"),
        (device_topic("edge-3", "telemetry"), b'{"schema": 1, "records": [{"seq": -1}]}', "records.0.seq"),
        (
            device_topic("edge-3", "reported"),
            b'{"schema": 1, "bundle": "b", "version": "1", "digest": "d", "status": "exploded"}',
            "status: Input should be",
        ),
        (device_topic("edge-3", "cmd_reply"), b'{"schema": 1, "ok": true}', "correlation_id: Field required"),
        (request_topic("ab" * 32, "edge-3"), b"{not json", "payload is not JSON"),
        (
            request_topic("ab" * 32, "edge-3"),
            b'{"schema": 1, "path": "../../admin.token", "chunk_size": 16384}',
            "no file '../../admin.token' in stored bundle",
        ),
        (
            request_topic("ab" * 32, "edge-3"),
            b'{"schema": 1, "path": "manifest.json", "chunk_size": 7}',
            "chunk_size: Value error, a chunk size is a power of two from 16384 to 4194304 bytes",
        ),
        (
            request_topic("ab" * 32, "edge-3"),
            b'{"schema": 1, "path": "manifest.json", "chunk_size": 65537}',
            "a chunk size is a power of two",
        ),
        (request_topic("not-a-digest", "edge-3"), b"{}", "is not a bundle digest"),
        # What used to raise RecursionError or ValueError on paho's thread (issue 11, finding 3)
        *[
            (topic, payload, reason)
            for topic in (
                device_topic("edge-3", "state"),
                device_topic("edge-3", "birth"),
                device_topic("edge-3", "telemetry"),
                device_topic("edge-3", "reported"),
                device_topic("edge-3", "cmd_reply"),
                request_topic("ab" * 32, "edge-3"),
            )
            for payload, reason in (
                (b"[" * 10_000 + b"]" * 10_000, "JSON nested more than 32 deep"),
                (b'{"schema": 1, "online": ' + b"7" * 5000 + b"}", "an integer of 5000 digits"),
                (b'{"schema": 1, "x": NaN}', "NaN is not JSON"),
            )
        ],
        (device_topic("edge-3", "state"), b'{"a": "' + b"x" * (70 << 10) + b'"}', "more than the 65536"),
    ],
)
def test_malformed_messages_are_logged_and_dropped(
    fleet_client, publisher, caplog: pytest.LogCaptureFixture, topic: str, payload: bytes, reason: str
) -> None:
    caplog.set_level(logging.WARNING, logger="slmops.controller.bridge")
    publisher.publish(topic, payload, qos=1)
    wait_for(lambda: fleet_client.get("/health").json()["dropped_messages"] == 1, "the message was not dropped")
    assert any(reason in r.getMessage() and "dropped a message from" in r.getMessage() for r in caplog.records)
    # still running, still correct
    publisher.publish(device_topic("edge-3", "state"), DeviceState(online=True).payload(), qos=1)
    wait_for(lambda: device(fleet_client, "edge-3"), "a valid message after a bad one was not recorded")


def test_a_request_for_what_is_not_stored_is_refused_to_the_device(fleet_client, publisher) -> None:
    """The device's fetch fails at once with the reason (finding 8: it waited 20 rounds)."""
    from slmops.messages import FetchRefused, parse

    refusals: list[FetchRefused] = []
    subscribed = threading.Event()
    publisher.on_subscribe = lambda *_: subscribed.set()
    publisher.on_message = lambda _c, _u, m: refusals.append(parse(FetchRefused, m.payload, m.topic))
    publisher.subscribe(device_topic("edge-9", "fetch_refused"), qos=1)
    assert subscribed.wait(5)
    request = ChunkRequest(path="manifest.json", chunk_size=256 << 10)
    publisher.publish(request_topic("cd" * 32, "edge-9"), request.payload(), qos=1)
    wait_for(lambda: refusals, "no fetch_refused came back")
    assert (refusals[0].digest, refusals[0].path) == ("cd" * 32, "manifest.json")
    assert "no file 'manifest.json' in stored bundle cdcdcdcdcdcd" in refusals[0].reason


def test_operators_label_devices_and_it_is_audited(fleet_client, publisher) -> None:
    publisher.publish(device_topic("edge-4", "birth"), Birth(agent_version="0.1.0", profile=PROFILE).payload(), qos=1)
    wait_for(lambda: device(fleet_client, "edge-4"), "no device")
    labels = {"tags": {"site": "plant-3"}, "groups": ["canary", "line-a", "canary"]}
    assert fleet_client.patch("/v1/devices/edge-4", json=labels, headers=READER).status_code == 403
    labelled = fleet_client.patch("/v1/devices/edge-4", json=labels, headers=ADMIN).json()
    assert labelled["tags"] == {"site": "plant-3"} and labelled["groups"] == ["canary", "line-a"]
    assert fleet_client.patch("/v1/devices/nobody", json=labels, headers=ADMIN).status_code == 404
    assert fleet_client.patch("/v1/devices/edge-4", json={"colour": "red"}, headers=ADMIN).status_code == 400
    entry = fleet_client.get("/v1/audit", headers=ADMIN).json()[0]
    assert (entry["actor"], entry["action"], entry["target"]) == ("alice", "device.label", "edge-4")
    assert json.dumps(entry["detail"], sort_keys=True) == json.dumps(
        {"groups": ["canary", "line-a"], "tags": {"site": "plant-3"}}, sort_keys=True
    )


def test_telemetry_is_stored_once_and_acknowledged(fleet_client, publisher) -> None:
    from slmops.messages import TelemetryAck, TelemetryBatch, TelemetryRecord, parse

    acks: list[int] = []
    publisher.on_message = lambda _c, _u, m: acks.append(parse(TelemetryAck, m.payload, m.topic).up_to_seq)
    publisher.subscribe(device_topic("edge-5", "telemetry_ack"), qos=1)
    time.sleep(0.2)  # the subscription is in place
    records = [
        TelemetryRecord(seq=s, created=time.time(), kind="system", payload={"cpu_percent": s}) for s in (1, 2, 3)
    ]
    batch = TelemetryBatch(records=records).payload()
    publisher.publish(device_topic("edge-5", "telemetry"), batch, qos=1)
    publisher.publish(device_topic("edge-5", "telemetry"), batch, qos=1)  # the ack was lost: sent again
    wait_for(lambda: acks == [3, 3], f"two acknowledgements up to seq 3 (got {acks})")
    stored = fleet_client.get("/v1/devices/edge-5/telemetry", headers=READER).json()
    assert [r["seq"] for r in stored] == [3, 2, 1] and stored[0]["payload"] == {"cpu_percent": 3}
    assert fleet_client.get("/v1/devices/nobody/telemetry", headers=READER).status_code == 404


def test_one_bundle_desired_for_many_devices_at_once_by_id_or_group(
    fleet_client, publisher, mosquitto: int, archive: bytes
) -> None:
    for device_id in ("edge-5", "edge-6", "edge-7"):
        publisher.publish(
            device_topic(device_id, "birth"), Birth(agent_version="0.1", profile=PROFILE).payload(), qos=1
        )
    wait_for(lambda: all(device(fleet_client, d) for d in ("edge-5", "edge-6", "edge-7")), "no devices")
    fleet_client.patch("/v1/devices/edge-6", json={"groups": ["line-b"]}, headers=ADMIN).raise_for_status()
    fleet_client.patch("/v1/devices/edge-7", json={"groups": ["line-b", "canary"]}, headers=ADMIN).raise_for_status()
    pushed = fleet_client.post("/v1/bundles", content=archive, headers=ADMIN).json()
    received: dict[str, bytes] = {}
    watcher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="test-watcher")
    watcher.on_message = lambda _c, _u, m: received.__setitem__(m.topic.split("/")[3], m.payload)
    watcher.connect("127.0.0.1", mosquitto)
    watcher.loop_start()
    watcher.subscribe(device_topic("+", "desired"), qos=1)
    try:
        body = {"bundle": pushed["name"], "version": pushed["version"]}
        assert fleet_client.put("/v1/desired", json={**body, "group": "line-b"}, headers=READER).status_code == 403
        unknown = fleet_client.put("/v1/desired", json={**body, "devices": ["edge-5", "nobody"]}, headers=ADMIN)
        assert unknown.status_code == 404 and "nobody" in unknown.json()["error"]["message"]
        assert device(fleet_client, "edge-5")["desired"] is None  # all or none
        for selector in ({}, {"devices": ["edge-5"], "group": "line-b"}, {"devices": []}):
            assert fleet_client.put("/v1/desired", json={**body, **selector}, headers=ADMIN).status_code == 400
        assert fleet_client.put("/v1/desired", json={**body, "group": "nobody"}, headers=ADMIN).status_code == 404

        by_group = fleet_client.put("/v1/desired", json={**body, "group": "line-b"}, headers=ADMIN)
        assert by_group.status_code == 202 and by_group.json()["devices"] == ["edge-6", "edge-7"]
        wait_for(lambda: set(received) == {"edge-6", "edge-7"}, "the group's devices were not sent the desired state")
        assert all(json.loads(p)["digest"] == pushed["digest"] for p in received.values())
        by_id = fleet_client.put("/v1/desired", json={**body, "devices": ["edge-5", "edge-5"]}, headers=ADMIN)
        assert by_id.json()["devices"] == ["edge-5"]
        wait_for(lambda: "edge-5" in received, "edge-5 was not sent the desired state")
    finally:
        watcher.disconnect()
        watcher.loop_stop()
    audited = [
        e["target"] for e in fleet_client.get("/v1/audit", headers=ADMIN).json() if e["action"] == "device.desired"
    ]
    assert sorted(audited) == ["edge-5", "edge-6", "edge-7"]


def test_a_device_that_drifts_from_its_desired_state_is_told_again_and_flagged(
    fleet_client, publisher, mosquitto: int, archive: bytes
) -> None:
    """Finding 2: a forged desired state downgraded a device, served within 3 s, and the controller
    never noticed. Now what a device serves is compared with what it was told to."""
    from slmops.messages import Reported

    publisher.publish(device_topic("edge-d", "birth"), Birth(agent_version="0.1", profile=PROFILE).payload(), qos=1)
    wait_for(lambda: device(fleet_client, "edge-d"), "no device")
    pushed = fleet_client.post("/v1/bundles", content=archive, headers=ADMIN).json()
    desired_messages: list[bytes] = []
    watcher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="test-drift-watcher")
    watcher.on_message = lambda _c, _u, m: desired_messages.append(m.payload)
    watcher.connect("127.0.0.1", mosquitto)
    watcher.loop_start()
    watcher.subscribe(device_topic("edge-d", "desired"), qos=1)
    try:
        body = {"bundle": pushed["name"], "version": pushed["version"]}
        assert fleet_client.put("/v1/devices/edge-d/desired", json=body, headers=ADMIN).status_code == 202
        wait_for(lambda: len(desired_messages) == 1, "the desired state was not published")

        def report(status: str, digest: str) -> None:
            message = Reported(bundle="tiny", version="1.0.0", digest=digest, status=status, variant="cpu-int4")
            publisher.publish(device_topic("edge-d", "reported"), message.payload(), qos=1)

        report("failed", "ef" * 32)  # a superseded attempt's last word is not the device's report
        report("healthy", pushed["digest"])
        wait_for(lambda: (device(fleet_client, "edge-d")["reported"] or {}).get("status") == "healthy", "no report")
        serving = Serving(bundle="tiny", version="1.0.0", variant="cpu-int4", provider="cpu")
        publisher.publish(device_topic("edge-d", "state"), DeviceState(online=True, serving=serving).payload(), 1)
        time.sleep(0.3)
        assert device(fleet_client, "edge-d")["drift"] is None and len(desired_messages) == 1  # in step

        older = Serving(bundle="tiny", version="0.9.0", variant="cpu-int4", provider="cpu")
        publisher.publish(device_topic("edge-d", "state"), DeviceState(online=True, serving=older).payload(), 1)
        wait_for(lambda: len(desired_messages) == 2, "the drifted device was not told its desired state again")
        assert json.loads(desired_messages[1])["digest"] == pushed["digest"]
        flagged = device(fleet_client, "edge-d")
        assert flagged["drift"] == {"desired": "tiny 1.0.0", "serving": older.model_dump()}
        audited = [e for e in fleet_client.get("/v1/audit", headers=ADMIN).json() if e["action"] == "device.drift"]
        assert [(e["actor"], e["target"]) for e in audited] == [("controller", "edge-d")]
    finally:
        watcher.disconnect()
        watcher.loop_stop()


def test_chunks_are_served_while_the_database_is_locked(
    fleet_client, publisher, mosquitto: int, archive: bytes, controller_config
) -> None:
    """paho's network thread never waits on the database: with every write to it held up (a long
    transaction elsewhere), a chunk asked for still comes; the birth sent before the request is
    written once the lock goes."""
    digest = fleet_client.post("/v1/bundles", content=archive, headers=ADMIN).json()["digest"]
    chunk, subscribed = threading.Event(), threading.Event()
    watcher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="test-chunk-watcher")
    watcher.on_message = lambda *_: chunk.set()
    watcher.on_subscribe = lambda *_: subscribed.set()
    watcher.connect("127.0.0.1", mosquitto)
    watcher.loop_start()
    engine = open_database(controller_config.database_url)
    try:
        watcher.subscribe(chunk_topic(digest), qos=1)
        assert subscribed.wait(10)
        with engine.connect() as locker:
            if engine.dialect.name == "sqlite":
                locker.exec_driver_sql("BEGIN IMMEDIATE")  # the write lock: readers go on, writers wait
            else:
                locker.execute(text("LOCK TABLE device IN EXCLUSIVE MODE"))
            publisher.publish(device_topic("edge-8", "birth"), Birth(agent_version="0.1", profile=PROFILE).payload(), 1)
            request = ChunkRequest(path="manifest.json", chunk_size=16 << 10)
            publisher.publish(request_topic(digest, "edge-8"), request.payload(), qos=1)
            assert chunk.wait(10), "no chunk came while the database was locked"
            assert device(fleet_client, "edge-8") is None  # its birth is still waiting for the lock
            locker.rollback()
        wait_for(lambda: device(fleet_client, "edge-8"), "the birth was not written once the lock went")
    finally:
        watcher.disconnect()
        watcher.loop_stop()
        engine.dispose()


REFUSE_POISON = {
    "sqlite": [
        "CREATE TRIGGER refuse BEFORE INSERT ON device WHEN NEW.id = 'poison' BEGIN SELECT RAISE(ABORT, 'refused'); END"
    ],
    "postgresql": [
        "CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION 'refused'; END $$ LANGUAGE plpgsql",
        "CREATE TRIGGER refuse BEFORE INSERT ON device FOR EACH ROW WHEN (NEW.id = 'poison') EXECUTE FUNCTION refuse()",
    ],
}


@pytest.fixture
def refusing_fleet(controller_config) -> Iterator[Fleet]:
    """A fleet whose database refuses the row of device `poison` (a trigger: a real refusal, as a
    constraint or a full disk would give)."""
    engine = open_database(controller_config.database_url)
    migrate(engine)
    with engine.begin() as connection:
        for statement in REFUSE_POISON[engine.dialect.name]:
            connection.execute(text(statement))
    yield Fleet(engine)
    engine.dispose()


def telemetry(*seqs: int) -> TelemetryBatch:
    return TelemetryBatch(
        records=[TelemetryRecord(seq=s, created=time.time(), kind="system", payload={"n": s}) for s in seqs]
    )


def test_a_message_the_database_refuses_loses_only_itself(
    refusing_fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="slmops.controller.recorder")
    fleet, acks = refusing_fleet, []
    recorder = Recorder(fleet, lambda device, seq: acks.append((device, seq)))
    queued = [
        ("edge-a", Birth(agent_version="0.1.0", profile=PROFILE)),
        ("edge-a", telemetry(1, 2, 3)),
        ("poison", Birth(agent_version="0.1.0", profile=PROFILE)),
        ("edge-b", DeviceState(online=True)),
        ("edge-b", telemetry(7)),
    ]
    for device_id, message in queued:  # all queued before the thread starts: one batch
        recorder.put(device_id, message)
    recorder.start()
    recorder.stop()  # writes what is queued first

    assert fleet.device("edge-a").profile["cpu_model"] == "test CPU" and fleet.device("edge-b").online
    assert [r.seq for r in fleet.telemetry("edge-a")] == [3, 2, 1]
    with pytest.raises(NotFound):
        fleet.device("poison")
    assert recorder.failed == 1 and acks == [("edge-a", 3), ("edge-b", 7)]  # acked once stored, not before
    assert [r.getMessage() for r in caplog.records] == ["could not record a Birth from device poison"]


def test_the_recorders_queue_is_bounded_in_records_not_messages(refusing_fleet: Fleet, monkeypatch) -> None:
    """A backlog of big batches must not hold thousands of them: put() waits once QUEUED_RECORDS are queued."""
    import threading

    from slmops.controller import recorder as recording

    monkeypatch.setattr(recording, "QUEUED_RECORDS", 250)
    recorder = Recorder(refusing_fleet, lambda device, seq: None)
    recorder.put("edge-a", Birth(agent_version="0.1.0", profile=PROFILE))
    recorder.put("edge-a", telemetry(*range(1, 101)))
    recorder.put("edge-a", telemetry(*range(101, 201)))
    third = threading.Thread(target=recorder.put, args=("edge-a", telemetry(*range(201, 301))))
    third.start()
    third.join(timeout=0.5)
    assert third.is_alive() and recorder.queued == 3, "301 records would be past the bound: it waits"
    recorder.start()  # the recorder writes what is queued: room for the third batch
    third.join(timeout=10)
    assert not third.is_alive()
    recorder.stop()
    assert [r.seq for r in refusing_fleet.telemetry("edge-a", limit=1000)][:1] == [300]


def test_a_report_recorded_after_a_later_one_does_not_replace_it(controller_config) -> None:
    """Two controller replicas on a shared subscription may record one device's reports out of order."""
    from datetime import UTC, datetime, timedelta

    from slmops.messages import Reported

    engine = open_database(controller_config.database_url)
    fleet = Fleet(engine)
    try:
        sent = datetime.now(UTC)
        report = {"bundle": "tiny", "version": "2.0.0", "digest": "d" * 64}
        healthy = Reported(**report, status="healthy", sent_at=sent)
        activating = Reported(**report, status="activating", sent_at=sent - timedelta(milliseconds=1))
        fleet.record([("edge-a", healthy)])
        fleet.record([("edge-a", activating)])
        assert fleet.device("edge-a").reported["status"] == "healthy"
        retry = Reported(**report, status="downloading", sent_at=sent + timedelta(seconds=1))
        fleet.record([("edge-a", retry)])
        assert fleet.device("edge-a").reported["status"] == "downloading", "a later report still replaces it"
    finally:
        engine.dispose()


def test_a_devices_previous_slot_is_what_its_state_says_and_outlives_its_will(controller_config) -> None:
    """The agent's other A/B slot (what a rollback returns to), as the dashboard's device page shows it."""
    from slmops.controller.protocol import DeviceSummary
    from slmops.messages import SlotHeld

    engine = open_database(controller_config.database_url)
    migrate(engine)
    fleet = Fleet(engine)
    try:
        serving = Serving(bundle="tiny", version="2.0.0", variant="cpu-int4", provider="cpu")
        held = SlotHeld(bundle="tiny", version="1.0.0", variant="cpu-int4")
        fleet.record([("edge-a", DeviceState(online=True, serving=serving))])
        assert fleet.device("edge-a").previous is None  # its first bundle: no other slot yet
        fleet.record([("edge-a", DeviceState(online=True, serving=serving, previous=held))])
        fleet.record([("edge-a", DeviceState(online=False))])  # the will: the slots stay on its disk
        summary = DeviceSummary.of(fleet.device("edge-a"))
        assert summary.previous == held.model_dump() and summary.serving is None and not summary.online
    finally:
        engine.dispose()


def test_a_device_born_short_of_its_desired_state_is_told_it_again(controller_config) -> None:
    """Not left to the broker's retained copy, which a broker cluster may not have on the device's node."""
    from slmops.messages import DesiredState, Reported

    engine = open_database(controller_config.database_url)
    fleet = Fleet(engine)
    try:
        fleet.record([("edge-a", Birth(agent_version="0.1.0", profile=PROFILE))])
        with engine.begin() as connection:
            desired = {"bundle": "tiny", "version": "2.0.0", "digest": "d" * 64}
            connection.execute(text("UPDATE device SET desired = :d WHERE id = 'edge-a'"), {"d": json.dumps(desired)})
        told = fleet.record([("edge-a", Birth(agent_version="0.1.0", profile=PROFILE))])
        assert [(device, d.model_dump(exclude={"sent_at"})) for device, d in told] == [
            ("edge-a", DesiredState.model_validate(desired).model_dump(exclude={"sent_at"}))
        ]
        fleet.record([("edge-a", Reported(**desired, status="healthy"))])
        assert fleet.record([("edge-a", Birth(agent_version="0.1.0", profile=PROFILE))]) == [], "it reached it"
    finally:
        engine.dispose()


def test_two_replicas_registering_the_same_new_devices_at_once_lose_no_message(database_url: str) -> None:
    """One replica records a device's birth while another records its state (a shared subscription splits
    them): both register the device at the same moment. A plain INSERT lost that race (the loser's message
    was dropped: the device never got its profile)."""
    import threading

    engine = open_database(database_url)
    replicas = [Fleet(engine), Fleet(engine)]
    devices = [f"race-{i:02d}" for i in range(40)]
    start, failures = threading.Barrier(2), []

    def record(fleet: Fleet, message) -> None:
        start.wait()
        try:
            for device_id in devices:
                fleet.record([(device_id, message)])
        except Exception as e:
            failures.append(e)

    threads = [threading.Thread(target=record, args=(replicas[0], Birth(agent_version="0.1.0", profile=PROFILE))),
               threading.Thread(target=record, args=(replicas[1], DeviceState(online=True)))]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not failures, failures
    assert all(
        replicas[0].device(d).profile["cpu_model"] == "test CPU" and replicas[0].device(d).online for d in devices
    )
    engine.dispose()


def test_a_page_of_devices_is_filtered_and_counted_in_the_database(controller_config) -> None:
    """What the dashboard lists: every filter in SQL on both databases, groups and tags matched whole in
    their JSON (a name inside another, quotes, LIKE's own % and _, non-ASCII), pages by id."""
    from slmops.controller.audit import Actor
    from slmops.controller.fleet import DeviceFilter
    from slmops.controller.rollout_plan import hardware_class

    engine = open_database(controller_config.database_url)
    migrate(engine)
    fleet, admin = Fleet(engine), Actor("alice", "admin")
    npu = HardwareProfile(**{**PROFILE.model_dump(), "cpu_model": "Snapdragon X", "accelerators": [
        {"provider": "cpu", "onnxruntime_name": "CPUExecutionProvider"},
        {"provider": "qnn", "onnxruntime_name": "QNNExecutionProvider"}]})  # fmt: skip
    births = [(f"edge-{i:02d}", Birth(agent_version="0.1", profile=npu if i % 4 == 0 else PROFILE)) for i in range(12)]
    fleet.record([*births, ("edge-03", DeviceState(online=False)), ("edge-07", DeviceState(online=False)),
                  ("edge-05", DeviceState(online=True, serving=Serving(bundle="b", version="1", variant="v",
                                                                       provider="cpu")))])  # fmt: skip
    fleet.label("edge-01", admin, {"site": 'plant "3"'}, ["canary", "eu"])
    fleet.label("edge-02", admin, {"site": "plant 3x"}, ["not-canary"])
    fleet.label("edge-05", admin, {"site": "ünïcode"}, ["50%_off"])
    fleet.label("edge-06", admin, {"owner": "site"}, ["5000_off"])

    def ids(**chosen: str) -> list[str]:
        rows, total = fleet.listing(DeviceFilter(**chosen), 100, 0)
        assert total == len(rows)
        return [d.id for d in rows]

    assert ids() == [d for d, _ in births]
    assert ids(status="offline") == ["edge-03", "edge-07"] and len(ids(status="online")) == 10
    assert ids(hardware_class=hardware_class(npu.model_dump(mode="json"))) == ["edge-00", "edge-04", "edge-08"]
    assert ids(group="canary") == ["edge-01"]  # not edge-02's "not-canary"
    assert ids(group="50%_off") == ["edge-05"]  # % and _ are not wildcards
    assert ids(tag='site=plant "3"') == ["edge-01"] and ids(tag="site=plant 3x") == ["edge-02"]
    assert ids(tag="site=ünïcode") == ["edge-05"] and ids(tag="owner=site") == ["edge-06"]
    assert ids(text="EDGE-1") == ["edge-10", "edge-11"] and ids(text="%") == []
    assert ids(status="online", hardware_class=hardware_class(npu.model_dump(mode="json"))) == [
        "edge-00",
        "edge-04",
        "edge-08",
    ]
    page, total = fleet.listing(DeviceFilter(), 5, 10)
    assert [d.id for d in page] == ["edge-10", "edge-11"] and total == 12

    overview = fleet.overview()
    assert (overview.total, overview.online) == (12, 10)
    assert sorted(n for _, n in overview.classes) == [3, 9]
    assert overview.serving == [("nothing", 11), ("b 1 · v · cpu", 1)]
    assert overview.groups == sorted(["5000_off", "50%_off", "canary", "eu", "not-canary"])
    engine.dispose()
