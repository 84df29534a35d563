"""The controller at fleet scale: Mosquitto, the controller and the fleet simulator on this machine.

For each fleet size, in one run:

    connect     N simulated devices (slmops.controller.simulator, one event loop, one process) join:
                seconds until the controller counts them all online
    telemetry   every device sends one batch (a system and an inference record) per second for
                --seconds; then sampling stops, and what is still queued on the devices drains.
                Zero loss: every sequence number every device made is a row in the database,
                counted there (rows, and devices whose count differs from their last seq).
                The controller's and Mosquitto's CPU (% of one core) and the controller's peak RSS
                during the window; the recorder's lag p99 (receipt → commit) from its /metrics
    rollout     a rollout of a new bundle to all N (one wave): seconds from the create request
                until every device was told (its desired state reached the simulated device),
                and until the rollout completed

--replicas 2 runs the same with two controller replicas on one PostgreSQL (shared subscriptions);
--sizes runs several fleet sizes (e.g. 5000,7500,10000) to find the largest that holds zero loss
and the 30 s notification. Prints a table; writes benchmarks/results/fleet.json.

    python benchmarks/fleet.py [--sizes 5000] [--seconds 60] [--replicas 1]

The bundles, the Mosquitto and the PostgreSQL server come from the test helpers (tests/support.py):
one way to make them, for the tests and here.
"""

import argparse
import contextlib
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent
sys.path[:0] = [str(ROOT), str(ROOT.parent / "tests")]
from common import wait_for, write_report  # noqa: E402
from support import Mosquitto, create_database, free_port, postgres_server, synthetic_bundle  # noqa: E402

from slmops.bundle import write_archive  # noqa: E402
from slmops.controller.protocol import RolloutRequest  # noqa: E402
from slmops.controller.simulator import FleetSimulator, Profile  # noqa: E402
from slmops.signing import generate_keypair  # noqa: E402

SLMOPS = [sys.executable, "-P", "-m", "slmops"]
NOTIFY_TARGET_S = 30.0
BROKER_SETTINGS = "max_queued_messages 200000\nmax_connections -1\n"
"""The controller's subscription may have a burst queued at the broker (Mosquitto's default keeps 1,000
per client and drops the rest; the agents would send them again, but late)."""

console = Console(width=None if sys.stdout.isatty() else 200)  # a log file: the wide table stays readable


class Controllers:
    """`replicas` controller processes on one database and one data folder (their store), on the broker."""

    def __init__(self, folder: Path, broker_port: int, database_url: str | None, replicas: int, key: Path) -> None:
        args = ["--broker-url", f"mqtt://127.0.0.1:{broker_port}", "-k", str(key)]
        if database_url:
            args += ["--database-url", database_url]
        self.folder, self.database_url = folder, database_url
        self.processes: list[subprocess.Popen[str]] = []
        self.urls: list[str] = []
        env = {**os.environ, "SLMOPS_CONTROLLER_DATA_DIR": str(folder)}
        for _ in range(replicas):
            port = free_port()
            log = (folder.parent / f"controller-{port}.log").open("w")
            self.processes.append(
                subprocess.Popen(
                    [*SLMOPS, "controller", "serve", "--port", str(port), *args],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
            self.urls.append(f"http://127.0.0.1:{port}")
            wait_for(lambda u=self.urls[-1]: _up(u), "a controller did not start", 60, poll_s=0.2)
        self.token = (folder / "admin.token").read_text().strip()
        self.api = httpx.Client(headers={"Authorization": f"Bearer {self.token}"}, timeout=120)

    def metric(self, series: str) -> list[float]:
        """The series' value on each replica (0 when a replica has none)."""
        values = []
        for url in self.urls:
            lines = self.api.get(f"{url}/metrics").text.splitlines()
            values.append(next((float(line.split()[-1]) for line in lines if line.startswith(series)), 0.0))
        return values

    def telemetry_rows(self) -> dict[str, tuple[int, int]]:
        """device id → (rows, highest seq), read from the database itself."""
        query = "SELECT device_id, COUNT(*), MAX(seq) FROM telemetry GROUP BY device_id"
        if self.database_url is None:
            with contextlib.closing(sqlite3.connect(self.folder / "controller.sqlite")) as db:
                return {d: (n, m) for d, n, m in db.execute(query)}
        import psycopg

        with psycopg.connect(self.database_url.replace("postgresql+psycopg", "postgresql")) as db:
            return {d: (n, m) for d, n, m in db.execute(query)}

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            process.wait(timeout=60)


def _up(url: str) -> bool:
    with contextlib.suppress(httpx.TransportError):
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    return False


class Usage:
    """CPU (% of one core) and RSS of some processes, sampled each second on a thread of its own."""

    def __init__(self, processes: dict[str, psutil.Process]) -> None:
        self.processes, self.rss = processes, dict.fromkeys(processes, 0)
        self.cpu: dict[str, list[float]] = {name: [] for name in processes}
        self._stop = threading.Event()
        for process in processes.values():
            process.cpu_percent(None)
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(1.0):
            for name, process in self.processes.items():
                with contextlib.suppress(psutil.Error):
                    self.cpu[name].append(process.cpu_percent(None))
                    self.rss[name] = max(self.rss[name], process.memory_info().rss)

    def stop(self) -> dict[str, dict[str, float]]:
        self._stop.set()
        self._thread.join()
        return {n: {"cpu_percent": statistics.mean(c) if c else 0.0, "rss_mib": self.rss[n] / 2**20}
                for n, c in self.cpu.items()}  # fmt: skip


@contextlib.contextmanager
def fleet_under_test(
    work: Path, size: int, replicas: int, database_url: str | None, profile: Profile | None = None
) -> Iterator[dict[str, Any]]:
    """Mosquitto, the controllers with tiny 1.0.0 and 2.0.0 pushed, and a simulator of `size` devices serving
    1.0.0 (not started)."""
    key = work / "keys" / "bench"
    generate_keypair(key)
    broker = Mosquitto(work, BROKER_SETTINGS)
    controllers = Controllers(work / "controller", broker.port, database_url, replicas, key.with_suffix(".pub"))
    sim = None
    try:
        for version in ("1.0.0", "2.0.0"):
            bundle = synthetic_bundle(work / version, key.with_suffix(".key"), version=version, variants=("cpu-int4",))
            archive = write_archive(bundle, work / f"{version}.tar").read_bytes()
            controllers.api.post(f"{controllers.urls[0]}/v1/bundles", content=archive).raise_for_status()
        sim = FleetSimulator(f"mqtt://127.0.0.1:{broker.port}", size, profile or Profile(download_s=2, activate_s=0.5),
                             serving="tiny:1.0.0", connect_per_s=1000)  # fmt: skip
        yield {"broker": broker, "controllers": controllers, "sim": sim}
    finally:
        if sim is not None:
            sim.stop()
        controllers.stop()
        broker.stop()


def measure(size: int, seconds: float, replicas: int, database_url: str | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="slmops-fleet-bench-") as folder, \
            fleet_under_test(Path(folder), size, replicas, database_url) as parts:  # fmt: skip
        broker, controllers, sim = parts["broker"], parts["controllers"], parts["sim"]
        result: dict[str, Any] = {"devices": size, "replicas": replicas,
                                  "database": "postgresql" if database_url else "sqlite"}  # fmt: skip
        started = time.monotonic()
        sim.start()
        online = 'slmops_controller_devices{online="true"}'
        wait_for(lambda: controllers.metric(online)[0] >= size, f"{size} devices did not join", 300, poll_s=0.5)
        result["connect_s"] = time.monotonic() - started
        console.print(f"{size} devices online after {result['connect_s']:.1f} s; telemetry for {seconds:g} s")

        processes = {f"controller-{i}": psutil.Process(p.pid) for i, p in enumerate(controllers.processes)}
        processes["mosquitto"] = psutil.Process(broker.process.pid)
        processes["simulator"] = psutil.Process()  # this process: the simulator's loop, and the polling
        before = sim.stats()
        usage = Usage(processes)
        time.sleep(seconds)
        window = sim.stats()
        result["usage"] = usage.stop()
        result["records_made"] = window.get("records", 0) - before.get("records", 0)
        result["batch_rate_share"] = result["records_made"] / 2 / seconds / size
        # batches sent per device-second against the one asked for: below 1 when the simulator lags
        result["records_acked_in_window"] = window.get("records_acked", 0) - before.get("records_acked", 0)
        result["backlog_at_end"] = window["queued_records"]
        result["resent_batches"] = window.get("telemetry_resent", 0)
        result["recorder_lag_p99_s"] = max(
            controllers.metric('slmops_controller_recorder_lag_seconds{quantile="0.99"}')
        )
        sim.sampling = False
        drained = time.monotonic()
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: sim.stats()["queued_records"] == 0, "the devices' queues did not drain", 180, poll_s=0.5)
        result["drain_s"] = time.monotonic() - drained
        made = sim.call(lambda: {d.id: d.seq for d in sim.devices.values()})
        stored = controllers.telemetry_rows()
        result["records_total"] = sum(made.values())
        result["rows_stored"] = sum(n for n, _ in stored.values())
        result["lost"] = sum(seq - stored.get(d, (0, 0))[0] for d, seq in made.items())
        result["devices_with_gaps"] = sum(stored.get(d, (0, 0))[0] != seq for d, seq in made.items())
        sim.sampling = True

        digest = controllers.api.get(f"{controllers.urls[0]}/v1/bundles/tiny/2.0.0").json()["digest"]
        request = RolloutRequest(bundle="tiny", version="2.0.0", target="provider=cpu", waves="100%",
                                 min_reported=5, soak_s=5, device_timeout_s=600)  # fmt: skip
        created_at = time.monotonic()
        created = controllers.api.post(f"{controllers.urls[0]}/v1/rollouts", json=request.model_dump())
        created.raise_for_status()
        rollout = created.json()["id"]
        told = lambda: sim.call(lambda: len(sim.desired_at.get(digest, {})))  # noqa: E731
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: told() >= size, "not every device was told", 300, poll_s=0.5)
        times = sorted(sim.call(lambda: list(sim.desired_at.get(digest, {}).values())))
        result["notified"] = len(times)
        result["notify_s"] = (times[-1] - created_at) if len(times) == size else None

        def status() -> dict[str, Any]:
            """The rollout, or {"status": "unanswered"} while the controller does not answer (busy, or gone:
            the benchmark says which)."""
            try:
                # counts only: the benchmark needs no page of 10,000 devices twice a second
                return controllers.api.get(f"{controllers.urls[0]}/v1/rollouts/{rollout}?limit=0").json()
            except httpx.HTTPError as e:
                return {"status": "unanswered", "states": {}, "error": str(e)}

        with contextlib.suppress(TimeoutError):
            wait_for(lambda: status()["status"] not in ("active", "unanswered"), "no end", 600, poll_s=0.5)
        final = status()
        result["controller_exit_codes"] = [p.poll() for p in controllers.processes]
        result["rollout_status"] = final["status"]
        result["rollout_s"] = time.monotonic() - created_at
        result["rollout_states"] = final["states"]
        result["holds"] = (
            result["lost"] == 0 and result["notify_s"] is not None and result["notify_s"] <= NOTIFY_TARGET_S
        )
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="5000", help="fleet sizes, comma-separated")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--replicas", type=int, default=1, help="2: two replicas on PostgreSQL as well")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    runs = []
    with contextlib.ExitStack() as stack:
        postgres = stack.enter_context(postgres_server()) if args.replicas > 1 else None
        for size in sizes:
            runs.append(measure(size, args.seconds, 1, None))
            console.print(runs[-1])
            if postgres:
                runs.append(measure(size, args.seconds, args.replicas, create_database(postgres)))
                console.print(runs[-1])
    table = Table(title=f"fleet: controller + Mosquitto + simulator on one machine, telemetry {args.seconds:g} s")
    for column in (
        "devices",
        "replicas",
        "db",
        "connect s",
        "batches/device/s",
        "records",
        "lost",
        "drain s",
        "lag p99 s",
        "controller CPU %",
        "controller RSS MiB",
        "mosquitto CPU %",
        "simulator CPU %",
        "notify s",
        "rollout s",
        "holds",
    ):
        table.add_column(column, justify="right")  # fmt: skip
    for r in runs:
        controllers = [v for k, v in r["usage"].items() if k.startswith("controller")]
        table.add_row(
            str(r["devices"]), str(r["replicas"]), r["database"], f"{r['connect_s']:.1f}",
            f"{r['batch_rate_share']:.2f}", str(r["records_total"]),
            str(r["lost"]), f"{r['drain_s']:.1f}", f"{r['recorder_lag_p99_s']:.2f}",
            " + ".join(f"{c['cpu_percent']:.0f}" for c in controllers),
            " + ".join(f"{c['rss_mib']:.0f}" for c in controllers), f"{r['usage']['mosquitto']['cpu_percent']:.0f}",
            f"{r['usage']['simulator']['cpu_percent']:.0f}",
            "-" if r["notify_s"] is None else f"{r['notify_s']:.1f}", f"{r['rollout_s']:.1f} {r['rollout_status']}",
            "yes" if r["holds"] else "no",
        )  # fmt: skip
    console.print(table)
    write_report("fleet", {"seconds": args.seconds, "runs": runs}, console)


if __name__ == "__main__":
    main()
