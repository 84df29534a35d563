"""The controller's MQTT link: one paho client, its own reconnect loop, messages to the fleet.

    broker ─► slmops/v1/devices/+/birth ─► parse (validated) ─┐
           ─► slmops/v1/devices/+/state ─► parse (validated) ─┤ recorder.py: written to the
                                         offline (a will or a goodbye) ─► its chunks are not sent
           ─► slmops/v1/devices/+/reported ─► parse (validated) ─┤ database in its own thread,
           ─► slmops/v1/devices/+/telemetry ─► parse (validated) ─┘ in batches; telemetry acked
                                            (devices/{id}/telemetry_ack {up_to_seq}) once stored
           ─► slmops/v1/bundles/+/request/+ ─► chunks.py: the chunks asked for, on bundles/+/chunk
                                              (none such: devices/{id}/fetch_refused, the reason)
           ─► slmops/v1/devices/+/cmd_reply ─► the command waiting for it
    anything malformed: logged with the device it came from, counted, dropped; never fatal

Replicas: birth, telemetry, reported and chunk requests come through the shared subscription
$share/slmops/... (the broker gives each message to one replica); state and cmd_reply reach every
replica (SHARED, EVERY_REPLICA). `shared_subscriptions = false` for a broker without them, with one
controller.

paho runs the network loop in its thread and reconnects with backoff (1 s up to 30 s);
subscriptions are made again on every connect. That thread never waits on the database: it
also handles the broker's acks for the chunks being sent.
"""

import logging
import threading
import uuid
from collections import Counter
from collections.abc import Sequence
from typing import Literal

import paho.mqtt.client as mqtt

from slmops.broker import LinkClient, parse_brokers
from slmops.errors import MessageInvalid, Unanswered
from slmops.messages import (
    PREFIX,
    Birth,
    ChunkRequest,
    Command,
    CommandName,
    CommandReply,
    DesiredState,
    DeviceState,
    FetchRefused,
    Reported,
    TelemetryAck,
    TelemetryBatch,
    device_topic,
    parse,
    parse_request_topic,
    parse_topic,
)
from slmops.supervision import Supervised

from .chunks import DEVICE_BUDGET_BYTES, ChunkServer, Refused
from .fleet import Fleet
from .recorder import Recorder
from .store import BundleStore

log = logging.getLogger(__name__)

KEEPALIVE_S = 30
SHARE = "$share/slmops/"
"""The shared-subscription group of controller replicas: the broker hands each message to one of them."""
SHARED = [f"{PREFIX}/devices/+/{kind}" for kind in ("birth", "telemetry", "reported")] + [
    f"{PREFIX}/bundles/+/request/+"
]
"""What devices send that one replica handles: telemetry is stored and acked once, a chunk request
answered once (chunk traffic does not grow with replicas)."""
EVERY_REPLICA = [f"{PREFIX}/devices/+/{kind}" for kind in ("state", "cmd_reply")]
"""What every replica receives: a command's reply goes to the replica waiting for it, and presence is
retained, which brokers do not deliver on shared subscriptions (a replica that starts learns from it who
went offline while it was down)."""


def subscriptions(shared: bool) -> list[tuple[str, int]]:
    """The controller's subscriptions (QoS 1): what devices send, and nothing else."""
    return [(SHARE + topic if shared else topic, 1) for topic in SHARED] + [(topic, 1) for topic in EVERY_REPLICA]


class MqttBridge:
    def __init__(
        self,
        broker_url: str,
        fleet: Fleet,
        ca_file: str | None = None,
        protocol: Literal["3.1.1", "5"] = "5",
        store: BundleStore | None = None,
        device_chunk_budget_bytes: int = DEVICE_BUDGET_BYTES,
        shared_subscriptions: bool = True,
    ):
        self.fleet, self.shared_subscriptions = fleet, shared_subscriptions
        self.connected = False
        self.unhandled = 0
        self.received: Counter[str] = Counter()
        """Messages received by kind (birth, state, telemetry, reported, cmd_reply, request)."""
        self.recorder = Recorder(
            fleet, self._acknowledge_telemetry, lambda device, desired: self.publish_desired(desired, [device])
        )
        self._replies: dict[str, tuple[threading.Event, list[CommandReply]]] = {}
        self._replies_lock = threading.Lock()
        self._republishing: list[threading.Thread] = []
        fix = "the REST API goes on; fix broker_url (credentials) or broker_ca_file, then restart the controller"
        self.client = LinkClient(parse_brokers(broker_url), "slmops-controller", protocol, fix, ca_file)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.chunks = None if store is None else ChunkServer(store, self._publish_chunk, device_chunk_budget_bytes)

    def start(self) -> None:
        self.recorder.start()
        self.client.connect_first(KEEPALIVE_S)
        self.client.loop_start()
        if self.chunks is not None:
            self.chunks.start()

    def stop(self) -> None:
        if self.chunks is not None:
            self.chunks.stop()
        self.client.disconnect()
        self.client.loop_stop()
        for republish in self._republishing:  # done with the database before its engine is disposed
            republish.join(timeout=10)
        self.recorder.stop()

    @property
    def threads(self) -> list[Supervised]:
        return [self.recorder.thread, *([] if self.chunks is None else [self.chunks.sender])]

    @property
    def dropped(self) -> int:
        """Messages not handled: malformed, failing, or refused by the database."""
        return self.unhandled + self.recorder.failed

    @property
    def chunks_sent(self) -> int:
        return 0 if self.chunks is None else self.chunks.sent

    def _acknowledge_telemetry(self, device_id: str, up_to_seq: int) -> None:
        ack = TelemetryAck(up_to_seq=up_to_seq).payload()
        self.client.publish(device_topic(device_id, "telemetry_ack"), ack, qos=1)

    def _publish_chunk(self, topic: str, payload: bytes) -> mqtt.MQTTMessageInfo:
        return self.client.publish(topic, payload, qos=1)

    def command(self, device_id: str, name: CommandName, timeout_s: float) -> CommandReply:
        """Send a command and wait for the reply with the same correlation id (Unanswered without one)."""
        command = Command(correlation_id=uuid.uuid4().hex, command=name)
        waiter: tuple[threading.Event, list[CommandReply]] = (threading.Event(), [])
        with self._replies_lock:
            self._replies[command.correlation_id] = waiter
        try:
            self.client.publish(device_topic(device_id, "cmd"), command.payload(), qos=1)
            if not waiter[0].wait(timeout_s):
                raise Unanswered(f"{device_id} did not answer {name} within {timeout_s:g} s")
            return waiter[1][0]
        finally:
            with self._replies_lock:
                self._replies.pop(command.correlation_id, None)

    def publish_desired(self, desired: DesiredState, device_ids: Sequence[str], fetching: Sequence[str] = ()) -> None:
        """Retained: a device that is offline now gets it when it connects. The chunks of the bundle
        wait a moment for the devices `fetching` it now, so that one send serves them all."""
        if self.chunks is not None:
            self.chunks.expect(desired.digest, fetching)
        for device_id in device_ids:
            self.client.publish(device_topic(device_id, "desired"), desired.payload(), qos=1, retain=True)

    def _on_connect(
        self, client: mqtt.Client, _userdata: object, _flags: object, reason: object, _props: object
    ) -> None:
        if not self.client.accepted(reason):
            return
        client.subscribe(subscriptions(self.shared_subscriptions))
        # The desired states come from the database, which paho's thread never waits on.
        republish = threading.Thread(target=self._publish_all_desired, name="slmops-republish", daemon=True)
        self._republishing = [t for t in self._republishing if t.is_alive()] + [republish]
        republish.start()

    def _publish_all_desired(self) -> None:
        """After a connect: every desired state again, for a broker that restarted without them."""
        try:
            desired_states = self.fleet.desired_states()
        except Exception:  # the database is down: the link is up; the next reconnect publishes them
            log.exception("could not read the desired states to publish them again")
            return
        for device_id, desired in desired_states.items():
            self.publish_desired(desired, [device_id])

    def _on_subscribe(self, *_: object) -> None:
        """Connected for our purposes once the broker confirmed the subscriptions."""
        self.connected = True
        log.info("connected to the broker at %s", self.client.address)

    def _on_disconnect(self, *_: object) -> None:
        if self.connected:
            log.warning("lost the broker at %s; reconnecting", self.client.address)
        self.connected = False

    def _on_message(self, _client: mqtt.Client, _userdata: object, message: mqtt.MQTTMessage) -> None:
        sender = message.topic
        try:
            if message.topic.startswith(f"{PREFIX}/bundles/"):
                digest, device_id = parse_request_topic(message.topic)
                sender = f"device {device_id}"
                self.received["chunk_request"] += 1
                request = parse(ChunkRequest, message.payload, message.topic)
                if self.chunks is None:
                    raise MessageInvalid("this controller serves no bundle files over MQTT")
                try:
                    self.chunks.request(digest, device_id, request)
                except Refused as e:  # the device's fetch fails at once, with the reason
                    refused = FetchRefused(digest=digest, path=request.path[:512], reason=str(e)[:1024])
                    self.client.publish(device_topic(device_id, "fetch_refused"), refused.payload(), qos=1)
                    raise
                return
            device_id, kind = parse_topic(message.topic)
            sender = f"device {device_id}"
            self.received[kind] += 1
            if not message.payload:
                return  # a cleared retained message
            if kind == "birth":
                self.recorder.put(device_id, parse(Birth, message.payload, message.topic))
            elif kind == "state":
                state = parse(DeviceState, message.payload, message.topic)
                self.recorder.put(device_id, state)
                if not state.online and self.chunks is not None:
                    self.chunks.forget(device_id)
            elif kind == "reported":
                self.recorder.put(device_id, parse(Reported, message.payload, message.topic))
            elif kind == "telemetry":
                self.recorder.put(device_id, parse(TelemetryBatch, message.payload, message.topic))
            elif kind == "cmd_reply":
                reply = parse(CommandReply, message.payload, message.topic)
                with self._replies_lock:
                    waiter = self._replies.get(reply.correlation_id)
                if waiter is None:  # another replica's command, or one that gave up waiting
                    log.debug(
                        "a reply from %s for no pending command (%s); it came too late", sender, reply.correlation_id
                    )
                else:
                    waiter[1].append(reply)
                    waiter[0].set()
            else:
                raise MessageInvalid(f"{message.topic}: devices do not send {kind!r}")
        except MessageInvalid as e:
            self.unhandled += 1
            log.warning("dropped a message from %s: %s", sender, e)
        except Exception:  # a disk that fails under a chunk request must not kill paho's network thread
            self.unhandled += 1
            log.exception("could not handle a message from %s", sender)
