"""The dashboard's pages under /ui: server-rendered (Jinja2) from the same registry, fleet, rollouts and
builds the REST API serves, so any replica renders any page from the database. Live parts are htmx
partials the page polls (`…/live`); charts read `…/telemetry.json` and draw with uPlot. Readers see;
admins act, through forms that carry the session's CSRF token and go through the same calls (and audit
rows) as the API. Lists paginate: no page grows with the fleet."""

import math
import secrets
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from importlib import resources
from typing import Annotated, Any, TypeVar
from urllib.parse import parse_qs, urlencode

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from slmops.errors import HttpError

from ..fleet import DeviceFilter, Fleet, drift_detail, serving_label
from ..protocol import BuildJobView, RolloutDeviceView, RolloutView
from ..rollouts import ACTIONS
from . import session
from .session import Viewer

T = TypeVar("T")
PAGE_SIZE = 50
FAILED_SHOWN = 50
GATE_POINTS = 300
"""Devices charted against each gate's bound: those that broke it first, then the newest wave's."""
LOG_TAIL_BYTES = 8000
BUILD_PLOTS = {"training.png": "Training and validation loss per epoch", "scores.png": "Task scores per variant"}
ROLLOUT_ACTIONS = {
    "pause": "Pause: no further wave is told until resumed.",
    "resume": "Resume: the next wave is told when this one's soak passes.",
    "promote": "Promote: the current wave's healthy devices pass without the rest of their soak.",
    "abort": "Abort: the rollout stops where it is; no device is switched back.",
    "rollback": "Roll back: every device this rollout switched is told its previous bundle.",
}
DEVICE_COMMANDS = {
    "probe": "Probe: the device reports what it serves now.",
    "reload": "Reload: the device reloads its active slot.",
    "rollback": "Roll back: the device goes back to its previous slot.",
}

router = APIRouter(prefix="/ui", include_in_schema=False)
templates = Jinja2Templates(directory=str(resources.files("slmops.controller.dashboard") / "templates"))


def iso(at: datetime | None) -> str:
    """A time as ISO 8601 in UTC: the page shows it in the viewer's zone (static/app.js)."""
    if at is None:
        return ""
    return (at if at.tzinfo else at.replace(tzinfo=UTC)).astimezone(UTC).isoformat(timespec="seconds")


templates.env.filters["iso"] = iso
templates.env.filters["serving"] = serving_label
templates.env.filters["mib"] = lambda n: f"{n / 2**20:,.1f} MiB" if n is not None else "–"


# --- signing in -----------------------------------------------------------------------------------


class SignInFirst(Exception):
    """A page asked for without a session: `install` answers it with a redirect to the sign-in page."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.path = path


def _viewer(request: Request) -> Viewer | None:
    return session.viewer(request.app.state.tokens, request.cookies.get(session.COOKIE))


def _page_viewer(request: Request) -> Viewer:
    """Who asks for a page; without a session, the browser is sent to sign in (and back)."""
    who = _viewer(request)
    if who is None:
        raise SignInFirst(request.url.path)
    return who


def _signed_in(request: Request) -> Viewer:
    """Who asks for a partial, a chart's figures or a form's POST; HttpError 401 without a session."""
    who = _viewer(request)
    if who is None:
        raise HttpError(401, "sign in to the dashboard first", "authentication_error")
    return who


PageViewer = Annotated[Viewer, Depends(_page_viewer)]
Signed = Annotated[Viewer, Depends(_signed_in)]


def to_signin(_request: Request, missing: Exception) -> Response:
    assert isinstance(missing, SignInFirst)
    return RedirectResponse(f"/ui/signin?{urlencode({'next': missing.path})}", status_code=303)


async def _posted(request: Request) -> dict[str, str]:
    """A POSTed urlencoded form, each field's first value."""
    body = (await request.body()).decode("utf-8", errors="replace")
    return {k: v[0] for k, v in parse_qs(body, keep_blank_values=True).items()}


async def _form(request: Request, who: Viewer, admin: bool = True) -> dict[str, str]:
    """A POSTed form, after the CSRF check; admins only unless `admin` is False."""
    form = await _posted(request)
    given = form.get(session.CSRF_FIELD) or request.headers.get(session.CSRF_HEADER, "")
    if not secrets.compare_digest(given.encode(), who.csrf.encode()):
        raise HttpError(403, "the form's CSRF token is missing or wrong: reload the page", "permission_error")
    if admin and not who.admin:
        raise HttpError(403, f"{who.actor.name} is a reader; this needs an admin", "permission_error")
    return form


def _render(request: Request, template: str, who: Viewer | None, **context: Any) -> HTMLResponse:
    return templates.TemplateResponse(request, template, {"who": who, "path": request.url.path, **context})


@router.get("", response_class=HTMLResponse)
async def home(request: Request) -> Response:
    return RedirectResponse("/ui/fleet", status_code=303)


@router.get("/signin", response_class=HTMLResponse)
async def signin_page(request: Request, next: str = "/ui/fleet", error: str = "") -> Response:
    return _render(request, "signin.html", None, next=_local(next), error=error)


@router.post("/signin")
async def signin(request: Request) -> Response:
    form = await _posted(request)
    signed = session.sign_in(request.app.state.tokens, form.get("token", "").strip())
    target = _local(form.get("next", "/ui/fleet"))
    if signed is None:
        query = urlencode({"next": target, "error": "That token is not one of this controller's API tokens."})
        return RedirectResponse(f"/ui/signin?{query}", status_code=303)
    cookie, _who = signed
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        session.COOKIE, cookie, max_age=session.LIFETIME_S, httponly=True, samesite="strict",
        secure=request.url.scheme == "https", path="/ui",
    )  # fmt: skip
    return response


@router.post("/signout")
async def signout(request: Request, who: Signed) -> Response:
    await _form(request, who, admin=False)
    response = RedirectResponse("/ui/signin", status_code=303)
    response.delete_cookie(session.COOKIE, path="/ui")
    return response


def _local(target: str) -> str:
    """Only a path of this dashboard: a sign-in link cannot send the browser elsewhere."""
    return target if target.startswith("/ui/") and not target.startswith("//") else "/ui/fleet"


# --- fleet ----------------------------------------------------------------------------------------


def _fleet_view(fleet: Fleet, query: dict[str, str], whole: bool) -> dict[str, Any]:
    """One page of the devices the filters choose and how many are online; for the `whole` page also the
    counts the filters choose among (all from the database: nothing here grows with the fleet)."""
    chosen = DeviceFilter(
        status=query.get("status", ""), hardware_class=query.get("class", ""), group=query.get("group", ""),
        tag=query.get("tag", ""), text=query.get("q", "").strip(),
    )  # fmt: skip
    rows, matching, page, pages = _page_of(lambda limit, offset: fleet.listing(chosen, limit, offset), query)
    filters = {k: v for k, v in query.items() if k != "page"}
    view = {"devices": [{"row": d, "drift": drift_detail(d)} for d in rows],
            "matching": matching, "page": page, "pages": pages, "query": query,
            "page_link": "/ui/fleet?" + urlencode({**filters, "page": ""})}  # fmt: skip
    if not whole:  # the table's refresh
        online, total = fleet.online()
        return {**view, "online": online, "total": total}
    overview = fleet.overview()
    return {**view, "online": overview.online, "total": overview.total, "classes": overview.classes,
            "groups": overview.groups, "serving": overview.serving}  # fmt: skip


def _page_of(
    listing: Callable[[int, int], tuple[list[T], int]], query: Mapping[str, str]
) -> tuple[list[T], int, int, int]:
    """The page of a listing (limit, offset → rows, how many in all) that `query` asks for: its rows, how
    many in all, its number and how many pages. A page past the end (the list shrank since the link was
    made) gives the last one."""
    page = max(1, _int(query.get("page"), 1))
    rows, total = listing(PAGE_SIZE, (page - 1) * PAGE_SIZE)
    pages = max(1, math.ceil(total / PAGE_SIZE))
    if page > pages:
        page = pages
        rows, total = listing(PAGE_SIZE, (page - 1) * PAGE_SIZE)
    return rows, total, page, pages


def _int(text: str | None, default: int) -> int:
    try:
        return int(text) if text else default
    except ValueError:
        return default


@router.get("/fleet", response_class=HTMLResponse)
async def fleet(request: Request, who: PageViewer) -> Response:
    view = await run_in_threadpool(_fleet_view, request.app.state.fleet, dict(request.query_params), True)
    return _render(request, "fleet.html", who, **view)


@router.get("/fleet/live", response_class=HTMLResponse)
async def fleet_live(request: Request, who: Signed) -> Response:
    view = await run_in_threadpool(_fleet_view, request.app.state.fleet, dict(request.query_params), False)
    return _render(request, "_fleet_table.html", who, **view)


@router.get("/devices/{device_id}", response_class=HTMLResponse)
async def device(request: Request, device_id: str, who: PageViewer) -> Response:
    row = await run_in_threadpool(request.app.state.fleet.device, device_id)
    audit = await run_in_threadpool(request.app.state.registry.audit_log, 20, device_id)
    return _render(request, "device.html", who, device=row, hw_class=row.hardware_class, drift=drift_detail(row),
                   audit=audit, commands=DEVICE_COMMANDS, message=request.query_params.get("message", ""))  # fmt: skip


@router.get("/devices/{device_id}/telemetry.json")
async def device_telemetry(request: Request, device_id: str, _who: Signed, limit: int = 500) -> JSONResponse:
    """The device's newest records as columns for uPlot: time (s), then one series per figure."""
    fleet_ = request.app.state.fleet
    await run_in_threadpool(fleet_.device, device_id)
    rows = await run_in_threadpool(fleet_.telemetry, device_id, max(1, min(limit, 5000)))
    series: dict[str, list[tuple[float, float]]] = {}
    for row in reversed(rows):
        for name, value in row.payload.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                series.setdefault(f"{row.kind}.{name}", []).append((row.created.timestamp(), float(value)))
    return JSONResponse(series)


@router.post("/devices/{device_id}/commands")
async def device_command(request: Request, device_id: str, who: Signed) -> Response:
    form = await _form(request, who)
    command = form.get("command", "")
    if command not in DEVICE_COMMANDS:
        raise HttpError(400, f"unknown command {command!r}: one of {', '.join(DEVICE_COMMANDS)}",
                        "invalid_request_error")  # fmt: skip
    reply = await run_in_threadpool(request.app.state.control.command, device_id, command, 10.0, who.actor)
    said = f"{command}: " + ("done" if reply.ok else f"failed: {reply.error}")
    return RedirectResponse(f"/ui/devices/{device_id}?{urlencode({'message': said})}", status_code=303)


# --- rollouts -------------------------------------------------------------------------------------


@router.get("/rollouts", response_class=HTMLResponse)
async def rollouts(request: Request, who: PageViewer) -> Response:
    return _render(request, "rollouts.html", who, **await _rollout_list(request))


@router.get("/rollouts/live", response_class=HTMLResponse)
async def rollouts_live(request: Request, who: Signed) -> Response:
    return _render(request, "_rollouts_table.html", who, **await _rollout_list(request))


async def _rollout_list(request: Request) -> dict[str, Any]:
    views, _total, page, pages = await run_in_threadpool(
        _page_of, request.app.state.rollouts.listing, request.query_params
    )
    return {"rollouts": views, "page": page, "pages": pages}


@router.get("/rollouts/{rollout_id}", response_class=HTMLResponse)
async def rollout(request: Request, rollout_id: int, who: PageViewer) -> Response:
    return _render(request, "rollout.html", who, **await _rollout_detail(request, rollout_id))


@router.get("/rollouts/{rollout_id}/live", response_class=HTMLResponse)
async def rollout_live(request: Request, rollout_id: int, who: Signed) -> Response:
    return _render(request, "_rollout_live.html", who, **await _rollout_detail(request, rollout_id))


async def _rollout_detail(request: Request, rollout_id: int) -> dict[str, Any]:
    query = request.query_params
    state = query.get("state") or None
    page = max(1, _int(query.get("page"), 1))
    view: RolloutView = await run_in_threadpool(
        request.app.state.rollouts.get, rollout_id, state, None, PAGE_SIZE, (page - 1) * PAGE_SIZE
    )
    failed = await run_in_threadpool(request.app.state.rollouts.failures, rollout_id, FAILED_SHOWN)
    judged = await run_in_threadpool(request.app.state.rollouts.judged, rollout_id, GATE_POINTS) if view.gates else []
    decisions = await run_in_threadpool(request.app.state.registry.audit_log, 50, f"rollout/{rollout_id}")
    return {
        "rollout": view, "state": state or "", "page": page, "pages": max(1, math.ceil(view.devices_total / PAGE_SIZE)),
        "failed": failed, "decisions": decisions, "gates": _gate_figures(view.gates, judged),
        "descriptions": ROLLOUT_ACTIONS,
    }  # fmt: skip


def _gate_figures(gates: list[str], devices: list[RolloutDeviceView]) -> dict[str, list[dict[str, Any]]]:
    """Each gate's judged devices, by wave: the figure each was judged on, its bound and whether it held
    (a gate without a figure for a device, unjudged, has no point of it)."""
    points: dict[str, list[dict[str, Any]]] = {gate: [] for gate in gates}
    for d in sorted(devices, key=lambda d: (d.wave, d.device_id)):
        for gate, verdict in ((d.figures or {}).get("gates") or {}).items():
            if gate in points and verdict.get("value") is not None and verdict.get("limit") is not None:
                points[gate].append({"device": d.device_id, "wave": d.wave, "value": verdict["value"],
                                     "limit": verdict["limit"], "held": bool(verdict.get("held"))})  # fmt: skip
    return {gate: found for gate, found in points.items() if found}


@router.post("/rollouts/{rollout_id}/{action}")
async def rollout_action(request: Request, rollout_id: int, action: str, who: Signed) -> Response:
    await _form(request, who)
    if action not in ACTIONS:
        raise HttpError(404, f"no rollout action {action!r}", "not_found_error")
    await run_in_threadpool(request.app.state.rollouts.act, rollout_id, action, who.actor)
    return RedirectResponse(f"/ui/rollouts/{rollout_id}", status_code=303)


# --- bundles and builds ---------------------------------------------------------------------------


@router.get("/bundles", response_class=HTMLResponse)
async def bundles(request: Request, who: PageViewer) -> Response:
    rows = await run_in_threadpool(request.app.state.registry.bundles)
    return _render(request, "bundles.html", who, bundles=rows)


@router.get("/builds", response_class=HTMLResponse)
async def builds(request: Request, who: PageViewer) -> Response:
    rows, _total, page, pages = await run_in_threadpool(_page_of, request.app.state.builds.jobs, request.query_params)
    return _render(request, "builds.html", who, jobs=[BuildJobView.of(j) for j in rows], page=page, pages=pages)


@router.get("/builds/{build_id}", response_class=HTMLResponse)
async def build(request: Request, build_id: int, who: PageViewer) -> Response:
    return _render(request, "build.html", who, **await _build_detail(request, build_id))


@router.get("/builds/{build_id}/live", response_class=HTMLResponse)
async def build_live(request: Request, build_id: int, who: Signed) -> Response:
    return _render(request, "_build_live.html", who, **await _build_detail(request, build_id))


async def _build_detail(request: Request, build_id: int) -> dict[str, Any]:
    machine = request.app.state.builds
    job = BuildJobView.of(await run_in_threadpool(machine.job, build_id))
    log = await run_in_threadpool(machine.tail, build_id, LOG_TAIL_BYTES)
    plots = [name for name in BUILD_PLOTS if (machine.work(build_id) / name).is_file()]
    return {"job": job, "log_tail": log.text, "finished": log.finished, "plots": plots,
            "plot_titles": BUILD_PLOTS}  # fmt: skip


@router.get("/builds/{build_id}/{plot}")
async def build_plot(request: Request, build_id: int, plot: str, _who: Signed) -> Response:
    """One of the build report's plots (build/report.py), from the job's work folder."""
    machine = request.app.state.builds
    await run_in_threadpool(machine.job, build_id)  # 404 for an unknown job
    path = machine.work(build_id) / plot
    if plot not in BUILD_PLOTS or not path.is_file():
        raise HttpError(404, f"build {build_id} has no plot {plot!r}", "not_found_error")
    return FileResponse(path, media_type="image/png")
