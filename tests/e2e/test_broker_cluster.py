"""A rollout over a real broker cluster: two RabbitMQ nodes (Debian's rabbitmq-server with its MQTT plugin,
MQTT 3.1.1) started by the test, the controller and the simulated devices spread over both, and the
controller's node killed mid-rollout.

RabbitMQ keeps retained messages on the node they were published to, and it has no shared subscriptions:
the controller runs alone (shared_subscriptions = false), and a device that comes back on the other node
finds no retained desired state there: it is told again when it announces itself."""

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from controller_under_test import Controller, ControllerProcess
from support import RabbitMqCluster, synthetic_bundle, wait_for

from slmops.controller.protocol import RolloutRequest
from slmops.controller.simulator import DeviceClass, FleetSimulator, Profile


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RabbitMqCluster]:
    cluster = RabbitMqCluster(tmp_path / "rabbitmq", nodes=2)
    try:
        yield cluster
    finally:
        cluster.stop()


def test_a_rollout_survives_the_death_of_the_controllers_broker_node(
    cluster: RabbitMqCluster, signing_key, tmp_path: Path
) -> None:
    """Devices of a small class, offline, are told 2.0.0 by hand: retained on node 0 only. A 3-wave rollout
    to the large class runs; node 0 (the controller's, and half the devices') is killed in wave 2. The
    controller and those devices move to node 1, the rollout completes with each wave started once, and the
    small class, back on node 1 where no retained copy is, is told again and runs 2.0.0."""
    from slmops.bundle import write_archive

    node_0, node_1 = cluster.mqtt_urls
    process = ControllerProcess(
        tmp_path / "controller", "--broker-url", f"{node_0},{node_1}", "-k", str(signing_key[1]),
        rollout_tick_s="0.3", broker_protocol="3.1.1", shared_subscriptions="false",
    ).start()  # fmt: skip
    controller = Controller(process.url, process.env["SLMOPS_TOKEN"])
    classes = [DeviceClass(name="big", share=4), DeviceClass(name="small", memory="2GiB")]
    profile = Profile(classes=classes, download_s=2, activate_s=0.3)
    sim = FleetSimulator(f"{node_0},{node_1}", 24, profile, serving="tiny:1.0.0")
    try:
        for version in ("1.0.0", "2.0.0"):
            bundle = synthetic_bundle(tmp_path / version, signing_key[0], version=version, variants=("cpu-int4",))
            controller.api.push(write_archive(bundle, tmp_path / f"{version}.tar"))
        sim.start()
        wait_for(lambda: sum(d.online for d in controller.api.devices()) == 24, "the devices did not come online", 30)
        nodes = sim.call(lambda: {d.id: d.node for d in sim.devices.values()})
        assert Counter(nodes.values()) == {0: 12, 1: 12}, "the simulator spreads its devices over the nodes"

        small = sorted(d.id for d in sim.devices.values() if d.hw.name == "small")
        assert small
        sim.set_online(small, False)
        wait_for(lambda: not any(controller.device(d)["online"] for d in small), "the goodbyes were not recorded")
        controller.desire_at_once(small, "2.0.0")  # retained on node 0, the controller's

        request = RolloutRequest(bundle="tiny", version="2.0.0", target="min_memory=4GiB", waves="3,50%,100%",
                                 max_failure="0%", min_reported=2, soak_s=1)  # fmt: skip
        created = controller.api.create_rollout(request)
        assert len(created.devices) == 24 - len(small)
        wait_for(lambda: controller.api.rollout(created.id).wave >= 2, "wave 2 did not start", 60, poll_s=0.1)
        cluster.kill(0)
        on_node_1 = lambda: (h := controller.api.health()).mqtt_broker == node_1[7:] and h.mqtt == "connected"  # noqa: E731
        wait_for(on_node_1, "the controller did not move to node 1", 30)
        sim.set_online(small, True)

        done = wait_for(lambda: (r := controller.api.rollout(created.id)).status != "active" and r, "no end", 120)
        assert done.status == "completed", done.reason
        assert {d.state for d in done.devices} == {"passed"}
        assert sorted(e.detail["wave"] for e in controller.api.audit(10_000) if e.action == "rollout.wave") == [1, 2, 3]
        wait_for(lambda: sim.stats()["serving"] == {"tiny:2.0.0": 24}, "the small devices were not told again", 60)
        for device_id in small:
            assert controller.device(device_id)["reported"]["status"] == "healthy"
        assert set(sim.call(lambda: [d.node for d in sim.devices.values() if d.connected])) == {1}
        for device_id in sim.devices:
            seqs = controller.telemetry_seqs(device_id)
            assert seqs == list(range(1, len(seqs) + 1)), f"{device_id}: telemetry lost or doubled across the failover"
    finally:
        sim.stop()
        controller.api.close()
        process.stop()
