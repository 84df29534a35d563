"""/v1/store: the files of stored bundles, which devices fetch over HTTP (Range requests resume)."""

from fastapi import APIRouter
from fastapi.responses import FileResponse

from slmops.errors import NotFound
from slmops.http import error_responses

from . import Reader, RegistryOf

router = APIRouter(prefix="/v1/store", tags=["store"], responses=error_responses(400, 401, 404, 416, 500))


@router.get("/{digest}/{path:path}", response_class=FileResponse, responses={206: {"description": "A range"}})
async def store_file(digest: str, path: str, _who: Reader, registry: RegistryOf) -> FileResponse:
    """A file of a stored bundle (manifest.json, signature.json, variants/...); Range requests resume."""
    if (target := registry.store.file(digest, path)) is None:
        raise NotFound(f"no file {path!r} in stored bundle {digest[:12]}")
    return FileResponse(target)
