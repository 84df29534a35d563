"""What devices send, written to the database off the MQTT network thread, many messages per transaction.

bridge (paho's network thread) ─► Recorder.put(device, message): never waits on the database,
    so chunk requests and the broker's acks for chunks keep flowing while a commit is under way
recorder thread: what is queued, up to 500 messages ─► fleet.record: one transaction, in order
    ─► a telemetry ack for each batch stored (the agent deletes only what the controller stored)
    ─► a device found drifted from its desired state, or connecting without having reached it,
       is sent that state again (retained)
    a transaction that fails: each message again on its own; the one that fails alone is
    logged and counted, the others are kept
queue full (the database far behind): put() waits, and the broker holds what comes meanwhile. The
    queue is bounded in records, not messages: a backlog of 100-record batches held ten thousand of
    them (about 1 GB) where a message bound would allow it
stop(): what is queued is written first
"""

import logging
import queue
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable

from slmops.messages import DesiredState, TelemetryBatch
from slmops.supervision import Supervised

from .fleet import Fleet, Inbound

log = logging.getLogger(__name__)

BATCH_MESSAGES = 500
QUEUED_RECORDS = 20_000
"""Records (a telemetry batch weighs its records, any other message one) queued before put() waits."""

Received = tuple[str, Inbound, float]
"""device id, what it sent, when it was received (monotonic)"""
LAG_WINDOW = 20_000
"""Messages whose lag (received → committed) the recorder keeps for its percentiles."""


class Recorder:
    def __init__(
        self,
        fleet: Fleet,
        acknowledge: Callable[[str, int], None],
        reassert: Callable[[str, DesiredState], None] = lambda _device, _desired: None,
    ) -> None:
        """`reassert`: a device that drifted from its desired state is sent it again."""
        self.fleet, self.acknowledge, self.reassert = fleet, acknowledge, reassert
        self.failed = 0
        self.recorded = 0
        self.lags: deque[float] = deque(maxlen=LAG_WINDOW)
        """Seconds from receipt to commit of the last LAG_WINDOW messages recorded."""
        self._queue: queue.Queue[Received | None] = queue.Queue()
        self._room = threading.Condition()
        self._weight = 0
        """Records queued (see QUEUED_RECORDS)."""
        self.thread = Supervised("slmops-recorder", self._run)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        self.thread.join(timeout=30)

    def put(self, device_id: str, message: Inbound) -> None:
        """Queue a message; while QUEUED_RECORDS are queued, wait (one bigger than that goes in alone)."""
        weight = _weight(message)
        with self._room:
            self._room.wait_for(lambda: self._weight == 0 or self._weight + weight <= QUEUED_RECORDS)
            self._weight += weight
        self._queue.put((device_id, message, time.monotonic()))

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def lag_s(self, quantile: float) -> float | None:
        """A quantile of the recent messages' lag from receipt to commit; None before any."""
        lags = list(self.lags)
        if len(lags) < 2:
            return lags[0] if lags else None
        return statistics.quantiles(lags, n=100, method="inclusive")[round(quantile * 100) - 1]

    def _run(self) -> None:
        while (first := self._queue.get()) is not None:
            batch, stopping = [first], False
            while len(batch) < BATCH_MESSAGES:
                try:
                    received = self._queue.get_nowait()
                except queue.Empty:
                    break
                if received is None:
                    stopping = True
                    break
                batch.append(received)
            self._write(batch)
            with self._room:
                self._weight -= sum(_weight(message) for _, message, _ in batch)
                self._room.notify_all()
            if stopping:
                return

    def _write(self, batch: list[Received]) -> None:
        try:
            drifted = self.fleet.record([(device_id, message) for device_id, message, _ in batch])
        except Exception:  # a database hiccup or a message it refuses: find which, keep the rest
            if len(batch) > 1:
                for received in batch:
                    self._write([received])
                return
            self.failed += 1
            device_id, message, _ = batch[0]
            log.exception("could not record a %s from device %s", type(message).__name__, device_id)
            return
        committed = time.monotonic()
        self.recorded += len(batch)
        self.lags.extend(committed - received for _, _, received in batch)
        for device_id, message, _ in batch:
            if isinstance(message, TelemetryBatch):
                self.acknowledge(device_id, max(r.seq for r in message.records))
        for device_id, desired in drifted:
            log.warning(
                "%s does not run its desired %s %s; telling it again", device_id, desired.bundle, desired.version
            )
            self.reassert(device_id, desired)


def _weight(message: Inbound) -> int:
    return len(message.records) if isinstance(message, TelemetryBatch) else 1
