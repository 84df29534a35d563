"""Fetching bundle files over MQTT, chunk by chunk, straight to disk, resumable.

    subscribe bundles/{digest}/chunk ─► request the missing chunks of every file at once
        each chunk still needed: written at its offset, marked with the sha256 it came with;
        the file's own sha256 advances in order over what has landed (no second pass over it)
        (chunks already held, or of other files, are dropped unread: the topic is shared)
        a chunk is kept only when its header matches what was asked for: the path, this fetch's
            chunk size, and the count, file size and chunk length the manifest's size gives (a
            forged header cannot make the agent allocate or write past the file it expects)
        every chunk on disk ─► the file's sha256 against the manifest's: equal, the file is done;
            else each chunk against the sha256 it came with: the ones that differ are asked for
            again (the same wrong bytes twice: the controller's copy is damaged, TransferError);
            with none differing, a chunk was forged with a sha256 of its own, or the file itself
            was served wrong: the whole file is asked for again, and the same chunks once more
            mean the controller's file is wrong (TransferError)
        no chunk for `timeout_s` ─► request what is still missing (a lost chunk)
    every 8 MiB or half second, in a thread of its own (the receiving thread never waits for the
    disk), and when the fetch stops: the bitmap (<file>.chunks: the chunk size, then each chunk's
    sha256 or zeros) is saved, so a restart asks only for chunks not on disk and checks them all:
    a chunk claimed that a power cut kept from the disk, or that rotted there, is found by its
    sha256 and asked for again (so the data needs no fsync before its bitmap: the slot is
    fsynced once, whole, before it is activated, agent/fleet/sync.py)

Chunks travel on one topic per bundle: when several devices fetch the same bundle, one
publish reaches all of them, and each keeps the chunks of the files it is fetching.
"""

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple, Protocol

from slmops.errors import DiskFull, TransferError
from slmops.messages import ChunkHeader, ChunkRequest, chunk_count
from slmops.paths import replace_file

log = logging.getLogger(__name__)

CHECKPOINT_EVERY_S, CHECKPOINT_EVERY_BYTES = 0.5, 8 << 20
MAX_ROUNDS = 20
MAX_UNLISTED_BYTES = 4 << 20
"""The largest manifest or signature accepted: files the manifest cannot give a size for."""
MAX_WHOLE_REFETCHES = 2
"""Times a file whose every chunk matched its own sha256, but not the manifest's, is fetched again."""
SUM_BYTES = 32
NO_SUM = bytes(SUM_BYTES)


def served_wrong(path: str) -> TransferError:
    """Every byte arrived as sent, yet the file is not the one the manifest names."""
    return TransferError(f"{path}: the fetched file does not match the manifest's sha256")


class Wanted(NamedTuple):
    """A file to fetch: where it goes, the sha256 and size it must have (None: the manifest and its
    signature, which have neither yet: each chunk's sha256 is checked, the size bounded)."""

    target: Path
    sha256: str | None
    size: int | None


def bitmap_path(target: Path) -> Path:
    """Which chunks of `target` are on disk, while it is being fetched."""
    return target.with_name(target.name + ".chunks")


def saved_chunks(target: Path, chunk_size: int, size: int | None) -> list[bytes | None] | None:
    """The sha256 of each chunk an interrupted fetch of `target` left on disk (None: not there);
    None when it left no bitmap, or one for another chunk size or another file size than `size`
    (None: at most MAX_UNLISTED_BYTES): the file is fetched again. A bitmap is read only once its
    own size shows it fits."""
    bitmap = bitmap_path(target)
    try:
        if not target.is_file():
            return None
        bitmap_bytes = bitmap.stat().st_size
    except OSError:
        return None
    fits = (
        bitmap_bytes == 4 + SUM_BYTES * chunk_count(size, chunk_size)
        if size is not None
        else bitmap_bytes <= 4 + SUM_BYTES * chunk_count(MAX_UNLISTED_BYTES, chunk_size)
    )
    saved = bitmap.read_bytes() if fits else b""
    if len(saved) < 4 or (len(saved) - 4) % SUM_BYTES or int.from_bytes(saved[:4], "big") != chunk_size:
        log.info("%s is for another chunk size or file, or damaged; fetching the file again", bitmap.name)
        return None
    sums = [saved[i : i + SUM_BYTES] for i in range(4, len(saved), SUM_BYTES)]
    return [None if s == NO_SUM else s for s in sums]


def bytes_on_disk(target: Path, chunk_size: int, size: int) -> int:
    """How much of a `size`-byte file a fetch interrupted before has already put in `target`."""
    saved = saved_chunks(target, chunk_size, size)
    return 0 if saved is None else min(size, sum(s is not None for s in saved) * chunk_size)


OnChunk = Callable[[ChunkHeader, memoryview], None]
OnRefused = Callable[[str, str], None]
"""path, reason: the controller will not serve that file (devices/{id}/fetch_refused)"""


class ChunkLink(Protocol):
    """What the fetcher needs of the MQTT client (agent/fleet/uplink.py provides it)."""

    device_id: str

    def watch_bundle(self, digest: str, on_chunk: OnChunk, on_refused: OnRefused) -> bool: ...

    def unwatch_bundle(self, digest: str) -> None: ...

    def request_chunks(self, digest: str, request: ChunkRequest) -> None: ...


class FileStatus(NamedTuple):
    """Where one file's fetch stands, read under its lock."""

    complete: bool
    failed: TransferError | None


class _File:
    """One file being fetched: its data file, the sha256 each chunk on disk came with, and the
    file's own sha256 so far (over chunks 0 … hashed-1).

    Written by paho's thread (`accept`, `refuse`), read and checked by the fetch's thread (`status`,
    `missing`, `take_ask_again`, `check_chunks`): every field under `lock`. The network thread only
    writes chunks and advances the file's sha256 as they land; when every chunk is on disk and the
    sha256 differs from the manifest's, checking each chunk (reading the whole file back) is left
    to the fetch's thread.
    """

    def __init__(self, path: str, wanted: Wanted, chunk_size: int, saver: ThreadPoolExecutor) -> None:
        self.path, self.sha256, self.chunk_size, self.saver = path, wanted.sha256, chunk_size, saver
        self.target, self.bitmap_path = wanted.target, bitmap_path(wanted.target)
        self.size = wanted.size  # None: known from the first chunk kept, at most MAX_UNLISTED_BYTES
        self.count: int | None = None if wanted.size is None else chunk_count(wanted.size, chunk_size)
        self.file_size: int | None = None  # from the chunks' headers, or what a resumed file holds
        self.sums: list[bytes | None] = [] if self.count is None else [None] * self.count  # None: not on disk
        self.refused = 0  # chunks whose header did not match what was asked for
        self.whole_refetches: list[list[bytes | None]] = []  # each chunk's sha256, each time all matched
        self.digest, self.hashed = hashlib.sha256(), 0
        self.complete, self.asking_again = False, False
        self.unchecked = False  # every chunk on disk, the file's sha256 not the manifest's: check each chunk
        self.damaged: dict[int, bytes] = {}  # chunk index → the sha256 of the wrong bytes it came with
        self.failed: TransferError | None = None
        self.lock = threading.Lock()
        self.checkpoint: Future[None] | None = None
        self.checkpointed_at, self.unsaved_bytes = time.monotonic(), 0
        wanted.target.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_RDWR | os.O_CREAT
        if (saved := saved_chunks(wanted.target, chunk_size, wanted.size)) is not None:
            self.count, self.sums = len(saved), saved
            log.info("resuming %s: %d of %d chunks on disk", path, len(saved) - saved.count(None), len(saved))
        else:
            flags |= os.O_TRUNC  # nothing on disk is claimed
        self.fd: int | None = os.open(wanted.target, flags, 0o644)
        if saved is not None:
            self.file_size = os.fstat(self.fd).st_size  # through the last chunk written: enough to read back
            if None not in saved:  # killed before the file was found complete: check it now
                self._hash_ahead(-1, None)
                self._check_digest()
                self.check_chunks()

    def missing(self) -> list[int] | None:
        """The chunks to ask for; None: all of them (nothing of the file is on disk)."""
        with self.lock:
            missing = [i for i, sha256 in enumerate(self.sums) if sha256 is None]
            return None if self.count is None or len(missing) == self.count else missing

    def status(self) -> FileStatus:
        with self.lock:
            return FileStatus(self.complete, self.failed)

    def take_ask_again(self) -> bool:
        """Whether chunks found wrong are to be asked for again (once: the flag is taken)."""
        with self.lock:
            again, self.asking_again = self.asking_again, False
            return again

    def refuse(self, reason: str) -> None:
        with self.lock:
            self.failed = TransferError(f"the controller will not serve {self.path}: {reason}")

    def _fits(self, header: ChunkHeader, length: int) -> bool:
        """The header is one of the chunks asked for: this file's size, count and chunk length."""
        size = self.size if self.size is not None else header.file_size
        if size > MAX_UNLISTED_BYTES and self.size is None:
            return False
        count = chunk_count(size, self.chunk_size)
        expected = min(self.chunk_size, size - header.index * self.chunk_size)
        return (
            header.file_size == size
            and header.count == count
            and (self.count is None or count == self.count)
            and header.index < count
            and length == max(0, expected)
        )

    def accept(self, header: ChunkHeader, data: memoryview) -> tuple[int, bool]:
        """Write a chunk this file still needs; returns the bytes newly written, and whether the
        fetch's thread has something to do (the file complete, failed, to check or to ask again)."""
        with self.lock:
            written = self._accept(header, data)
            return written, self.complete or self.failed is not None or self.unchecked or self.asking_again

    def _accept(self, header: ChunkHeader, data: memoryview) -> int:
        """`accept` under the lock."""
        if self.fd is None:
            return 0
        if not self._fits(header, len(data)):
            self.refused += 1
            if self.refused in (1, 10, 100, 1000):
                log.warning(
                    "refused %d chunk(s) of %s whose header does not match the file asked for (last: %d of %d, "
                    "%d bytes of a %d-byte file)",
                    self.refused,
                    self.path,
                    header.index,
                    header.count,
                    len(data),
                    header.file_size,
                )
            return 0
        if self.count is None:  # the first chunk of a manifest or signature gives its size
            self.size, self.count, self.sums = header.file_size, header.count, [None] * header.count
        if self.sums[header.index] is not None:
            return 0
        self.file_size = header.file_size
        try:
            os.pwrite(self.fd, data, header.index * self.chunk_size)
        except OSError as e:  # a full disk: this fetch fails with the reason, and is tried again later
            self.failed = DiskFull(f"cannot write {self.path}: {e.strerror or e}")
            return 0
        self.sums[header.index] = bytes.fromhex(header.sha256)
        self._hash_ahead(header.index, data)
        if self.hashed == self.count:
            self._check_digest()
        self.unsaved_bytes += len(data)
        due = (
            self.unsaved_bytes >= CHECKPOINT_EVERY_BYTES
            or time.monotonic() - self.checkpointed_at >= CHECKPOINT_EVERY_S
        )
        if due and (self.checkpoint is None or self.checkpoint.done()):
            self.checkpoint = self.saver.submit(self._save, self._bitmap())
            self.checkpointed_at, self.unsaved_bytes = time.monotonic(), 0
        return len(data)

    def _read(self, index: int) -> bytes:
        assert self.fd is not None and self.file_size is not None
        offset = index * self.chunk_size  # past the end when a power cut lost the file's tail: no bytes
        return os.pread(self.fd, max(0, min(self.chunk_size, self.file_size - offset)), offset)

    def _hash_ahead(self, arrived: int, data: memoryview | None) -> None:
        """Feed the file's sha256 every chunk on disk from `hashed` on; the one that just arrived
        from memory, earlier arrivals (out of order, or from before a restart) from disk."""
        assert self.count is not None
        while self.hashed < self.count and self.sums[self.hashed] is not None:
            self.digest.update(data if self.hashed == arrived and data is not None else self._read(self.hashed))
            self.hashed += 1

    def _check_digest(self) -> None:
        """Every chunk is on disk: the file the manifest names, or chunks to check one by one?"""
        if self.sha256 is not None and self.digest.hexdigest() == self.sha256:
            self.complete = True
        else:
            self.unchecked = True

    def check_chunks(self) -> None:
        """A file whose sha256 did not match (or that has none to compare with): each chunk against
        the sha256 it came with (the fetch's thread: this reads the whole file back)."""
        with self.lock:
            if self.unchecked and self.fd is not None:
                self.unchecked = False
                self._check_chunks()

    def _check_chunks(self) -> None:
        assert self.count is not None
        actual = {i: hashlib.sha256(self._read(i)).digest() for i in range(self.count)}
        bad = [i for i, sha256 in actual.items() if sha256 != self.sums[i]]
        if not bad:
            if self.sha256 is None:  # no sha256 to compare with: every chunk checked
                self.complete = True
                return
            # Every chunk as its header said, not the file the manifest names: a chunk forged with a
            # sha256 of its own, or a wrong file. The whole file again tells which (bounded).
            received = list(self.sums)
            if received in self.whole_refetches or len(self.whole_refetches) >= MAX_WHOLE_REFETCHES:
                self.failed = served_wrong(self.path)
                return
            log.warning("%s does not match the manifest's sha256; asking for all of it again", self.path)
            self.whole_refetches.append(received)
            self.sums = [None] * self.count
            self.digest, self.hashed, self.asking_again = hashlib.sha256(), 0, True
            return
        if again := [i for i in bad if self.damaged.get(i) == actual[i]]:
            self.failed = TransferError(
                f"{self.path}: chunk {again[0]} came again with the same bytes, which do not match the sha256 "
                "sent with them: the controller's stored copy is damaged"
            )
            return
        for i in bad:
            log.warning("chunk %d of %s does not match its sha256; asking for it again", i, self.path)
            self.sums[i], self.damaged[i] = None, actual[i]
        self.digest, self.hashed, self.asking_again = hashlib.sha256(), 0, True
        self._hash_ahead(-1, None)

    def _bitmap(self) -> bytes:
        return self.chunk_size.to_bytes(4, "big") + b"".join(s or NO_SUM for s in self.sums)

    def _save(self, claimed: bytes) -> None:
        """The bitmap: `claimed` was taken after those chunks were written (a power cut can still keep
        them from the disk: the sha256 of each chunk claimed finds that on the restart)."""
        replace_file(self.bitmap_path, claimed)

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
        """Keep what arrived for the next attempt (finish() already closed a complete file), unless
        it is the wrong file: the next attempt fetches it from scratch."""
        with self.lock:
            if self.fd is None:
                return
            try:
                self._settle()
                if self.failed is not None and not isinstance(self.failed, DiskFull):
                    self.target.unlink(missing_ok=True)
                    self.bitmap_path.unlink(missing_ok=True)
                elif self.count is not None:
                    self._save(self._bitmap())
            except OSError as e:  # a full disk: without its bitmap the file starts over next time
                log.warning("cannot save which chunks of %s are on disk: %s", self.path, e.strerror or e)
            finally:
                os.close(self.fd)
                self.fd = None


class MqttFetcher:
    """Fetches files of one bundle while `watching(digest)`: one subscription for all its files."""

    def __init__(self, link: ChunkLink, chunk_size: int, timeout_s: float) -> None:
        self.link, self.chunk_size, self.timeout_s = link, chunk_size, timeout_s
        self._current: OnChunk | None = None
        self._refused: OnRefused | None = None

    @contextmanager
    def watching(self, digest: str) -> Iterator[None]:
        if not self.link.watch_bundle(digest, self._dispatch, self._refuse):
            log.warning("the broker has not confirmed the subscription to %s's chunks yet", digest[:12])
        try:
            yield
        finally:
            self.link.unwatch_bundle(digest)

    def _dispatch(self, header: ChunkHeader, data: memoryview) -> None:
        if (handler := self._current) is not None:
            handler(header, data)

    def _refuse(self, path: str, reason: str) -> None:
        if (handler := self._refused) is not None:
            handler(path, reason)

    def fetch(self, digest: str, files: dict[str, Wanted], progress: Callable[[int], None] | None = None) -> None:
        """Fetch bundle-relative files into their targets, all asked for at once (one round trip,
        not one per file), each checked against its sha256 (TransferError when it differs)."""
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="slmops-checkpoint") as saver:
            self._fetch(digest, {path: _File(path, w, self.chunk_size, saver) for path, w in files.items()}, progress)

    def _fetch(self, digest: str, files: dict[str, _File], progress: Callable[[int], None] | None) -> None:
        changed = threading.Event()  # a file complete, failed, or with chunks to ask for again
        landed = [time.monotonic()]  # when a chunk this fetch needed last landed (no wakeup for each)

        def on_chunk(header: ChunkHeader, data: memoryview) -> None:  # paho's thread
            file = files.get(header.path)
            if file is None or header.chunk_size != self.chunk_size:
                return
            written, look = file.accept(header, data)
            if written:
                landed[0] = time.monotonic()
                if progress is not None:
                    progress(written)
            if look:
                changed.set()

        def on_refused(path: str, reason: str) -> None:  # paho's thread
            if (file := files.get(path)) is not None:
                file.refuse(reason)
                changed.set()

        def incomplete() -> dict[str, _File]:
            waiting = {}
            for path, file in files.items():
                file.check_chunks()  # here, not on paho's thread: it reads the whole file back
                complete, failed = file.status()
                if failed is not None:
                    raise failed
                if not complete:
                    waiting[path] = file
            return waiting

        def asking_again() -> bool:
            return any([file.take_ask_again() for file in files.values()])  # every flag taken

        self._current, self._refused = on_chunk, on_refused
        try:
            for _ in range(MAX_ROUNDS):
                if not (waiting := incomplete()):
                    break
                for path, file in waiting.items():
                    request = ChunkRequest(path=path, chunk_size=self.chunk_size, chunks=file.missing())
                    self.link.request_chunks(digest, request)
                landed[0] = time.monotonic()
                while True:
                    changed.clear()  # before looking: a change in between sets it again
                    if not incomplete() or asking_again():
                        break
                    if (quiet := time.monotonic() - landed[0]) >= self.timeout_s:
                        log.info("no chunks for %.0f s; asking again for what is missing", self.timeout_s)
                        break
                    changed.wait(self.timeout_s - quiet)
            if waiting := incomplete():
                raise TransferError(f"{', '.join(waiting)}: chunks still missing after {MAX_ROUNDS} requests")
            for file in files.values():
                file.finish()
        finally:
            self._current = self._refused = None
            for file in files.values():
                file.close()
