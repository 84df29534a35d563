"""Chunked transfer: a whole file, resume from the bitmap after the link dies, corrupt chunks.

A `ChunkLink` made here serves the chunks of a real file: the seam the uplink fills in
production. tests/e2e/test_fleet_link.py runs the transfer over a real Mosquitto.
"""

import hashlib
import os
from pathlib import Path

import pytest

from slmops.agent.transfer import MqttFetcher, TransferError
from slmops.messages import ChunkHeader, ChunkRequest, MessageInvalid, chunk_payload, parse_chunk

CHUNK = 16 << 10


class FileLink:
    """Serves the chunks of one source file; `budget` chunks, then silence (a dead link)."""

    device_id = "edge-test"

    def __init__(self, source: Path, budget: int | None = None) -> None:
        self.source, self.budget = source, budget
        self.requests: list[ChunkRequest] = []
        self.on_chunk = None

    def watch_bundle(self, digest, on_chunk) -> None:
        self.on_chunk = on_chunk

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
            self.on_chunk(*parse_chunk(chunk_payload(header, piece), "test"))


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "weights.bin"
    path.write_bytes(os.urandom(40 * CHUNK + 123))  # 41 chunks, the last one short
    return path


def test_a_whole_file_arrives_intact(source: Path, tmp_path: Path) -> None:
    link = FileLink(source)
    written: list[int] = []
    fetcher = MqttFetcher(link, CHUNK, timeout_s=1)
    with fetcher.watching("d" * 64):
        fetcher.fetch("d" * 64, "variants/x/weights.bin", tmp_path / "out.bin", written.append)
    assert (tmp_path / "out.bin").read_bytes() == source.read_bytes()
    assert sum(written) == source.stat().st_size
    assert not (tmp_path / "out.bin.chunks").exists()


def test_a_restart_asks_only_for_the_chunks_not_on_disk(source: Path, tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    dying = FileLink(source, budget=35)  # the link dies after 35 of 41 chunks (SAVE_EVERY_CHUNKS is 32)
    fetcher = MqttFetcher(dying, CHUNK, timeout_s=0.05)
    with pytest.raises(TransferError, match="chunks still missing"), fetcher.watching("d" * 64):
        fetcher.fetch("d" * 64, "p", target)
    assert sum((target.with_name("out.bin.chunks")).read_bytes()) == 35

    restarted = FileLink(source)
    fetcher = MqttFetcher(restarted, CHUNK, timeout_s=1)
    with fetcher.watching("d" * 64):
        fetcher.fetch("d" * 64, "p", target)
    assert restarted.requests[0].chunks == list(range(35, 41))
    assert target.read_bytes() == source.read_bytes()


def test_a_corrupt_chunk_is_refused() -> None:
    piece = b"weights" * 100
    header = ChunkHeader(
        path="p", index=0, count=1, chunk_size=CHUNK, file_size=len(piece), sha256=hashlib.sha256(piece).hexdigest()
    )
    payload = bytearray(chunk_payload(header, piece))
    payload[-1] ^= 0xFF
    with pytest.raises(MessageInvalid, match="does not match its sha256"):
        parse_chunk(bytes(payload), "slmops/v1/bundles/x/chunk")
    with pytest.raises(MessageInvalid, match="not a chunk message"):
        parse_chunk(b"\x00\x00\xff\xff{}", "slmops/v1/bundles/x/chunk")
