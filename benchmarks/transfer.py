"""Bundle transfer of SmolLM2-135M-Instruct cpu-int4 over a local Mosquitto, measured end to end.

In one run, on one machine:

    raw broker      one paho publisher → 1 and N subscribers (processes of their own), the same
                    bytes in the same chunk size, QoS 1, 32 in flight: the ceiling for any MQTT
                    transfer here, to compare each MQTT row with
    MQTT, 1 agent   end to end: desired state set → the agent reports `verifying` (every file
                    fetched and checked; the time the agent sent the report, read off the broker):
                    variant bytes / that time; and the
                    download alone: its first request for a variant file → `verifying` (the
                    desired state's way to the device, the manifest and signature excluded);
                    the agent's peak RSS while downloading
    MQTT, N agents  N agents at once: N × variant bytes / time until the last one is done, and how
                    many chunks the controller published (shared: about one set, not N)
    HTTP            the same files from the controller's store, streamed by slmops.client
    resume          an agent killed (-9) at 50 % of its download, restarted: seconds from the
                    restart (process start included) to `verifying`, and chunks published again

The raw and MQTT rows are measured `--repeat` times, interleaved (raw 1, raw N, MQTT 1, MQTT N, then
again), so that each ratio compares runs made under the same load; on a shared 2-core machine one
run's 10-agent ratio can be 0.35 and the next 0.65. The table shows the median and the range.

Prints a table; writes benchmarks/results/transfer.json (every run, and the medians).

    python benchmarks/transfer.py [--agents 10] [--chunk-kib 256] [--repeat 3]
"""

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, free_port, wait_for, write_report
from serving import WORK as SERVING_WORK
from serving import prepare_bundle

WORK = RESULTS / "transfer"
SLMOPS = [sys.executable, "-P", "-m", "slmops"]


RAW_SUBSCRIBER = """
import sys, threading
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
port, count, name = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
done, got = threading.Event(), [0]
def on_message(*_):
    got[0] += 1
    if got[0] == count:
        done.set()
client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name)
client.on_message = on_message
client.on_subscribe = lambda *_: print("ready", flush=True)
client.connect("127.0.0.1", port)
client.loop_start()
client.subscribe("bench/raw", qos=1)
done.wait(600)
print("done", flush=True)
"""


def raw_broker(port: int, total_bytes: int, chunk: int, subscribers: int) -> float:
    """Aggregate MB/s delivered by QoS 1 publishes of `chunk` bytes from one paho client to
    `subscribers` paho clients, each in its own process (as agents are), through the broker."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    count = -(-total_bytes // chunk)
    subs = [
        subprocess.Popen(
            [sys.executable, "-c", RAW_SUBSCRIBER, str(port), str(count), f"bench-sub-{i}"],
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(subscribers)
    ]
    try:
        for sub in subs:
            assert sub.stdout is not None and sub.stdout.readline().strip() == "ready"
        pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-pub")
        pub.connect("127.0.0.1", port)
        pub.loop_start()
        payload = os.urandom(chunk)
        started = time.perf_counter()
        in_flight = []
        for _ in range(count):
            in_flight.append(pub.publish("bench/raw", payload, qos=1))
            if len(in_flight) >= 32:
                in_flight.pop(0).wait_for_publish(30)
        for sub in subs:
            assert sub.stdout is not None and sub.stdout.readline().strip() == "done"
        elapsed = time.perf_counter() - started
        pub.disconnect()
        pub.loop_stop()
    finally:
        for sub in subs:
            sub.kill()
            sub.wait()
    return subscribers * count * chunk / elapsed / 1e6


def sent_at(message: dict) -> float:
    """When the agent sent a message (its `sent_at`; one clock, on one machine), not when it got here:
    with ten agents loading models right after they report `verifying`, a report can sit for seconds
    in a starved broker or in this process before it is read."""
    return datetime.fromisoformat(message["sent_at"]).timestamp()


class Reports:
    """The agents' reports and chunk requests, read off the broker as the controller gets them (no
    polling of its API): when each device first reported each status, its last download percent,
    and when it first asked for a variant file's chunks (each as the agent sent it)."""

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.first: dict[tuple[str, str], float] = {}
        self.percent: dict[str, float] = {}
        self.reasons: dict[str, str] = {}
        self.changed = threading.Condition()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-reports")
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe([("slmops/v1/devices/+/reported", 1), ("slmops/v1/bundles/+/request/+", 1)])
        subscribed.wait(10)
        self.asked: dict[str, float] = {}

    def _on_message(self, _c: object, _u: object, message) -> None:
        if "/request/" in message.topic:
            request = json.loads(message.payload)
            if request["path"].startswith("variants/"):
                self.asked.setdefault(message.topic.split("/")[5], sent_at(request))
            return
        device, report = message.topic.split("/")[3], json.loads(message.payload)
        with self.changed:
            self.first.setdefault((device, report["status"]), sent_at(report))
            if report["status"] == "downloading":
                self.percent[device] = report.get("percent") or 0.0
            if report["status"] == "failed":
                self.reasons[device] = report.get("reason", "")
            self.changed.notify_all()

    def wait(self, condition, what: str, timeout_s: float = 900):
        deadline = time.monotonic() + timeout_s
        with self.changed:
            while not (result := condition()):
                if failed := dict(self.reasons):
                    raise RuntimeError(f"{what}: {failed}")
                if not self.changed.wait(max(0.0, deadline - time.monotonic())):
                    raise TimeoutError(what)
            return result

    def fetched(self, device: str) -> float | None:
        """When the device had every file fetched and checked (it reports verifying next)."""
        return self.first.get((device, "verifying"))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def target_size(target: Path) -> int:
    """The manifest's size of a file being fetched into a partial slot (slots/<digest>.partial/variants/<id>/<file>)."""
    from slmops.manifest import Manifest

    slot, variant = target.parents[2], target.parent.name
    files = Manifest.load(slot / "manifest.json").variant(variant).files
    return next(f.size for f in files if f.path == target.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", type=int, default=10)
    parser.add_argument("--chunk-kib", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    from slmops.agent import hardware
    from slmops.agent.fleet.transfer import saved_chunks
    from slmops.bundle import Bundle, write_archive
    from slmops.client import ControllerClient
    from slmops.errors import ControllerError

    console = Console()
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    SERVING_WORK.mkdir(parents=True, exist_ok=True)
    bundle_dir, public_key = prepare_bundle(console)
    manifest = Bundle.open(bundle_dir).manifest
    variant = manifest.variant("cpu-int4")
    variant_bytes = variant.size_bytes
    chunk = args.chunk_kib << 10

    broker_port, controller_port = free_port(), free_port()
    conf = WORK / "mosquitto.conf"
    conf.write_text(
        f"listener {broker_port} 127.0.0.1\nallow_anonymous true\npersistence false\nset_tcp_nodelay true\n"
    )
    processes: list[subprocess.Popen] = [
        subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ]
    url = f"http://127.0.0.1:{controller_port}"
    env = {**os.environ, "SLMOPS_CONTROLLER_DATA_DIR": str(WORK / "controller")}
    report: dict = {"machine": hardware.describe(), "variant_bytes": variant_bytes, "chunk_bytes": chunk}
    controller_log = (WORK / "controller.log").open("wb")
    try:
        time.sleep(0.5)
        processes.append(
            subprocess.Popen(
                [
                    *SLMOPS,
                    "controller",
                    "serve",
                    "--port",
                    str(controller_port),
                    "-k",
                    str(public_key),
                    "--broker-url",
                    f"mqtt://127.0.0.1:{broker_port}",
                ],
                env=env,
                stdout=controller_log,
                stderr=controller_log,
            )
        )

        anonymous = ControllerClient(url)

        def connected() -> bool:
            try:
                return anonymous.health().mqtt == "connected"
            except ControllerError:
                return False

        wait_for(connected, "the controller did not start", 60)
        controller = ControllerClient(url, (WORK / "controller" / "admin.token").read_text().strip(), timeout_s=60)
        controller.push(write_archive(Bundle.open(bundle_dir), WORK / "bundle.tar"))
        digest = manifest.digest

        with console.status("HTTP download of the variant's files"):
            started = time.perf_counter()
            for entry in variant.files:  # streamed, as an agent's HTTP source reads them
                with controller.http.stream("GET", f"/v1/store/{digest}/variants/cpu-int4/{entry.path}") as r:
                    for _ in r.iter_bytes(1 << 20):
                        pass
            report["http_mb_s"] = variant_bytes / (time.perf_counter() - started) / 1e6

        reports = Reports(broker_port)
        set_size = sum(max(1, -(-f.size // chunk)) for f in variant.files) + 2  # + manifest and signature

        def start_agent(device: str) -> subprocess.Popen:
            agent_env = {
                **os.environ,
                "SLMOPS_AGENT_DEVICE_ID": device,
                "SLMOPS_AGENT_BROKER_URL": f"mqtt://127.0.0.1:{broker_port}",
                "SLMOPS_AGENT_TRUSTED_KEYS": f'["{public_key}"]',
                "SLMOPS_AGENT_PORT": str(free_port()),
                "SLMOPS_AGENT_DATA_DIR": str(WORK / device),
                "SLMOPS_AGENT_CHUNK_SIZE_BYTES": str(chunk),
                "SLMOPS_AGENT_SMOKE_MIN_SPEED_FRACTION": "0",
            }
            with (WORK / f"{device}.log").open("ab") as log:
                proc = subprocess.Popen([*SLMOPS, "agent", "run"], env=agent_env, stdout=log, stderr=log)
            processes.append(proc)
            return proc

        def joined(device: str) -> None:
            def online() -> bool:
                try:
                    return controller.device(device).online
                except ControllerError as e:
                    if e.status != 404:  # not there until its birth message
                        raise
                    return False

            wait_for(online, f"{device} did not join", 120)

        def desire(devices: list[str]) -> None:
            """One call for all of them (`slmops fleet desire`), as an operator rolls a bundle out."""
            controller.desire_many(manifest.name, manifest.version, devices)

        def stop(proc: subprocess.Popen) -> None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)

        def run_agents(count: int, run: int) -> dict:
            sent_before = anonymous.health().chunks_sent
            agents = {f"bench-{run}-{count}-{i}": start_agent(f"bench-{run}-{count}-{i}") for i in range(count)}
            for device in agents:
                joined(device)
            rss: list[tuple[float, str, int]] = []  # when, whose, how much
            started = time.time()
            desire(list(agents))
            while not all(reports.fetched(d) for d in agents):
                if reports.reasons:
                    raise RuntimeError(f"failed: {reports.reasons}")
                for device, proc in agents.items():
                    if not reports.fetched(device):
                        rss.append((time.time(), device, psutil.Process(proc.pid).memory_info().rss))
                if time.time() - started > 900:
                    raise TimeoutError("the transfer did not finish in 15 minutes")
                time.sleep(0.02)
            finished = max(reports.fetched(d) or 0.0 for d in agents)
            peak_rss = max(b for at, d, b in rss if at < (reports.fetched(d) or 0.0))
            elapsed, downloading = finished - started, finished - min(reports.asked[d] for d in agents)
            for proc in agents.values():
                stop(proc)
            return {
                "agents": count,
                "seconds": elapsed,
                "aggregate_mb_s": count * variant_bytes / elapsed / 1e6,
                "per_agent_mb_s": variant_bytes / elapsed / 1e6,
                "download_seconds": downloading,
                "download_aggregate_mb_s": count * variant_bytes / downloading / 1e6,
                "chunks_published": anonymous.health().chunks_sent - sent_before,
                "chunks_per_agent_set": set_size,
                "agent_peak_rss_bytes_while_downloading": peak_rss,
            }

        def resume_after_kill(at_percent: float) -> dict:
            device = "bench-resume"
            proc = start_agent(device)
            joined(device)
            desire([device])
            reports.wait(lambda: reports.percent.get(device, 0) >= at_percent, "the download did not get under way")
            proc.kill()  # SIGKILL: no goodbye, no last checkpoint
            proc.wait()
            killed_at = reports.percent[device]
            claimed = sum(
                sum(sha256 is not None for sha256 in saved_chunks(target, chunk, target_size(target)) or [])
                for target in (
                    b.with_name(b.name.removesuffix(".chunks"))
                    for b in (WORK / device / "slots").glob("*.partial/**/*.chunks")
                )
            )
            sent_before = anonymous.health().chunks_sent
            restarted = time.time()
            proc = start_agent(device)
            fetched = reports.wait(lambda: reports.fetched(device), "the restarted agent did not finish")
            stop(proc)
            return {
                "killed_at_percent": killed_at,
                "chunks_claimed_on_disk": claimed,
                "seconds_from_restart_to_fetched": fetched - restarted,
                "chunks_published_after_restart": anonymous.health().chunks_sent - sent_before,
                "chunks_per_agent_set": set_size,
            }

        counts = sorted({1, args.agents})
        report["runs"] = []
        for run in range(args.repeat):
            measured: dict = {"raw_broker_mb_s": {}, "mqtt": []}
            for count in counts:
                with console.status(f"run {run + 1}/{args.repeat}: raw broker to {count} subscriber(s)"):
                    measured["raw_broker_mb_s"][str(count)] = raw_broker(broker_port, variant_bytes, chunk, count)
            for count in counts:
                with console.status(f"run {run + 1}/{args.repeat}: MQTT transfer to {count} agent(s) at once"):
                    m = run_agents(count, run)
                raw = measured["raw_broker_mb_s"][str(count)]
                m["vs_raw"], m["download_vs_raw"] = m["aggregate_mb_s"] / raw, m["download_aggregate_mb_s"] / raw
                measured["mqtt"].append(m)
            report["runs"].append(measured)
        report["median"] = {
            "raw_broker_mb_s": {
                str(n): statistics.median(r["raw_broker_mb_s"][str(n)] for r in report["runs"]) for n in counts
            },
            "mqtt": [
                {
                    key: statistics.median(r["mqtt"][i][key] for r in report["runs"])
                    for key in report["runs"][0]["mqtt"][i]
                }
                for i in range(len(counts))
            ],
        }
        with console.status("kill -9 mid-download, restart, resume"):
            report["resume"] = resume_after_kill(50.0)
        reports.close()
    finally:
        for proc in reversed(processes):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()

    def spread(values: list[float], digits: int = 2) -> str:
        """median, and the range over the runs"""
        low, mid, high = min(values), statistics.median(values), max(values)
        return f"{mid:.{digits}f}" if len(values) == 1 else f"{mid:.{digits}f} ({low:.{digits}f}–{high:.{digits}f})"

    runs = report["runs"]
    table = Table(
        title=f"transfer of cpu-int4 ({variant_bytes / 1e6:.1f} MB), {args.chunk_kib} KiB chunks, "
        f"{report['machine']}: median (range) of {len(runs)} run(s)"
    )
    for column in ("path", "MB/s", "vs raw broker", "seconds", "chunks published", "agent peak RSS MiB"):
        table.add_column(column, justify="left" if column == "path" else "right")
    for n in report["median"]["raw_broker_mb_s"]:
        raw_mb_s = [r["raw_broker_mb_s"][n] for r in runs]
        table.add_row(f"raw broker, paho → {n} paho subscriber(s), QoS 1", spread(raw_mb_s, 0), "1", "", "", "")
    for i, m in enumerate(report["median"]["mqtt"]):
        each = [r["mqtt"][i] for r in runs]
        table.add_row(
            f"MQTT to {m['agents']:.0f} agent(s), aggregate: desired set → verified",
            spread([e["aggregate_mb_s"] for e in each], 0),
            spread([e["vs_raw"] for e in each]),
            spread([e["seconds"] for e in each]),
            f"{m['chunks_published']:.0f} (one set: {m['chunks_per_agent_set']:.0f})",
            f"{m['agent_peak_rss_bytes_while_downloading'] / 2**20:.0f}",
        )
        table.add_row(
            "  of which the download: first variant request → verified",
            spread([e["download_aggregate_mb_s"] for e in each], 0),
            spread([e["download_vs_raw"] for e in each]),
            spread([e["download_seconds"] for e in each]),
            "",
            "",
        )
    table.add_row(
        "HTTP from the controller's store",
        f"{report['http_mb_s']:.0f}",
        f"{report['http_mb_s'] / report['median']['raw_broker_mb_s']['1']:.2f}",
        "",
        "",
        "",
    )
    r = report["resume"]
    table.add_row(
        f"resume after kill -9 at {r['killed_at_percent']:.0f} % ({r['chunks_claimed_on_disk']} chunks on disk)",
        "",
        "",
        f"{r['seconds_from_restart_to_fetched']:.2f}",
        f"{r['chunks_published_after_restart']} (one set: {r['chunks_per_agent_set']})",
        "",
    )
    console.print(table)
    write_report("transfer", report, console)


if __name__ == "__main__":
    main()
