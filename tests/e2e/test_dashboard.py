"""The dashboard in a real browser: Debian's Chromium, headless, driven by Selenium through Debian's
chromium-driver (nothing downloaded), against a controller process, a Mosquitto of the test's own and
simulated devices. axe-core (vendored under tests/controller/vendor) checks each page; screenshots of
each page at desktop and phone widths go to test-artifacts/dashboard/."""

import json
import os
import shutil
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
from simulated_fleet import QUICK, THREE_CLASSES, SimulatedFleet, simulated_fleet
from support import wait_for

from slmops.controller.protocol import RolloutRequest
from slmops.controller.simulator import Profile

ADMIN, READER = "admin-token-0123456789", "reader-token-0123456789"
TOKENS = [{"name": "alice", "token": ADMIN, "role": "admin"}, {"name": "bob", "token": READER, "role": "reader"}]
AXE = Path(__file__).resolve().parent.parent / "controller" / "vendor" / "axe.min.js"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "dashboard"
SIZES = {"desktop": (1280, 800), "phone": (390, 844)}

pytestmark = pytest.mark.skipif(
    not (shutil.which("chromium") and shutil.which("chromedriver")),
    reason="Debian's chromium and chromium-driver (make install puts them there)",
)


@pytest.fixture(scope="module")
def browser() -> Iterator:
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager would look for a driver online
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or ""
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=shutil.which("chromedriver")), options=options)
    driver.set_script_timeout(30)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def dashboard(broker, signing_key, tmp_path: Path, browser) -> Iterator[SimulatedFleet]:
    """A controller with an admin and a reader token; the browser starts signed out."""
    folder = tmp_path / "fleet"
    (folder / "controller").mkdir(parents=True)
    (folder / "controller" / "admin.token").write_text(ADMIN)  # what the test's API client signs in with
    with simulated_fleet(broker.port, signing_key, folder, tokens=json.dumps(TOKENS)) as fleet:
        browser.delete_all_cookies()
        yield fleet


def sign_in(browser, url: str, token: str, page: str = "/ui/fleet") -> None:
    from selenium.webdriver.common.by import By

    browser.get(f"{url}{page}")
    browser.find_element(By.ID, "token").send_keys(token)
    browser.find_element(By.CSS_SELECTOR, "form[action='/ui/signin'] button").click()
    wait_for(lambda: "/ui/signin" not in browser.current_url, f"signing in did not leave the sign-in page: {page}")


def texts(browser, selector: str) -> list[str]:
    """The text of each element `selector` finds, read in one script: htmx may swap them between two calls."""
    return list(browser.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0]), e => e.innerText)", selector))  # fmt: skip


def text_of(browser, selector: str) -> str:
    return " ".join(texts(browser, selector))


def serious_violations(browser) -> list[str]:
    browser.execute_script(AXE.read_text())
    found = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "axe.run(document).then(r => done(r.violations"
        "  .filter(v => ['serious', 'critical'].includes(v.impact))"
        "  .map(v => v.id + ': ' + v.nodes.map(n => n.target.join(' ')).slice(0, 3).join(', '))),"
        "  e => done(['axe: ' + e]));"
    )
    return list(found)


def fits(browser, width: int) -> bool:
    """The page is no wider than `width`: nothing to scroll sideways."""
    return browser.execute_script("return document.documentElement.scrollWidth") <= width


def check_page(browser, url: str, name: str) -> None:
    """No serious or critical axe-core violation at either width; a screenshot at each."""
    browser.get(url)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for size, (width, height) in SIZES.items():
        metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": size == "phone"}
        browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
        assert serious_violations(browser) == [], f"{name} at {size}"
        if size == "phone":  # readable without scrolling sideways: wide tables scroll inside themselves
            # the charts refit to the new width 150 ms after a resize (app.js)
            wait_for(partial(fits, browser, width), f"{name} stayed wider than a phone's {width} px", 5)
        browser.save_screenshot(str(ARTIFACTS / f"{name}-{size}.png"))
    browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def test_sign_in_refuses_a_wrong_token_and_a_reader_sees_the_fleet_filtered(dashboard, browser) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    dashboard.simulate(12, Profile(classes=THREE_CLASSES, **QUICK))
    url = dashboard.process.url
    browser.get(f"{url}/ui/fleet")
    assert "/ui/signin" in browser.current_url  # signed out: sent to sign in
    browser.find_element(By.ID, "token").send_keys("not-a-token-of-this-controller")
    browser.find_element(By.CSS_SELECTOR, "form[action='/ui/signin'] button").click()
    wait_for(lambda: "not one of this controller" in text_of(browser, ".error"), "no error for a wrong token")
    assert browser.get_cookie("slmops_session") is None

    sign_in(browser, url, READER)
    assert "12 of 12 online" in text_of(browser, ".counts")
    assert len(rows := texts(browser, "table.devices tbody tr")) == 12, rows
    jetson = next(o.get_attribute("value") for o in browser.find_elements(By.CSS_SELECTOR, "#class option")
                  if "Cortex-A78AE" in o.get_attribute("value"))  # fmt: skip
    Select(browser.find_element(By.ID, "class")).select_by_value(jetson)  # htmx swaps the table in place
    rows = lambda: texts(browser, "table.devices tbody tr")  # noqa: E731
    wait_for(lambda: 0 < len(rows()) < 12, "the class filter did not narrow the table", 10)
    narrowed = rows()
    assert all("Cortex-A78AE" in row for row in narrowed)
    time.sleep(6)  # the table refreshes every 5 s: with the filter still applied
    assert len(rows()) == len(narrowed) and all("Cortex-A78AE" in row for row in rows())
    assert "tiny 1.0.0" in text_of(browser, "main")  # what the fleet serves
    check_page(browser, f"{url}/ui/fleet", "fleet")


def test_a_rollout_shows_its_waves_live_and_a_reader_gets_no_actions(dashboard, browser) -> None:
    from selenium.webdriver.common.by import By

    dashboard.simulate(10, Profile(classes=THREE_CLASSES, **QUICK))
    url = dashboard.process.url
    sign_in(browser, url, ADMIN, "/ui/rollouts")
    browser.execute_script("window.notReloaded = true")
    request = RolloutRequest(bundle="tiny", version="2.0.0", target="provider=cpu", waves="2,50%,100%",
                             min_reported=2, soak_s=1.5)  # fmt: skip
    created = dashboard.controller.api.create_rollout(request)
    wait_for(lambda: f"/ui/rollouts/{created.id}" in browser.page_source, "the new rollout did not appear", 15)
    browser.get(f"{url}/ui/rollouts/{created.id}")
    browser.execute_script("window.notReloaded = true")
    seen_waves: set[str] = set()

    def completed() -> bool:
        seen_waves.add(text_of(browser, ".timeline .current"))
        return text_of(browser, "[data-testid=rollout-status]") == "completed"

    wait_for(completed, "the page did not show the rollout complete", 60, poll_s=0.2)
    assert browser.execute_script("return window.notReloaded") is True  # htmx swapped it in place
    assert len(seen_waves - {""}) >= 2, seen_waves  # the current wave moved on while we watched
    assert text_of(browser, "dd[data-state=passed]") == "10"
    forms = browser.find_elements(By.CSS_SELECTOR, ".actions form")
    assert [f.get_attribute("action").rsplit("/", 1)[1] for f in forms] == ["rollback"]  # what a completed one takes
    check_page(browser, f"{url}/ui/rollouts/{created.id}", "rollout")

    browser.delete_all_cookies()
    sign_in(browser, url, READER, f"/ui/rollouts/{created.id}")
    assert browser.find_elements(By.CSS_SELECTOR, ".actions form") == []
    # a form posted without the session's CSRF token (what another page could forge) is refused
    status = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        f"fetch('/ui/rollouts/{created.id}/abort', {{method: 'POST', credentials: 'same-origin',"
        "  headers: {'content-type': 'application/x-www-form-urlencoded'}, body: 'csrf=forged'})"
        ".then(r => done(r.status));"
    )
    assert status == 403


def test_a_halted_rollout_shows_the_failed_gate_and_devices_and_admins_act(dashboard, browser) -> None:
    from selenium.webdriver.common.by import By

    profile = Profile(classes=THREE_CLASSES, bundles={"tiny:2.0.0": {"speed": 0.5}}, **QUICK)
    sim = dashboard.simulate(8, profile)
    wait_for(lambda: sim.stats()["records_acked"] >= 8 * 4, "no inference figures before the switch", 20)
    request = RolloutRequest(bundle="tiny", version="2.0.0", target="provider=cpu", waves="3,100%", max_failure="0%",
                             min_reported=2, soak_s=2, gates=["tokens_per_s>=0.8x"])  # fmt: skip
    halted = dashboard.rollout(request, lambda r: r.status == "halted", "the slower bundle did not halt")
    url = dashboard.process.url
    sign_in(browser, url, ADMIN, f"/ui/rollouts/{halted.id}")
    assert text_of(browser, "[data-testid=rollout-status]") == "halted"
    reasons = text_of(browser, "td.reason")
    assert "gate tokens_per_s>=0.8x" in reasons and " against " in reasons
    gate_chart = (  # read in one script: htmx swaps the chart in every 2 s (drawn a moment later)
        "const f = document.querySelector('figure.gates'); const u = f && f.querySelector('.uplot');"
        "return u ? [f.querySelector('figcaption').innerText, u.dataset.points] : null"
    )
    drawn = wait_for(lambda: browser.execute_script(gate_chart), "no gate chart", 10)
    assert "tokens_per_s>=0.8x" in drawn[0] and drawn[1] == "3", drawn  # the gate, and the 3 canaries judged
    check_page(browser, f"{url}/ui/rollouts/{halted.id}", "rollout-halted")

    device = next(d.device_id for d in halted.devices if d.state == "rolled_back")

    def back_on_its_previous_slot() -> bool:  # told to roll back at the halt; its state says so a moment later
        browser.get(f"{url}/ui/devices/{device}")
        return text_of(browser, "[data-testid=previous-slot]").startswith("tiny 2.0.0")  # the slot it left

    wait_for(back_on_its_previous_slot, "the device page does not show the slot it rolled back from", 15, poll_s=0.5)
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "figure.chart .uplot[data-points]"), "no chart drawn", 10)
    points = [int(e.get_attribute("data-points")) for e in browser.find_elements(By.CSS_SELECTOR, ".uplot")]
    assert max(points) >= 4, points  # the device's telemetry, drawn
    assert "rollout" not in text_of(browser, ".notice")
    check_page(browser, f"{url}/ui/devices/{device}", "device")

    browser.get(f"{url}/ui/rollouts/{halted.id}")
    forms = browser.find_elements(By.CSS_SELECTOR, ".actions form")
    assert [f.get_attribute("action").rsplit("/", 1)[1] for f in forms] == ["rollback"]
    browser.execute_script("window.confirm = () => true")  # the operator says yes to the confirmation
    forms[0].find_element(By.TAG_NAME, "button").click()
    wait_for(lambda: "rolled back by alice" in text_of(browser, "main"), "the rollback is not on the page", 10)
    entry = next(e for e in dashboard.controller.api.audit(100) if e.actor == "alice")
    assert (entry.action, entry.target) == ("rollout.halt", f"rollout/{halted.id}")  # the API's own audit row

    check_page(browser, f"{url}/ui/bundles", "bundles")
    titles = {e.text for e in browser.find_elements(By.CSS_SELECTOR, "section.bundle h2")}
    assert titles == {"tiny 1.0.0", "tiny 2.0.0", "tiny 3.0.0"}
    check_page(browser, f"{url}/ui/builds", "builds")
    assert "No build jobs yet" in text_of(browser, ".empty")
