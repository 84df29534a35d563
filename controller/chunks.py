"""Serving stored bundle files as chunks over MQTT: one publish reaches every device fetching them.

bundles/{digest}/request ─► ChunkServer.request: the path must name a file of the stored bundle;
    then, per file and chunk size: chunk index → the devices waiting for it (a chunk several
    devices wait for is queued once)
sender thread: one chunk of each file with chunks waiting, in turn (a manifest asked for now
    is not stuck behind the 300 chunks of a model file) ─► read at its offset ─► its sha256,
    kept by the store (computed when the bundle was pushed, for the default chunk size; for
    another size, computed as chunks go out and kept once the file's are complete) ─► one
    publish on bundles/{digest}/chunk, QoS 1, at most 32 awaiting the broker's ack (memory
    stays flat for any bundle size)
devices told to fetch a bundle together (PUT /v1/desired, `expect`): a file's chunks wait until
    each of them that will want it has asked for it (the manifest and signature: all of them; a
    variant's files: those that chose it, as their first request for one of its files shows),
    or for half a second at most, so that one send serves them all (otherwise each device that
    asks late gets the chunks it missed sent again, to every device on the topic)
a device gone offline: the chunks only it was waiting for are not sent, and it is not waited for
a device asking in another chunk size (a power of two: nine sizes at most) no longer waits for
    that bundle's chunks in the size it asked in before: one device, one send of each file
each device has a budget of chunk bytes it may ask for (DEVICE_BUDGET_BYTES, refilled over an
    hour): past it, its requests are refused (fetch_refused) until the budget refills, so no
    device can make the controller send a bundle over and over"""

import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt

from slmops.bundle import MANIFEST_FILE, SIGNATURE_FILE, VARIANTS_DIR, expected_members
from slmops.errors import ManifestInvalid, MessageInvalid
from slmops.manifest import Manifest
from slmops.messages import ChunkHeader, ChunkRequest, chunk_count, chunk_payload, chunk_topic
from slmops.supervision import Supervised

from .store import BundleStore

log = logging.getLogger(__name__)

IN_FLIGHT_CHUNKS = 32
"""Chunk publishes awaiting the broker's ack before the next: memory stays flat for any bundle size."""
OPEN_FILES = 32
"""Files kept open, with their chunks' sha256, after their last chunk went out."""
GATHER_S = 0.5
"""How long at most the chunks of a bundle wait for devices told to fetch it together."""

DEVICE_BUDGET_BYTES = 8 << 30
"""Chunk bytes one device may ask for at once, refilled at this much per hour: a 3B-parameter
int4 variant (about 2 GB) fetched from scratch four times over, and no more."""
BUDGET_REFILL_S = 3600.0

FileKey = tuple[str, str, int]
"""digest, bundle-relative path, chunk size"""


@dataclass
class _ServedFile:
    """A stored file served in one chunk size."""

    path: str
    fd: int
    size: int
    chunk_size: int
    sums: list[bytes | None]
    keep: Callable[[list[bytes]], None]
    """Called once every chunk's sha256 is known, with them all."""
    waiting: dict[int, set[str]] = field(default_factory=dict)
    """chunk index → devices waiting for it; in order, so a chunk asked for again goes to the back"""

    @property
    def count(self) -> int:
        return len(self.sums)

    def length(self, index: int) -> int:
        """Bytes of chunk `index` (the last one may be short; an empty file is one empty chunk)."""
        return max(0, min(self.chunk_size, self.size - index * self.chunk_size))

    def payload(self, index: int) -> bytes:
        data = os.pread(self.fd, self.chunk_size, index * self.chunk_size)
        if (sha256 := self.sums[index]) is None:
            sha256 = self.sums[index] = hashlib.sha256(data).digest()
            if None not in self.sums:
                self.keep([s for s in self.sums if s is not None])
        header = ChunkHeader(
            path=self.path,
            index=index,
            count=self.count,
            chunk_size=self.chunk_size,
            file_size=self.size,
            sha256=sha256.hex(),
        )
        return chunk_payload(header, data)


@dataclass
class _Gathering:
    """Devices told to fetch a bundle together, and the files each will still ask for."""

    until: float
    choosing: set[str]
    """not yet asked for a file of a variant: any variant's file may be theirs"""
    pending: dict[str, set[str]]
    """bundle-relative path → the devices that will ask for it and have not yet"""
    variant_files: dict[str, list[str]]
    """variant id → the bundle-relative paths of its files"""

    @classmethod
    def of(cls, device_ids: Collection[str], variant_files: dict[str, list[str]]) -> "_Gathering":
        pending = {path: set(device_ids) for path in (MANIFEST_FILE, SIGNATURE_FILE)}
        return cls(time.monotonic() + GATHER_S, set(device_ids), pending, variant_files)

    def asked(self, device_id: str, path: str) -> None:
        if device_id in self.choosing and (variant := _variant_of(path)) is not None:
            self.choosing.discard(device_id)  # it asks for all its variant's files, one message each
            for other in self.variant_files.get(variant, []):
                self.pending.setdefault(other, set()).add(device_id)
        self.pending.get(path, set()).discard(device_id)

    def forget(self, device_id: str) -> None:
        self.choosing.discard(device_id)
        for devices in self.pending.values():
            devices.discard(device_id)

    def holds(self, path: str) -> bool:
        return bool(self.pending.get(path)) or (_variant_of(path) is not None and bool(self.choosing))

    def late(self) -> set[str]:
        return self.choosing.union(*self.pending.values())


def _variant_of(path: str) -> str | None:
    parts = path.split("/")
    return parts[1] if len(parts) > 2 and parts[0] == VARIANTS_DIR else None


class Refused(MessageInvalid):
    """A request this server will not serve (a file the store does not hold, a device past its
    budget): the device is told why (fetch_refused)."""


@dataclass
class _Budget:
    """A device's chunk bytes left to ask for, as of `at` (a token bucket)."""

    left: float
    at: float

    def take(self, wanted: int, capacity: int) -> bool:
        now = time.monotonic()
        self.left = min(capacity, self.left + capacity * (now - self.at) / BUDGET_REFILL_S)
        self.at = now
        if wanted > self.left:
            return False
        self.left -= wanted
        return True


class ChunkServer:
    def __init__(
        self,
        store: BundleStore,
        publish: Callable[[str, bytes], mqtt.MQTTMessageInfo],
        device_budget_bytes: int = DEVICE_BUDGET_BYTES,
    ) -> None:
        self.store, self.publish, self.device_budget_bytes = store, publish, device_budget_bytes
        self.sent = 0
        self._budgets: dict[str, _Budget] = {}
        self._files: OrderedDict[FileKey, _ServedFile] = OrderedDict()  # open, least recently asked first
        self._turns: OrderedDict[FileKey, None] = OrderedDict()  # files with chunks waiting, whose turn first
        self._reading: FileKey | None = None  # the sender's file, never closed under it
        self._gathering: dict[str, _Gathering] = {}  # digest → devices its chunks wait for
        self._ready = threading.Condition()
        self._running = True
        self.sender = Supervised("slmops-chunks", self._send_loop)

    def start(self) -> None:
        self.sender.start()

    def stop(self) -> None:
        with self._ready:
            self._running = False
            self._ready.notify()
        self.sender.join(timeout=10)
        with self._ready:
            for served in self._files.values():
                os.close(served.fd)
            self._files.clear()

    def expect(self, digest: str, device_ids: Collection[str]) -> None:
        """These devices were told to fetch the bundle now: its chunks wait for them (GATHER_S at most)."""
        if not device_ids:
            return
        try:
            manifest = Manifest.load(self.store.path(digest) / MANIFEST_FILE)
        except (OSError, ManifestInvalid) as e:  # not stored here: no chunks to hold
            log.warning("cannot hold the chunks of %s for the devices told to fetch it: %s", digest[:12], e)
            return
        variant_files = {v.id: list(expected_members(manifest, [v.id])) for v in manifest.variants}
        with self._ready:
            self._gathering[digest] = _Gathering.of(device_ids, variant_files)

    def request(self, digest: str, device_id: str, request: ChunkRequest) -> None:
        """Queue the chunks a device asked for; MessageInvalid when the file is not in the store."""
        key = (digest, request.path, request.chunk_size)
        with self._ready:
            served = self._open(key)
            indices = [
                i for i in (range(served.count) if request.chunks is None else request.chunks) if 0 <= i < served.count
            ]
            wanted = sum(served.length(i) for i in indices if device_id not in served.waiting.get(i, ()))
            budget = self._budgets.setdefault(device_id, _Budget(self.device_budget_bytes, time.monotonic()))
            if not budget.take(wanted, self.device_budget_bytes):
                raise Refused(
                    f"{device_id} asked for more than {self.device_budget_bytes >> 20} MiB of chunks within the "
                    f"hour ({wanted >> 20} MiB more now); ask again later"
                )
            self._drop_other_sizes(digest, device_id, request.chunk_size)
            if (gathering := self._gathering.get(digest)) is not None:
                gathering.asked(device_id, request.path)
            for index in indices:
                served.waiting.setdefault(index, set()).add(device_id)
            if served.waiting:
                self._turns[key] = None
                self._ready.notify()

    def _drop_other_sizes(self, digest: str, device_id: str, chunk_size: int) -> None:
        """The device asks in `chunk_size` now: what it waits for of the bundle in others goes."""
        for key in [k for k in self._turns if k[0] == digest and k[2] != chunk_size]:
            self._unwait(key, device_id)

    def _unwait(self, key: FileKey, device_id: str) -> None:
        waiting = self._files[key].waiting
        for index, devices in list(waiting.items()):
            devices.discard(device_id)
            if not devices:
                del waiting[index]
        if not waiting:
            del self._turns[key]

    def forget(self, device_id: str) -> None:
        """The device went away: what only it was waiting for is not sent."""
        with self._ready:
            for gathering in self._gathering.values():
                gathering.forget(device_id)
            self._ready.notify()
            for key in list(self._turns):
                self._unwait(key, device_id)

    def _open(self, key: FileKey) -> _ServedFile:
        if (served := self._files.get(key)) is not None:
            self._files.move_to_end(key)
            return served
        digest, path, chunk_size = key
        if (target := self.store.file(digest, path)) is None:
            raise Refused(f"no file {path!r} in stored bundle {digest[:12]}")
        fd = os.open(target, os.O_RDONLY)
        size = os.fstat(fd).st_size
        count = chunk_count(size, chunk_size)
        kept = self.store.chunk_sums(digest, path, chunk_size)
        sums: list[bytes | None] = list(kept) if kept is not None and len(kept) == count else [None] * count

        def keep(sums: list[bytes]) -> None:
            try:
                self.store.save_chunk_sums(digest, path, chunk_size, sums)
            except OSError as e:  # they are computed again next time
                log.warning("cannot keep the chunk sums of %s in %s: %s", path, digest[:12], e)

        served = self._files[key] = _ServedFile(path, fd, size, chunk_size, sums, keep)
        idle = [k for k in self._files if k not in self._turns and k not in (key, self._reading)]
        for old in idle[: max(0, len(self._files) - OPEN_FILES)]:
            os.close(self._files.pop(old).fd)
        return served

    def _held(self, key: FileKey, now: float) -> float | None:
        """Seconds the file's chunks still wait for devices told to fetch with the others; None: none."""
        digest, path, _ = key
        if (gathering := self._gathering.get(digest)) is None:
            return None
        late = gathering.late()
        if now >= gathering.until or not late:
            if late:
                log.info("sending %s without waiting longer for %s", digest[:12], ", ".join(sorted(late)))
            del self._gathering[digest]
            return None
        return gathering.until - now if gathering.holds(path) else None

    def _next(self) -> tuple[str, _ServedFile, int] | None:
        """The next chunk to send, the files taking turns; None once stopped."""
        with self._ready:
            while self._running:
                now, wait = time.monotonic(), None
                for key in self._turns:
                    if (held := self._held(key, now)) is None:
                        break
                    wait = held if wait is None else min(wait, held)
                else:
                    self._ready.wait(wait)  # None: until a request comes
                    continue
                break
            if not self._running:
                return None
            self._reading = key
            served = self._files[key]
            index = next(iter(served.waiting))
            del served.waiting[index]
            if served.waiting:
                self._turns.move_to_end(key)
            else:
                del self._turns[key]
            return key[0], served, index

    def _send_loop(self) -> None:
        in_flight: list[mqtt.MQTTMessageInfo] = []
        while (chunk := self._next()) is not None:
            digest, served, index = chunk
            try:
                payload = served.payload(index)
            except OSError as e:  # the disk failed under it: the device will ask again
                log.warning("cannot read chunk %d of %s in %s: %s", index, served.path, digest[:12], e)
                continue
            finally:
                with self._ready:
                    self._reading = None
            in_flight.append(self.publish(chunk_topic(digest), payload))
            self.sent += 1
            if len(in_flight) >= IN_FLIGHT_CHUNKS:
                in_flight.pop(0).wait_for_publish(timeout=30)
