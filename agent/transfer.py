"""Fetching bundle files over MQTT, chunk by chunk, straight to disk, resumable.

    subscribe bundles/{digest}/chunk ─► request the missing chunks of every file at once
        each chunk still needed: sha256 checked ─► written at its offset ─► marked in the bitmap
        (chunks already held, or of other files, are dropped unread: the topic is shared)
        no chunk for `timeout_s` ─► request what is still missing (a lost or corrupt chunk)
    every 8 MiB or half second, in a thread of its own (the receiving thread never waits for the
    disk), and when the fetch stops: the data is fsynced, then the bitmap (<file>.chunks) that
    claims it is saved, so a restart asks only for chunks not on disk

Chunks travel on one topic per bundle: when several devices fetch the same bundle, one
publish reaches all of them, and each keeps the chunks of the files it is fetching.
"""

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from slmops.errors import SlmopsError
from slmops.messages import ChunkHeader, ChunkRequest

log = logging.getLogger(__name__)

CHECKPOINT_EVERY_S, CHECKPOINT_EVERY_BYTES = 0.5, 8 << 20
MAX_ROUNDS = 20


class TransferError(SlmopsError):
    pass


def bitmap_path(target: Path) -> Path:
    """Which chunks of `target` are on disk, while it is being fetched."""
    return target.with_name(target.name + ".chunks")


def _saved_bitmap(target: Path) -> bytes | None:
    """The bitmap an interrupted fetch of `target` left, if it left the file too."""
    bitmap = bitmap_path(target)
    return bitmap.read_bytes() if bitmap.is_file() and target.is_file() else None


def bytes_on_disk(target: Path, chunk_size: int, size: int) -> int:
    """How much of a `size`-byte file a fetch interrupted before has already put in `target`."""
    saved = _saved_bitmap(target)
    return 0 if saved is None else min(size, sum(saved) * chunk_size)


class ChunkLink(Protocol):
    """What the fetcher needs of the MQTT client (agent/uplink.py provides it)."""

    device_id: str

    def watch_bundle(self, digest: str, on_chunk: Callable[[ChunkHeader, memoryview], None]) -> bool: ...

    def unwatch_bundle(self, digest: str) -> None: ...

    def request_chunks(self, digest: str, request: ChunkRequest) -> None: ...


class _File:
    """One file being fetched: its data file, its bitmap, what arrived."""

    def __init__(self, path: str, target: Path, chunk_size: int, saver: ThreadPoolExecutor) -> None:
        self.chunk_size, self.saver = chunk_size, saver
        self.bitmap_path = bitmap_path(target)
        self.count: int | None = None
        self.file_size: int | None = None
        self.have = bytearray()
        self.lock = threading.Lock()
        self.checkpoint: Future[None] | None = None
        self.checkpointed_at, self.unsaved_bytes = time.monotonic(), 0
        target.parent.mkdir(parents=True, exist_ok=True)
        if (saved := _saved_bitmap(target)) is not None:
            self.count, self.have = len(saved), bytearray(saved)
            log.info("resuming %s: %d of %d chunks on disk", path, sum(saved), len(saved))
        self.fd: int | None = os.open(target, os.O_RDWR | os.O_CREAT, 0o644)

    def missing(self) -> list[int] | None:
        return None if self.count is None else [i for i in range(self.count) if not self.have[i]]

    def done(self) -> bool:
        return self.count is not None and 0 not in self.have  # memchr: this runs on every chunk

    def accept(self, header: ChunkHeader, data: memoryview) -> int:
        """Write a chunk this file still needs; returns the bytes newly written. Only such chunks are
        checked against their sha256 (MessageInvalid): on a shared topic most are someone else's."""
        with self.lock:
            if self.fd is None or (self.count is not None and header.count != self.count):
                return 0
            if header.index >= header.count or (self.count is not None and self.have[header.index]):
                return 0
            header.verify(data)
            if self.count is None:
                self.count, self.have = header.count, bytearray(header.count)
            self.file_size = header.file_size
            os.pwrite(self.fd, data, header.index * self.chunk_size)
            self.have[header.index] = 1
            self.unsaved_bytes += len(data)
            due = (
                self.unsaved_bytes >= CHECKPOINT_EVERY_BYTES
                or time.monotonic() - self.checkpointed_at >= CHECKPOINT_EVERY_S
            )
            if due and (self.checkpoint is None or self.checkpoint.done()):
                self.checkpoint = self.saver.submit(self._save, bytes(self.have))
                self.checkpointed_at, self.unsaved_bytes = time.monotonic(), 0
        return len(data)

    def _save(self, claimed: bytes) -> None:
        """fsync, then the bitmap: `claimed` was taken after those chunks were written, so the bitmap
        never claims a chunk that is not on disk, even after a power cut."""
        assert self.fd is not None
        os.fsync(self.fd)
        tmp = self.bitmap_path.with_suffix(".tmp")
        tmp.write_bytes(claimed)
        os.replace(tmp, self.bitmap_path)

    def _settle(self) -> None:
        if self.checkpoint is not None:
            self.checkpoint.result()

    def finish(self) -> None:
        with self.lock:
            self._settle()
            assert self.fd is not None
            if self.file_size is not None:
                os.ftruncate(self.fd, self.file_size)
            os.close(self.fd)
            self.fd = None
        self.bitmap_path.unlink(missing_ok=True)

    def close(self) -> None:
        """Keep what arrived for the next attempt (finish() already closed a complete file)."""
        with self.lock:
            if self.fd is None:
                return
            try:
                self._settle()
                if self.count is not None:
                    self._save(bytes(self.have))
            finally:
                os.close(self.fd)
                self.fd = None


class MqttFetcher:
    """Fetches files of one bundle while `watching(digest)`: one subscription for all its files."""

    def __init__(self, link: ChunkLink, chunk_size: int, timeout_s: float) -> None:
        self.link, self.chunk_size, self.timeout_s = link, chunk_size, timeout_s
        self._current: Callable[[ChunkHeader, memoryview], None] | None = None

    @contextmanager
    def watching(self, digest: str) -> Iterator[None]:
        if not self.link.watch_bundle(digest, self._dispatch):
            log.warning("the broker has not confirmed the subscription to %s's chunks yet", digest[:12])
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
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="slmops-checkpoint") as saver:
            self._fetch(
                digest,
                {path: _File(path, target, self.chunk_size, saver) for path, target in targets.items()},
                progress,
            )

    def _fetch(self, digest: str, files: dict[str, _File], progress: Callable[[int], None] | None) -> None:
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
            for _ in range(MAX_ROUNDS):
                if not (waiting := incomplete()):
                    break
                for path, file in waiting.items():
                    request = ChunkRequest(
                        device_id=self.link.device_id, path=path, chunk_size=self.chunk_size, chunks=file.missing()
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
