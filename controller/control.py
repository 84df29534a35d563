"""What an operator's change to the fleet does beyond the database: the embedded broker's ACL
follows it, and the devices are told. The REST API and (later) rollouts act through this."""

from collections.abc import Sequence

from slmops.errors import Unavailable
from slmops.messages import CommandName, CommandReply, DesiredState

from .audit import Actor
from .bridge import MqttBridge
from .db import BundleRow
from .embedded_broker import EmbeddedBroker
from .fleet import Fleet


class FleetControl:
    def __init__(self, fleet: Fleet, bridge: MqttBridge | None, broker: EmbeddedBroker | None) -> None:
        self.fleet, self.bridge, self.broker = fleet, bridge, broker

    def desire(self, device_ids: Sequence[str], bundle: BundleRow, actor: Actor) -> DesiredState:
        """Store the desired state of these devices (all or none), let the embedded broker's ACL give
        them the bundle's chunks, and publish it to them (retained: offline ones get it later)."""
        desired, fetching = self.fleet.set_desired(device_ids, bundle, actor)
        if self.broker is not None:
            self.broker.reload()
        if self.bridge is not None:
            self.bridge.publish_desired(desired, device_ids, fetching)
        return desired

    def command(self, device_id: str, command: CommandName, timeout_s: float, actor: Actor) -> CommandReply:
        """Audit the command, send it, and wait for the device's reply (Unanswered after `timeout_s`)."""
        self.fleet.device(device_id)  # NotFound for an unknown device
        if self.bridge is None or not self.bridge.connected:
            raise Unavailable("the MQTT link is not connected: commands cannot reach devices")
        self.fleet.record_command(device_id, command, actor)
        return self.bridge.command(device_id, command, timeout_s)
