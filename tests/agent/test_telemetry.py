"""The telemetry queue: durable, ordered, bounded, and honest about what it dropped."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from slmops.agent.telemetry import TelemetryCollector, TelemetryQueue
from slmops.cli import app

WRITER = """
import sys
from pathlib import Path
from slmops.agent.telemetry import TelemetryQueue
queue = TelemetryQueue(Path(sys.argv[1]))
i = 0
while True:
    seq = queue.append("inference", {"i": i})
    print(seq, i, flush=True)  # printed only after the commit returned
    i += 1
"""


def test_records_survive_kill_9_of_the_writer(tmp_path: Path) -> None:
    db = tmp_path / "telemetry.sqlite"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(db)], stdout=subprocess.PIPE, text=True)
    assert writer.stdout is not None
    committed = [tuple(map(int, writer.stdout.readline().split())) for _ in range(300)]
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait(timeout=10)
    writer.stdout.close()

    check = sqlite3.connect(db)
    assert check.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    check.close()
    queue = TelemetryQueue(db)
    stored = {r.seq: r.payload["i"] for r in queue.pending(limit=100_000)}
    assert all(stored.get(seq) == i for seq, i in committed), "a record acknowledged by a commit was lost"
    seqs = sorted(stored)
    assert seqs == list(range(seqs[0], seqs[-1] + 1)), "sequence numbers have no gaps"
    assert queue.append("system", {}) > seqs[-1], "sequence numbers are never reused after a restart"
    queue.close()


def test_pending_and_ack_in_sequence_order(tmp_path: Path) -> None:
    queue = TelemetryQueue(tmp_path / "t.sqlite")
    seqs = [queue.append("system", {"n": n}) for n in range(5)]
    assert seqs == sorted(seqs)
    assert [r.payload["n"] for r in queue.pending(limit=3)] == [0, 1, 2]
    assert queue.ack(seqs[2]) == 3
    assert [r.payload["n"] for r in queue.pending()] == [3, 4]
    assert queue.pending(after_seq=seqs[3])[0].seq == seqs[4]
    queue.close()


def test_when_full_the_oldest_lowest_priority_records_go_first_and_are_reported(tmp_path: Path) -> None:
    queue = TelemetryQueue(tmp_path / "t.sqlite", max_rows=100)
    for n in range(50):
        queue.append("system", {"n": n})
    for n in range(50):
        queue.append("inference", {"n": n})
    queue.append("inference", {"n": 50})  # one over: the oldest system sample goes
    kept = queue.pending(limit=1000)
    assert len(kept) == 100
    assert [r.payload["n"] for r in kept if r.kind == "system"] == list(range(1, 50))
    assert [r.payload["n"] for r in kept if r.kind == "inference"] == list(range(51))
    assert "dropped_before" not in kept[-1].payload
    seq = queue.append("system", {"n": "next"})  # tells the receiver one record was dropped before it
    assert queue.pending(after_seq=seq - 1)[0].payload == {"n": "next", "dropped_before": 1}
    assert [r.payload["n"] for r in queue.pending(limit=1000) if r.kind == "system"][:2] == [2, 3]
    summary = queue.summary()
    assert summary["dropped_total"] == 2 and summary["records"] == 100
    assert summary["by_kind"] == {"system": 49, "inference": 51}
    queue.close()


def test_records_past_the_retention_window_are_dropped(tmp_path: Path) -> None:
    queue = TelemetryQueue(tmp_path / "t.sqlite", retention_s=3600)
    queue.append("system", {"old": True}, created=1_000_000.0)
    queue.append("system", {"old": False}, created=1_000_000.0 + 7200)
    assert [r.payload["old"] for r in queue.pending()] == [False]
    assert queue.summary()["dropped_total"] == 1
    queue.close()


def test_collector_records_system_and_inference_figures(start_agent, session_bundle: Path, tmp_path: Path) -> None:
    agent = start_agent(session_bundle, data_dir=tmp_path / "agent")
    client = agent.openai()
    for _ in range(3):
        client.chat.completions.create(model="", messages=[{"role": "user", "content": "Hi"}], max_tokens=5)
    collector = TelemetryCollector(agent.server, agent.server.config)
    collector.collect()
    collector.collect()  # a second window with nothing in it
    records = collector.queue.pending()
    collector.stop()
    system = [r.payload for r in records if r.kind == "system"]
    inference = [r.payload for r in records if r.kind == "inference"]
    assert len(system) == 2 and system[0]["memory_available_bytes"] > 0 and system[0]["process_rss_bytes"] > 0
    first, second = inference
    assert first["requests"] == 3 and first["generated_tokens"] >= 3 and first["errors"] == 0
    assert first["ttft_ms_p50"] > 0 and first["ttft_ms_p95"] >= first["ttft_ms_p50"]
    assert (first["bundle"], first["variant"], first["provider"]) == ("tiny", "cpu-int4", "cpu")
    assert second["requests"] == 0 and second["ttft_ms_p50"] is None

    result = CliRunner().invoke(
        app, ["agent", "telemetry", "--json"], env={"SLMOPS_AGENT_DATA_DIR": str(tmp_path / "agent")}
    )
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert shown["summary"]["records"] == 4 and [r["kind"] for r in shown["records"]].count("inference") == 2
