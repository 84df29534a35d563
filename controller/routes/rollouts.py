"""Rollouts: /v1/rollouts (create, list), /v1/rollouts/{id} (status with every device), and the
operator's pause, resume, abort, rollback and promote. The controller moves active ones on its own timer."""

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query
from fastapi.concurrency import run_in_threadpool

from slmops.http import error_responses

from ..protocol import RolloutDeviceState, RolloutRequest, RolloutView
from ..rollouts import DEVICE_PAGE
from . import COUNTED, Admin, Paged, Reader, RolloutsOf

router = APIRouter(tags=["rollouts"], responses=error_responses(400, 401, 403, 404, 409, 500))
RolloutId = Annotated[int, Path(ge=1, le=2**31 - 1, description="The rollout's id")]


@router.post("/v1/rollouts", status_code=201)
async def create(body: RolloutRequest, who: Admin, rollouts: RolloutsOf) -> RolloutView:
    """Cut the target into waves (membership fixed now) and start: the first wave is told within a tick."""
    return await run_in_threadpool(rollouts.create, body, who)


@router.get("/v1/rollouts", responses=COUNTED)
async def list_rollouts(_who: Reader, rollouts: RolloutsOf, page: Paged) -> list[RolloutView]:
    """A page of the rollouts, newest first, with their devices counted by state; X-Total-Count says how
    many there are."""
    views, total = await run_in_threadpool(rollouts.listing, page.limit, page.offset)
    page.counted(total)
    return views


@router.get("/v1/rollouts/{rollout_id}")
async def status(
    rollout_id: RolloutId,
    _who: Reader,
    rollouts: RolloutsOf,
    state: Annotated[RolloutDeviceState | None, Query(description="Only devices in this state.")] = None,
    wave: Annotated[int | None, Query(ge=1, le=1000, description="Only devices of this wave.")] = None,
    limit: Annotated[int, Query(ge=0, le=100_000, description="Devices in the page; 0: counts only.")] = DEVICE_PAGE,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> RolloutView:
    """A rollout, its devices counted by state, and a page of its devices (by wave and id): each one's
    wave, hardware class, state and what decided it. `devices_total` says how many match."""
    return await run_in_threadpool(rollouts.get, rollout_id, state, wave, limit, offset)


@router.post("/v1/rollouts/{rollout_id}/{action}")
async def act(
    rollout_id: RolloutId,
    action: Annotated[Literal["pause", "resume", "abort", "rollback", "promote"], Path()],
    who: Admin,
    rollouts: RolloutsOf,
) -> RolloutView:
    """pause (an active rollout stops telling waves), resume, abort (stops where it is, no rollback),
    rollback (every device it switched is told its previous bundle; halted), promote (the current
    wave's healthy devices pass without the rest of their soak)."""
    return await run_in_threadpool(rollouts.act, rollout_id, action, who)
