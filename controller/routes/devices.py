"""/v1/devices: the fleet as devices report it, their labels, telemetry, commands and enrolment."""

from typing import Annotated, Literal

from fastapi import APIRouter, Query
from fastapi import Path as FastApiPath
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from slmops.broker import with_credentials
from slmops.http import error_responses
from slmops.messages import DEVICE_ID_PATTERN

from ..fleet import DeviceFilter
from ..protocol import (
    CommandAnswer,
    CommandRequest,
    DeviceEnrolment,
    DeviceLabels,
    DeviceSummary,
    TelemetryEntry,
)
from . import COUNTED, Admin, Config, ControlOf, EnrolmentOf, FleetOf, Limit, Paged, Reader

router = APIRouter(tags=["devices"], responses=error_responses(400, 401, 403, 404, 500))


@router.get("/v1/devices", responses=COUNTED)
async def list_devices(
    _who: Reader,
    fleet: FleetOf,
    page: Paged,
    status: Annotated[
        Literal["online", "offline"] | None, Query(description="Only devices online, or offline.")
    ] = None,
    hardware_class: Annotated[str, Query(max_length=200, description="Only devices of this hardware class.")] = "",
    group: Annotated[str, Query(max_length=200, description="Only members of this group.")] = "",
    tag: Annotated[str, Query(max_length=400, description="Only devices with this tag (key=value).")] = "",
    q: Annotated[str, Query(max_length=200, description="Only devices whose id holds this text.")] = "",
) -> list[DeviceSummary]:
    """A page of the devices the filters choose, by id; X-Total-Count says how many they choose."""
    chosen = DeviceFilter(status=status or "", hardware_class=hardware_class, group=group, tag=tag, text=q)
    rows, total = await run_in_threadpool(fleet.listing, chosen, page.limit, page.offset)
    page.counted(total)
    return [DeviceSummary.of(row) for row in rows]


@router.get("/v1/devices/{device_id}")
async def show(device_id: str, _who: Reader, fleet: FleetOf) -> DeviceSummary:
    return DeviceSummary.of(await run_in_threadpool(fleet.device, device_id))


@router.patch("/v1/devices/{device_id}")
async def label(device_id: str, body: DeviceLabels, who: Admin, fleet: FleetOf) -> DeviceSummary:
    """Set a device's tags and groups (rollouts select devices by them)."""
    return DeviceSummary.of(await run_in_threadpool(fleet.label, device_id, who, body.tags, body.groups))


@router.get("/v1/devices/{device_id}/telemetry")
async def telemetry(device_id: str, _who: Reader, fleet: FleetOf, limit: Limit = 100) -> list[TelemetryEntry]:
    """The newest telemetry records the device sent, newest first."""
    await run_in_threadpool(fleet.device, device_id)  # 404 for an unknown device
    return [TelemetryEntry.of(row) for row in await run_in_threadpool(fleet.telemetry, device_id, limit)]


@router.post("/v1/devices/{device_id}/commands", responses=error_responses(503, 504))
async def command(device_id: str, body: CommandRequest, who: Admin, control: ControlOf) -> CommandAnswer:
    """probe, reload (the active slot) or rollback (to the previous slot); waits for the device's reply."""
    return CommandAnswer.of(await run_in_threadpool(control.command, device_id, body.command, body.timeout_s, who))


@router.post("/v1/devices/{device_id}/enrolment", status_code=201)
async def enrol(
    device_id: Annotated[str, FastApiPath(pattern=DEVICE_ID_PATTERN)],
    who: Admin,
    config: Config,
    enrolment: EnrolmentOf,
) -> DeviceEnrolment:
    """New broker credentials for a device (its MQTT user name is its id), replacing any it had.
    The password is shown here once; the controller keeps only its hash."""
    password = await run_in_threadpool(enrolment.enrol, device_id, who)
    broker_url = with_credentials(config.devices_broker_url, f"{device_id}:{password}")
    return DeviceEnrolment(device_id=device_id, broker_url=broker_url, username=device_id, password=password)


@router.delete("/v1/devices/{device_id}/enrolment", status_code=204)
async def revoke(device_id: str, who: Admin, enrolment: EnrolmentOf) -> Response:
    """The device's broker credentials are gone: the broker refuses it from now on."""
    await run_in_threadpool(enrolment.revoke, device_id, who)
    return Response(status_code=204)
