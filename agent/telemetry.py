"""Telemetry that is never lost: an on-disk queue, and the collector that fills it.

    collector (every telemetry_interval_s) ─► system sample (psutil)      priority 0
                                            ─► inference window (metrics)  priority 1
        ─► TelemetryQueue (SQLite, WAL, synchronous=FULL: a committed record survives kill -9)
        ─► read in sequence order by the uplink (MQTT), deleted only on `ack`

Bounds: records older than the retention window go first; past `max_rows`, the
oldest records of the lowest priority go next (system samples before inference
summaries). A full disk applies the same order: the oldest tenth of the lowest priority
goes to make room, and a record that still does not fit is dropped. Every drop is
counted, and the count travels in the next record so the receiving side knows what it
did not get. The collector thread outlives any one failed sample.
"""

import json
import logging
import sqlite3
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from slmops.supervision import Supervised

if TYPE_CHECKING:
    from .config import AgentConfig
    from .host import ModelHost

SCHEMA = """
CREATE TABLE IF NOT EXISTS record (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    created REAL NOT NULL,
    kind TEXT NOT NULL,
    priority INTEGER NOT NULL,
    payload TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS record_priority ON record (priority, seq);
CREATE TABLE IF NOT EXISTS counter (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""
PRIORITY = {"system": 0, "inference": 1, "event": 2}
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Record:
    seq: int
    created: float
    kind: str
    payload: dict[str, Any]


class TelemetryQueue:
    def __init__(self, path: Path, max_rows: int = 100_000, retention_s: float = 7 * 24 * 3600) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.max_rows = max_rows
        self.retention_s = retention_s
        self._lock = threading.Lock()
        self._lost = 0  # records a full disk dropped that no counter row holds yet
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def append(self, kind: str, payload: dict[str, Any], created: float | None = None) -> int | None:
        """Store one record durably and return its sequence number; None when the disk is full even
        after making room (the record is dropped and counted)."""
        created = time.time() if created is None else created
        try:
            return self._append(kind, payload, created)
        except sqlite3.OperationalError as e:
            if not _disk_full(e):
                raise
        try:
            with self._transaction() as db:
                made_room = db.execute(
                    "DELETE FROM record WHERE seq IN (SELECT seq FROM record ORDER BY priority, seq LIMIT "
                    "(SELECT COUNT(*) / 10 + 1 FROM record))"
                ).rowcount
            self._lost += made_room
            log.warning("the disk is full: dropped the %d oldest telemetry records of the lowest priority", made_room)
            return self._append(kind, payload, created)
        except sqlite3.OperationalError as e:
            if not _disk_full(e):
                raise
            self._lost += 1
            log.warning("the disk is full: dropped a %s telemetry record (%d dropped so far)", kind, self._lost)
            return None

    def _append(self, kind: str, payload: dict[str, Any], created: float) -> int:
        with self._transaction() as db:
            if self._lost:  # what a full disk dropped, counted once a record fits again
                self._add_dropped(db, self._lost)
            dropped = self._counter(db, "dropped_unreported")
            if dropped:
                payload = {**payload, "dropped_before": dropped}
                db.execute("UPDATE counter SET value = 0 WHERE name = 'dropped_unreported'")
            cursor = db.execute(
                "INSERT INTO record (created, kind, priority, payload) VALUES (?, ?, ?, ?)",
                (created, kind, PRIORITY.get(kind, 0), json.dumps(payload)),
            )
            self._enforce_bounds(db, now=created)
            assert cursor.lastrowid is not None
        self._lost = 0
        return cursor.lastrowid

    def _enforce_bounds(self, db: sqlite3.Connection, now: float) -> None:
        expired = db.execute("DELETE FROM record WHERE created < ?", (now - self.retention_s,)).rowcount
        excess = db.execute("SELECT COUNT(*) FROM record").fetchone()[0] - self.max_rows
        if excess > 0:
            db.execute(
                "DELETE FROM record WHERE seq IN (SELECT seq FROM record ORDER BY priority, seq LIMIT ?)", (excess,)
            )
        if dropped := expired + max(excess, 0):
            self._add_dropped(db, dropped)

    @staticmethod
    def _add_dropped(db: sqlite3.Connection, dropped: int) -> None:
        for name in ("dropped_total", "dropped_unreported"):
            db.execute(
                "INSERT INTO counter (name, value) VALUES (?, ?) "
                "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
                (name, dropped),
            )

    @staticmethod
    def _counter(db: sqlite3.Connection, name: str) -> int:
        row = db.execute("SELECT value FROM counter WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else 0

    def pending(self, limit: int = 500, after_seq: int = 0) -> list[Record]:
        """The oldest records not yet acknowledged, in sequence order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, created, kind, payload FROM record WHERE seq > ? ORDER BY seq LIMIT ?",
                (after_seq, limit),
            ).fetchall()
        return [Record(seq, created, kind, json.loads(payload)) for seq, created, kind, payload in rows]

    def ack(self, up_to_seq: int) -> int:
        """The receiver stored everything up to this sequence number: delete it here."""
        with self._transaction() as db:
            return db.execute("DELETE FROM record WHERE seq <= ?", (up_to_seq,)).rowcount

    def summary(self) -> dict[str, Any]:
        with self._lock:
            count, first, last, oldest = self._db.execute(
                "SELECT COUNT(*), MIN(seq), MAX(seq), MIN(created) FROM record"
            ).fetchone()
            by_kind = dict(self._db.execute("SELECT kind, COUNT(*) FROM record GROUP BY kind").fetchall())
            dropped = self._counter(self._db, "dropped_total")
        size = sum(p.stat().st_size for p in self.path.parent.glob(self.path.name + "*") if p.is_file())
        return {
            "records": count,
            "first_seq": first,
            "last_seq": last,
            "oldest": oldest,
            "by_kind": by_kind,
            "dropped_total": dropped,
            "size_bytes": size,
            "max_rows": self.max_rows,
            "retention_s": self.retention_s,
        }

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _disk_full(error: sqlite3.OperationalError) -> bool:
    return "disk is full" in str(error) or "disk I/O error" in str(error)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def system_sample(data_dir: Path) -> dict[str, Any]:
    memory = psutil.virtual_memory()
    sample: dict[str, Any] = {
        "cpu_percent": psutil.cpu_percent(interval=None),
        "load_avg_1m": psutil.getloadavg()[0],
        "memory_used_bytes": memory.total - memory.available,
        "memory_available_bytes": memory.available,
        "process_rss_bytes": psutil.Process().memory_info().rss,
        "disk_free_bytes": psutil.disk_usage(str(data_dir if data_dir.exists() else Path.home())).free,
    }
    temperatures: dict[str, list[Any]] = getattr(psutil, "sensors_temperatures", dict)()
    readings = [t.current for entries in temperatures.values() for t in entries if t.current]
    if readings:
        sample["temperature_max_c"] = max(readings)
    return sample


class TelemetryCollector:
    """Samples the system and the server's inference window into the queue at a fixed interval."""

    def __init__(self, server: "ModelHost", config: "AgentConfig") -> None:
        self.server = server
        self.config = config
        self.queue = TelemetryQueue(config.telemetry_db, config.telemetry_max_rows, config.telemetry_retention_s)
        self._stop = threading.Event()
        self.thread = Supervised("slmops-telemetry", self._run)

    def start(self) -> None:
        psutil.cpu_percent(interval=None)  # prime: the first reading is relative to this one
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(timeout=10)
        self.queue.close()

    def _run(self) -> None:
        while not self._stop.wait(self.config.telemetry_interval_s):
            try:
                self.collect()
            except Exception:  # a sample that fails is logged; the next one is taken as usual
                log.exception("could not take a telemetry sample")

    def collect(self) -> None:
        self.queue.append("system", system_sample(self.config.data_dir))
        window = self.server.metrics.drain()
        model = self.server.engine.current
        self.queue.append(
            "inference",
            {
                "requests": window.requests,
                "errors": window.errors,
                "prompt_tokens": window.prompt_tokens,
                "generated_tokens": window.generated_tokens,
                "ttft_ms_p50": _ms(percentile(window.ttft_s, 50)),
                "ttft_ms_p95": _ms(percentile(window.ttft_s, 95)),
                "tokens_per_s_p50": percentile(window.tokens_per_s, 50),
                "tokens_per_s_p95": percentile(window.tokens_per_s, 95),
                "queue_depth": self.server.engine.queue_depth,
                "active_requests": self.server.engine.active_count,
                "bundle": model.bundle if model else None,
                "version": model.version if model else None,
                "variant": model.variant_id if model else None,
                "provider": model.provider if model else None,
            },
        )


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000
