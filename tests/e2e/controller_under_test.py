"""The controller an end-to-end test runs, as the test sees it: slmops.client plus what tests wait on."""

import os
import subprocess

from support import SLMOPS

from slmops.client import ControllerClient
from slmops.errors import ControllerError


class Controller:
    """The controller under test: `api` is slmops.client with its admin token; the rest is what
    the tests wait on."""

    def __init__(self, url: str, token: str) -> None:
        self.url, self.token = url, token
        self.api = ControllerClient(url, token, timeout_s=10)

    def device(self, device_id: str) -> dict:
        """The device as the API shows it (JSON), or {} until it has reported."""
        try:
            return self.api.device(device_id).model_dump(mode="json")
        except ControllerError as e:
            if e.status != 404:
                raise
            return {}

    def telemetry_seqs(self, device_id: str) -> list[int]:
        try:
            return sorted(r.seq for r in self.api.telemetry(device_id, limit=100_000))
        except ControllerError as e:
            if e.status != 404:
                raise
            return []

    def desire(self, device_id: str, version: str) -> None:
        self.api.desire(device_id, "tiny", version)

    def desire_at_once(self, device_ids: list[str], version: str) -> None:
        """`slmops fleet desire`: one call sets it for all of them, as an operator rolls a bundle out."""
        devices = [arg for device_id in device_ids for arg in ("--device", device_id)]
        env = {**os.environ, "SLMOPS_CONTROLLER_URL": self.url, "SLMOPS_TOKEN": self.token}
        done = subprocess.run(
            [*SLMOPS, "fleet", "desire", "tiny", version, *devices], env=env, capture_output=True, text=True
        )
        assert done.returncode == 0 and f"desired on {len(device_ids)} device(s)" in done.stdout, done

    def reported(self, device_id: str, status: str, version: str) -> dict:
        """The device's last report if it has this status for this version, else {}."""
        r = self.device(device_id).get("reported") or {}
        return r if r.get("status") == status and r.get("version") == version else {}
