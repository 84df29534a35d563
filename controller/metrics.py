"""The controller's Prometheus figures, read from the database at each scrape (GET /metrics), so
every replica shows the same state and nothing is counted twice:

    slmops_controller_devices{online}                 devices known, online or not
    slmops_controller_rollouts{status}                rollouts by status
    slmops_controller_rollout_devices{rollout,state}  devices of each rollout under way, by state
    slmops_controller_gate_verdicts{verdict}          judged devices of rollouts under way: passed, failed, unjudged
"""

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

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


def registry(engine: Engine) -> CollectorRegistry:
    figures = CollectorRegistry()
    figures.register(FleetFigures(engine))
    return figures
