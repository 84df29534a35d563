"""The controller's REST API (OpenAPI docs at /docs): thin routes over the registry.

Auth: `Authorization: Bearer <token>`; readers may GET, admins may change. Every error
has one shape, `{"error": {"message", "type", "code"}}`.
"""

import logging
import secrets
import tempfile
from typing import Annotated, Any
from urllib.parse import urlsplit, urlunsplit

from fastapi import Depends, FastAPI, Query, Request
from fastapi import Path as FastApiPath
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from slmops.errors import BundleError, describe_validation
from slmops.messages import DEVICE_ID_PATTERN, DesiredState

from .audit import Actor
from .bridge import MqttBridge
from .config import ApiToken, ControllerConfig
from .db import BundleRow
from .embedded_broker import EmbeddedBroker
from .enrolment import Enrolment
from .fleet import Fleet
from .protocol import (
    AuditEntry,
    BundleDetail,
    BundleSummary,
    CommandRequest,
    DesiredRequest,
    DeviceEnrolment,
    DeviceLabels,
    DeviceSummary,
    FleetDesired,
    FleetDesiredRequest,
    TelemetryEntry,
    error_body,
)
from .registry import Registry, RegistryError

log = logging.getLogger(__name__)

Limit = Annotated[int, Query(ge=1, le=100_000, description="How many, newest first (at most 100,000).")]


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type_, code


def create_app(
    config: ControllerConfig,
    registry: Registry,
    fleet: Fleet,
    enrolment: Enrolment,
    tokens: list[ApiToken],
    bridge: MqttBridge | None = None,
    broker: EmbeddedBroker | None = None,
    lifespan: Any = None,
) -> FastAPI:
    app = FastAPI(
        title="slmops controller", description="Registry and fleet control for slmops bundles", lifespan=lifespan
    )

    def actor(request: Request) -> Actor:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")  # "Bearer <token>", nothing else
        for t in tokens:
            if scheme == "Bearer" and given and secrets.compare_digest(given.encode(), t.token.encode()):
                return Actor(t.name, t.role)
        raise ApiError(401, "missing or unknown API token (Authorization: Bearer ...)", "authentication_error")

    def admin(who: Annotated[Actor, Depends(actor)]) -> Actor:
        if who.role != "admin":
            raise ApiError(403, f"{who.name} is a reader; this needs an admin token", "permission_error")
        return who

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(error_body(e.message, e.type, e.code), status_code=e.status)

    @app.exception_handler(RegistryError)
    async def registry_error(_request: Request, e: RegistryError) -> JSONResponse:
        return JSONResponse(error_body(str(e), "registry_error", type(e).__name__), status_code=e.status)

    @app.exception_handler(BundleError)
    async def bundle_error(_request: Request, e: BundleError) -> JSONResponse:
        return JSONResponse(error_body(str(e), "invalid_bundle", type(e).__name__), status_code=422)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, e: RequestValidationError) -> JSONResponse:
        message = describe_validation(e.errors(), skip=1, root="body")
        return JSONResponse(error_body(message, "invalid_request_error"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, e: StarletteHTTPException) -> JSONResponse:
        """Starlette's own answers (no such route, a method the route does not take) in the envelope."""
        return JSONResponse(error_body(str(e.detail), "invalid_request_error"), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=e)
        return JSONResponse(error_body("internal error; the controller's log has the details", "server_error"), 500)

    async def desire(device_ids: list[str], bundle: BundleRow, who: Actor) -> DesiredState:
        """Store the desired state of these devices (all or none), let the embedded broker's ACL give
        them the bundle's chunks, and publish it to them."""
        desired, fetching = await run_in_threadpool(fleet.set_desired, device_ids, bundle, who)
        if broker is not None:
            await run_in_threadpool(broker.reload)
        if bridge is not None:
            bridge.publish_desired(desired, device_ids, fetching)
        return desired

    @app.get("/health")
    async def health() -> dict[str, Any]:
        mqtt = "off" if bridge is None else "connected" if bridge.connected else "disconnected"
        return {
            "status": "ok",
            "mqtt": mqtt,
            "mqtt_refused": (bridge.refused or None) if bridge else None,
            "dropped_messages": bridge.dropped if bridge else 0,
            "chunks_sent": bridge.chunks_sent if bridge else 0,
            "embedded_broker": None if broker is None else {"running": broker.running, "restarts": broker.restarts},
            "threads": {} if bridge is None else {thread.name: thread.status() for thread in bridge.threads},
        }

    @app.post("/v1/bundles", status_code=201, response_model=BundleSummary)
    async def push_bundle(request: Request, who: Annotated[Actor, Depends(admin)]) -> Response:
        """Upload a bundle archive (the body is the .tar); it is verified before it is registered."""
        with tempfile.TemporaryFile(dir=config.store_dir) as upload:  # on disk: bundles are large
            received = 0
            async for chunk in request.stream():
                received += len(chunk)
                if received > config.max_upload_bytes:
                    raise ApiError(413, f"the upload exceeds {config.max_upload_bytes} bytes", "invalid_request_error")
                upload.write(chunk)
            upload.seek(0)
            row, created = await run_in_threadpool(registry.push, upload, who)
        summary = BundleSummary.of(row).model_dump(mode="json")
        return JSONResponse(summary, status_code=201 if created else 200)

    @app.get("/v1/bundles", dependencies=[Depends(actor)])
    async def list_bundles() -> list[BundleSummary]:
        return [BundleSummary.of(row) for row in await run_in_threadpool(registry.bundles)]

    @app.get("/v1/bundles/{name}/{version}", dependencies=[Depends(actor)])
    async def get_bundle(name: str, version: str) -> BundleDetail:
        return BundleDetail.of(await run_in_threadpool(registry.bundle, name, version))

    @app.delete("/v1/bundles/{name}/{version}", status_code=204)
    async def delete_bundle(name: str, version: str, who: Annotated[Actor, Depends(admin)]) -> Response:
        digest = (await run_in_threadpool(registry.bundle, name, version)).digest
        wanted_by = sorted(d for d, s in (await run_in_threadpool(fleet.desired_states)).items() if s.digest == digest)
        if wanted_by:
            raise ApiError(409, f"{name} {version} is the desired state of {', '.join(wanted_by)}", "conflict")
        await run_in_threadpool(registry.delete, name, version, who)
        return Response(status_code=204)

    @app.get("/v1/devices", dependencies=[Depends(actor)])
    async def list_devices() -> list[DeviceSummary]:
        return [DeviceSummary.of(row) for row in await run_in_threadpool(fleet.devices)]

    @app.get("/v1/devices/{device_id}", dependencies=[Depends(actor)])
    async def get_device(device_id: str) -> DeviceSummary:
        return DeviceSummary.of(await run_in_threadpool(fleet.device, device_id))

    @app.get("/v1/devices/{device_id}/telemetry", dependencies=[Depends(actor)])
    async def device_telemetry(device_id: str, limit: Limit = 100) -> list[TelemetryEntry]:
        """The newest telemetry records the device sent, newest first."""
        await run_in_threadpool(fleet.device, device_id)  # 404 for an unknown device
        return [TelemetryEntry.of(row) for row in await run_in_threadpool(fleet.telemetry, device_id, limit)]

    @app.put("/v1/devices/{device_id}/desired", status_code=202)
    async def set_desired(
        device_id: str, body: DesiredRequest, who: Annotated[Actor, Depends(admin)]
    ) -> dict[str, Any]:
        """What the device should run; sent to it (retained) at once or when it next connects."""
        bundle = await run_in_threadpool(registry.bundle, body.bundle, body.version)
        desired = await desire([device_id], bundle, who)
        return desired.model_dump(mode="json", exclude={"schema_version", "sent_at"})

    @app.put("/v1/desired", status_code=202)
    async def set_fleet_desired(body: FleetDesiredRequest, who: Annotated[Actor, Depends(admin)]) -> FleetDesired:
        """One bundle for many devices (by id, or a group) at once: all set, or none when one is
        unknown; every device gets it within the same moment, so their fetches share one set of chunks."""
        bundle = await run_in_threadpool(registry.bundle, body.bundle, body.version)
        if body.devices is not None:
            devices = sorted(set(body.devices))
        else:
            assert body.group is not None  # the model takes exactly one of the two
            devices = await run_in_threadpool(fleet.group, body.group)
        desired = await desire(devices, bundle, who)
        return FleetDesired(bundle=desired.bundle, version=desired.version, digest=desired.digest, devices=devices)

    @app.post("/v1/devices/{device_id}/commands")
    async def command(device_id: str, body: CommandRequest, who: Annotated[Actor, Depends(admin)]) -> dict[str, Any]:
        """probe, reload (the active slot) or rollback (to the previous slot); waits for the device's reply."""
        await run_in_threadpool(fleet.device, device_id)  # 404 for an unknown device
        if bridge is None or not bridge.connected:
            raise ApiError(503, "the MQTT link is not connected: commands cannot reach devices", "unavailable")
        await run_in_threadpool(fleet.record_command, device_id, body.command, who)
        try:
            reply = await run_in_threadpool(bridge.command, device_id, body.command, body.timeout_s)
        except TimeoutError as e:
            raise ApiError(504, str(e), "timeout") from None
        return reply.model_dump(mode="json", exclude={"schema_version", "sent_at"})

    @app.get("/v1/store/{digest}/{path:path}", dependencies=[Depends(actor)])
    async def store_file(digest: str, path: str) -> FileResponse:
        """A file of a stored bundle (manifest.json, signature.json, variants/...); Range requests resume."""
        if (target := registry.store.file(digest, path)) is None:
            raise ApiError(404, f"no file {path!r} in stored bundle {digest[:12]}", "not_found_error")
        return FileResponse(target)

    @app.post("/v1/devices/{device_id}/enrolment", status_code=201)
    async def enrol_device(
        device_id: Annotated[str, FastApiPath(pattern=DEVICE_ID_PATTERN)], who: Annotated[Actor, Depends(admin)]
    ) -> DeviceEnrolment:
        """New broker credentials for a device (its MQTT user name is its id), replacing any it had.
        The password is shown here once; the controller keeps only its hash."""
        password = await run_in_threadpool(enrolment.enrol, device_id, who)
        parts = urlsplit(config.devices_broker_url)
        broker_url = urlunsplit(parts._replace(netloc=f"{device_id}:{password}@{parts.netloc}"))
        return DeviceEnrolment(device_id=device_id, broker_url=broker_url, username=device_id, password=password)

    @app.delete("/v1/devices/{device_id}/enrolment", status_code=204)
    async def revoke_device(device_id: str, who: Annotated[Actor, Depends(admin)]) -> Response:
        """The device's broker credentials are gone: the broker refuses it from now on."""
        await run_in_threadpool(enrolment.revoke, device_id, who)
        return Response(status_code=204)

    @app.patch("/v1/devices/{device_id}")
    async def label_device(device_id: str, body: DeviceLabels, who: Annotated[Actor, Depends(admin)]) -> DeviceSummary:
        """Set a device's tags and groups (rollouts select devices by them)."""
        return DeviceSummary.of(await run_in_threadpool(fleet.label, device_id, who, body.tags, body.groups))

    @app.get("/v1/audit", dependencies=[Depends(admin)])
    async def audit(limit: Limit = 100) -> list[AuditEntry]:
        return [AuditEntry.of(row) for row in await run_in_threadpool(registry.audit_log, limit)]

    return app
