"""The README's default: a controller with its embedded broker, and agents enrolled with their own
credentials (`slmops fleet enrol`), each a real process (issue 11, findings 1, 2 and 4)."""

import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from controller_under_test import Controller
from support import SLMOPS


def enrol(env: dict[str, str], device_id: str, tmp_path: Path) -> str:
    """The broker URL with the device's own credentials, from the enrolment file the CLI writes."""
    import tomllib

    out = tmp_path / f"{device_id}.toml"
    done = subprocess.run(
        [*SLMOPS, "fleet", "enrol", device_id, "--out", str(out)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert out.stat().st_mode & 0o777 == 0o600
    enrolment = tomllib.loads(out.read_text())
    assert enrolment["device_id"] == device_id
    return enrolment["broker_url"]


def health(port: int) -> dict:
    """The agent's /health, or {} while it is not listening yet."""
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()
    except httpx.TransportError:
        return {}


def push(env: dict[str, str], bundle: Path) -> None:
    done = subprocess.run([*SLMOPS, "bundle", "push", str(bundle)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_enrolled_agents_apply_only_their_own_desired_states(
    controller_process,
    agent_process,
    session_bundle: Path,
    tiny_export: Path,
    signing_key,
    tmp_path: Path,
    eventually,
    request: pytest.FixtureRequest,
) -> None:
    from slmops.build.bundle import create

    create(tiny_export, tmp_path / "v2", "tiny", "2.0.0", key=signing_key[0], variant_ids=["cpu-int4"])
    with controller_process("-k", str(signing_key[1])) as (url, env):
        push(env, session_bundle)
        push(env, tmp_path / "v2")
        controller = Controller(url, env["SLMOPS_TOKEN"])
        request.addfinalizer(controller.api.close)
        device = controller.device

        agents = {}
        for device_id, version in (("edge-a", "1.0.0"), ("edge-b", "2.0.0")):
            agents[device_id] = agent_process(device_id, enrol(env, device_id, tmp_path), smoke_min_speed_fraction="0")
            eventually(lambda d=device_id: device(d).get("online"), f"{device_id} did not join")
            controller.desire(device_id, version)
        for device_id, version in (("edge-a", "1.0.0"), ("edge-b", "2.0.0")):
            eventually(
                lambda d=device_id, v=version: (
                    (device(d).get("reported") or {}).get("status") == "healthy"
                    and device(d)["reported"]["version"] == v
                ),
                f"{device_id} did not apply its own desired state",
                60,
            )

        # Finding 1: on amqtt, a third device fetched and activated the other two's bundles in turn.
        third_url = enrol(env, "edge-c", tmp_path)
        third = agent_process("edge-c", third_url, smoke_min_speed_fraction="0")
        eventually(lambda: device("edge-c").get("online"), "edge-c did not join")
        eventually(lambda: (health(third.port).get("fleet_link") or {}).get("connected"), "edge-c's link is not up")
        impostor = agent_process("edge-d", enrol(env, "edge-d", tmp_path).replace("edge-d:", "edge-d:x"))
        refused = eventually(
            lambda: (health(impostor.port).get("fleet_link") or {}).get("refused") and health(impostor.port),
            "the wrong password was not shown in /health",
        )
        assert refused["fleet_link"]["connected"] is False and "authori" in refused["fleet_link"]["refused"].lower()
        assert device("edge-c")["desired"] is None and device("edge-c")["serving"] is None
        link = health(third.port)["fleet_link"]
        assert link["connected"] and link["client_id"].startswith("slmops-agent-edge-c-")
        output = third.stop()
        assert "fetching" not in output, output
        assert urlsplit(third_url).password not in output  # credentials stay out of the logs
        assert not device("edge-d")  # never got in
        time.sleep(3)  # paho would have retried twice by now (1 s, then 2 s)
        refusals = impostor.stop()
        assert refusals.count("the link stops") == 1, refusals  # refused credentials are not retried
