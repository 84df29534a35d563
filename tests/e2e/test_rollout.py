"""A rollout over real processes: three agent daemons, a controller and a Mosquitto broker. A
two-wave rollout reaches every device healthy; then a bundle the devices' smoke test refuses halts
at its canary, which is told its previous bundle, and the other devices are never touched."""

import os
import subprocess
from pathlib import Path

from support import SLMOPS

from slmops.controller.protocol import RolloutRequest


def test_a_rollout_completes_then_a_broken_one_halts_at_its_canary_and_rolls_back(
    fleet, two_versions, agent_process, eventually, tiny_export: Path, signing_key, tmp_path: Path
) -> None:
    from slmops.build.bundle import create
    from slmops.bundle import write_archive

    controller, broker_url = fleet
    devices = [f"edge-{i}" for i in range(3)]
    agents = [agent_process(d, broker_url, smoke_min_speed_fraction="0") for d in devices]
    for device in devices:
        eventually(lambda d=device: controller.device(d).get("online"), f"{device} did not join")
    controller.desire_at_once(devices, "1.0.0")
    for device in devices:
        eventually(lambda d=device: controller.reported(d, "healthy", "1.0.0"), f"{device} never ran 1.0.0", 90)

    env = {**os.environ, "SLMOPS_CONTROLLER_URL": controller.url, "SLMOPS_TOKEN": controller.token}
    create_cmd = [*SLMOPS, "fleet", "rollout", "create", "tiny:2.0.0", "--target", "provider=cpu"]
    create_cmd += ["--waves", "1,100%", "--min-reported", "1", "--soak", "1"]
    done = subprocess.run(create_cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0 and "to 3 device(s) in 2 wave(s)" in done.stdout, done
    first = controller.api.rollouts()[0]
    eventually(lambda: controller.api.rollout(first.id).status == "completed", "the rollout did not complete", 120)
    assert [a.chat_model() for a in agents] == ["tiny:2.0.0"] * 3
    status = subprocess.run(
        [*SLMOPS, "fleet", "rollout", "status", str(first.id)], env=env, capture_output=True, text=True
    )
    assert status.returncode == 0 and "passed 3" in status.stdout, status.stdout  # the counts by state
    assert status.stdout.count("│ passed") == 3, status.stdout  # and a row for each device

    # 3.0.0 reaches agents whose smoke test now asks for an impossible speed: every one would refuse it.
    bundle = create(tiny_export, tmp_path / "3.0.0", "tiny", "3.0.0", key=signing_key[0], variant_ids=["cpu-int4"])
    controller.api.push(write_archive(bundle, tmp_path / "3.0.0.tar"))
    for agent in agents:
        agent.stop()
        agent.start(SLMOPS_AGENT_SMOKE_MIN_SPEED_FRACTION="1000")
    for device in devices:
        eventually(lambda d=device: (controller.device(d).get("serving") or {}).get("version") == "2.0.0", f"{device}")
        previous = controller.device(device)["previous"]  # the A/B slot a rollback returns to, as the agent says
        assert (previous["version"], previous["variant"]) == ("1.0.0", "cpu-int4"), previous
    broken = controller.api.create_rollout(
        RolloutRequest(bundle="tiny", version="3.0.0", target="provider=cpu", waves="1,100%", max_failure="0%")
    )
    halted = eventually(lambda: (r := controller.api.rollout(broken.id)).status == "halted" and r, "no halt", 120)
    assert "smoke test" in halted.reason, halted.reason
    canary = [d for d in halted.devices if d.wave == 1]
    assert len(canary) == 1 and canary[0].state == "rolled_back"
    assert {d.state for d in halted.devices if d.wave == 2} == {"pending"}
    for device in devices:
        assert controller.device(device)["desired"]["version"] == "2.0.0", "the canary is told its previous bundle"
    assert [a.chat_model() for a in agents] == ["tiny:2.0.0"] * 3
