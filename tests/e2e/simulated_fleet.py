"""A controller process on the test's broker with tiny 1.0.0, 2.0.0 and 3.0.0 pushed, and simulated agents
(slmops.controller.simulator) speaking the real protocol to it: what rollout and dashboard tests run on."""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from controller_under_test import Controller, ControllerProcess
from support import synthetic_bundle, wait_for

from slmops.controller.protocol import RolloutRequest, RolloutView
from slmops.controller.simulator import DeviceClass, FleetSimulator, Profile

QUICK = {"download_s": 0.4, "activate_s": 0.2}
"""Simulated devices that fetch and activate in well under a second."""
THREE_CLASSES = [
    DeviceClass(name="pi", share=2, cpu_model="Cortex-A76", memory="8GiB", tokens_per_s=40),
    DeviceClass(name="jetson", cpu_model="Cortex-A78AE", memory="16GiB", providers=["cpu", "cuda"], tokens_per_s=90),
    DeviceClass(name="nuc", cpu_model="Intel N100", memory="4GiB", tokens_per_s=60),
]


@dataclass
class SimulatedFleet:
    controller: Controller
    process: ControllerProcess
    broker_url: str
    simulate: Callable[..., FleetSimulator]

    def rollout(self, request: RolloutRequest, until: Callable[[RolloutView], bool], what: str) -> RolloutView:
        created = self.controller.api.create_rollout(request)
        return wait_for(lambda: until(r := self.controller.api.rollout(created.id)) and r, what, 90, poll_s=0.2)


@contextmanager
def simulated_fleet(
    broker_port: int, signing_key: tuple[Path, Path], folder: Path, database_url: str | None = None, **settings: str
) -> Iterator[SimulatedFleet]:
    """A controller (rollouts stepped every 0.3 s; `settings`: more SLMOPS_CONTROLLER_* variables) on the
    broker with tiny 1.0.0, 2.0.0 and 3.0.0 pushed; `simulate(count, profile)` starts simulated devices
    serving tiny 1.0.0 and waits for them."""
    from slmops.bundle import write_archive

    broker_url = f"mqtt://127.0.0.1:{broker_port}"
    args = ["--broker-url", broker_url, "-k", str(signing_key[1])]
    if database_url is not None:
        args += ["--database-url", database_url]
    process = ControllerProcess(folder / "controller", *args, rollout_tick_s="0.3", **settings).start()
    controller = Controller(process.url, process.env["SLMOPS_TOKEN"])
    for version in ("1.0.0", "2.0.0", "3.0.0"):
        bundle = synthetic_bundle(folder / version, signing_key[0], version=version, variants=("cpu-int4",))
        controller.api.push(write_archive(bundle, folder / f"{version}.tar"))
    simulators: list[FleetSimulator] = []

    def simulate(count: int, profile: Profile, prefix: str = "sim", fetch_share: float = 0.0) -> FleetSimulator:
        sim = FleetSimulator(broker_url, count, profile, prefix=prefix, serving="tiny:1.0.0", fetch_share=fetch_share)
        simulators.append(sim)
        sim.start()
        online = lambda: sum(d.online and d.id.startswith(prefix) for d in controller.api.devices())  # noqa: E731
        wait_for(lambda: online() == count, f"{count} simulated devices did not come online", 30, poll_s=0.2)
        return sim

    fleet = SimulatedFleet(controller, process, broker_url, simulate)
    try:
        yield fleet
    finally:
        for sim in simulators:
            sim.stop()
        fleet.controller.api.close()  # the test may have made a new one (a restarted controller)
        process.stop()
