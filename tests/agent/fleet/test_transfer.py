"""Chunked transfer: a whole file, resume from the bitmap after the link dies, corrupt chunks,
a file served wrong.

A `ChunkLink` made here serves the chunks of a real file: the seam the uplink fills in
production. tests/e2e/test_fleet_link.py runs the transfer over a real Mosquitto.
"""

import hashlib
import logging
import os
import time
from pathlib import Path

import pytest

from slmops.agent.fleet.transfer import MqttFetcher, Wanted, saved_chunks
from slmops.errors import MessageInvalid, TransferError
from slmops.messages import ChunkHeader, ChunkRequest, chunk_payload, parse_chunk

CHUNK = 16 << 10
SIZE = 40 * CHUNK + 123


class FileLink:
    """Serves the chunks of one source file; `budget` chunks, then silence (a dead link); the
    chunks whose index is in `corrupt` have a byte flipped on the way, once each; those in `rotten`,
    every time (the sender's copy is damaged). Headers have the sha256 of the intact bytes."""

    device_id = "edge-test"

    def __init__(
        self,
        source: Path,
        budget: int | None = None,
        corrupt: set[int] | None = None,
        rotten: frozenset[int] = frozenset(),
    ) -> None:
        self.source, self.budget, self.corrupt, self.rotten = source, budget, corrupt or set(), rotten
        self.requests: list[ChunkRequest] = []
        self.on_chunk = self.on_refused = None

    def watch_bundle(self, digest, on_chunk, on_refused) -> bool:
        self.on_chunk, self.on_refused = on_chunk, on_refused
        return True

    def unwatch_bundle(self, digest) -> None:
        self.on_chunk = None

    def request_chunks(self, digest, request: ChunkRequest) -> None:
        self.requests.append(request)
        data = self.source.read_bytes()
        count = max(1, -(-len(data) // request.chunk_size))
        indices = range(count) if request.chunks is None else request.chunks
        for index in indices:
            if self.budget is not None:
                if self.budget == 0:
                    return
                self.budget -= 1
            piece = data[index * request.chunk_size : (index + 1) * request.chunk_size]
            header = ChunkHeader(
                path=request.path,
                index=index,
                count=count,
                chunk_size=request.chunk_size,
                file_size=len(data),
                sha256=hashlib.sha256(piece).hexdigest(),
            )
            payload = bytearray(chunk_payload(header, piece))
            if index in self.corrupt or index in self.rotten:
                self.corrupt.discard(index)
                payload[-1] ^= 0xFF
            self.on_chunk(*parse_chunk(payload, "test"))


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "weights.bin"
    path.write_bytes(os.urandom(SIZE))  # 41 chunks, the last one short
    return path


def want(target: Path, source: Path, listed: bool = True) -> Wanted:
    """`target`, to hold what `source` holds; not `listed`: no sha256 or size to check, as for a manifest."""
    data = source.read_bytes()
    return Wanted(target, hashlib.sha256(data).hexdigest(), len(data)) if listed else Wanted(target, None, None)


def test_a_whole_file_arrives_intact(source: Path, tmp_path: Path) -> None:
    link = FileLink(source)
    written: list[int] = []
    fetcher = MqttFetcher(link, CHUNK, timeout_s=1)
    with fetcher.watching("d" * 64):
        fetcher.fetch("d" * 64, {"variants/x/weights.bin": want(tmp_path / "out.bin", source)}, written.append)
    assert (tmp_path / "out.bin").read_bytes() == source.read_bytes()
    assert sum(written) == source.stat().st_size
    assert not (tmp_path / "out.bin.chunks").exists()


def test_a_restart_asks_only_for_the_chunks_not_on_disk(source: Path, tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    dying = FileLink(source, budget=35)  # the link dies after 35 of 41 chunks (saved when the fetch stops)
    fetcher = MqttFetcher(dying, CHUNK, timeout_s=0.05)
    with pytest.raises(TransferError, match="chunks still missing"), fetcher.watching("d" * 64):
        fetcher.fetch("d" * 64, {"p": want(target, source)})
    saved = saved_chunks(target, CHUNK, SIZE)
    assert saved is not None and [s is not None for s in saved] == [True] * 35 + [False] * 6
    assert saved_chunks(target, 2 * CHUNK, SIZE) is None  # another chunk size: nothing on disk counts

    restarted = FileLink(source)
    fetcher = MqttFetcher(restarted, CHUNK, timeout_s=1)
    with fetcher.watching("d" * 64):
        fetcher.fetch("d" * 64, {"p": want(target, source)})
    assert restarted.requests[0].chunks == list(range(35, 41))
    assert target.read_bytes() == source.read_bytes()


@pytest.mark.parametrize(
    ("loss", "found"),
    [("rot", [7]), ("power-cut", list(range(20, 35)))],
    ids=["a-chunk-rots", "a-power-cut-loses-the-tail"],
)
def test_chunks_the_bitmap_claims_but_the_disk_lost_are_found_and_fetched_again(
    source: Path, tmp_path: Path, loss: str, found: list[int]
) -> None:
    target = tmp_path / "out.bin"
    fetcher = MqttFetcher(FileLink(source, budget=35), CHUNK, timeout_s=0.05)
    with pytest.raises(TransferError, match="chunks still missing"), fetcher.watching("d" * 64):
        fetcher.fetch("d" * 64, {"p": want(target, source)})
    with target.open("r+b") as f:
        if loss == "rot":  # a chunk the bitmap claims rots while the agent is down
            f.seek(7 * CHUNK + 5)
            f.write(b"\x00rot")
        else:  # the bitmap reached the disk, the last 15 chunks it claims did not (no fsync between)
            f.truncate(20 * CHUNK)

    restarted = FileLink(source)
    fetcher = MqttFetcher(restarted, CHUNK, timeout_s=1)
    with fetcher.watching("d" * 64):
        fetcher.fetch("d" * 64, {"p": want(target, source)})
    assert [r.chunks for r in restarted.requests] == [list(range(35, 41)), found]
    assert target.read_bytes() == source.read_bytes()


@pytest.mark.parametrize("file_sha256", [True, False], ids=["file-sha256", "chunks-only"])
def test_a_corrupt_chunk_is_refused_and_asked_for_again(
    source: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, file_sha256: bool
) -> None:
    caplog.set_level(logging.WARNING, logger="slmops.agent.fleet.transfer")
    link = FileLink(source, corrupt={3, 40})
    fetcher = MqttFetcher(link, CHUNK, timeout_s=5)  # asked for again at once, not after the timeout
    with fetcher.watching("d" * 64):
        fetcher.fetch("d" * 64, {"p": want(tmp_path / "out.bin", source, listed=file_sha256)})
    refused = [r.getMessage() for r in caplog.records]
    assert refused == [f"chunk {i} of p does not match its sha256; asking for it again" for i in (3, 40)]
    assert [r.chunks for r in link.requests] == [None, [3, 40]]
    assert (tmp_path / "out.bin").read_bytes() == source.read_bytes()


def test_a_file_served_wrong_fails_and_is_not_kept(source: Path, tmp_path: Path) -> None:
    """Each chunk as its header says, but not the file the manifest names (rot in the store)."""
    target = tmp_path / "out.bin"
    fetcher = MqttFetcher(FileLink(source), CHUNK, timeout_s=1)
    with pytest.raises(TransferError, match="does not match the manifest's sha256"), fetcher.watching("d" * 64):
        fetcher.fetch("d" * 64, {"p": Wanted(target, "0" * 64, source.stat().st_size)})
    assert not target.exists() and saved_chunks(target, CHUNK, SIZE) is None  # the next attempt starts over


def test_the_same_wrong_bytes_twice_fail_the_fetch_as_a_damaged_source(source: Path, tmp_path: Path) -> None:
    link = FileLink(source, rotten=frozenset({5}))
    fetcher = MqttFetcher(link, CHUNK, timeout_s=5)
    with pytest.raises(TransferError, match="chunk 5 came again with the same bytes"), fetcher.watching("d" * 64):
        fetcher.fetch("d" * 64, {"p": want(tmp_path / "out.bin", source)})
    assert [r.chunks for r in link.requests] == [None, [5]]  # asked for once more, then given up on


class SharedTopicLink(FileLink):
    """Also delivers what other devices' fetches put on the shared topic: a chunk of a file this
    fetch does not want, one in another chunk size, and a damaged repeat of a chunk it holds."""

    def request_chunks(self, digest, request: ChunkRequest) -> None:
        super().request_chunks(digest, request)
        for header, piece in (
            (_header("other", b"x"), b"x"),
            (_header(request.path, b"y", chunk_size=2 * CHUNK), b"y"),
            (_header(request.path, b"z", count=41), b"not z"),  # chunk 0, already held: not even read
        ):
            self.on_chunk(*parse_chunk(chunk_payload(header, piece), "test"))


def test_files_are_asked_for_at_once_and_foreign_chunks_are_ignored(source: Path, tmp_path: Path) -> None:
    link = SharedTopicLink(source)
    fetcher = MqttFetcher(link, CHUNK, timeout_s=1)
    targets = {"a": tmp_path / "a.bin", "b": tmp_path / "b.bin"}
    with fetcher.watching("d" * 64):
        fetcher.fetch("d" * 64, {path: want(target, source) for path, target in targets.items()})
    assert [(r.path, r.chunks) for r in link.requests] == [("a", None), ("b", None)]
    assert all(t.read_bytes() == source.read_bytes() for t in targets.values())
    assert not (tmp_path / "other").exists()


def _header(path: str, piece: bytes, chunk_size: int = CHUNK, count: int = 1) -> ChunkHeader:
    return ChunkHeader(
        path=path,
        index=0,
        count=count,
        chunk_size=chunk_size,
        file_size=len(piece),
        sha256=hashlib.sha256(piece).hexdigest(),
    )


def test_a_chunk_message_is_parsed_without_copying_its_bytes() -> None:
    piece = b"weights" * 100
    header = _header("p", piece)
    parsed, data = parse_chunk(chunk_payload(header, piece), "t")
    assert parsed == header and isinstance(data, memoryview) and data == piece
    with pytest.raises(MessageInvalid, match="not a chunk message"):
        parse_chunk(b"\x00\x00\xff\xff{}", "slmops/v1/bundles/x/chunk")


class ForgingLink(FileLink):
    """Before the real chunks of each request, what a client publishing on the chunk topic forged
    (issue 11, finding 5): a first chunk claiming 50,000,000 chunks, a short one, and for a file
    the manifest lists (`listed`), one of a larger file and — once — a last chunk of the right
    shape with other bytes and their own sha256. (A manifest, which has no size to check yet,
    takes its size from its first chunk within MAX_UNLISTED_BYTES; its signature and digest are
    what guard it.)"""

    def __init__(self, source: Path, listed: bool) -> None:
        super().__init__(source)
        self.listed, self.forge_last = listed, listed

    def request_chunks(self, digest, request: ChunkRequest) -> None:
        count = -(-SIZE // CHUNK)
        x = b"x" * CHUNK
        forged = [
            (_header(request.path, x, count=50_000_000).model_copy(update={"file_size": 50_000_000 * CHUNK}), x),
            (_header(request.path, b"x", count=count).model_copy(update={"file_size": SIZE}), b"x"),
        ]
        if self.listed:
            forged.append((_header(request.path, x, count=count + 1).model_copy(update={"file_size": SIZE + CHUNK}), x))
        if self.forge_last:
            self.forge_last = False
            tail = os.urandom(SIZE - (count - 1) * CHUNK)
            header = _header(request.path, tail, count=count).model_copy(update={"index": count - 1, "file_size": SIZE})
            forged.append((header, tail))
        for header, piece in forged:
            self.on_chunk(*parse_chunk(chunk_payload(header, piece), "test"))
        super().request_chunks(digest, request)


@pytest.mark.parametrize("listed", [True, False], ids=["variant-file", "manifest"])
def test_forged_chunks_allocate_nothing_and_the_fetch_succeeds(source: Path, tmp_path: Path, listed: bool) -> None:
    import tracemalloc

    link = ForgingLink(source, listed)
    fetcher = MqttFetcher(link, CHUNK, timeout_s=5)
    tracemalloc.start()
    try:
        with fetcher.watching("d" * 64):
            fetcher.fetch("d" * 64, {"p": want(tmp_path / "out.bin", source, listed=listed)})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (tmp_path / "out.bin").read_bytes() == source.read_bytes()
    assert peak < 16 << 20, f"{peak / 2**20:.0f} MiB allocated (a list of 50,000,000 chunks is 400 MB)"
    if listed:  # the forged last chunk matched its own sha256, not the manifest's: all of it again
        assert [r.chunks for r in link.requests] == [None, None]


def test_a_poisoned_bitmap_is_not_read_and_the_file_starts_over(source: Path, tmp_path: Path) -> None:
    """The 1.6 GB bitmap a forged count left used to poison every later attempt at the version."""
    target = tmp_path / "out.bin"
    target.write_bytes(b"left")
    with (tmp_path / "out.bin.chunks").open("wb") as bitmap:
        bitmap.write(CHUNK.to_bytes(4, "big"))
        bitmap.truncate(1_600_000_000)  # sparse: nothing is written, but reading it would take 1.6 GB
    assert saved_chunks(target, CHUNK, SIZE) is None
    link = FileLink(source)
    fetcher = MqttFetcher(link, CHUNK, timeout_s=1)
    with fetcher.watching("d" * 64):
        fetcher.fetch("d" * 64, {"p": want(target, source)})
    assert target.read_bytes() == source.read_bytes() and [r.chunks for r in link.requests] == [None]


class RefusingLink(FileLink):
    """A controller that does not hold the bundle: it answers each request with fetch_refused."""

    def request_chunks(self, digest, request: ChunkRequest) -> None:
        self.requests.append(request)
        self.on_refused(request.path, f"no file {request.path!r} in stored bundle {digest[:12]}")


def test_a_refused_request_fails_the_fetch_at_once(source: Path, tmp_path: Path) -> None:
    """Finding 8: a desired state for a digest the controller does not hold used to block the
    agent's worker for 20 rounds of the transfer timeout (204 s)."""
    link = RefusingLink(source)
    fetcher = MqttFetcher(link, CHUNK, timeout_s=30)
    started = time.monotonic()
    with pytest.raises(TransferError, match=r"will not serve manifest\.json: no file"), fetcher.watching("d" * 64):
        fetcher.fetch("d" * 64, {"manifest.json": want(tmp_path / "manifest.json", source, listed=False)})
    assert time.monotonic() - started < 30 and len(link.requests) == 1
