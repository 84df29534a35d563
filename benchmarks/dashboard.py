"""The dashboard at fleet scale: the fleet page and a rollout page in headless Chromium, against a controller
with N simulated devices (Mosquitto, the controller and the simulator on this machine).

For each fleet size (default 100 and 5,000: pages paginate, so neither should grow with the fleet):

    paint        time to first contentful paint (the Paint Timing API), fresh navigation, signed in
    interactive  DOMContentLoaded done: the deferred scripts (htmx, uPlot, app.js) have run
    refresh      the controller's CPU (user + system) per request of what an open page polls: the fleet
                 table partial (every 5 s) and the rollout's live partial (every 2 s), and per full page,
                 less what it spends in as long again without requests (the devices' own telemetry);
                 the partial's size in bytes

A rollout to every device, in waves with a long soak, is under way while the rollout page is measured.
--rounds rounds, the pages interleaved; median and range. Prints a table; writes
benchmarks/results/dashboard.json.

    python benchmarks/dashboard.py [--sizes 100,5000] [--rounds 5] [--requests 20]
"""

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
from rich.table import Table

ROOT = Path(__file__).resolve().parent
sys.path[:0] = [str(ROOT), str(ROOT.parent / "tests")]
from common import wait_for, write_report  # noqa: E402
from fleet import console, fleet_under_test  # noqa: E402

from slmops.controller.protocol import RolloutRequest  # noqa: E402
from slmops.controller.simulator import Profile  # noqa: E402

TIMING = """
const done = arguments[arguments.length - 1];
const nav = performance.getEntriesByType('navigation')[0];
new PerformanceObserver((list, observer) => {
  const paint = list.getEntriesByName('first-contentful-paint')[0];
  if (paint) { observer.disconnect();
    done({paint_ms: paint.startTime, interactive_ms: nav.domContentLoadedEventEnd, html_bytes: nav.transferSize}); }
}).observe({type: 'paint', buffered: true});
"""
"""Waits for the page's first contentful paint (headless Chromium reports it a moment after load)."""


def browser() -> Any:
    os.environ.setdefault("SE_OFFLINE", "true")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or ""
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,800",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=shutil.which("chromedriver")), options=options)
    driver.set_script_timeout(30)
    return driver


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "low": min(values), "high": max(values)}


def cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def measure(size: int, rounds: int, requests: int) -> dict[str, Any]:
    profile = Profile(download_s=1, activate_s=0.5, telemetry_interval_s=10)
    with tempfile.TemporaryDirectory(prefix="slmops-dashboard-bench-") as folder, \
            fleet_under_test(Path(folder), size, 1, None, profile) as parts:  # fmt: skip
        controllers, sim = parts["controllers"], parts["sim"]
        url = controllers.urls[0]
        sim.start()
        online = 'slmops_controller_devices{online="true"}'
        wait_for(lambda: controllers.metric(online)[0] >= size, f"{size} devices did not join", 300, poll_s=0.5)
        request = RolloutRequest(bundle="tiny", version="2.0.0", target="provider=cpu", waves="1%,10%,100%",
                                 min_reported=1, soak_s=3600, device_timeout_s=3600)  # fmt: skip
        created = controllers.api.post(f"{url}/v1/rollouts", json=request.model_dump())
        created.raise_for_status()
        rollout = created.json()["id"]
        pages = {"fleet": "/ui/fleet", "rollout": f"/ui/rollouts/{rollout}"}
        partials = {"fleet": "/ui/fleet/live", "rollout": f"/ui/rollouts/{rollout}/live"}
        console.print(f"{size} devices online; rollout {rollout} under way; {rounds} rounds")

        driver = browser()
        try:
            driver.get(f"{url}/ui/signin")
            driver.find_element("id", "token").send_keys(controllers.token)
            driver.find_element("css selector", "form[action='/ui/signin'] button").click()
            wait_for(lambda: "/ui/signin" not in driver.current_url, "could not sign in", 30)
            timings: dict[str, list[dict[str, float]]] = {name: [] for name in pages}
            for _ in range(rounds):
                for name, path in pages.items():
                    driver.get(f"{url}{path}")
                    timings[name].append(driver.execute_async_script(TIMING))
            cookie = driver.get_cookie("slmops_session")["value"]
        finally:
            driver.quit()

        controller = psutil.Process(controllers.processes[0].pid)
        refresh: dict[str, dict[str, Any]] = {}
        with httpx.Client(base_url=url, cookies={"slmops_session": cookie}, timeout=60) as web:
            for name in pages:
                per: dict[str, list[float]] = {"partial": [], "page": []}
                size_bytes = 0
                for _ in range(rounds):
                    for kind, path in (("partial", partials[name]), ("page", pages[name])):
                        before, started = cpu_s(controller), time.monotonic()
                        for _ in range(requests):
                            answer = web.get(path)
                            answer.raise_for_status()
                        busy, took = cpu_s(controller) - before, time.monotonic() - started
                        before = cpu_s(controller)
                        time.sleep(took)  # as long again without requests: what the fleet's own traffic costs
                        idle = cpu_s(controller) - before
                        per[kind].append(max(0.0, busy - idle) / requests * 1000)
                        size_bytes = len(answer.content) if kind == "partial" else size_bytes
                refresh[name] = {"cpu_ms_per_partial": spread(per["partial"]), "cpu_ms_per_page": spread(per["page"]),
                                 "partial_bytes": size_bytes}  # fmt: skip
        return {
            "devices": size,
            "pages": {
                name: {
                    "paint_ms": spread([t["paint_ms"] for t in timings[name]]),
                    "interactive_ms": spread([t["interactive_ms"] for t in timings[name]]),
                    **refresh[name],
                }
                for name in pages
            },
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,5000", help="fleet sizes, comma-separated")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=20, help="requests per CPU sample")
    args = parser.parse_args()
    started = time.monotonic()
    runs = [measure(int(size), args.rounds, args.requests) for size in args.sizes.split(",")]
    table = Table(title=f"dashboard: headless Chromium, {args.rounds} rounds, median (range)")
    for column in ("devices", "page", "first paint ms", "interactive ms", "CPU ms / refresh", "CPU ms / page",
                   "refresh KiB"):  # fmt: skip
        table.add_column(column, justify="right")
    for run in runs:
        for name, page in run["pages"].items():
            table.add_row(
                str(run["devices"]), name, _spread(page["paint_ms"]), _spread(page["interactive_ms"]),
                _spread(page["cpu_ms_per_partial"]), _spread(page["cpu_ms_per_page"]),
                f"{page['partial_bytes'] / 1024:.1f}",
            )  # fmt: skip
    console.print(table)
    write_report("dashboard", {"rounds": args.rounds, "requests": args.requests, "runs": runs,
                               "seconds": time.monotonic() - started}, console)  # fmt: skip


def _spread(figure: dict[str, float]) -> str:
    return f"{figure['median']:.1f} ({figure['low']:.1f}–{figure['high']:.1f})"


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
