"""The controller's chunk server: which chunks go out, in which order, for whom.

The publish seam records what would go to the broker; the e2e tests run it against Mosquitto.
"""

import hashlib
import io
import os
import threading
import time
from pathlib import Path

import pytest

from slmops.controller import chunks
from slmops.controller.chunks import ChunkServer, Refused
from slmops.controller.store import BundleStore, hash_chunks
from slmops.errors import MessageInvalid
from slmops.messages import ChunkRequest, chunk_topic, parse_chunk

DIGEST = "ab" * 32
CHUNK = 16 << 10


class Published:
    def wait_for_publish(self, timeout: float | None = None) -> None:
        pass


class Broker:
    """Records each chunk published; holds the first one until `release()` so that requests made
    meanwhile queue up behind it, as they do while a real publish is under way."""

    def __init__(self, digest: str = DIGEST) -> None:
        self.digest = digest
        self.sent: list[tuple[str, int]] = []
        self.publishing, self.released, self.changed = threading.Event(), threading.Event(), threading.Condition()

    def publish(self, topic: str, payload: bytes) -> Published:
        assert topic == chunk_topic(self.digest)
        self.publishing.set()
        self.released.wait(10)
        header, data = parse_chunk(payload, topic)
        assert hashlib.sha256(data).hexdigest() == header.sha256
        with self.changed:
            self.sent.append((header.path, header.index))
            self.changed.notify_all()
        return Published()

    def first_under_way(self) -> None:
        assert self.publishing.wait(10), "nothing was published"

    def release(self) -> None:
        self.released.set()

    def wait_for(self, count: int) -> list[tuple[str, int]]:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.sent) >= count, 10), self.sent
        return self.sent


@pytest.fixture
def store(tmp_path: Path) -> BundleStore:
    store = BundleStore(tmp_path / "store")
    (store.path(DIGEST) / "variants").mkdir(parents=True)
    (store.path(DIGEST) / "manifest.json").write_bytes(b"{}")
    (store.path(DIGEST) / "variants" / "model.bin").write_bytes(os.urandom(6 * CHUNK))
    return store


@pytest.fixture
def served(store: BundleStore):
    broker = Broker()
    server = ChunkServer(store, broker.publish)
    server.start()
    yield server, broker
    broker.release()
    server.stop()


def ask(device: str, path: str, chunks: list[int] | None = None) -> tuple[str, ChunkRequest]:
    """The arguments of ChunkServer.request after the digest: who asks, and for what."""
    return device, ChunkRequest(path=path, chunk_size=CHUNK, chunks=chunks)


def test_files_take_turns_so_a_small_file_is_not_stuck_behind_a_big_one(served) -> None:
    server, broker = served
    server.request(DIGEST, *ask("edge-1", "variants/model.bin"))
    broker.first_under_way()
    server.request(DIGEST, *ask("edge-2", "manifest.json"))
    broker.release()
    sent = broker.wait_for(7)
    assert sent.index(("manifest.json", 0)) <= 2, sent
    assert sorted(sent) == [("manifest.json", 0)] + [("variants/model.bin", i) for i in range(6)]


def test_a_chunk_many_devices_wait_for_goes_out_once_and_a_late_device_gets_the_rest_after(served) -> None:
    server, broker = served
    server.request(DIGEST, *ask("edge-1", "variants/model.bin"))
    broker.first_under_way()  # chunk 0
    for device in ("edge-2", "edge-3"):
        server.request(DIGEST, *ask(device, "variants/model.bin"))
    broker.release()
    sent = broker.wait_for(7)
    assert sent == [("variants/model.bin", i) for i in [0, 1, 2, 3, 4, 5, 0]]  # 0 again, for the late two
    assert server.sent == 7


def test_what_only_a_device_gone_offline_waited_for_is_not_sent(served) -> None:
    server, broker = served
    server.request(DIGEST, *ask("edge-1", "variants/model.bin"))
    broker.first_under_way()  # chunk 0
    server.request(DIGEST, *ask("edge-2", "variants/model.bin", [4]))
    server.forget("edge-1")
    broker.release()
    assert broker.wait_for(2) == [("variants/model.bin", 0), ("variants/model.bin", 4)]
    server.request(DIGEST, *ask("edge-2", "manifest.json"))  # still serving afterwards
    assert broker.wait_for(3)[2] == ("manifest.json", 0)


def test_a_device_asking_in_another_chunk_size_no_longer_waits_in_the_first(served) -> None:
    """Finding 8: 200 requests in distinct chunk sizes queued the bundle 200 times over. Chunk sizes
    are powers of two (nine in all), and a device waits in one of them at a time."""
    server, broker = served
    server.request(DIGEST, *ask("edge-1", "manifest.json"))  # holds the sender while the rest queues
    broker.first_under_way()
    server.request(DIGEST, *ask("edge-1", "variants/model.bin"))
    bigger = ChunkRequest(path="variants/model.bin", chunk_size=2 * CHUNK)
    server.request(DIGEST, "edge-1", bigger)
    broker.release()
    broker.wait_for(4)
    time.sleep(0.2)  # nothing more comes
    assert broker.sent == [("manifest.json", 0)] + [("variants/model.bin", i) for i in range(3)]  # 3 of 2×CHUNK
    assert server.sent == 4


def test_a_device_past_its_budget_is_refused_and_others_are_served(store: BundleStore) -> None:
    """Finding 8: requests made the controller queue a bundle over and over (17 GB for 23.6 KB)."""
    broker = Broker()
    broker.release()
    server = ChunkServer(store, broker.publish, device_budget_bytes=8 * CHUNK)  # a whole model.bin, and 2 chunks
    server.start()
    try:
        server.request(DIGEST, *ask("edge-1", "variants/model.bin"))
        broker.wait_for(6)
        with pytest.raises(Refused, match="edge-1 asked for more than 0 MiB of chunks within the hour"):
            server.request(DIGEST, *ask("edge-1", "variants/model.bin"))  # all of it again
        server.request(DIGEST, *ask("edge-1", "variants/model.bin", [2, 3]))  # what is left of its budget
        server.request(DIGEST, *ask("edge-2", "variants/model.bin"))  # another device has its own
        broker.wait_for(12)  # chunks 2 and 3 go out once for both
        time.sleep(0.2)
        assert server.sent == 12
    finally:
        server.stop()


@pytest.mark.parametrize("path", ["../../admin.token", "variants", "nothing.json", "/etc/passwd"])
def test_only_files_of_the_stored_bundle_are_served(served, path: str) -> None:
    server, broker = served
    with pytest.raises(MessageInvalid, match="no file"):
        server.request(DIGEST, *ask("edge-1", path))
    with pytest.raises(MessageInvalid, match="no file"):
        server.request("../" + DIGEST, *ask("edge-1", "manifest.json"))
    broker.release()
    assert server.sent == 0


def test_chunk_sums_computed_while_serving_are_kept_and_a_damaged_kept_file_is_not_trusted(
    store: BundleStore,
) -> None:
    path = "variants/model.bin"
    assert store.chunk_sums(DIGEST, path, CHUNK) is None  # not pushed through ingest: nothing kept
    for damage in (None, b"\0" * 33):  # the second server finds its kept file truncated to nonsense
        if damage is not None:
            (store.root / "chunk-sums" / DIGEST / str(CHUNK) / path).write_bytes(damage)
        broker = Broker()  # checks every chunk's bytes against the sha256 in its header
        broker.release()
        server = ChunkServer(store, broker.publish)
        server.start()
        try:
            server.request(DIGEST, *ask("edge-1", path))
            assert len(broker.wait_for(6)) == 6
        finally:
            server.stop()
        assert store.chunk_sums(DIGEST, path, CHUNK) == hash_chunks(store.path(DIGEST) / path, CHUNK)


@pytest.mark.parametrize("size", [0, 1, CHUNK, CHUNK + 1])
def test_hash_chunks_counts_chunks_as_the_chunk_server_does(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    (tmp_path / "f").write_bytes(data)
    pieces = [data[i : i + CHUNK] for i in range(0, size, CHUNK)] or [b""]
    assert hash_chunks(tmp_path / "f", CHUNK) == [hashlib.sha256(p).digest() for p in pieces]


@pytest.fixture
def pushed(tmp_path: Path, archive: bytes, trusted):
    """A chunk server over a store holding the tiny bundle (two variants), pushed as a user would."""
    store = BundleStore(tmp_path / "pushed")
    manifest, staging = store.stage(io.BytesIO(archive), trusted)
    assert store.keep(manifest, staging)
    digest = manifest.digest
    broker = Broker(digest)
    broker.release()
    server = ChunkServer(store, broker.publish)
    server.start()
    yield server, broker, digest, manifest
    server.stop()


def int4_files(manifest) -> list[str]:
    return [f"variants/cpu-int4/{f.path}" for f in manifest.variant("cpu-int4").files]


def test_devices_told_together_are_waited_for_so_one_send_serves_them_all(pushed, monkeypatch) -> None:
    """Each device asks for the manifest and signature, then for each file of the variant it chose,
    one message per file; each file goes out once, after every device that will want it asked."""
    monkeypatch.setattr(chunks, "GATHER_S", 30.0)  # only asking, or going offline, ends the wait here
    server, broker, digest, manifest = pushed
    server.expect(digest, ["edge-1", "edge-2", "edge-3", "edge-4"])
    for device in ("edge-1", "edge-2", "edge-3"):
        for path in ("manifest.json", "signature.json"):
            server.request(digest, *ask(device, path))
    server.forget("edge-4")  # offline: not waited for
    assert sorted(broker.wait_for(2)) == [("manifest.json", 0), ("signature.json", 0)]
    files = int4_files(manifest)
    for device in ("edge-1", "edge-2"):
        for path in files:
            server.request(digest, *ask(device, path))
    server.request(digest, *ask("edge-3", files[0]))  # its first file: the others' requests are on their way
    time.sleep(0.2)  # that one goes (all three asked for it), the rest wait: sent now, they would go again
    assert broker.sent[2:] == [(files[0], 0)]
    for path in files[1:]:
        server.request(digest, *ask("edge-3", path))
    count = sum(-(-f.size // CHUNK) for f in manifest.variant("cpu-int4").files)
    sent = broker.wait_for(2 + count)
    time.sleep(0.2)
    assert len(sent) == 2 + count and len(set(sent)) == len(sent)  # every chunk once, for all three


def test_a_device_told_with_the_others_that_never_asks_holds_them_up_briefly(pushed, monkeypatch) -> None:
    monkeypatch.setattr(chunks, "GATHER_S", 0.2)
    server, broker, digest, _ = pushed
    server.expect(digest, ["edge-1", "edge-2"])  # edge-2 serves this bundle already, say: it never asks
    server.request(digest, *ask("edge-1", "manifest.json"))
    assert broker.wait_for(1) == [("manifest.json", 0)]
