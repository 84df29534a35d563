"""The agent's link to the fleet: one MQTT client for presence, birth and telemetry.

    connect (will: state offline, retained) ─► birth (hardware profile) ─► state (online, serving)
    desired (retained) and cmd from the controller ─► on_work (sync.py); progress goes out as
    `reported`, command results as `cmd_reply`
    sender thread: queue.pending() ─► devices/{id}/telemetry ─► wait for telemetry_ack {up_to_seq}
                   ─► queue.ack(seq): only what the controller stored is deleted here
                   no ack in time ─► the same batch again (the controller keeps each seq once)

paho's loop thread reconnects with backoff (1 s up to 30 s); birth and state are published
again on every connect (from the sender thread: the birth probes the hardware). With no broker
at all the agent keeps serving and queueing. Credentials the broker refuses (bad password, not
authorized, banned) stop the link with an error saying what to do; serving goes on.

Only what names this device is obeyed: a `desired`, `cmd` or `telemetry_ack` on another
device's topic (a broker may deliver one: amqtt 0.12 sent a new client the retained messages
of every client's subscriptions) and chunks of a bundle not being fetched are dropped before
they are parsed. Anything a message does while it is handled on paho's thread is caught:
a bad one is logged, counted (`dropped` in /health) and dropped, never fatal to the link.
The client id is new for each connection (`slmops-agent-<id>-<random>`), so another client
connecting with a guessed id cannot take this one's session over.
"""

import logging
import threading
from collections.abc import Callable

import paho.mqtt.client as mqtt

from slmops import __version__
from slmops.broker import LinkClient, parse_brokers
from slmops.errors import MessageInvalid
from slmops.messages import (
    Birth,
    ChunkRequest,
    Command,
    CommandReply,
    DesiredState,
    DeviceState,
    FetchRefused,
    Reported,
    Serving,
    SlotHeld,
    TelemetryAck,
    TelemetryBatch,
    TelemetryRecord,
    chunk_topic,
    device_topic,
    parse,
    parse_chunk,
    request_topic,
    resend_wait_s,
)
from slmops.supervision import Supervised

from .. import hardware
from ..config import AgentConfig
from ..host import ModelHost
from ..telemetry import TelemetryQueue
from .slots import Slots
from .transfer import OnChunk, OnRefused

log = logging.getLogger(__name__)

KEEPALIVE_S = 30


class Uplink:
    def __init__(
        self,
        config: AgentConfig,
        server: ModelHost,
        queue: TelemetryQueue,
        on_work: Callable[[DesiredState | Command], None] | None = None,
    ) -> None:
        assert config.broker_url is not None
        self.config, self.server, self.queue, self.on_work = config, server, queue, on_work
        self.device_id = config.device_id
        self.slots = Slots(config.data_dir)  # read for the previous slot each state announces
        self.connected = threading.Event()
        self._acked = threading.Event()
        self._acked_seq = 0
        self._ack_wait_s = config.telemetry_ack_timeout_s
        """How long the batch in flight waits for its ack: doubled at each resend (up to 8×), so that a
        fleet whose controller fell behind does not bury it under copies; back to the setting on an ack."""
        self._announce = threading.Event()  # set on every connect: birth and state are due
        self._stop = threading.Event()
        self.dropped = 0
        """Messages from the broker dropped: malformed, not for this device, or failing when handled."""
        self._announced: Serving | None = None
        self._bundles: dict[str, tuple[OnChunk, OnRefused]] = {}  # digest → the fetch's handlers
        self._subacks: dict[int, threading.Event] = {}
        self._subacks_lock = threading.Lock()
        ca_file = str(config.broker_ca_file) if config.broker_ca_file else None
        fix = (
            f"serving goes on; check broker_url and broker_ca_file (enrol {self.device_id} again for new "
            "credentials: slmops fleet enrol), then restart the agent"
        )
        self.client = LinkClient(
            parse_brokers(config.broker_url), f"slmops-agent-{self.device_id}", config.broker_protocol, fix, ca_file
        )
        self._own = {
            device_topic(self.device_id, kind): kind for kind in ("telemetry_ack", "desired", "cmd", "fetch_refused")
        }
        offline = DeviceState(online=False, agent_version=__version__).payload()
        self.client.will_set(device_topic(self.device_id, "state"), offline, qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.sender = Supervised("slmops-uplink", self._send_loop)

    def start(self) -> None:
        self.client.connect_first(KEEPALIVE_S)
        self.client.loop_start()
        self.sender.start()

    def status(self) -> dict[str, object]:
        """The link as it is, for /health: paho's own view of the connection, not just the last event."""
        return {
            "broker": str(self.client.address),
            "client_id": self.client.client_id,
            "connected": self.connected.is_set() and self.client.is_connected(),
            "refused": self.client.refused or None,
            "dropped_messages": self.dropped,
        }

    def stop(self) -> None:
        """Say goodbye (state offline, retained), then disconnect: the will is for dying without one."""
        self._stop.set()
        if self.connected.is_set():
            offline = DeviceState(online=False, agent_version=__version__).payload()
            self.client.publish(device_topic(self.device_id, "state"), offline, qos=1, retain=True).wait_for_publish(5)
        self.client.disconnect()
        self.client.loop_stop()
        self.sender.join(timeout=10)

    # --- paho's thread -----------------------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, _u: object, _f: object, reason: object, _p: object) -> None:
        if not self.client.accepted(reason):
            return
        with self._subacks_lock:  # connected once the broker confirmed this device's own topics
            result, mid = client.subscribe([(topic, 1) for topic in self._own])
            if result == mqtt.MQTT_ERR_SUCCESS and mid is not None:
                self._subacks[mid] = self.connected
        for digest in list(self._bundles):  # a transfer under way goes on after a reconnect
            client.subscribe(chunk_topic(digest), qos=1)
        log.info("connected to the broker at %s as %s", self.client.address, self.device_id)
        self._announce.set()  # birth (a hardware probe: nvidia-smi, disks) and state, from the sender thread

    def _on_disconnect(self, *_: object) -> None:
        if self.connected.is_set() and not self._stop.is_set():
            log.warning("lost the broker at %s; serving on, queueing telemetry", self.client.address)
        self.connected.clear()

    # --- bundle transfer (agent/fleet/transfer.py's ChunkLink) ----------------------------

    def watch_bundle(self, digest: str, on_chunk: OnChunk, on_refused: OnRefused) -> bool:
        """Receive a bundle's chunks, and the controller's refusals of its requests; True once the
        broker confirmed the subscription, False when it did not within the transfer timeout (a
        reconnect subscribes again; requests are repeated)."""
        self._bundles[digest] = (on_chunk, on_refused)
        if not self.connected.wait(self.config.transfer_timeout_s):
            return False
        confirmed = threading.Event()
        with self._subacks_lock:  # the SUBACK can arrive before subscribe() returns the mid it answers
            result, mid = self.client.subscribe(chunk_topic(digest), qos=1)
            if result == mqtt.MQTT_ERR_SUCCESS and mid is not None:
                self._subacks[mid] = confirmed
        return result == mqtt.MQTT_ERR_SUCCESS and confirmed.wait(self.config.transfer_timeout_s)

    def unwatch_bundle(self, digest: str) -> None:
        self._bundles.pop(digest, None)
        self.client.unsubscribe(chunk_topic(digest))

    def request_chunks(self, digest: str, request: ChunkRequest) -> None:
        self.client.publish(request_topic(digest, self.device_id), request.payload(), qos=1)

    def _on_subscribe(self, _c: mqtt.Client, _u: object, mid: int, *_: object) -> None:
        with self._subacks_lock:
            confirmed = self._subacks.pop(mid, None)
        if confirmed is not None:
            confirmed.set()

    def publish_reported(self, reported: Reported) -> None:
        self.client.publish(device_topic(self.device_id, "reported"), reported.payload(), qos=1)

    def publish_reply(self, reply: CommandReply) -> None:
        self.client.publish(device_topic(self.device_id, "cmd_reply"), reply.payload(), qos=1)

    def _on_message(self, _c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        try:
            self._handle(message.topic, message.payload)
        except MessageInvalid as e:
            self.dropped += 1
            log.warning("dropped a message from the broker: %s", e)
        except Exception:  # whatever handling it raised, paho's thread and the link go on
            self.dropped += 1
            log.exception("could not handle a message on %s; dropped it", message.topic)

    def _handle(self, topic: str, payload: bytes | bytearray) -> None:
        if topic.endswith("/chunk"):
            parts = topic.split("/")
            fetch = self._bundles.get(parts[3]) if len(parts) == 5 and topic == chunk_topic(parts[3]) else None
            if fetch is not None:  # else a chunk still in flight after a fetch ended, or not ours
                fetch[0](*parse_chunk(payload, topic))
            return
        kind = self._own.get(topic)
        if kind is None:
            raise MessageInvalid(f"{topic}: not a topic of this device ({self.device_id})")
        if kind == "telemetry_ack":  # the sender thread deletes what it acknowledges
            self._acked_seq = max(self._acked_seq, parse(TelemetryAck, payload, topic).up_to_seq)
            self._acked.set()
        elif kind == "fetch_refused":
            refused = parse(FetchRefused, payload, topic)
            if (fetch := self._bundles.get(refused.digest)) is not None:
                fetch[1](refused.path, refused.reason)
        elif payload and self.on_work is not None:  # an empty retained desired state: cleared
            self.on_work(parse(Command, payload, topic) if kind == "cmd" else parse(DesiredState, payload, topic))

    # --- the sender thread -------------------------------------------------------------------

    def _serving(self) -> Serving | None:
        model = self.server.engine.current
        if model is None:
            return None
        return Serving(bundle=model.bundle, version=model.version, variant=model.variant_id, provider=model.provider)

    def _publish_state(self) -> None:
        serving = self._serving()
        held = self.slots.previous()
        previous = SlotHeld(bundle=held.bundle, version=held.version, variant=held.variant) if held else None
        state = DeviceState(online=True, agent_version=__version__, serving=serving, previous=previous)
        self.client.publish(device_topic(self.device_id, "state"), state.payload(), qos=1, retain=True)
        self._announced = serving

    def _send_loop(self) -> None:
        while not self._stop.is_set():
            if not self.connected.wait(timeout=1):
                continue
            try:
                self._send_once()
            except Exception:  # a full disk or a closed queue must not end the link
                log.exception("telemetry uplink failed; retrying")
                self._stop.wait(self.config.telemetry_ack_timeout_s)

    def _send_once(self) -> None:
        if self._announce.is_set():  # cleared once announced: a probe that fails is tried again
            birth = Birth(agent_version=__version__, profile=hardware.probe(self.config.data_dir))
            self.client.publish(device_topic(self.device_id, "birth"), birth.payload(), qos=1)
            self._publish_state()
            self._announce.clear()
        elif self._serving() != self._announced:
            self._publish_state()
        records = self.queue.pending(limit=self.config.telemetry_batch_records)
        if not records:
            self._stop.wait(min(1.0, self.config.telemetry_interval_s))
            return
        batch = TelemetryBatch(
            records=[TelemetryRecord(seq=r.seq, created=r.created, kind=r.kind, payload=r.payload) for r in records]
        )
        self._acked.clear()
        self.client.publish(device_topic(self.device_id, "telemetry"), batch.payload(), qos=1)
        if not self._acked.wait(self._ack_wait_s):
            log.info("no acknowledgement for telemetry %d-%d yet; sending again", records[0].seq, records[-1].seq)
            self._ack_wait_s = resend_wait_s(self._ack_wait_s, self.config.telemetry_ack_timeout_s)
            return
        self._ack_wait_s = self.config.telemetry_ack_timeout_s
        if (stored := min(self._acked_seq, records[-1].seq)) >= records[0].seq:
            self.queue.ack(stored)  # never past what was sent: an ack cannot delete what the controller never had
