"""The controller's own surface: /health, /metrics (Prometheus) and the audit log."""

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from slmops.http import error_responses

from ..protocol import AuditEntry, BrokerHealth, ControllerHealth, LeaseHealth
from . import Admin, Limit, Reader, RegistryOf

router = APIRouter(tags=["controller"], responses=error_responses(400, 401, 403, 404, 500))


@router.get("/health")
async def health(request: Request) -> ControllerHealth:
    bridge, broker = request.app.state.bridge, request.app.state.broker
    lease = getattr(request.app.state, "lease", None)
    threads = [] if bridge is None else list(bridge.threads)
    if (timer := getattr(request.app.state, "rollout_timer", None)) is not None:
        threads.append(timer.thread)
    if (runner := getattr(request.app.state, "build_runner", None)) is not None:
        threads.append(runner.thread)
    return ControllerHealth(
        mqtt="off" if bridge is None else "connected" if bridge.connected else "disconnected",
        mqtt_broker=str(bridge.client.address) if bridge else None,
        mqtt_refused=(bridge.client.refused or None) if bridge else None,
        dropped_messages=bridge.dropped if bridge else 0,
        chunks_sent=bridge.chunks_sent if bridge else 0,
        embedded_broker=None if broker is None else BrokerHealth(running=broker.running, restarts=broker.restarts),
        rollout_lease=None
        if lease is None
        else LeaseHealth(replica=lease.holder, held=lease.epoch is not None, epoch=lease.epoch),
        threads={thread.name: thread.status() for thread in threads},
    )


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request, _who: Reader) -> PlainTextResponse:
    """Devices by presence, rollouts by status, each rollout's devices by state, gate verdicts
    (controller/metrics.py), read from the database now."""
    text = await run_in_threadpool(generate_latest, request.app.state.metrics)
    return PlainTextResponse(text, media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/audit")
async def audit(_who: Admin, registry: RegistryOf, limit: Limit = 100) -> list[AuditEntry]:
    return [AuditEntry.of(row) for row in await run_in_threadpool(registry.audit_log, limit)]
