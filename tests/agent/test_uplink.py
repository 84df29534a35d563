"""The agent's MQTT link against a real Mosquitto."""

import sys
import threading
from pathlib import Path

import pytest

from slmops.agent import config as agent_config
from slmops.agent.server import AgentServer
from slmops.agent.telemetry import TelemetryQueue
from slmops.agent.uplink import Uplink


@pytest.fixture
def uplink(mosquitto: int, tmp_path: Path):
    config = agent_config.load(
        device_id="uplink-test", broker_url=f"mqtt://127.0.0.1:{mosquitto}", data_dir=tmp_path, transfer_timeout_s=2
    )
    server = AgentServer(config)
    link = Uplink(config, server, TelemetryQueue(tmp_path / "telemetry.db"))
    link.start()
    assert link.connected.wait(10), "the uplink did not connect"
    yield link
    link.stop()
    server.close()


def test_watch_bundle_sees_the_broker_confirm_every_subscription(uplink: Uplink) -> None:
    """A SUBACK can come back before subscribe() has returned its message id; none may be missed
    (a missed one used to stall a fetch for the whole transfer timeout)."""
    switch, done = sys.getswitchinterval(), threading.Event()

    def contend() -> None:  # a third thread wanting the GIL: the subscriber is preempted more often
        while not done.is_set():
            pass

    contender = threading.Thread(target=contend)
    sys.setswitchinterval(1e-6)  # and the GIL changes hands as often as it can: the race shows up
    contender.start()
    try:
        confirmed = [uplink.watch_bundle(f"{i:064x}", lambda header, data: None) for i in range(200)]
    finally:
        done.set()
        contender.join()
        sys.setswitchinterval(switch)
    assert all(confirmed), f"{confirmed.count(False)} of 200 subscriptions seen as unconfirmed"
