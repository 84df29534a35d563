"""Rollouts at fleet scale: a controller process, a Mosquitto of the test's own and 50 simulated agents
(slmops.controller.simulator) speaking the real protocol, on SQLite and on PostgreSQL."""

import signal
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from controller_under_test import Controller, ControllerProcess
from simulated_fleet import QUICK, THREE_CLASSES, SimulatedFleet, simulated_fleet
from support import synthetic_bundle, wait_for

from slmops.controller.protocol import RolloutRequest
from slmops.controller.simulator import DeviceClass, FleetSimulator, Profile


@pytest.fixture
def sim_fleet(broker, signing_key, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[SimulatedFleet]:
    """simulated_fleet on SQLite, or on PostgreSQL where the test's parameter says so."""
    database = None
    if getattr(request, "param", "sqlite") == "postgresql":
        database = request.getfixturevalue("postgres_database")
    with simulated_fleet(broker.port, signing_key, tmp_path, database) as fleet:
        yield fleet


def waves_started(controller: Controller, rollout_id: int) -> list[int]:
    return [e.detail["wave"] for e in controller.api.audit(10_000) if e.action == "rollout.wave"
            and e.target == f"rollout/{rollout_id}"]  # fmt: skip


@pytest.mark.parametrize("sim_fleet", ["sqlite", "postgresql"], indirect=True)
def test_three_waves_over_fifty_devices_complete_and_the_first_covers_every_hardware_class(sim_fleet) -> None:
    sim = sim_fleet.simulate(50, Profile(classes=THREE_CLASSES, **QUICK))
    request = RolloutRequest(bundle="tiny", version="2.0.0", target="provider=cpu", waves="3,30%,100%",
                             min_reported=2, soak_s=1)  # fmt: skip
    done = sim_fleet.rollout(request, lambda r: r.status == "completed", "the rollout did not complete")

    classes = {d.hardware_class for d in done.devices}
    assert len(classes) == 3
    assert {d.hardware_class for d in done.devices if d.wave == 1} == classes
    assert Counter(d.wave for d in done.devices) == {1: 3, 2: 12, 3: 35}
    assert {d.state for d in done.devices} == {"passed"}
    assert sim.stats()["serving"] == {"tiny:2.0.0": 50}
    assert sorted(waves_started(sim_fleet.controller, done.id)) == [1, 2, 3]


@pytest.mark.parametrize("sim_fleet", ["sqlite", "postgresql"], indirect=True)
def test_a_fifth_failing_activation_halts_in_the_first_wave_past_the_bound_and_rolls_back(sim_fleet) -> None:
    profile = Profile(classes=THREE_CLASSES, bundles={"tiny:2.0.0": {"fail_activation": 0.2}}, **QUICK)
    sim = sim_fleet.simulate(50, profile)
    failing = {d for d in sim.devices if sim.fails(d, "tiny", "2.0.0")}
    assert 4 <= len(failing) <= 16, "the seed deals about a fifth of the devices a failing smoke test"
    request = RolloutRequest(bundle="tiny", version="2.0.0", target="provider=cpu", waves="5,20%,100%",
                             max_failure="5%", min_reported=2, soak_s=1)  # fmt: skip
    halted = sim_fleet.rollout(request, lambda r: r.status == "halted", "the rollout did not halt")

    # 5 % of at most 10 devices is under one: the first failure in waves 1 and 2 trips it; wave 3 ends at
    # about a fifth failed, past 5 %, so it trips there at the latest.
    first_failing_wave = min(d.wave for d in halted.devices if d.device_id in failing)
    assert halted.wave == min(first_failing_wave, 3), halted.reason
    assert "past max_failure 5%" in halted.reason
    started = [d for d in halted.devices if d.wave <= halted.wave]
    assert {d.state for d in started} == {"rolled_back"}
    assert {d.state for d in halted.devices if d.wave > halted.wave} <= {"pending"}
    wait_for(lambda: sim.stats()["serving"] == {"tiny:1.0.0": 50}, "the switched devices did not return to 1.0.0")
    for device in started:
        assert sim_fleet.controller.device(device.device_id)["desired"]["version"] == "1.0.0"


def test_a_tokens_per_s_gate_judges_each_device_against_its_own_figures(sim_fleet) -> None:
    """2.0.0 runs at half the speed each device had: halted on the gate. 3.0.0 on the slow class runs at that
    class's usual speed, far below the fast class's: it passes (a device is compared with itself)."""
    classes = [DeviceClass(name="fast", tokens_per_s=80), DeviceClass(name="slow", cpu_model="Cortex-A53",
                                                                     memory="2GiB", tokens_per_s=12)]  # fmt: skip
    profile = Profile(classes=classes, bundles={"tiny:2.0.0": {"speed": 0.5}}, **QUICK)
    sim = sim_fleet.simulate(20, profile)
    wait_for(lambda: sim.stats()["records_acked"] >= 20 * 4, "no inference figures before the switch", 20)

    gate = ["tokens_per_s>=0.8x"]
    slower = RolloutRequest(bundle="tiny", version="2.0.0", target="provider=cpu", waves="4,100%", max_failure="0%",
                            min_reported=2, soak_s=2, gates=gate)  # fmt: skip
    halted = sim_fleet.rollout(slower, lambda r: r.status == "halted", "the slower bundle did not halt")
    failed = [d for d in halted.devices if d.figures and d.figures["gates"]["tokens_per_s>=0.8x"]["held"] is False]
    assert failed, [d.figures for d in halted.devices]
    verdict = failed[0].figures["gates"]["tokens_per_s>=0.8x"]
    assert verdict["value"] < verdict["limit"] and verdict["limit"] == pytest.approx(
        0.8 * failed[0].figures["before"]["tokens_per_s"]
    )
    wait_for(lambda: sim.stats()["serving"] == {"tiny:1.0.0": 20}, "the devices did not return to 1.0.0")

    slow_class = next(d.hardware_class for d in halted.devices if "Cortex-A53" in d.hardware_class)
    slow = [d.device_id for d in halted.devices if d.hardware_class == slow_class]
    for device_id in slow:
        sim_fleet.controller.api.label(device_id, groups=["slow"])
    usual = RolloutRequest(bundle="tiny", version="3.0.0", target="group=slow", waves="2,100%", max_failure="0%",
                           min_reported=2, soak_s=2, gates=gate)  # fmt: skip
    passed = sim_fleet.rollout(usual, lambda r: r.status in ("completed", "halted", "paused"), "3.0.0 did not finish")
    assert passed.status == "completed", passed.reason
    figures = [d.figures["during"]["tokens_per_s"] for d in passed.devices]
    assert max(figures) < 0.8 * 80, "the slow class runs far below the fast class's figure, and passes"


def test_devices_in_fetch_mode_download_every_chunk_of_their_variant_from_the_controller(sim_fleet, tmp_path) -> None:
    """--fetch: half the devices download 2.0.0 for real (manifest, then every file of the variant, each
    chunk checked against its header) before they activate; the rest only pretend to."""
    import json

    sim = sim_fleet.simulate(8, Profile(**QUICK), fetch_share=0.5)
    fetchers = sim.call(lambda: [d.id for d in sim.devices.values() if d.fetches])
    assert 0 < len(fetchers) < 8
    request = RolloutRequest(bundle="tiny", version="2.0.0", target="provider=cpu", waves="100%", min_reported=2,
                             soak_s=1)  # fmt: skip
    done = sim_fleet.rollout(request, lambda r: r.status != "active", "the rollout did not end")
    assert done.status == "completed", done.reason
    stats = sim.stats()
    assert stats["fetched"] == len(fetchers) and stats["serving"] == {"tiny:2.0.0": 8}
    folder = tmp_path / "2.0.0"
    manifest = json.loads((folder / "manifest.json").read_text())
    variant = manifest["variants"][0]
    one = sum(f["size"] for f in variant["files"]) + (folder / "manifest.json").stat().st_size
    assert stats["chunk_bytes"] == len(fetchers) * one, "each fetching device got its variant, every byte once"


def test_too_few_reports_pause_the_rollout_as_inconclusive(sim_fleet) -> None:
    sim_fleet.simulate(6, Profile(requests_per_window=0, **QUICK))  # serving, but nobody asks: no figures
    request = RolloutRequest(bundle="tiny", version="2.0.0", target="provider=cpu", waves="3,100%", min_reported=2,
                             soak_s=1, gates=["ttft_ms_p95<=800"])  # fmt: skip
    paused = sim_fleet.rollout(request, lambda r: r.status != "active", "the rollout did not stop")
    assert paused.status == "paused" and paused.wave == 1
    assert paused.reason.startswith("inconclusive: wave 1 has 0 healthy device(s) with figures for every gate")
    assert {d.state for d in paused.devices if d.wave == 2} == {"pending"}


def test_offline_devices_catch_up_when_they_return_and_time_out_when_they_do_not(sim_fleet) -> None:
    sim = sim_fleet.simulate(10, Profile(**QUICK))
    away = ["sim-00001", "sim-00002", "sim-00003", "sim-00004"]
    sim.set_online(away, False, crash=True)
    controller = sim_fleet.controller
    wait_for(lambda: not any(controller.device(d)["online"] for d in away), "the broker did not publish the wills")
    request = RolloutRequest(bundle="tiny", version="2.0.0", target="provider=cpu", waves="100%", max_failure="50%",
                             min_reported=2, soak_s=1, device_timeout_s=12)  # fmt: skip
    created = controller.api.create_rollout(request)
    wait_for(lambda: {d.device_id for d in controller.api.rollout(created.id).devices if d.state == "unreached"}
             == set(away), "the offline devices are not unreached", 15)  # fmt: skip
    sim.set_online(away[:2], True)
    done = wait_for(lambda: (r := controller.api.rollout(created.id)).status != "active" and r, "no end", 60)
    states = {d.device_id: d.state for d in done.devices}
    assert done.status == "completed", done.reason
    assert [states[d] for d in away] == ["passed", "passed", "timed_out", "timed_out"]
    assert Counter(states.values()) == {"passed": 8, "timed_out": 2}


def test_a_controller_killed_mid_wave_resumes_and_no_wave_is_started_twice(sim_fleet) -> None:
    sim = sim_fleet.simulate(30, Profile(download_s=3, activate_s=0.5))
    controller, process = sim_fleet.controller, sim_fleet.process
    request = RolloutRequest(bundle="tiny", version="2.0.0", target="provider=cpu", waves="3,50%,100%",
                             min_reported=2, soak_s=1)  # fmt: skip
    created = controller.api.create_rollout(request)
    wait_for(lambda: controller.api.rollout(created.id).wave == 2, "wave 2 did not start", 60)
    process.stop(signal.SIGKILL)
    process.start()
    controller.api.close()
    sim_fleet.controller = controller = Controller(process.url, process.env["SLMOPS_TOKEN"])
    done = wait_for(lambda: (r := controller.api.rollout(created.id)).status == "completed" and r, "no resume", 90)
    assert {d.state for d in done.devices} == {"passed"}
    assert sorted(waves_started(controller, created.id)) == [1, 2, 3]
    told = Counter(e.target for e in controller.api.audit(10_000) if e.action == "device.desired")
    assert set(told.values()) == {1} and len(told) == 30, "every device is told the bundle once"
    assert sim.stats()["serving"] == {"tiny:2.0.0": 30}


def test_two_replicas_split_the_fleet_decide_each_wave_once_and_the_survivor_takes_over(
    broker, signing_key, tmp_path: Path, postgres_database: str
) -> None:
    """Two controllers on one PostgreSQL and one store folder (a shared file system, as S3 would be),
    with shared subscriptions on Mosquitto; the lease holder is killed mid-rollout."""
    import time

    from slmops.bundle import write_archive

    lease_s = 3.0
    args = ["--broker-url", f"mqtt://127.0.0.1:{broker.port}", "-k", str(signing_key[1]), "--database-url",
            postgres_database]  # fmt: skip
    settings = {"rollout_tick_s": "0.3", "rollout_lease_s": str(lease_s)}
    replicas = [ControllerProcess(tmp_path / "shared", *args, **settings).start() for _ in range(2)]
    controllers = [Controller(r.url, r.env["SLMOPS_TOKEN"]) for r in replicas]
    sim = None
    try:
        for version in ("1.0.0", "2.0.0"):
            bundle = synthetic_bundle(tmp_path / version, signing_key[0], version=version, variants=("cpu-int4",))
            controllers[0].api.push(write_archive(bundle, tmp_path / f"{version}.tar"))
        sim = FleetSimulator(f"mqtt://127.0.0.1:{broker.port}", 30, Profile(download_s=2, activate_s=0.3),
                             serving="tiny:1.0.0")  # fmt: skip
        sim.start()
        # online (state, on every replica) and born (birth: a shared subscription, one replica): targetable
        joined = lambda: sum(d.online and bool(d.profile) for d in controllers[1].api.devices()) == 30  # noqa: E731
        wait_for(joined, "the devices did not join", 30)

        def holders() -> list[bool]:
            return [c.api.health().rollout_lease.held for c in controllers]

        held = wait_for(lambda: (h := holders()).count(True) == 1 and h, "not exactly one replica holds the lease")
        holder, survivor = (0, 1) if held[0] else (1, 0)
        wait_for(lambda: sim.stats()["records_acked"] >= 30 * 6, "telemetry is not acknowledged", 20)
        for controller in controllers:  # the shared subscription gives each replica a share of the telemetry
            assert (metric(controller, 'slmops_controller_messages_received_total{kind="telemetry"}') or 0) > 0

        request = RolloutRequest(bundle="tiny", version="2.0.0", target="provider=cpu", waves="3,50%,100%",
                                 min_reported=2, soak_s=1)  # fmt: skip
        created = controllers[survivor].api.create_rollout(request)
        wait_for(lambda: controllers[survivor].api.rollout(created.id).wave == 2, "wave 2 did not start", 60)
        replicas[holder].stop(signal.SIGKILL)
        killed = time.monotonic()
        wait_for(lambda: controllers[survivor].api.health().rollout_lease.held, "the survivor did not take over", 30)
        takeover_s = time.monotonic() - killed
        assert takeover_s < lease_s + 5, f"took over after {takeover_s:.1f} s"
        done = wait_for(lambda: (r := controllers[survivor].api.rollout(created.id)).status == "completed" and r,
                        "the rollout did not finish", 90)  # fmt: skip
        assert {d.state for d in done.devices} == {"passed"}
        assert sorted(waves_started(controllers[survivor], created.id)) == [1, 2, 3]
        told = Counter(e.target for e in controllers[survivor].api.audit(10_000) if e.action == "device.desired")
        assert set(told.values()) == {1} and len(told) == 30, "every device is told the bundle once"
        assert sim.stats()["serving"] == {"tiny:2.0.0": 30}
    finally:
        if sim is not None:
            sim.stop()
        for controller, replica in zip(controllers, replicas, strict=True):
            controller.api.close()
            replica.stop()


def metric(controller: Controller, series: str) -> float | None:
    """A series' value in the controller's /metrics, or None when it has none."""
    import httpx

    response = httpx.get(f"{controller.url}/metrics", headers={"Authorization": f"Bearer {controller.token}"})
    return next((float(line.split()[-1]) for line in response.text.splitlines() if line.startswith(series)), None)
