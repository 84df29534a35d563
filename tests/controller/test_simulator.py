"""The fleet simulator on its own: its profile file, and `slmops fleet simulate` against a real broker."""

import json
import subprocess
from pathlib import Path

import pytest
from support import SLMOPS, wait_for

from slmops.controller.simulator import FleetSimulator, Profile
from slmops.errors import ConfigError

EXAMPLE = Path(__file__).parents[2] / "examples" / "fleet-mix.toml"


def test_the_example_profile_loads_and_deals_devices_to_classes_in_its_shares() -> None:
    profile = Profile.load(EXAMPLE)
    sim = FleetSimulator("mqtt://127.0.0.1:1", 1000, profile)
    try:
        dealt = {hw.name: sum(d.hw.name == hw.name for d in sim.devices.values()) for hw in profile.classes}
        assert dealt["pi5"] > dealt["nuc"] > dealt["jetson"] > 50, dealt
        again = FleetSimulator("mqtt://127.0.0.1:1", 1000, profile)
        assert [d.hw.name for d in again.devices.values()] == [d.hw.name for d in sim.devices.values()]
        again.loop.close()
        failing = [d for d in sim.devices if sim.fails(d, "smollm2-135m-instruct", "1.1.0")]
        assert 20 <= len(failing) <= 80, "about 5 % refuse 1.1.0"
        assert not any(sim.fails(d, "smollm2-135m-instruct", "1.0.0") for d in sim.devices)
    finally:
        sim.loop.close()


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("[[classes]]\nname = 'x'\nshare = -1\n", "share"),
        ("telemetry_interval_s = 'often'\n", "telemetry_interval_s"),
        ("[churn]\noffline_per_hour = 1\nbogus = 2\n", "bogus"),
        ("classes = [", "profile.toml"),
    ],
)
def test_a_bad_profile_is_refused_naming_the_field(tmp_path: Path, text: str, says: str) -> None:
    path = tmp_path / "profile.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=says):
        Profile.load(path)


def test_fleet_simulate_connects_its_devices_to_the_broker_and_stops_after_its_duration(
    mosquitto: int, publisher
) -> None:
    broker = f"mqtt://127.0.0.1:{mosquitto}"
    command = [*SLMOPS, "fleet", "simulate", "-n", "20", "--broker", broker, "--profile", str(EXAMPLE)]
    done = subprocess.run([*command, "--duration", "3", "--serving", "tiny:1.0.0"], capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "connects" in done.stdout and "20 simulated devices" in done.stdout
    bad = subprocess.run([*command, "--serving", "tiny"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "expected NAME:VERSION" in bad.stdout + bad.stderr

    states: dict[str, bytes] = {}  # the retained presence each device left: a goodbye
    publisher.on_message = lambda _c, _u, m: states.__setitem__(m.topic, m.payload)
    publisher.subscribe("slmops/v1/devices/+/state", qos=1)
    wait_for(lambda: len(states) == 20, "not every simulated device left a retained state")
    assert all(json.loads(p)["online"] is False for p in states.values())
