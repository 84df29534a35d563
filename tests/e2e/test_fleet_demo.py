"""`examples/fleet_demo.py` (what `make demo` runs after building) works on the tiny bundle."""

import os
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fleet_demo.py"


def test_the_fleet_demo_runs_end_to_end(session_bundle: Path, signing_key, tmp_path: Path) -> None:
    # The tiny model's build-time speed comes from 8 tokens in about a millisecond: noise, so no
    # speed floor for its smoke test here (the demo on SmolLM2 keeps the default).
    env = {**os.environ, "SLMOPS_AGENT_SMOKE_MIN_SPEED_FRACTION": "0"}
    result = subprocess.run(
        [sys.executable, "-P", EXAMPLE, session_bundle, signing_key[1], "--work", tmp_path / "fleet"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for step in ("registered", "demo-device is online", "healthy", "assistant:", "demo-device", "requests=1"):
        assert step in result.stdout, step
