"""Chunked bundle transfer over a real Mosquitto when things go wrong on the way.

Agents reach the broker through a LinkProxy (link_proxy.py): a TCP relay that can pace what the
broker sends, so that a transfer of the tiny bundle (5.7 MB in 16 KiB chunks) lasts seconds, and
flip a byte inside a chunk in flight.
"""

import signal
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from slmops.agent.fleet.transfer import saved_chunks
from slmops.manifest import Manifest
from slmops.messages import ChunkRequest

CHUNK = str(16 << 10)
RATE = 1.5e6  # bytes/s from the broker to each paced agent: about 4 s for the tiny variant


class RequestSpy:
    """Every chunk request devices publish, as the controller receives them."""

    def __init__(self, port: int) -> None:
        self.requests: list[tuple[str, ChunkRequest]] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="request-spy")
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe("slmops/v1/bundles/+/request/+", qos=1)
        assert subscribed.wait(10)

    def _on_message(self, _c: object, _u: object, message: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.requests.append((message.topic.split("/")[5], ChunkRequest.model_validate_json(message.payload)))

    def since(self, start: int) -> list[tuple[str, ChunkRequest]]:
        """(device id, request) of each request from the start-th on."""
        with self.lock:
            return self.requests[start:]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def spy(broker):
    requests = RequestSpy(broker.port)
    yield requests
    requests.close()


def downloading(controller, device_id: str, at_least: float) -> bool:
    r = controller.device(device_id).get("reported") or {}
    return r.get("status") == "downloading" and r.get("percent", 0) >= at_least and r.get("variant") is not None


def test_a_chunk_corrupted_in_flight_is_refused_and_fetched_again(
    fleet, two_versions, agent_process, link_proxy, eventually
) -> None:
    controller, _ = fleet
    proxy = link_proxy()
    # A byte flipped 500 bytes past the path in a model.onnx.data chunk's header: in its data.
    proxy.corrupt(b'"path":"variants/cpu-int4/model.onnx.data"', offset=500)
    agent = agent_process(
        "edge-corrupt", proxy.url, chunk_size_bytes=CHUNK, transfer_timeout_s="30", smoke_min_speed_fraction="0"
    )
    eventually(lambda: controller.device("edge-corrupt").get("online"), "the agent did not join")
    controller.desire("edge-corrupt", "1.0.0")
    eventually(lambda: controller.reported("edge-corrupt", "healthy", "1.0.0"), "it never became healthy", 60)
    assert proxy.corrupted == 1 and agent.chat_model() == "tiny:1.0.0"
    output = agent.stop()
    assert "model.onnx.data does not match its sha256; asking for it again" in output, output
    assert "no chunks for" not in output, output  # asked for again at once, not after the timeout


def test_a_kill_mid_download_resumes_with_the_chunks_on_disk(
    fleet, two_versions, agent_process, link_proxy, spy, tmp_path: Path, eventually
) -> None:
    controller, broker_url = fleet
    proxy = link_proxy(rate_bytes_per_s=RATE)
    agent = agent_process("edge-kill", proxy.url, chunk_size_bytes=CHUNK, smoke_min_speed_fraction="0")
    eventually(lambda: controller.device("edge-kill").get("online"), "the agent did not join")
    controller.desire("edge-kill", "1.0.0")
    eventually(lambda: downloading(controller, "edge-kill", 40), "the download did not get under way", 60)
    agent.stop(signal.SIGKILL)

    slot = next((tmp_path / "agent-edge-kill" / "slots").glob("*.partial"))
    partial = slot / "variants" / "cpu-int4"
    sizes = {f.path: f.size for f in Manifest.load(slot / "manifest.json").variant("cpu-int4").files}
    on_disk = {
        f"variants/cpu-int4/{target.name}": saved_chunks(target, int(CHUNK), sizes[target.name])
        for target in (b.with_name(b.name.removesuffix(".chunks")) for b in partial.glob("*.chunks"))
    }
    assert any(any(bitmap or []) for bitmap in on_disk.values()), "no checkpoint reached the disk"
    before = len(spy.since(0))
    left_over = [partial / "model.onnx.data.tmp", partial.parent / "cpu-fp32" / "model.onnx"]
    for path in left_over:  # a checkpoint cut short; a variant this device chose before
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"left by an earlier attempt")

    agent.env["SLMOPS_AGENT_BROKER_URL"] = broker_url  # straight to the broker, unpaced, this time
    agent.start()
    eventually(lambda: controller.reported("edge-kill", "healthy", "1.0.0"), "it never became healthy", 60)
    resumed = [r for device, r in spy.since(before) if device == "edge-kill" and r.path.startswith("variants/")]
    for request in resumed:  # a file complete on disk is not asked for at all
        if request.path in on_disk:  # of the others, only the chunks the checkpoint did not claim
            bitmap = on_disk[request.path] or []
            assert request.chunks == [i for i, sha256 in enumerate(bitmap) if sha256 is None], request.path
    assert agent.chat_model() == "tiny:1.0.0"  # the slot holds exactly the variant's files: verified
    output = agent.stop()
    assert "resuming variants/cpu-int4/" in output, output
    assert "removing variants/cpu-fp32/model.onnx, left by an earlier attempt" in output, output


def test_a_broker_restart_mid_transfer_and_everyone_completes(
    fleet, two_versions, agent_process, link_proxy, broker, eventually
) -> None:
    controller, _ = fleet
    devices = [f"edge-r{i}" for i in range(3)]
    proxy = link_proxy(rate_bytes_per_s=RATE)
    agents = [
        agent_process(d, proxy.url, chunk_size_bytes=CHUNK, transfer_timeout_s="2", smoke_min_speed_fraction="0")
        for d in devices
    ]
    for device in devices:
        eventually(lambda d=device: controller.device(d).get("online"), f"{device} did not join")
    for device in devices:
        controller.desire(device, "1.0.0")
    for device in devices:
        eventually(lambda d=device: downloading(controller, d, 10), f"{device} did not start downloading", 60)
    broker.stop()
    broker.start()  # empty: the controller publishes the desired states again
    for device in devices:
        eventually(lambda d=device: controller.reported(d, "healthy", "1.0.0"), f"{device} never completed", 90)
    assert [a.chat_model() for a in agents] == ["tiny:1.0.0"] * 3
    for agent in agents:
        assert "lost the broker" in agent.stop()


def test_the_agent_refuses_what_the_controller_should_not_have_served(
    fleet, two_versions, agent_process, tmp_path: Path, eventually
) -> None:
    """Its own checks, not the controller's: a signer it does not trust, bytes that changed in the
    controller's store after the push. Nothing is activated; the reason is reported."""
    from slmops.signing import generate_keypair

    controller, broker_url = fleet
    _, stranger = generate_keypair(tmp_path / "stranger")
    suspicious = agent_process("edge-strict", broker_url, trusted_keys=f'["{stranger}"]')
    eventually(lambda: controller.device("edge-strict").get("online"), "the agent did not join")
    controller.desire("edge-strict", "1.0.0")
    failed = eventually(lambda: controller.reported("edge-strict", "failed", "1.0.0"), "an untrusted bundle was taken")
    assert "trusted" in failed["reason"], failed
    assert controller.device("edge-strict")["serving"] is None
    suspicious.stop()

    digest = next(b.digest for b in controller.api.bundles() if b.version == "2.0.0")
    stored = tmp_path / "controller" / "store" / "bundles" / digest / "variants" / "cpu-int4" / "model.onnx.data"
    rotten = bytearray(stored.read_bytes())
    rotten[len(rotten) // 2] ^= 0xFF  # bit rot on the controller's disk, after the chunk sums were taken
    stored.write_bytes(rotten)
    agent_process("edge-rot", broker_url, smoke_min_speed_fraction="0")
    eventually(lambda: controller.device("edge-rot").get("online"), "the agent did not join")
    controller.desire("edge-rot", "2.0.0")
    failed = eventually(lambda: controller.reported("edge-rot", "failed", "2.0.0"), "a rotten file was taken")
    assert "came again with the same bytes" in failed["reason"], failed
    assert "the controller's stored copy is damaged" in failed["reason"], failed
    assert controller.device("edge-rot")["serving"] is None
