"""Random and adversarial payloads on every MQTT handler of both daemons (issue 11): no message
may raise out of a handler (paho's network thread would die with it), and only valid messages
reach the work behind the handlers.

The handlers are called as paho calls them, with MQTTMessage objects, on objects built as the
daemons build them (not connected: nothing here needs the broker).
"""

import hashlib
import json
import string
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slmops.messages import (
    Birth,
    ChunkHeader,
    Command,
    CommandReply,
    DesiredState,
    DeviceState,
    FetchRefused,
    Reported,
    TelemetryAck,
    TelemetryBatch,
    chunk_topic,
    device_topic,
    request_topic,
)

DIGEST = "ab" * 32
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)


def adversarial() -> st.SearchStrategy[bytes]:
    """What the hostile run sent, and what random bytes and near-valid messages add to it."""
    deep = st.integers(min_value=30, max_value=20_000).map(lambda n: b"[" * n + b"]" * n)
    deep_objects = st.integers(min_value=30, max_value=5_000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n)
    digits = st.integers(min_value=21, max_value=6_000).map(lambda n: b'{"schema": 1, "up_to_seq": ' + b"9" * n + b"}")
    valid_shapes = st.sampled_from(
        [
            DesiredState(bundle="b", version="1", digest=DIGEST).payload(),
            Command(correlation_id="0123456789abcdef", command="probe").payload(),
            TelemetryAck(up_to_seq=3).payload(),
            FetchRefused(digest=DIGEST, path="manifest.json", reason="no").payload(),
            DeviceState(online=True).payload(),
        ]
    )
    mutated = st.tuples(valid_shapes, st.dictionaries(st.text(max_size=12), json_values, max_size=3)).map(
        lambda pair: json.dumps({**json.loads(pair[0]), **pair[1]}).encode()
    )
    header_fields = st.fixed_dictionaries(
        {"path": st.sampled_from(["manifest.json", "p", "../x"]), "index": st.integers(), "count": st.integers()},
        optional={"chunk_size": st.integers(), "file_size": st.integers(), "sha256": st.text(max_size=70)},
    )
    chunk_frames = st.tuples(
        header_fields.map(lambda h: json.dumps(h).encode()) | st.binary(max_size=64), st.binary(max_size=512)
    ).map(lambda pair: len(pair[0]).to_bytes(4, "big") + pair[0] + pair[1])
    lying_lengths = st.tuples(st.integers(min_value=0, max_value=2**32 - 1), st.binary(max_size=64)).map(
        lambda pair: pair[0].to_bytes(4, "big") + pair[1]
    )
    return (
        st.binary(max_size=2048)
        | chunk_frames
        | lying_lengths
        | json_values.map(lambda v: json.dumps(v).encode())
        | deep
        | deep_objects
        | digits
        | mutated
        | valid_shapes
        | st.sampled_from([b"", b"null", b"NaN", b'{"schema": 1, "x": Infinity}', b"\xff\xfe\x00", b"1e999999"])
    )


def message(topic: str, payload: bytes) -> mqtt.MQTTMessage:
    m = mqtt.MQTTMessage(topic=topic.encode())
    m.payload = payload
    return m


# --- the agent ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def uplink(tmp_path_factory: pytest.TempPathFactory):
    from slmops.agent import config as agent_config
    from slmops.agent.fleet.uplink import Uplink
    from slmops.agent.host import ModelHost
    from slmops.agent.telemetry import TelemetryQueue

    folder = tmp_path_factory.mktemp("fuzz-agent")
    config = agent_config.load(device_id="edge-fuzz", broker_url="mqtt://127.0.0.1:9", data_dir=folder)
    server = ModelHost(config)
    link = Uplink(config, server, TelemetryQueue(folder / "telemetry.db"))
    yield link
    server.close()


AGENT_TOPICS = [
    *(device_topic("edge-fuzz", kind) for kind in ("desired", "cmd", "telemetry_ack", "fetch_refused")),
    device_topic("edge-other", "desired"),
    chunk_topic(DIGEST),
    "slmops/v1/devices/edge-fuzz",
    "slmops/v1/bundles//chunk",
]


@FUZZ
@given(topic=st.sampled_from(AGENT_TOPICS) | st.text(max_size=80), payload=adversarial())
def test_the_agent_survives_any_message(uplink, topic: str, payload: bytes) -> None:
    work: list[object] = []
    uplink.on_work = work.append
    uplink._bundles[DIGEST] = (lambda header, data: work.append(header), lambda path, reason: work.append(reason))
    uplink._on_message(uplink.client, None, message(topic, payload))  # raises nothing
    for item in work:
        assert isinstance(item, DesiredState | Command | ChunkHeader | str)
    if work and isinstance(work[0], DesiredState | Command):
        assert topic in (device_topic("edge-fuzz", "desired"), device_topic("edge-fuzz", "cmd"))


@FUZZ
@given(
    index=st.integers(min_value=0, max_value=2**40),
    count=st.integers(min_value=1, max_value=2**40),
    file_size=st.integers(min_value=0, max_value=2**50),
    chunk_exp=st.integers(min_value=14, max_value=22),
    length=st.integers(min_value=0, max_value=70_000),
    listed=st.booleans(),
)
def test_a_fetch_takes_only_chunks_of_the_file_it_asked_for(
    tmp_path: Path, index: int, count: int, file_size: int, chunk_exp: int, length: int, listed: bool
) -> None:
    """The chunk handler behind the agent's chunk topic, with headers of any shape."""
    from slmops.agent.fleet.transfer import Wanted, _File

    size, chunk = 40_000, 16 << 10
    data = bytes(length)
    header = ChunkHeader(
        path="p",
        index=index,
        count=count,
        chunk_size=1 << chunk_exp,
        file_size=file_size,
        sha256=hashlib.sha256(data).hexdigest(),
    )
    target = tmp_path / f"f-{index}-{count}-{file_size}-{chunk_exp}-{length}-{listed}"
    with ThreadPoolExecutor(max_workers=1) as saver:
        wanted = Wanted(target, "0" * 64, size) if listed else Wanted(target, None, None)
        file = _File("p", wanted, chunk, saver)
        if header.chunk_size == chunk:  # the fetch drops other chunk sizes before the file sees them
            file.accept(header, memoryview(data))
        file.close()
    limit = size if listed else 4 << 20
    assert target.stat().st_size <= limit and len(file.sums) <= -(-limit // chunk)


# --- the controller -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bridge(tmp_path_factory: pytest.TempPathFactory):
    from slmops.controller.bridge import MqttBridge
    from slmops.controller.db import open_database
    from slmops.controller.fleet import Fleet
    from slmops.controller.store import BundleStore

    folder = tmp_path_factory.mktemp("fuzz-controller")
    engine = open_database(f"sqlite:///{folder / 'controller.sqlite'}")
    link = MqttBridge("mqtt://127.0.0.1:9", Fleet(engine), store=BundleStore(folder / "store"))
    yield link
    engine.dispose()


CONTROLLER_TOPICS = [
    *(device_topic("edge-fuzz", kind) for kind in ("birth", "state", "telemetry", "reported", "cmd_reply")),
    device_topic("edge-fuzz", "desired"),
    request_topic(DIGEST, "edge-fuzz"),
    request_topic("not-hex", "edge-fuzz"),
    "slmops/v1/bundles/" + DIGEST + "/request/../x",
    "slmops/v1/devices/" + "x" * 200 + "/state",
]
INBOUND = (Birth, DeviceState, Reported, TelemetryBatch)


@FUZZ
@given(
    topic=st.sampled_from(CONTROLLER_TOPICS) | st.text(alphabet=string.printable, max_size=80), payload=adversarial()
)
def test_the_controller_survives_any_message(bridge, topic: str, payload: bytes) -> None:
    recorded: list[object] = []
    bridge.recorder.put = lambda device_id, m: recorded.append(m)  # the queue to the database thread
    bridge.client.publish = lambda *a, **k: None  # not connected: a refusal would be published here
    bridge._on_message(bridge.client, None, message(topic, payload))  # raises nothing
    assert all(isinstance(m, INBOUND) for m in recorded)


@FUZZ
@given(payload=adversarial())
def test_a_command_reply_of_any_shape_is_matched_or_dropped(bridge, payload: bytes) -> None:
    bridge._on_message(bridge.client, None, message(device_topic("edge-fuzz", "cmd_reply"), payload))
    assert all(isinstance(r, CommandReply) for waiter in bridge._replies.values() for r in waiter[1])
