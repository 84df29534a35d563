"""The agent's own surface: /health (open to all), /metrics for Prometheus, /admin/load."""

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from slmops.errors import HttpError
from slmops.http import error_responses

from ..protocol import Health, LoadAccepted, LoadRequest
from . import Host

router = APIRouter(tags=["agent"], responses=error_responses(401, 500))


@router.get("/health", responses={503: {"model": Health, "description": "No model is served yet (or any more)"}})
async def health(request: Request, host: Host) -> Health:
    model, status = host.engine.current, host.status
    link, threads = request.app.state.link, request.app.state.threads
    health = Health(
        status="ok" if model is not None else status.state,  # type: ignore[arg-type]
        state=status.state,  # type: ignore[arg-type]
        message=status.message,
        fallbacks=status.fallbacks,
        fleet_link=None if link is None else link.status(),
        threads={thread.name: thread.status() for thread in threads},
    )
    if model is None:
        return JSONResponse(health.model_dump(mode="json"), status_code=503)  # type: ignore[return-value]
    return health.model_copy(
        update=dict(
            model=model.model_id,
            bundle=model.bundle,
            version=model.version,
            variant=model.variant_id,
            provider=model.provider,
            queue_depth=host.engine.queue_depth,
            active_requests=host.engine.active_count,
        )
    )


@router.post("/admin/load", status_code=202, responses=error_responses(400, 409))
async def load(body: LoadRequest, host: Host) -> LoadAccepted:
    """Switch to another bundle (hot swap): in-flight requests finish on the current model."""
    if not body.bundle.is_dir():
        raise HttpError(400, f"{body.bundle} is not a bundle folder on this device", "invalid_request_error")
    if host.status.state == "loading":
        raise HttpError(409, f"already {host.status.message}", "invalid_request_error", "busy")
    host.load_bundle_in_background(body.bundle)
    return LoadAccepted(bundle=str(body.bundle))


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(host: Host) -> Response:
    """Prometheus' text format."""
    host.metrics.queue_depth.set(host.engine.queue_depth)
    host.metrics.active.set(host.engine.active_count)
    return PlainTextResponse(generate_latest(host.metrics.registry), media_type=CONTENT_TYPE_LATEST)
