"""The scheduler that turns admitted requests into tokens.

    submit(Job) ─► waiting (bounded: QueueFull past max_queued) ─► active (≤ max_active)
                                                                   │ one scheduler thread steps every
                                                                   │ active generation one token in turn
    job.events ◄── ("text", piece) … ("done", finish_reason) | ("error", message)

Fairness comes from interleaving: eight clients all see tokens flowing, none waits
for another to finish. A job's text is handed over at most every `stream_interval_s` (the
first piece at once, the rest held and joined): each hand-off wakes the event loop and, when
streamed, costs an SSE chunk the client parses. On a 2-CPU device that work preempts the
model's own threads; per token it cost about a tenth of the decode speed (benchmarks/serving.py).
A cancelled job (client gone) is dropped at its next turn, freeing its KV cache. Each job is
pinned to the model that was current when it was submitted, so `swap()` sends new jobs to a
new model while old ones finish on theirs.
"""

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace

from slmops.manifest import Manifest

from .runtime import Generation, GenerationStats, LoadedVariant, Sampling, TextStream

log = logging.getLogger(__name__)


class QueueFull(Exception):
    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"the request queue is full; retry in about {retry_after_s} s")
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class ServedModel:
    """A loaded variant and what it is, as /health, /v1/models and telemetry report it; with `adapter`,
    the same variant as a request names it with one of its LoRA adapters (`bundle:adapter`)."""

    variant: LoadedVariant
    model_id: str
    bundle: str
    version: str
    variant_id: str
    provider: str
    manifest: Manifest
    loaded_at: float = field(default_factory=time.time)
    adapter: str | None = None

    def with_adapter(self, adapter: str) -> "ServedModel":
        return replace(self, model_id=f"{self.bundle}:{adapter}", adapter=adapter)

    def choices(self) -> list["ServedModel"]:
        """The model itself, then itself with each of its adapters: what /v1/models lists."""
        return [self, *(self.with_adapter(name) for name in self.variant.adapters)]


@dataclass
class Job:
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: Sampling
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[tuple[str, str]] = field(default_factory=asyncio.Queue)
    """(kind, value): ("text", piece) … then ("done", finish_reason) or ("error", message)."""
    cancelled: threading.Event = field(default_factory=threading.Event)
    model: ServedModel | None = None
    adapter: str | None = None
    """The LoRA adapter the request named, if any (the variant's start() refuses one it lacks)."""
    stats: GenerationStats = field(default_factory=GenerationStats)
    submitted_at: float = field(default_factory=time.perf_counter)

    def emit(self, kind: str, value: str) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


@dataclass
class _Active:
    job: Job
    generation: Generation
    decoder: TextStream
    held: str = ""
    """Text decoded and not handed over yet (within the stream interval)."""
    handed_at: float = 0.0


class Engine:
    def __init__(self, max_active: int, max_queued: int, stream_interval_s: float = 0.0) -> None:
        self.max_active = max_active
        self.max_queued = max_queued
        self.stream_interval_s = stream_interval_s
        self.current: ServedModel | None = None
        self._waiting: deque[Job] = deque()
        self._active: list[_Active] = []
        self._in_flight = 0
        """Submitted and not finished: waiting + active, counted under the lock (the bound)."""
        self._wake = threading.Condition()
        self._running = True
        self._recent_request_s: deque[float] = deque(maxlen=20)
        self._thread = threading.Thread(target=self._run, name="slmops-engine", daemon=True)

    def start(self) -> None:
        """Start the scheduler thread (nothing runs before: a constructed engine is inert)."""
        self._thread.start()

    # --- public ---------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def active_count(self) -> int:
        return len(self._active)

    def swap(self, model: ServedModel) -> ServedModel | None:
        """New jobs go to `model` from now on; admitted ones finish on the model they started with."""
        with self._wake:
            previous, self.current = self.current, model
        return previous

    def submit(self, job: Job) -> ServedModel:
        with self._wake:
            if not self._thread.is_alive():
                raise RuntimeError("the engine is not running (start() it first)")
            if self.current is None:
                raise RuntimeError("no model is loaded yet")
            if self._in_flight >= self.max_active + self.max_queued:
                raise QueueFull(self._retry_after_s())
            job.model = self.current
            self._in_flight += 1
            self._waiting.append(job)
            self._wake.notify()
            return job.model

    def close(self) -> None:
        with self._wake:
            self._running = False
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    # --- scheduler thread -------------------------------------------------------------------

    def _retry_after_s(self) -> int:
        typical = sorted(self._recent_request_s)[len(self._recent_request_s) // 2] if self._recent_request_s else 1.0
        return max(1, round(typical * (len(self._waiting) + 1) / self.max_active))

    def _run(self) -> None:
        while True:
            with self._wake:
                while self._running and not self._waiting and not self._active:
                    self._wake.wait()
                if not self._running:
                    break
                admitted: list[Job] = []
                while self._waiting and len(self._active) + len(admitted) < self.max_active:
                    admitted.append(self._waiting.popleft())
            for job in admitted:
                self._admit(job)
            for entry in list(self._active):
                self._step(entry)
        for entry in self._active:
            entry.job.emit("error", "the server is shutting down")

    def _admit(self, job: Job) -> None:
        if job.cancelled.is_set():
            self._release()
            return
        assert job.model is not None
        try:
            generation = job.model.variant.start(job.prompt_ids, job.max_new_tokens, job.sampling, job.adapter)
        except Exception as e:  # a request the model cannot take must not stop the scheduler
            log.exception("could not start a generation")
            job.emit("error", str(e))
            self._release()
            return
        job.stats = generation.stats
        self._active.append(_Active(job, generation, job.model.variant.text_stream()))

    def _step(self, entry: _Active) -> None:
        job = entry.job
        if job.cancelled.is_set():
            job.stats.finish_reason = "cancelled"
            self._finish(entry)
            return
        try:
            token = entry.generation.step()
        except Exception as e:
            log.exception("generation failed")
            job.emit("error", str(e))
            self._finish(entry, emit_done=False)
            return
        if token is None:
            if tail := entry.held + entry.decoder.flush():
                job.emit("text", tail)
            self._finish(entry)
            return
        entry.held += entry.decoder.decode(token)  # nothing while a multi-byte character is incomplete
        now = time.perf_counter()
        if entry.held and now - entry.handed_at >= self.stream_interval_s:
            job.emit("text", entry.held)
            entry.held, entry.handed_at = "", now

    def _release(self) -> None:
        with self._wake:
            self._in_flight -= 1

    def _finish(self, entry: _Active, emit_done: bool = True) -> None:
        self._active.remove(entry)
        entry.generation.release()
        self._release()
        self._recent_request_s.append(time.perf_counter() - entry.job.submitted_at)
        if emit_done:
            entry.job.emit("done", entry.job.stats.finish_reason)
