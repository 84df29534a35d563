"""Desired states: what one device (/v1/devices/{id}/desired) or many at once (/v1/desired) should run."""

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool

from slmops.http import error_responses

from ..protocol import DesiredRequest, DesiredView, FleetDesired, FleetDesiredRequest
from . import Admin, ControlOf, FleetOf, RegistryOf, RolloutsOf

router = APIRouter(tags=["desired"], responses=error_responses(400, 401, 403, 404, 409, 500))


@router.put("/v1/devices/{device_id}/desired", status_code=202)
async def set_desired(
    device_id: str, body: DesiredRequest, who: Admin, registry: RegistryOf, control: ControlOf, rollouts: RolloutsOf
) -> DesiredView:
    """What the device should run; sent to it (retained) at once or when it next connects. Refused
    (409) while a rollout under way owns the device."""
    bundle = await run_in_threadpool(registry.bundle, body.bundle, body.version)
    await run_in_threadpool(rollouts.refuse_owned, [device_id])
    return DesiredView.of(await run_in_threadpool(control.desire, [device_id], bundle, who))


@router.put("/v1/desired", status_code=202)
async def set_fleet_desired(
    body: FleetDesiredRequest,
    who: Admin,
    registry: RegistryOf,
    fleet: FleetOf,
    control: ControlOf,
    rollouts: RolloutsOf,
) -> FleetDesired:
    """One bundle for many devices (by id, or a group) at once: all set, or none when one is
    unknown; every device gets it within the same moment, so their fetches share one set of chunks."""
    bundle = await run_in_threadpool(registry.bundle, body.bundle, body.version)
    if body.devices is not None:
        devices = sorted(set(body.devices))
    else:
        assert body.group is not None  # the model takes exactly one of the two
        devices = await run_in_threadpool(fleet.group, body.group)
    await run_in_threadpool(rollouts.refuse_owned, devices)
    desired = await run_in_threadpool(control.desire, devices, bundle, who)
    return FleetDesired(bundle=desired.bundle, version=desired.version, digest=desired.digest, devices=devices)
