"""/v1/builds: recipes the controller runs (controller/builds.py): submit, list, show, follow the log, cancel."""

import tempfile
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from fastapi.concurrency import run_in_threadpool

from slmops.http import error_responses

from ..builds import MAX_UPLOAD_BYTES
from ..protocol import BuildJobView, BuildLog
from . import COUNTED, Admin, BuildsOf, Config, Paged, Reader, spool
from .bundles import ARCHIVE

router = APIRouter(prefix="/v1/builds", tags=["builds"], responses=error_responses(400, 401, 403, 404, 500))
BuildId = Annotated[int, Path(ge=1, le=2**31 - 1, description="The build job's id")]


@router.post("", status_code=201, responses=error_responses(413), openapi_extra=ARCHIVE)
async def submit(request: Request, who: Admin, config: Config, builds: BuildsOf) -> BuildJobView:
    """Queue a recipe: the body is a tar with recipe.yaml at its root and the files it names (`slmops build
    submit` packs it). The recipe is checked whole before it is queued."""
    with tempfile.TemporaryFile(dir=config.data_dir) as upload:
        await spool(request, upload, MAX_UPLOAD_BYTES)
        return BuildJobView.of(await run_in_threadpool(builds.submit, upload, who))


@router.get("", responses=COUNTED)
async def list_builds(_who: Reader, builds: BuildsOf, page: Paged) -> list[BuildJobView]:
    """A page of the build jobs, newest first; X-Total-Count says how many there are."""
    jobs, total = await run_in_threadpool(builds.jobs, page.limit, page.offset)
    page.counted(total)
    return [BuildJobView.of(job) for job in jobs]


@router.get("/{build_id}")
async def show(build_id: BuildId, _who: Reader, builds: BuildsOf) -> BuildJobView:
    return BuildJobView.of(await run_in_threadpool(builds.job, build_id))


@router.get("/{build_id}/log")
async def build_log(
    build_id: BuildId,
    _who: Reader,
    builds: BuildsOf,
    offset: Annotated[int, Query(ge=0, le=2**40, description="Byte to read from (the last answer's offset).")] = 0,
) -> BuildLog:
    """The job's log from `offset`: follow it by asking again from the offset each answer gives."""
    return await run_in_threadpool(builds.log, build_id, offset)


@router.post("/{build_id}/cancel")
async def cancel(build_id: BuildId, who: Admin, builds: BuildsOf) -> BuildJobView:
    """Cancel a queued job, or kill a running one (it ends `cancelled`)."""
    return BuildJobView.of(await run_in_threadpool(builds.cancel, build_id, who))
