"""/v1/bundles: push (verified before it is registered), list, show, delete."""

import tempfile

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from slmops.http import error_responses

from ..protocol import BundleDetail, BundleSummary
from . import Admin, Config, Reader, RegistryOf, spool

router = APIRouter(prefix="/v1/bundles", tags=["bundles"], responses=error_responses(400, 401, 403, 404, 500))


ARCHIVE = {
    "requestBody": {
        "required": True,
        "content": {
            kind: {"schema": {"type": "string", "format": "binary"}}
            for kind in ("application/x-tar", "application/octet-stream")
        },
    }
}


@router.post(
    "",
    status_code=201,
    response_model=BundleSummary,
    responses={
        200: {"model": BundleSummary, "description": "It was registered already"},
        **error_responses(409, 413, 422),
    },
    openapi_extra=ARCHIVE,
)
async def push(request: Request, who: Admin, config: Config, registry: RegistryOf) -> Response:
    """Upload a bundle archive (the body is the .tar); 201 when new, 200 when it was there already."""
    with tempfile.TemporaryFile(dir=config.store_dir) as upload:  # on disk: bundles are large
        await spool(request, upload, config.max_upload_bytes)
        row, created = await run_in_threadpool(registry.push, upload, who)
    return JSONResponse(BundleSummary.of(row).model_dump(mode="json"), status_code=201 if created else 200)


@router.get("")
async def list_bundles(_who: Reader, registry: RegistryOf) -> list[BundleSummary]:
    return [BundleSummary.of(row) for row in await run_in_threadpool(registry.bundles)]


@router.get("/{name}/{version}")
async def show(name: str, version: str, _who: Reader, registry: RegistryOf) -> BundleDetail:
    return BundleDetail.of(await run_in_threadpool(registry.bundle, name, version))


@router.delete("/{name}/{version}", status_code=204, responses=error_responses(409))
async def delete(name: str, version: str, who: Admin, registry: RegistryOf) -> Response:
    """Refused (409) while a device is told to run it."""
    await run_in_threadpool(registry.delete, name, version, who)
    return Response(status_code=204)
