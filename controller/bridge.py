"""The controller's MQTT link: one paho client, its own reconnect loop, messages to the fleet.

    broker ─► slmops/v1/devices/+/birth ─► parse (validated) ─► fleet.record_birth
           ─► slmops/v1/devices/+/state ─► parse (validated) ─► fleet.record_state
           ─► slmops/v1/devices/+/telemetry ─► fleet.record_telemetry (dedup on device+seq)
                                            ─► devices/{id}/telemetry_ack {up_to_seq} once stored
    anything malformed: logged with the device it came from, counted, dropped; never fatal

paho runs the network loop in its thread and reconnects with backoff (1 s up to 30 s);
subscriptions are made again on every connect.
"""

import hashlib
import logging
import threading
import uuid
from typing import Literal

import paho.mqtt.client as mqtt

from slmops.broker import BrokerAddress, new_client
from slmops.messages import (
    PREFIX,
    Birth,
    ChunkHeader,
    ChunkRequest,
    Command,
    CommandName,
    CommandReply,
    DesiredState,
    DeviceState,
    MessageInvalid,
    Reported,
    TelemetryAck,
    TelemetryBatch,
    bundle_topic,
    chunk_payload,
    device_topic,
    parse,
    parse_topic,
)

from .fleet import Fleet
from .store import BundleStore

log = logging.getLogger(__name__)

KEEPALIVE_S = 30
INBOUND = ("birth", "state", "telemetry", "reported", "cmd_reply")
"""What devices send; the controller subscribes to these only."""
SUBSCRIPTIONS = [(f"{PREFIX}/devices/+/{kind}", 1) for kind in INBOUND] + [(f"{PREFIX}/bundles/+/request", 1)]
IN_FLIGHT_CHUNKS = 32
"""Chunk publishes awaiting the broker's ack before the next: memory stays flat for any bundle size."""


class MqttBridge:
    def __init__(
        self,
        broker_url: str,
        fleet: Fleet,
        ca_file: str | None = None,
        protocol: Literal["3.1.1", "5"] = "5",
        client_id: str = "slmops-controller",
        store: BundleStore | None = None,
    ):
        self.address = BrokerAddress.parse(broker_url)
        self.fleet = fleet
        self.connected = False
        self.dropped = 0
        self._replies: dict[str, tuple[threading.Event, list[CommandReply]]] = {}
        self._replies_lock = threading.Lock()
        self.store = store
        self.chunks_sent = 0
        # (digest, path, chunk size, index) → queued once however many devices asked: one
        # publish on the bundle's chunk topic serves every device fetching it.
        self._chunks: dict[tuple[str, str, int, int], None] = {}
        self._chunks_ready = threading.Condition()
        self._sender = threading.Thread(target=self._send_chunks, name="slmops-chunks", daemon=True)
        self._running = True
        self.client = new_client(self.address, client_id, protocol, ca_file)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    def start(self) -> None:
        self.client.connect_async(self.address.host, self.address.port, keepalive=KEEPALIVE_S)
        self.client.loop_start()
        self._sender.start()

    def stop(self) -> None:
        with self._chunks_ready:
            self._running = False
            self._chunks_ready.notify()
        self.client.disconnect()
        self.client.loop_stop()
        self._sender.join(timeout=10)

    # --- bundle transfer -----------------------------------------------------------------

    def _queue_chunks(self, digest: str, request: ChunkRequest) -> None:
        if self.store is None:
            raise MessageInvalid("this controller serves no bundle files over MQTT")
        root = self.store.path(digest).resolve()
        target = (root / request.path).resolve()
        if not digest.isalnum() or not target.is_relative_to(root) or not target.is_file():
            raise MessageInvalid(f"no file {request.path!r} in stored bundle {digest[:12]}")
        count = max(1, -(-target.stat().st_size // request.chunk_size))
        indices = range(count) if request.chunks is None else [i for i in request.chunks if 0 <= i < count]
        with self._chunks_ready:
            for index in indices:
                self._chunks[(digest, request.path, request.chunk_size, index)] = None
            self._chunks_ready.notify()

    def _send_chunks(self) -> None:
        in_flight: list[mqtt.MQTTMessageInfo] = []
        while True:
            with self._chunks_ready:
                while self._running and not self._chunks:
                    self._chunks_ready.wait()
                if not self._running:
                    return
                key = next(iter(self._chunks))
                del self._chunks[key]
            digest, path, chunk_size, index = key
            try:
                payload = self._chunk(digest, path, chunk_size, index)
            except OSError as e:  # deleted meanwhile: the device will ask again and be told
                log.warning("cannot read chunk %d of %s in %s: %s", index, path, digest[:12], e)
                continue
            in_flight.append(self.client.publish(bundle_topic(digest, "chunk"), payload, qos=1))
            self.chunks_sent += 1
            if len(in_flight) >= IN_FLIGHT_CHUNKS:
                in_flight.pop(0).wait_for_publish(timeout=30)

    def _chunk(self, digest: str, path: str, chunk_size: int, index: int) -> bytes:
        assert self.store is not None
        target = self.store.path(digest) / path
        size = target.stat().st_size
        with target.open("rb") as f:
            f.seek(index * chunk_size)
            data = f.read(chunk_size)
        header = ChunkHeader(
            path=path,
            index=index,
            count=max(1, -(-size // chunk_size)),
            chunk_size=chunk_size,
            file_size=size,
            sha256=hashlib.sha256(data).hexdigest(),
        )
        return chunk_payload(header, data)

    def command(self, device_id: str, name: CommandName, timeout_s: float) -> CommandReply:
        """Send a command and wait for the reply with the same correlation id (TimeoutError without one)."""
        command = Command(correlation_id=uuid.uuid4().hex, command=name)
        waiter: tuple[threading.Event, list[CommandReply]] = (threading.Event(), [])
        with self._replies_lock:
            self._replies[command.correlation_id] = waiter
        try:
            self.client.publish(device_topic(device_id, "cmd"), command.payload(), qos=1)
            if not waiter[0].wait(timeout_s):
                raise TimeoutError(f"{device_id} did not answer {name} within {timeout_s:g} s")
            return waiter[1][0]
        finally:
            with self._replies_lock:
                self._replies.pop(command.correlation_id, None)

    def publish_desired(self, device_id: str, desired: DesiredState) -> None:
        """Retained: a device that is offline now gets it when it connects."""
        self.client.publish(device_topic(device_id, "desired"), desired.payload(), qos=1, retain=True)

    def _on_connect(
        self, client: mqtt.Client, _userdata: object, _flags: object, reason: object, _props: object
    ) -> None:
        if getattr(reason, "is_failure", False):
            log.error("the broker %s refused the connection: %s", self.address, reason)
            return
        client.subscribe(SUBSCRIPTIONS)
        for device_id, desired in self.fleet.desired_states().items():  # a broker that restarted empty
            self.publish_desired(device_id, desired)

    def _on_subscribe(self, *_: object) -> None:
        """Connected for our purposes once the broker confirmed the subscriptions."""
        self.connected = True
        log.info("connected to the broker at %s", self.address)

    def _on_disconnect(self, *_: object) -> None:
        if self.connected:
            log.warning("lost the broker at %s; reconnecting", self.address)
        self.connected = False

    def _on_message(self, _client: mqtt.Client, _userdata: object, message: mqtt.MQTTMessage) -> None:
        sender = message.topic
        try:
            if message.topic.startswith(f"{PREFIX}/bundles/"):
                request = parse(ChunkRequest, message.payload, message.topic)
                sender = f"device {request.device_id}"
                self._queue_chunks(message.topic.split("/")[3], request)
                return
            device_id, kind = parse_topic(message.topic)
            sender = f"device {device_id}"
            if not message.payload:
                return  # a cleared retained message
            if kind == "birth":
                self.fleet.record_birth(device_id, parse(Birth, message.payload, message.topic))
            elif kind == "state":
                self.fleet.record_state(device_id, parse(DeviceState, message.payload, message.topic))
            elif kind == "reported":
                self.fleet.record_reported(device_id, parse(Reported, message.payload, message.topic))
            elif kind == "cmd_reply":
                reply = parse(CommandReply, message.payload, message.topic)
                with self._replies_lock:
                    waiter = self._replies.get(reply.correlation_id)
                if waiter is None:
                    log.info(
                        "a reply from %s for no pending command (%s); it came too late", sender, reply.correlation_id
                    )
                else:
                    waiter[1].append(reply)
                    waiter[0].set()
            elif kind == "telemetry":
                stored = self.fleet.record_telemetry(device_id, parse(TelemetryBatch, message.payload, message.topic))
                ack = TelemetryAck(up_to_seq=stored).payload()
                self.client.publish(device_topic(device_id, "telemetry_ack"), ack, qos=1)
            else:
                raise MessageInvalid(f"{message.topic}: devices do not send {kind!r}")
        except MessageInvalid as e:
            self.dropped += 1
            log.warning("dropped a message from %s: %s", sender, e)
        except Exception:  # a database hiccup must not kill paho's network thread
            self.dropped += 1
            log.exception("could not record a message from %s", sender)
