"""Rollouts on a real database (SQLite and PostgreSQL): waves cut from the target, devices followed
from their own reports, a halt that rolls back, inconclusive pauses, timeouts and offline devices.
Devices speak through Fleet.record, as the recorder hands their MQTT messages over."""

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from support import synthetic_bundle

from slmops.bundle import write_archive
from slmops.controller.audit import Actor
from slmops.controller.control import FleetControl
from slmops.controller.db import open_database
from slmops.controller.fleet import DeviceFilter, Fleet
from slmops.controller.protocol import RolloutRequest
from slmops.controller.registry import Registry
from slmops.controller.rollout_plan import Selector, WaveSize, hardware_class, parse_waves, plan_waves
from slmops.controller.rollouts import Rollouts
from slmops.controller.store import BundleStore
from slmops.errors import Rejected
from slmops.messages import Birth, DeviceState, HardwareProfile, Reported, Serving
from slmops.signing import load_public_key

OPERATOR = Actor("alice", "admin")
T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def profile(cpu: str = "test CPU", memory_gib: int = 8, providers: tuple[str, ...] = ("cpu",)) -> HardwareProfile:
    return HardwareProfile(
        cpu_model=cpu,
        cpu_cores_physical=4,
        cpu_cores_logical=8,
        isa=["avx2"],
        memory_total_bytes=memory_gib << 30,
        memory_available_bytes=(memory_gib - 1) << 30,
        disk_free_bytes=100 << 30,
        os="Linux 6.1",
        arch="x86_64",
        accelerators=[{"provider": p, "onnxruntime_name": p} for p in providers],
    )


# --- the plan ---------------------------------------------------------------------------------


def test_selectors_and_waves_parse_and_bad_ones_name_the_term() -> None:
    selector = Selector.parse("group=lab, provider=cuda, tag:site=berlin, min_memory=2GiB")
    assert selector == Selector(("lab",), ("cuda",), (("site", "berlin"),), 2 << 30)
    gpu = profile(memory_gib=4, providers=("cpu", "cuda")).model_dump()
    assert selector.matches(["lab"], {"site": "berlin"}, gpu)
    assert not selector.matches(["lab"], {"site": "paris"}, gpu)
    assert not selector.matches(["lab"], {"site": "berlin"}, profile(memory_gib=1).model_dump())
    assert parse_waves("5,10%,50%,100%") == [
        WaveSize(count=5),
        WaveSize(share=0.1),
        WaveSize(share=0.5),
        WaveSize(share=1),
    ]
    for bad, says in [
        ("colour=red", "colour=red"),
        ("group", "KEY=VALUE"),
        ("min_memory=lots", "not a size"),
    ]:
        with pytest.raises(Rejected, match=says):
            Selector.parse(bad)
    for bad, says in [("5,50%", "must end with 100%"), ("50%,10%,100%", "shrinks"), ("x,100%", "'x'")]:
        with pytest.raises(Rejected, match=says):
            parse_waves(bad)


def test_the_first_wave_covers_every_hardware_class_and_membership_is_stable() -> None:
    def of(**hardware) -> str:
        return hardware_class(profile(**hardware).model_dump())

    classes = {f"cpu-{i}": of() for i in range(40)} | {f"gpu-{i}": of(providers=("cpu", "cuda")) for i in range(5)}
    classes |= {"small-0": of(memory_gib=2), "arm-0": of(cpu="Cortex-A78")}
    plan = plan_waves(classes, parse_waves("2,10%,50%,100%"), salt="rollout/1")
    assert {classes[d] for d in plan[0]} == set(classes.values()), "one device of each of the 4 classes"
    assert len(plan[0]) == 4, "the canary of 2 grew to cover the classes"
    assert [len(w) for w in plan] == [4, 1, 19, 23]  # cumulative 4, 5, 24, 47
    assert sorted(d for w in plan for d in w) == sorted(classes)
    assert plan == plan_waves(classes, parse_waves("2,10%,50%,100%"), salt="rollout/1")
    assert plan != plan_waves(classes, parse_waves("2,10%,50%,100%"), salt="rollout/2"), "other canaries"


# --- rollouts on a database -------------------------------------------------------------------


@pytest.fixture
def world(database_url: str, tmp_path: Path, signing_key):
    """A registry with tiny 1.0.0 (what the devices run) and 2.0.0 (what is rolled out), and a fleet."""
    engine = open_database(database_url)
    registry = Registry(engine, BundleStore(tmp_path / "store"), [load_public_key(signing_key[1])])
    bundles = {}
    for version in ("1.0.0", "2.0.0"):
        folder = tmp_path / version
        archive = write_archive(synthetic_bundle(folder / "b", signing_key[0], version=version), folder / "b.tar")
        bundles[version] = registry.push(archive, OPERATOR)[0]
    fleet = Fleet(engine)
    control = FleetControl(fleet, None, None)
    yield fleet, control, Rollouts(engine, registry, control), bundles
    engine.dispose()


def join(fleet: Fleet, control: FleetControl, bundles: dict, ids: list[str], **hardware) -> None:
    """Devices born online, running tiny 1.0.0 as the controller desired."""
    fleet.record([(d, Birth(agent_version="0.1.0", profile=profile(**hardware))) for d in ids])
    control.desire(ids, bundles["1.0.0"], OPERATOR)
    serving = Serving(bundle="tiny", version="1.0.0", variant="cpu-int4", provider="cpu")
    fleet.record([(d, DeviceState(online=True, serving=serving)) for d in ids])


def report(fleet: Fleet, bundle, ids: list[str], status: str, reason: str = "") -> None:
    message = {"bundle": bundle.name, "version": bundle.version, "digest": bundle.digest, "status": status}
    fleet.record([(d, Reported(**message, reason=reason)) for d in ids])


def spec(**fields) -> RolloutRequest:
    return RolloutRequest(**{"bundle": "tiny", "version": "2.0.0", "target": "provider=cpu", **fields})


def wave_of(rollouts: Rollouts, rollout_id: int, wave: int) -> list[str]:
    return [d.device_id for d in rollouts.get(rollout_id).devices if d.wave == wave]


def states(rollouts: Rollouts, rollout_id: int) -> dict[str, str]:
    return {d.device_id: d.state for d in rollouts.get(rollout_id).devices}


def test_a_three_wave_rollout_passes_wave_by_wave_after_each_soak(world) -> None:
    fleet, control, rollouts, bundles = world
    devices = [f"dev-{i:02d}" for i in range(20)]
    join(fleet, control, bundles, devices)
    request = spec(waves="2,50%,100%", min_reported=2, soak_s=60)
    rollout = rollouts.create(request, OPERATOR)
    assert [len(wave_of(rollouts, rollout.id, w)) for w in (1, 2, 3)] == [2, 8, 10]
    new = bundles["2.0.0"]
    now = T0
    for wave in (1, 2, 3):
        rollouts.advance(now)
        members = wave_of(rollouts, rollout.id, wave)
        assert {fleet.device(d).desired["version"] for d in members} == {"2.0.0"}, "the wave is told"
        later = [d for w in range(wave + 1, 4) for d in wave_of(rollouts, rollout.id, w)]
        assert {fleet.device(d).desired["version"] for d in later} <= {"1.0.0"}, "later waves are not"
        report(fleet, new, members, "downloading")
        rollouts.advance(now := now + timedelta(seconds=5))
        assert {states(rollouts, rollout.id)[d] for d in members} == {"downloading"}
        report(fleet, new, members, "healthy")
        rollouts.advance(now := now + timedelta(seconds=5))
        assert {states(rollouts, rollout.id)[d] for d in members} == {"soaking"}
        rollouts.advance(now := now + timedelta(seconds=61))
        assert {states(rollouts, rollout.id)[d] for d in members} == {"passed"}
    rollouts.advance(now + timedelta(seconds=1))
    assert rollouts.get(rollout.id).status == "completed"


def test_too_many_failures_halt_the_rollout_and_roll_back_what_it_switched(world) -> None:
    fleet, control, rollouts, bundles = world
    devices = [f"dev-{i:02d}" for i in range(20)]
    join(fleet, control, bundles, devices)
    request = spec(waves="5,100%", max_failure="20%", min_reported=3, soak_s=0)
    rollout = rollouts.create(request, OPERATOR)
    rollouts.advance(T0)
    canaries = wave_of(rollouts, rollout.id, 1)
    report(fleet, bundles["2.0.0"], canaries[:3], "healthy")
    report(fleet, bundles["2.0.0"], canaries[3:], "failed", reason="smoke test: no tokens")
    rollouts.advance(T0 + timedelta(seconds=10))
    halted = rollouts.get(rollout.id)
    members = halted.devices
    assert halted.status == "halted" and "2 of 5" in halted.reason and "smoke test: no tokens" in halted.reason
    assert {m.device_id: m.state for m in members if m.wave == 1} == dict.fromkeys(canaries, "rolled_back")
    assert {fleet.device(d).desired["version"] for d in canaries} == {"1.0.0"}, "told their previous bundle"
    second = [m.device_id for m in members if m.wave == 2]
    assert {states(rollouts, rollout.id)[d] for d in second} == {"pending"}, "the next wave never started"
    assert {fleet.device(d).desired["version"] for d in second} == {"1.0.0"}


def test_a_device_told_the_bundle_by_hand_before_rolls_back_to_what_it_serves(world) -> None:
    """Its desired state is already the rollout's bundle: what it returns to on a halt is what it serves."""
    fleet, control, rollouts, bundles = world
    join(fleet, control, bundles, ["early", "other"])
    control.desire(["early"], bundles["2.0.0"], OPERATOR)  # still serving 1.0.0: not there yet
    rollout = rollouts.create(spec(waves="100%", max_failure="0%", min_reported=1, soak_s=0), OPERATOR)
    rollouts.advance(T0)
    report(fleet, bundles["2.0.0"], ["early", "other"], "failed", reason="smoke test: no tokens")
    rollouts.advance(T0 + timedelta(seconds=10))
    assert states(rollouts, rollout.id) == {"early": "rolled_back", "other": "rolled_back"}
    assert {fleet.device(d).desired["version"] for d in ("early", "other")} == {"1.0.0"}


def test_a_rollout_view_pages_its_devices_and_counts_them_all(world) -> None:
    fleet, control, rollouts, bundles = world
    join(fleet, control, bundles, [f"dev-{i:02d}" for i in range(20)])
    rollout = rollouts.create(spec(waves="5,100%"), OPERATOR)
    rollouts.advance(T0)
    whole = rollouts.get(rollout.id)
    assert whole.devices_total == 20 and len(whole.devices) == 20
    assert whole.states == {"notified": 5, "pending": 15}
    pages = [rollouts.get(rollout.id, limit=8, offset=offset).devices for offset in (0, 8, 16)]
    assert [len(page) for page in pages] == [8, 8, 4]
    assert [d.device_id for page in pages for d in page] == [d.device_id for d in whole.devices], "by wave and id"
    pending = rollouts.get(rollout.id, state="pending")
    assert pending.devices_total == 15 and {d.state for d in pending.devices} == {"pending"}
    canaries = rollouts.get(rollout.id, wave=1, limit=2)
    assert canaries.devices_total == 5 and [d.wave for d in canaries.devices] == [1, 1]
    counts = rollouts.get(rollout.id, limit=0)
    assert counts.devices == [] and counts.states == whole.states and counts.devices_total == 20


def test_too_few_healthy_devices_pause_the_rollout_as_inconclusive(world) -> None:
    fleet, control, rollouts, bundles = world
    join(fleet, control, bundles, [f"dev-{i}" for i in range(6)])
    request = spec(waves="3,100%", max_failure="50%", min_reported=3, soak_s=0)
    rollout = rollouts.create(request, OPERATOR)
    rollouts.advance(T0)
    canaries = wave_of(rollouts, rollout.id, 1)
    report(fleet, bundles["2.0.0"], canaries[:2], "healthy")
    report(fleet, bundles["2.0.0"], canaries[2:], "failed", reason="out of memory")
    rollouts.advance(T0 + timedelta(seconds=1))
    paused = rollouts.get(rollout.id)
    assert paused.status == "paused" and paused.reason.startswith("inconclusive") and paused.wave == 1
    rollouts.act(rollout.id, "resume", OPERATOR)
    rollouts.advance(T0 + timedelta(seconds=2))
    assert rollouts.get(rollout.id).status == "paused", "the same wave is judged the same way again"


def test_offline_devices_are_unreached_catch_up_on_return_or_time_out(world) -> None:
    fleet, control, rollouts, bundles = world
    devices = ["dev-a", "dev-b", "dev-c"]
    join(fleet, control, bundles, devices)
    fleet.record([("dev-b", DeviceState(online=False)), ("dev-c", DeviceState(online=False))])
    request = spec(waves="100%", max_failure="50%", min_reported=1, soak_s=0, device_timeout_s=600)
    rollout = rollouts.create(request, OPERATOR)
    rollouts.advance(T0)
    assert states(rollouts, rollout.id) == {"dev-a": "notified", "dev-b": "unreached", "dev-c": "unreached"}
    assert fleet.device("dev-b").desired["version"] == "2.0.0", "retained: it gets it when it returns"
    fleet.record([("dev-b", DeviceState(online=True))])
    report(fleet, bundles["2.0.0"], ["dev-a", "dev-b"], "healthy")
    rollouts.advance(T0 + timedelta(seconds=30))
    assert states(rollouts, rollout.id) == {"dev-a": "passed", "dev-b": "passed", "dev-c": "unreached"}
    assert rollouts.get(rollout.id).status == "active", "an unreached device holds the wave until its deadline"
    rollouts.advance(T0 + timedelta(seconds=601))
    assert states(rollouts, rollout.id)["dev-c"] == "timed_out"
    assert rollouts.get(rollout.id).status == "completed", "1 timed out of 3 is within the 50 % allowed"


# --- over the REST API, moved by the controller's own timer ----------------------------------

ADMIN = {"Authorization": "Bearer admin-token-0123456789"}
READER = {"Authorization": "Bearer reader-token-0123456789"}


def test_a_rollout_over_the_api_is_moved_by_the_controllers_timer(controller_config, tmp_path: Path, signing_key):
    from fastapi.testclient import TestClient
    from support import wait_for

    from slmops.controller.service import build_app

    config = controller_config.model_copy(update={"rollout_tick_s": 0.05})
    with TestClient(build_app(config)) as client:
        for version in ("1.0.0", "2.0.0"):
            bundle = synthetic_bundle(tmp_path / version / "b", signing_key[0], version=version)
            archive = write_archive(bundle, tmp_path / version / "b.tar").read_bytes()
            assert client.post("/v1/bundles", content=archive, headers=ADMIN).status_code in (200, 201)
        state = client.app.state  # type: ignore[attr-defined]
        old = state.registry.bundle("tiny", "1.0.0")
        devices = [f"dev-{i}" for i in range(4)]
        join(state.fleet, state.control, {"1.0.0": old}, devices)
        body = {"bundle": "tiny", "version": "2.0.0", "target": "provider=cpu", "waves": "1,100%",
                "min_reported": 1, "soak_s": 0}  # fmt: skip
        assert client.post("/v1/rollouts", json=body, headers=READER).status_code == 403
        for bad, says in [({"target": "colour=red"}, "colour=red"), ({"waves": "50%"}, "100%")]:
            refused = client.post("/v1/rollouts", json=body | bad, headers=ADMIN)
            assert refused.status_code == 400 and says in refused.json()["error"]["message"]
        assert client.post("/v1/rollouts", json=body | {"version": "9.9.9"}, headers=ADMIN).status_code == 404
        created = client.post("/v1/rollouts", json=body, headers=ADMIN)
        assert created.status_code == 201, created.text
        rollout = created.json()
        assert rollout["status"] == "active" and rollout["wave_count"] == 2 and rollout["states"] == {"pending": 4}
        figures = client.get("/metrics", headers=READER).text
        assert 'slmops_controller_rollouts{status="active"} 1.0' in figures
        pending = f'slmops_controller_rollout_devices{{rollout="{rollout["id"]}",state="pending"}} '
        assert f"{pending}4.0" in figures or f"{pending}3.0" in figures, "4 pending, or 3 once the timer told wave 1"
        assert 'slmops_controller_devices{online="true"} 4.0' in figures

        def view() -> dict:
            return client.get(f"/v1/rollouts/{rollout['id']}", headers=READER).json()

        def told() -> list[str]:  # the decision commits, then the device is told: wait for both
            notified = [d["device_id"] for d in view()["devices"] if d["state"] == "notified"]
            return [d for d in notified if (state.fleet.device(d).desired or {}).get("version") == "2.0.0"]

        canary = wait_for(told, "wave 1")
        assert len(canary) == 1
        by_hand = {"bundle": "tiny", "version": "1.0.0"}
        mine = client.put(f"/v1/devices/{canary[0]}/desired", json=by_hand, headers=ADMIN)
        assert mine.status_code == 409 and f"rollout {rollout['id']}" in mine.json()["error"]["message"]
        new = state.registry.bundle("tiny", "2.0.0")
        report(state.fleet, new, canary, "healthy")
        rest = wait_for(lambda: view()["wave"] == 2 and [d["device_id"] for d in view()["devices"] if d["wave"] == 2],
                        "wave 2")  # fmt: skip
        report(state.fleet, new, rest, "healthy")
        done = wait_for(lambda: (v := view())["status"] == "completed" and v, "the rollout completes")
        assert done["states"] == {"passed": 4}
        figures = client.get("/metrics", headers=READER).text
        assert 'slmops_controller_rollouts{status="completed"} 1.0' in figures
        assert "slmops_controller_rollout_lease_held 1.0" in figures, "the only replica decides"
        assert client.get("/health").json()["rollout_lease"] == {"replica": config.replica, "held": True, "epoch": 1}
        listed = client.get("/v1/rollouts", headers=READER).json()
        assert [r["id"] for r in listed] == [rollout["id"]] and listed[0]["devices"] == []
        refused = client.post(f"/v1/rollouts/{rollout['id']}/pause", headers=ADMIN)
        assert refused.status_code == 409 and "completed" in refused.json()["error"]["message"]
        audit = [a["action"] for a in client.get("/v1/audit", headers=ADMIN).json()]
        assert {"rollout.create", "rollout.wave", "rollout.complete"} <= set(audit)


def test_a_device_belongs_to_one_rollout_at_a_time_unless_superseded(world) -> None:
    from slmops.errors import Conflict

    fleet, control, rollouts, bundles = world
    join(fleet, control, bundles, ["dev-a", "dev-b"])
    first = rollouts.create(spec(waves="1,100%", min_reported=1), OPERATOR)
    with pytest.raises(Conflict, match=rf"rollout {first.id} under way: dev-a \(rollout {first.id}\)"):
        rollouts.create(spec(target="provider=cpu", version="1.0.0"), OPERATOR)
    with pytest.raises(Conflict, match="pause or abort it"):
        rollouts.refuse_owned(["dev-b"])
    second = rollouts.create(spec(version="1.0.0", supersede=True), OPERATOR)
    old = rollouts.get(first.id)
    assert old.status == "superseded" and f"rollout {second.id}" in old.reason
    rollouts.advance(T0)
    assert rollouts.get(first.id).wave == 0, "a superseded rollout tells nobody"
    rollouts.act(second.id, "abort", OPERATOR)
    rollouts.refuse_owned(["dev-a", "dev-b"])  # nothing under way owns them now


def test_an_operator_rolls_back_or_promotes_a_wave(world) -> None:
    fleet, control, rollouts, bundles = world
    join(fleet, control, bundles, [f"dev-{i}" for i in range(4)])
    rollout = rollouts.create(spec(waves="2,100%", min_reported=1, soak_s=3600), OPERATOR)
    rollouts.advance(T0)
    canaries = wave_of(rollouts, rollout.id, 1)
    report(fleet, bundles["2.0.0"], canaries, "healthy")
    rollouts.advance(T0 + timedelta(seconds=1))
    assert {states(rollouts, rollout.id)[d] for d in canaries} == {"soaking"}
    promoted = rollouts.promote(rollout.id, OPERATOR)
    assert {d.state for d in promoted.devices if d.wave == 1} == {"passed"}
    rollouts.advance(T0 + timedelta(seconds=2))
    assert rollouts.get(rollout.id).wave == 2, "the next wave starts without the hour of soak"
    back = rollouts.roll_back(rollout.id, OPERATOR)
    assert back.status == "halted" and back.reason == "rolled back by alice"
    assert {d.state for d in back.devices} == {"rolled_back"}
    assert {fleet.device(d).desired["version"] for d in fleet_ids(fleet)} == {"1.0.0"}


def test_the_actions_a_rollout_offers_are_the_ones_it_takes(world) -> None:
    """The view's `actions` (what the dashboard shows as buttons) through a rollout's life; every action
    it does not offer is refused, and those it offers are taken (a completed rollout rolls back)."""
    from slmops.controller.rollouts import ACTIONS
    from slmops.errors import Conflict

    fleet, control, rollouts, bundles = world
    join(fleet, control, bundles, [f"dev-{i}" for i in range(4)])
    rollout = rollouts.create(spec(waves="2,100%", min_reported=1, soak_s=60), OPERATOR)

    def offered(expected: list[str]) -> None:
        view = rollouts.get(rollout.id)
        assert view.actions == expected, view.status
        for action in set(ACTIONS) - set(expected):
            with pytest.raises(Conflict, match=f"rollout {rollout.id} is {view.status}"):
                rollouts.act(rollout.id, action, OPERATOR)

    offered(["pause", "promote", "abort"])  # no wave told yet: nothing to roll back
    rollouts.advance(T0)
    offered(["pause", "promote", "abort", "rollback"])
    rollouts.act(rollout.id, "pause", OPERATOR)
    offered(["resume", "promote", "abort", "rollback"])
    rollouts.act(rollout.id, "resume", OPERATOR)
    now = T0
    for wave in (1, 2):
        report(fleet, bundles["2.0.0"], wave_of(rollouts, rollout.id, wave), "healthy")
        rollouts.advance(now := now + timedelta(seconds=1))
        rollouts.act(rollout.id, "promote", OPERATOR)
        rollouts.advance(now := now + timedelta(seconds=1))
    assert rollouts.get(rollout.id).status == "completed"
    assert rollouts.judged(rollout.id, 10) == []  # no gate, nothing judged: no figures kept
    offered(["rollback"])
    assert rollouts.act(rollout.id, "rollback", OPERATOR).status == "halted"
    assert {fleet.device(d).desired["version"] for d in fleet_ids(fleet)} == {"1.0.0"}

    second = rollouts.create(spec(waves="100%", min_reported=1), OPERATOR)
    assert rollouts.act(second.id, "abort", OPERATOR).actions == []
    newest, total = rollouts.listing(1)
    assert [v.id for v in newest] == [second.id] and total == 2
    assert [v.id for v in rollouts.listing(5, offset=1)[0]] == [rollout.id]


def fleet_ids(fleet: Fleet) -> list[str]:
    return [d.id for d in fleet.listing(DeviceFilter(), 10_000, 0)[0]]


# --- gates on what each device measures -------------------------------------------------------


def inference(fleet: Fleet, device: str, seq: int, at: datetime, version: str, tokens_per_s: float) -> None:
    """One telemetry window of the device's inference figures, as its agent sends them."""
    from slmops.messages import TelemetryBatch, TelemetryRecord

    payload = {"requests": 10, "errors": 0, "tokens_per_s_p50": tokens_per_s, "ttft_ms_p95": 120.0,
               "bundle": "tiny", "version": version}  # fmt: skip
    record = TelemetryRecord(seq=seq, created=at.timestamp(), kind="inference", payload=payload)
    fleet.record([(device, TelemetryBatch(records=[record]))])


def gated_rollout(world, speed_after: dict[str, float] | None) -> tuple[Rollouts, int]:
    """Fast and slow devices (two hardware classes) that decoded at 100 and 40 tokens/s on 1.0.0, rolled
    to 2.0.0 with a tokens/s gate relative to each device's own figure; `speed_after` their speed on 2.0.0
    (None: they send no figures)."""
    fleet, control, rollouts, bundles = world
    fast, slow = ["fast-0", "fast-1"], ["slow-0", "slow-1"]
    join(fleet, control, bundles, fast, cpu="Fast CPU")
    join(fleet, control, bundles, slow, cpu="Slow CPU", memory_gib=2)
    for device, speed in [*((d, 100.0) for d in fast), *((d, 40.0) for d in slow)]:
        inference(fleet, device, 1, T0 - timedelta(hours=1), "1.0.0", speed)
    request = spec(waves="100%", min_reported=4, soak_s=60, max_failure="0%", gates=["tokens_per_s>=0.8x"])
    rollout = rollouts.create(request, OPERATOR)
    rollouts.advance(T0)
    report(fleet, bundles["2.0.0"], fast + slow, "healthy")
    rollouts.advance(T0 + timedelta(seconds=5))
    if speed_after is not None:
        for device in fast + slow:
            inference(fleet, device, 2, T0 + timedelta(seconds=30), "2.0.0", speed_after[device])
    rollouts.advance(T0 + timedelta(seconds=70))
    return rollouts, rollout.id


def test_a_device_slower_than_its_own_figures_fails_its_gate_and_halts_the_rollout(world) -> None:
    rollouts, rollout_id = gated_rollout(world, {"fast-0": 50, "fast-1": 98, "slow-0": 39, "slow-1": 41})
    halted = rollouts.get(rollout_id)
    assert halted.status == "halted" and "fast-0" in halted.reason
    fast0 = next(d for d in halted.devices if d.device_id == "fast-0")
    assert fast0.figures is not None and fast0.figures["gates"]["tokens_per_s>=0.8x"] == {
        "value": 50.0,
        "limit": 80.0,
        "held": False,
    }
    assert "gate tokens_per_s>=0.8x: 50 against 80" in halted.reason
    judged = rollouts.judged(rollout_id, 10)  # what the dashboard charts against the gate's bound
    assert [d.device_id for d in judged] == ["fast-0", "fast-1", "slow-0", "slow-1"] and all(d.figures for d in judged)
    assert [d.device_id for d in rollouts.judged(rollout_id, 2)] == ["fast-0", "fast-1"]


def test_slower_hardware_at_its_usual_speed_passes(world) -> None:
    rollouts, rollout_id = gated_rollout(world, {"fast-0": 97, "fast-1": 98, "slow-0": 39, "slow-1": 41})
    done = rollouts.get(rollout_id)
    assert done.status == "completed", done.reason
    slow0 = next(d for d in done.devices if d.device_id == "slow-0")
    assert slow0.figures is not None
    assert slow0.figures["before"]["tokens_per_s"] == 40 and slow0.figures["during"]["tokens_per_s"] == 39
    assert slow0.figures["gates"]["tokens_per_s>=0.8x"]["limit"] == pytest.approx(32)


def test_devices_without_figures_leave_a_gated_wave_inconclusive(world) -> None:
    rollouts, rollout_id = gated_rollout(world, None)
    paused = rollouts.get(rollout_id)
    assert paused.status == "paused" and "with figures for every gate" in paused.reason
    assert {d.detail for d in paused.devices} == {"passed without figures for tokens_per_s>=0.8x"}


def test_a_bad_gate_is_refused_naming_it(world) -> None:
    _fleet, _control, rollouts, _bundles = world
    with pytest.raises(Rejected, match="latency<=5"):
        rollouts.create(spec(gates=["latency<=5"]), OPERATOR)


class StoppedBeforePublishing:
    """A controller that dies between committing a decision and telling the devices."""

    def desire(self, *_args) -> None:
        raise RuntimeError("the controller stopped here")


def test_devices_a_restart_left_untold_are_told_at_the_next_step(world) -> None:
    fleet, control, rollouts, bundles = world
    join(fleet, control, bundles, ["dev-a", "dev-b"])
    rollout = rollouts.create(spec(waves="100%", max_failure="0%", min_reported=1, soak_s=0), OPERATOR)
    rollouts.control = StoppedBeforePublishing()
    with pytest.raises(RuntimeError):
        rollouts.advance(T0)
    assert set(states(rollouts, rollout.id).values()) == {"notified"}, "the decision committed"
    assert {fleet.device(d).desired["version"] for d in ("dev-a", "dev-b")} == {"1.0.0"}, "nobody was told"
    rollouts.control = control
    rollouts.advance(T0 + timedelta(seconds=1))
    assert {fleet.device(d).desired["version"] for d in ("dev-a", "dev-b")} == {"2.0.0"}, "told after the restart"

    report(fleet, bundles["2.0.0"], ["dev-a"], "failed", reason="smoke test")
    rollouts.control = StoppedBeforePublishing()
    with pytest.raises(RuntimeError):
        rollouts.advance(T0 + timedelta(seconds=2))
    assert rollouts.get(rollout.id).status == "halted"
    assert fleet.device("dev-b").desired["version"] == "2.0.0", "the rollback was decided, not told"
    rollouts.control = control
    rollouts.advance(T0 + timedelta(seconds=3))
    assert {fleet.device(d).desired["version"] for d in ("dev-a", "dev-b")} == {"1.0.0"}, "told after the restart"
    # A desired state set after the halt is the operator's (or a later rollout's): the halted one leaves it.
    control.desire(["dev-b"], bundles["2.0.0"], OPERATOR)
    rollouts.advance(T0 + timedelta(seconds=4))
    assert fleet.device("dev-b").desired["version"] == "2.0.0"


def test_a_decision_under_a_lost_lease_is_neither_kept_nor_told(world) -> None:
    from slmops.controller.lease import LeaseLost

    fleet, control, rollouts, bundles = world
    join(fleet, control, bundles, ["dev-a"])
    rollout = rollouts.create(spec(waves="100%", min_reported=1, soak_s=0), OPERATOR)

    def lost(_session) -> None:
        raise LeaseLost("replica-a no longer holds the rollouts lease (epoch 1)")

    with pytest.raises(LeaseLost):
        rollouts.advance(T0, fence=lost)
    assert rollouts.get(rollout.id).wave == 0
    assert set(states(rollouts, rollout.id).values()) == {"pending"}
    assert fleet.device("dev-a").desired["version"] == "1.0.0"
    rollouts.advance(T0, fence=lambda _session: None)
    assert rollouts.get(rollout.id).wave == 1
