"""The controller an end-to-end test runs: its process (ControllerProcess), and as the test sees it
(Controller: slmops.client plus what tests wait on)."""

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
from support import SLMOPS, free_port

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


class ControllerProcess:
    """`slmops controller serve` in its own process, on its own data folder: it can be killed and started
    again on the same folder and port. `env` carries its admin token once it has started. Its output goes to
    a file beside the data folder (a pipe read only at the end fills, and a chatty controller blocks on it)."""

    def __init__(self, data: Path, *args: str, **settings: str) -> None:
        """`settings`: SLMOPS_CONTROLLER_* variables, e.g. ROLLOUT_TICK_S="0.3"."""
        self.data, self.args, self.port = data, args, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "SLMOPS_CONTROLLER_DATA_DIR": str(data),
            "SLMOPS_CONTROLLER_EMBEDDED_BROKER_BIND": f"127.0.0.1:{free_port()}",
            **{f"SLMOPS_CONTROLLER_{k.upper()}": v for k, v in settings.items()},
        }
        self.process: subprocess.Popen | None = None
        self.log = data.parent / f"{data.name}-{self.port}.log"
        self._log_from = 0

    def start(self) -> "ControllerProcess":
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("a") as log:
            self._log_from = log.tell()
            self.process = subprocess.Popen(
                [*SLMOPS, "controller", "serve", "--port", str(self.port), *self.args],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"the controller exited: {self.stop()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"the controller did not start: {self.stop(signal.SIGKILL)}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        token = (self.data / "admin.token").read_text().strip()  # written on first start: no tokens configured
        self.env.update(SLMOPS_TOKEN=token, SLMOPS_CONTROLLER_URL=self.url)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> str:
        """What it wrote since it was started; SIGKILL: no goodbye, no flush."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        self.process.wait(timeout=20)
        with self.log.open(errors="replace") as log:
            log.seek(self._log_from)
            return log.read()
