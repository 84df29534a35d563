"""Fetching bundle files over MQTT, chunk by chunk, straight to disk, resumable.

    subscribe bundles/{digest}/chunk ─► request the missing chunks of one file
        each chunk: sha256 checked ─► written at its offset ─► marked in the bitmap
        no progress for `timeout_s` ─► request what is still missing (a lost or corrupt chunk)
    the bitmap (<file>.chunks) is saved after the data is flushed, so a restart asks only
    for chunks that are not on disk

Chunks travel on one topic per bundle: when several devices fetch the same bundle, one
publish reaches all of them, and each keeps the chunks of the files it is fetching.
"""

import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from slmops.errors import SlmopsError
from slmops.messages import ChunkHeader, ChunkRequest

log = logging.getLogger(__name__)

SAVE_EVERY_CHUNKS = 32
MAX_ROUNDS = 20


class TransferError(SlmopsError):
    pass


class ChunkLink(Protocol):
    """What the fetcher needs of the MQTT client (agent/uplink.py provides it)."""

    device_id: str

    def watch_bundle(self, digest: str, on_chunk: Callable[[ChunkHeader, bytes], None]) -> None: ...

    def unwatch_bundle(self, digest: str) -> None: ...

    def request_chunks(self, digest: str, request: ChunkRequest) -> None: ...


class _File:
    """One file being fetched: its data file, its bitmap, what arrived."""

    def __init__(self, target: Path, chunk_size: int) -> None:
        self.target, self.chunk_size = target, chunk_size
        self.bitmap_path = target.with_name(target.name + ".chunks")
        self.count: int | None = None
        self.file_size: int | None = None
        self.have = bytearray()
        self.unsaved = 0
        self.progress = threading.Event()
        self.lock = threading.Lock()
        target.parent.mkdir(parents=True, exist_ok=True)
        if self.bitmap_path.is_file() and target.is_file():
            saved = self.bitmap_path.read_bytes()
            self.count, self.have = len(saved), bytearray(saved)
        self.data = target.open("r+b" if target.is_file() else "w+b")

    def missing(self) -> list[int] | None:
        return None if self.count is None else [i for i in range(self.count) if not self.have[i]]

    def done(self) -> bool:
        return self.count is not None and all(self.have)

    def accept(self, header: ChunkHeader, data: bytes) -> int:
        """Write a chunk that belongs here; returns the bytes newly written."""
        with self.lock:
            if self.count is None:
                self.count, self.have = header.count, bytearray(header.count)
            if header.count != self.count or header.index >= self.count or self.have[header.index]:
                return 0
            self.file_size = header.file_size
            self.data.seek(header.index * self.chunk_size)
            self.data.write(data)
            self.have[header.index] = 1
            self.unsaved += 1
            if self.unsaved >= SAVE_EVERY_CHUNKS or all(self.have):
                self._save()
        self.progress.set()
        return len(data)

    def _save(self) -> None:
        """Data first, then the bitmap that claims it: a kill never marks a chunk that is not on disk."""
        self.data.flush()
        os.fsync(self.data.fileno())
        tmp = self.bitmap_path.with_suffix(".tmp")
        tmp.write_bytes(bytes(self.have))
        os.replace(tmp, self.bitmap_path)
        self.unsaved = 0

    def finish(self) -> None:
        with self.lock:
            if self.file_size is not None:
                self.data.truncate(self.file_size)
            self.data.close()
        self.bitmap_path.unlink(missing_ok=True)

    def close(self) -> None:
        """Keep what arrived for the next attempt (finish() already closed a complete file)."""
        with self.lock:
            if self.data.closed:
                return
            if self.count is not None:
                self._save()
            self.data.close()


class MqttFetcher:
    """Fetches files of one bundle while `watching(digest)`: one subscription for all its files."""

    def __init__(self, link: ChunkLink, chunk_size: int, timeout_s: float) -> None:
        self.link, self.chunk_size, self.timeout_s = link, chunk_size, timeout_s
        self._current: Callable[[ChunkHeader, bytes], None] | None = None

    @contextmanager
    def watching(self, digest: str) -> Iterator[None]:
        self.link.watch_bundle(digest, self._dispatch)
        try:
            yield
        finally:
            self.link.unwatch_bundle(digest)

    def _dispatch(self, header: ChunkHeader, data: bytes) -> None:
        if (handler := self._current) is not None:
            handler(header, data)

    def fetch(self, digest: str, path: str, target: Path, progress: Callable[[int], None] | None = None) -> None:
        """Fetch one bundle-relative file into `target` (its sha256 is the caller's to check)."""
        file = _File(target, self.chunk_size)

        def on_chunk(header: ChunkHeader, data: bytes) -> None:
            if header.path == path and header.chunk_size == self.chunk_size and not file.data.closed:
                written = file.accept(header, data)
                if written and progress is not None:
                    progress(written)

        self._current = on_chunk
        try:
            for _round in range(MAX_ROUNDS):
                if file.done():
                    break
                missing = file.missing()
                self.link.request_chunks(
                    digest,
                    ChunkRequest(device_id=self.link.device_id, path=path, chunk_size=self.chunk_size, chunks=missing),
                )
                while not file.done():
                    file.progress.clear()
                    if not file.progress.wait(self.timeout_s):
                        log.info("no chunks of %s for %.0f s; asking again for what is missing", path, self.timeout_s)
                        break
            if not file.done():
                raise TransferError(f"{path}: chunks still missing after {MAX_ROUNDS} requests")
            file.finish()
        finally:
            self._current = None
            file.close()
