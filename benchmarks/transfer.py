"""Bundle transfer of SmolLM2-135M-Instruct cpu-int4 over a local Mosquitto, measured end to end.

In one run, on one machine:

    raw broker      one paho publisher → one subscriber, the same bytes in the same chunk size,
                    QoS 1, 32 in flight: the ceiling for any MQTT transfer here
    MQTT, 1 agent   desired state set → the agent reports `verifying` (every file fetched and
                    checked): variant bytes / that time; the agent's peak RSS while downloading
    MQTT, N agents  N agents at once: N × variant bytes / time until the last one is done, and how
                    many chunks the controller published (shared: about one set, not N)
    HTTP            the same files from the controller's store with httpx

Prints a table; writes benchmarks/results/transfer.json.

    python -P benchmarks/transfer.py [--agents 10] [--chunk-kib 256]
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inference import RESULTS
from serving import WORK as SERVING_WORK
from serving import prepare_bundle

WORK = RESULTS / "transfer"
SLMOPS = [sys.executable, "-P", "-m", "slmops"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, what: str, timeout_s: float = 600):
    deadline = time.monotonic() + timeout_s
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)
    return result


def raw_broker(port: int, total_bytes: int, chunk: int) -> float:
    """MB/s of QoS 1 publishes of `chunk` bytes from one client to another through the broker."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    count = -(-total_bytes // chunk)
    received = threading.Event()
    got = [0]

    def on_message(*_: object) -> None:
        got[0] += 1
        if got[0] == count:
            received.set()

    sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-sub")
    sub.on_message = on_message
    subscribed = threading.Event()
    sub.on_subscribe = lambda *_: subscribed.set()
    sub.connect("127.0.0.1", port)
    sub.loop_start()
    sub.subscribe("bench/raw", qos=1)
    subscribed.wait(10)
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
    received.wait(600)
    elapsed = time.perf_counter() - started
    for client in (pub, sub):
        client.disconnect()
        client.loop_stop()
    return count * chunk / elapsed / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", type=int, default=10)
    parser.add_argument("--chunk-kib", type=int, default=256)
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    from slmops.agent import hardware
    from slmops.bundle import Bundle, write_archive

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

        def health() -> dict:
            try:
                return httpx.get(f"{url}/health", timeout=2).json()
            except httpx.TransportError:
                return {}

        wait_for(lambda: health().get("mqtt") == "connected", "the controller did not start", 60)
        token = (WORK / "controller" / "admin.token").read_text().strip()
        headers = {"Authorization": f"Bearer {token}"}
        archive = write_archive(Bundle.open(bundle_dir), WORK / "bundle.tar")
        with archive.open("rb") as f:
            httpx.post(f"{url}/v1/bundles", content=f.read(), headers=headers, timeout=300).raise_for_status()
        digest = manifest.digest

        with console.status("raw broker throughput"):
            report["raw_broker_mb_s"] = raw_broker(broker_port, variant_bytes, chunk)

        with console.status("HTTP download of the variant's files"):
            started = time.perf_counter()
            with httpx.Client(headers=headers, timeout=60) as http:
                for entry in variant.files:
                    with http.stream("GET", f"{url}/v1/store/{digest}/variants/cpu-int4/{entry.path}") as r:
                        for _ in r.iter_bytes(1 << 20):
                            pass
            report["http_mb_s"] = variant_bytes / (time.perf_counter() - started) / 1e6

        def run_agents(count: int) -> dict:
            sent_before = health().get("chunks_sent", 0)
            agents = []
            for i in range(count):
                device = f"bench-{count}-{i}"
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
                with (WORK / f"{device}.log").open("wb") as log:
                    proc = subprocess.Popen([*SLMOPS, "agent", "run"], env=agent_env, stdout=log, stderr=log)
                processes.append(proc)
                agents.append((device, proc))

            def device_state(device: str) -> dict:
                response = httpx.get(f"{url}/v1/devices/{device}", headers=headers, timeout=5)
                return response.json() if response.status_code == 200 else {}

            for device, _ in agents:
                wait_for(lambda d=device: device_state(d).get("online"), f"{device} did not join", 120)
            peak_rss = 0
            started = time.perf_counter()
            for device, _ in agents:
                body = {"bundle": manifest.name, "version": manifest.version}
                httpx.put(
                    f"{url}/v1/devices/{device}/desired", json=body, headers=headers, timeout=10
                ).raise_for_status()
            fetched: dict[str, float] = {}
            while len(fetched) < count:
                for device, proc in agents:
                    if device in fetched:
                        continue
                    reported = device_state(device).get("reported") or {}
                    if reported.get("status") in ("verifying", "activating", "healthy"):
                        fetched[device] = time.perf_counter() - started
                    elif reported.get("status") == "failed":
                        raise RuntimeError(f"{device}: {reported['reason']}")
                    elif reported.get("status") == "downloading":
                        peak_rss = max(peak_rss, psutil.Process(proc.pid).memory_info().rss)
                if time.perf_counter() - started > 900:
                    raise TimeoutError("the transfer did not finish in 15 minutes")
                time.sleep(0.05)
            elapsed = max(fetched.values())
            for _, proc in agents:
                proc.send_signal(signal.SIGTERM)
            for _, proc in agents:
                proc.wait(timeout=60)
            return {
                "agents": count,
                "seconds": elapsed,
                "aggregate_mb_s": count * variant_bytes / elapsed / 1e6,
                "per_agent_mb_s": variant_bytes / elapsed / 1e6,
                "chunks_published": health().get("chunks_sent", 0) - sent_before,
                "chunks_per_agent_set": sum(max(1, -(-f.size // chunk)) for f in variant.files) + 2,
                "agent_peak_rss_bytes_while_downloading": peak_rss,
            }

        report["mqtt"] = []
        for count in (1, args.agents):
            with console.status(f"MQTT transfer to {count} agent(s) at once"):
                report["mqtt"].append(run_agents(count))
    finally:
        for proc in reversed(processes):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()

    table = Table(
        title=f"transfer of cpu-int4 ({variant_bytes / 1e6:.1f} MB), {args.chunk_kib} KiB chunks, {report['machine']}"
    )
    for column in ("path", "MB/s", "vs raw broker", "seconds", "chunks published", "agent peak RSS MiB"):
        table.add_column(column, justify="left" if column == "path" else "right")
    raw = report["raw_broker_mb_s"]
    table.add_row("raw broker (paho → paho, QoS 1)", f"{raw:.1f}", "1.00", "", "", "")
    for m in report["mqtt"]:
        table.add_row(
            f"MQTT to {m['agents']} agent(s), aggregate",
            f"{m['aggregate_mb_s']:.1f}",
            f"{m['aggregate_mb_s'] / raw:.2f}",
            f"{m['seconds']:.1f}",
            f"{m['chunks_published']} (one set: {m['chunks_per_agent_set']})",
            f"{m['agent_peak_rss_bytes_while_downloading'] / 2**20:.0f}",
        )
    table.add_row(
        "HTTP from the controller's store", f"{report['http_mb_s']:.1f}", f"{report['http_mb_s'] / raw:.2f}", "", "", ""
    )
    console.print(table)
    out = RESULTS / "transfer.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
