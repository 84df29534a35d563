"""Fetching bundle files over MQTT, chunk by chunk, straight to disk, resumable.

    subscribe bundles/{digest}/chunk ─► request the missing chunks of every file at once
        each chunk still needed: sha256 checked ─► written at its offset ─► marked in the bitmap
        (chunks already held, or of other files, are dropped unread: the topic is shared)
        no chunk for `timeout_s` ─► request what is still missing (a lost or corrupt chunk)
    at most once a second, and when the fetch stops: the data is fsynced, then the bitmap
    (<file>.chunks) that claims it is saved, so a restart asks only for chunks not on disk;
    a kill loses at most a second of chunks, and a fast transfer pays for no fsync

Chunks travel on one topic per bundle: when several devices fetch the same bundle, one
publish reaches all of them, and each keeps the chunks of the files it is fetching.
"""

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from slmops.errors import SlmopsError
from slmops.messages import ChunkHeader, ChunkRequest

log = logging.getLogger(__name__)

SAVE_EVERY_S = 1.0
MAX_ROUNDS = 20


class TransferError(SlmopsError):
    pass


class ChunkLink(Protocol):
    """What the fetcher needs of the MQTT client (agent/uplink.py provides it)."""

    device_id: str

    def watch_bundle(self, digest: str, on_chunk: Callable[[ChunkHeader, memoryview], None]) -> None: ...

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
        self.saved_at = time.monotonic()
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

    def accept(self, header: ChunkHeader, data: memoryview) -> int:
        """Write a chunk this file still needs; returns the bytes newly written. Only such chunks are
        checked against their sha256 (MessageInvalid): on a shared topic most are someone else's."""
        with self.lock:
            if self.data.closed or (self.count is not None and header.count != self.count):
                return 0
            if header.index >= header.count or (self.count is not None and self.have[header.index]):
                return 0
            header.verify(data)
            if self.count is None:
                self.count, self.have = header.count, bytearray(header.count)
            self.file_size = header.file_size
            self.data.seek(header.index * self.chunk_size)
            self.data.write(data)
            self.have[header.index] = 1
            if time.monotonic() - self.saved_at >= SAVE_EVERY_S:
                self._save()
        return len(data)

    def _save(self) -> None:
        """Data first, then the bitmap that claims it: a kill never marks a chunk that is not on disk."""
        self.data.flush()
        os.fsync(self.data.fileno())
        tmp = self.bitmap_path.with_suffix(".tmp")
        tmp.write_bytes(bytes(self.have))
        os.replace(tmp, self.bitmap_path)
        self.saved_at = time.monotonic()

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
        self._current: Callable[[ChunkHeader, memoryview], None] | None = None

    @contextmanager
    def watching(self, digest: str) -> Iterator[None]:
        self.link.watch_bundle(digest, self._dispatch)
        try:
            yield
        finally:
            self.link.unwatch_bundle(digest)

    def _dispatch(self, header: ChunkHeader, data: memoryview) -> None:
        if (handler := self._current) is not None:
            handler(header, data)

    def fetch(self, digest: str, targets: dict[str, Path], progress: Callable[[int], None] | None = None) -> None:
        """Fetch bundle-relative files into their targets, all asked for at once (one round trip,
        not one per file); their sha256 is the caller's to check."""
        files = {path: _File(target, self.chunk_size) for path, target in targets.items()}
        arrived = threading.Event()

        def on_chunk(header: ChunkHeader, data: memoryview) -> None:
            file = files.get(header.path)
            if file is not None and header.chunk_size == self.chunk_size and (written := file.accept(header, data)):
                arrived.set()
                if progress is not None:
                    progress(written)

        def incomplete() -> dict[str, _File]:
            return {path: file for path, file in files.items() if not file.done()}

        self._current = on_chunk
        try:
            for _round in range(MAX_ROUNDS):
                if not (waiting := incomplete()):
                    break
                for path, file in waiting.items():
                    missing = file.missing()
                    if _round == 0 and missing is not None:
                        log.info(
                            "resuming %s: %d of %d chunks on disk", path, len(file.have) - len(missing), len(file.have)
                        )
                    request = ChunkRequest(
                        device_id=self.link.device_id, path=path, chunk_size=self.chunk_size, chunks=missing
                    )
                    self.link.request_chunks(digest, request)
                while True:
                    arrived.clear()  # before looking: a chunk landing in between sets it again
                    if not incomplete():
                        break
                    if not arrived.wait(self.timeout_s):
                        log.info("no chunks for %.0f s; asking again for what is missing", self.timeout_s)
                        break
            if waiting := incomplete():
                raise TransferError(f"{', '.join(waiting)}: chunks still missing after {MAX_ROUNDS} requests")
            for file in files.values():
                file.finish()
        finally:
            self._current = None
            for file in files.values():
                file.close()
