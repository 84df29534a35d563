"""The controller's Prometheus figures (GET /metrics).

The fleet's, read from the database at each scrape, so every replica shows the same state and
nothing is counted twice:

    slmops_controller_devices{online}                 devices known, online or not
    slmops_controller_rollouts{status}                rollouts by status
    slmops_controller_rollout_devices{rollout,state}  devices of each rollout under way, by state
    slmops_controller_gate_verdicts{verdict}          judged devices of rollouts under way: passed, failed, unjudged

This replica's own (its share of the MQTT traffic, its recorder, the lease):

    slmops_controller_messages_received_total{kind}   messages from devices, by kind (rate() gives message rates)
    slmops_controller_messages_dropped_total          malformed, failing, or refused by the database
    slmops_controller_recorded_total                  messages written to the database
    slmops_controller_recorder_queue                  messages waiting for the recorder
    slmops_controller_recorder_lag_seconds{quantile}  receipt to commit, over the last 20,000 messages
    slmops_controller_rollout_lease_held              1 when this replica decides rollouts
"""

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from .bridge import MqttBridge
from .db import DeviceRow, RolloutDeviceRow, RolloutRow
from .rollouts import OWNING


class FleetFigures(Collector):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily]:
        devices = GaugeMetricFamily("slmops_controller_devices", "Devices known, online or not", labels=["online"])
        rollouts = GaugeMetricFamily("slmops_controller_rollouts", "Rollouts by status", labels=["status"])
        members = GaugeMetricFamily(
            "slmops_controller_rollout_devices",
            "Devices of each rollout under way, by state",
            labels=["rollout", "state"],
        )
        verdicts = GaugeMetricFamily(
            "slmops_controller_gate_verdicts", "Judged devices of rollouts under way", labels=["verdict"]
        )
        with Session(self.engine) as session:
            for online, count in session.execute(select(DeviceRow.online, func.count()).group_by(DeviceRow.online)):
                devices.add_metric([str(bool(online)).lower()], count)
            for status, count in session.execute(select(RolloutRow.status, func.count()).group_by(RolloutRow.status)):
                rollouts.add_metric([status], count)
            under_way = (
                select(RolloutDeviceRow)
                .join(RolloutRow, RolloutRow.id == RolloutDeviceRow.rollout_id)
                .where(RolloutRow.status.in_(OWNING))
            )
            by_state: dict[tuple[str, str], int] = {}
            by_verdict = {"passed": 0, "failed": 0, "unjudged": 0}
            for member in session.scalars(under_way):
                key = (str(member.rollout_id), member.state)
                by_state[key] = by_state.get(key, 0) + 1
                if member.figures:
                    held = [v["held"] for v in member.figures["gates"].values()]
                    verdict = "failed" if False in held else "unjudged" if None in held else "passed"
                    by_verdict[verdict] += 1
        for labels, count in sorted(by_state.items()):
            members.add_metric(list(labels), count)
        for verdict, count in by_verdict.items():
            verdicts.add_metric([verdict], count)
        yield from (devices, rollouts, members, verdicts)


class ReplicaFigures(Collector):
    """This process's link and lease; `state` is the app's state (the lease appears when the app starts)."""

    def __init__(self, bridge: MqttBridge | None, state: Any) -> None:
        self.bridge, self.state = bridge, state

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        lease = getattr(self.state, "lease", None)
        held = GaugeMetricFamily("slmops_controller_rollout_lease_held", "1 when this replica decides rollouts")
        held.add_metric([], int(lease is not None and lease.epoch is not None))
        yield held
        if self.bridge is None:
            return
        received = CounterMetricFamily(
            "slmops_controller_messages_received", "MQTT messages from devices, by kind", labels=["kind"]
        )
        for kind, count in sorted(self.bridge.received.items()):
            received.add_metric([kind], count)
        dropped = CounterMetricFamily("slmops_controller_messages_dropped", "Messages dropped: malformed or failing")
        dropped.add_metric([], self.bridge.dropped)
        recorder = self.bridge.recorder
        recorded = CounterMetricFamily("slmops_controller_recorded", "Messages written to the database")
        recorded.add_metric([], recorder.recorded)
        queued = GaugeMetricFamily("slmops_controller_recorder_queue", "Messages waiting for the recorder")
        queued.add_metric([], recorder.queued)
        lag = GaugeMetricFamily(
            "slmops_controller_recorder_lag_seconds", "Receipt to commit, recent messages", labels=["quantile"]
        )
        for quantile in (0.5, 0.99):
            if (value := recorder.lag_s(quantile)) is not None:
                lag.add_metric([str(quantile)], value)
        yield from (received, dropped, recorded, queued, lag)


def registry(engine: Engine, bridge: MqttBridge | None, state: Any) -> CollectorRegistry:
    figures = CollectorRegistry()
    figures.register(FleetFigures(engine))
    figures.register(ReplicaFigures(bridge, state))
    return figures
