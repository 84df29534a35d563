"""`slmops fleet ...`: what the controller knows about the fleet, over its REST API."""

import json
import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer

from slmops.terminal import console, fail

if TYPE_CHECKING:
    from slmops.client import ControllerClient

T = TypeVar("T")

app = typer.Typer(
    help="Fleet operations against a running controller (its REST API): devices, their labels, desired state.",
    no_args_is_help=True,
)

ControllerUrl = Annotated[str, typer.Option(envvar="SLMOPS_CONTROLLER_URL", help="Controller base URL.")]
Token = Annotated[str | None, typer.Option(envvar="SLMOPS_TOKEN", help="API token (reader or admin).")]


def client(url: str, token: str | None) -> "ControllerClient":
    from slmops.client import ControllerClient

    if token is None:
        fail("no API token: pass --token or set SLMOPS_TOKEN", code=2)
    return ControllerClient(url, token)


def answer(call: Callable[[], T]) -> T:
    """The call's typed answer; a refusal or no answer at all ends the command with its message."""
    from slmops.errors import ControllerError

    try:
        return call()
    except ControllerError as e:
        fail(e.message if e.status is None else f"the controller answered {e.status}: {e.message}")


def _ago(timestamp: datetime) -> str:
    seconds = (datetime.now(UTC) - timestamp).total_seconds()
    return f"{seconds:.0f} s ago" if seconds < 120 else f"{seconds / 60:.0f} min ago"


@app.command("devices")
def devices_cmd(
    controller: ControllerUrl = "http://127.0.0.1:8700",
    token: Token = None,
    status: Annotated[str, typer.Option(help="Only devices online, or offline.")] = "",
    hardware_class: Annotated[str, typer.Option("--class", help="Only devices of this hardware class.")] = "",
    group: Annotated[str, typer.Option(help="Only members of this group.")] = "",
    tag: Annotated[str, typer.Option(help="Only devices with this tag (key=value).")] = "",
    id_contains: Annotated[str, typer.Option(help="Only devices whose id holds this text.")] = "",
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable list.")] = False,
) -> None:
    """Devices with their online state, what they serve and when they were last seen."""
    from rich.table import Table

    with client(controller, token) as api:
        devices = answer(
            lambda: api.devices(status=status, hardware_class=hardware_class, group=group, tag=tag, q=id_contains)
        )
    if as_json:
        print(json.dumps([d.model_dump(mode="json") for d in devices], indent=2))
        return
    table = Table(title=f"{len(devices)} device" + ("" if len(devices) == 1 else "s"))
    for column in ("device", "state", "serving", "provider", "agent", "groups", "last seen"):
        table.add_column(column)
    for d in devices:
        serving = d.serving or {}
        table.add_row(
            d.id,
            ("[green]online[/]" if d.online else "[red]offline[/]") + (" [yellow]drift[/]" if d.drift else ""),
            f"{serving['bundle']} {serving['version']} {serving['variant']}" if serving else "–",
            serving.get("provider", "–"),
            d.agent_version or "–",
            ", ".join(d.groups) or "–",
            _ago(d.last_seen),
        )
    console.print(table)


@app.command("label")
def label_cmd(
    device_id: Annotated[str, typer.Argument(help="Device id.")],
    tag: Annotated[list[str] | None, typer.Option("--tag", help="key=value; replaces the tags. Repeat.")] = None,
    group: Annotated[list[str] | None, typer.Option("--group", help="Group name; replaces the groups. Repeat.")] = None,
    controller: ControllerUrl = "http://127.0.0.1:8700",
    token: Token = None,
) -> None:
    """Set a device's tags and groups (what rollouts select on). Needs an admin token."""
    if tag is not None and any("=" not in t for t in tag):
        fail("--tag takes key=value", code=2)
    if tag is None and group is None:
        fail("nothing to change: give --tag and/or --group", code=2)
    tags = None if tag is None else dict(t.split("=", 1) for t in tag)
    with client(controller, token) as api:
        device = answer(lambda: api.label(device_id, tags, group))
    console.print(f"[green]✓[/] {device.id}: tags {device.tags}, groups {device.groups}")


@app.command("desire")
def desire_cmd(
    bundle: Annotated[str, typer.Argument(help="Bundle name, as pushed.")],
    version: Annotated[str, typer.Argument(help="Bundle version.")],
    device: Annotated[list[str] | None, typer.Option("--device", help="Device id. Repeat.")] = None,
    group: Annotated[str | None, typer.Option("--group", help="Every device in this group.")] = None,
    controller: ControllerUrl = "http://127.0.0.1:8700",
    token: Token = None,
) -> None:
    """Set the bundle these devices should run, all at once (an unknown device changes none).
    Needs an admin token; `slmops fleet devices` then shows them fetch and switch."""
    if (device is None) == (group is None):
        fail("give --device (repeatable) or --group", code=2)
    with client(controller, token) as api:
        desired = answer(lambda: api.desire_many(bundle, version, device, group))
    console.print(
        f"[green]✓[/] {desired.bundle} {desired.version} ({desired.digest[:12]}) desired on "
        f"{len(desired.devices)} device(s): {', '.join(desired.devices)}"
    )


@app.command("enrol")
def enrol_cmd(
    device_id: Annotated[str, typer.Argument(help="Device id: its MQTT user name and topics.")],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write the agent's config lines here (mode 0600).")
    ] = None,
    controller: ControllerUrl = "http://127.0.0.1:8700",
    token: Token = None,
) -> None:
    """New broker credentials for one device (replacing any it had). Needs an admin token.
    The password is shown once: the controller keeps only its hash."""
    with client(controller, token) as api:
        enrolled = answer(lambda: api.enrol(device_id))
    lines = (
        f"# slmops agent enrolment of {enrolled.device_id}: its own broker credentials; keep this file secret\n"
        f'device_id = "{enrolled.device_id}"\nbroker_url = "{enrolled.broker_url}"\n'
    )
    if out is None:
        print(lines, end="")
        return
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(lines)
    console.print(f"[green]✓[/] {enrolled.device_id} enrolled: `slmops agent run --config {out}`")


@app.command("revoke")
def revoke_cmd(
    device_id: Annotated[str, typer.Argument(help="Device id.")],
    controller: ControllerUrl = "http://127.0.0.1:8700",
    token: Token = None,
) -> None:
    """Remove a device's broker credentials: the broker refuses it from now on. Needs an admin token."""
    with client(controller, token) as api:
        answer(lambda: api.revoke(device_id))
    console.print(f"[green]✓[/] {device_id}'s credentials are revoked")


rollout_app = typer.Typer(
    help="Roll a bundle out in waves, each gated on its devices' own reports; halted and rolled back "
    "when too many fail.",
    no_args_is_help=True,
)
app.add_typer(rollout_app, name="rollout")


@rollout_app.command("create")
def rollout_create_cmd(
    bundle: Annotated[str, typer.Argument(help="NAME:VERSION of a pushed bundle.")],
    target: Annotated[
        str, typer.Option(help="Every term must hold: group=NAME, provider=NAME, tag:KEY=VALUE, min_memory=2GiB.")
    ],
    waves: Annotated[str, typer.Option(help="A canary count, then cumulative shares ending with 100%.")] = (
        "5,10%,50%,100%"
    ),
    max_failure: Annotated[str, typer.Option(help="Failed + timed out share of those that answered.")] = "5%",
    min_reported: Annotated[int, typer.Option(min=1, help="Healthy devices a wave needs to pass.")] = 5,
    soak: Annotated[float, typer.Option(min=0, help="Seconds a device stays healthy to pass.")] = 120,
    device_timeout: Annotated[float, typer.Option(min=1, help="Seconds a device has to a result.")] = 1200,
    gate: Annotated[
        list[str] | None,
        typer.Option(
            "--gate",
            help="A bound on what each device measures while it soaks; repeat. tokens_per_s>=0.8x (of its own "
            "figure before the switch), ttft_ms_p95<=800, error_rate<=1%.",
        ),
    ] = None,
    supersede: Annotated[
        bool, typer.Option("--supersede", help="Take devices another rollout under way owns (it stops).")
    ] = False,
    controller: ControllerUrl = "http://127.0.0.1:8700",
    token: Token = None,
) -> None:
    """Start a rollout (needs an admin token): the target's devices are cut into waves now, and the
    controller tells one wave after another as the last one passes."""
    from slmops.controller.protocol import RolloutRequest

    name, _, version = bundle.partition(":")
    if not name or not version:
        fail(f"{bundle!r} is not NAME:VERSION", code=2)
    request = RolloutRequest(
        bundle=name,
        version=version,
        target=target,
        waves=waves,
        max_failure=max_failure,
        min_reported=min_reported,
        soak_s=soak,
        device_timeout_s=device_timeout,
        gates=gate or [],
        supersede=supersede,
    )
    with client(controller, token) as api:
        rollout = answer(lambda: api.create_rollout(request))
    console.print(
        f"[green]✓[/] rollout {rollout.id}: {rollout.bundle} {rollout.version} to "
        f"{sum(rollout.states.values())} device(s) in {rollout.wave_count} wave(s)"
    )


@rollout_app.command("list")
def rollout_list_cmd(
    controller: ControllerUrl = "http://127.0.0.1:8700",
    token: Token = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable list.")] = False,
) -> None:
    """Every rollout, newest first, with its devices counted by state."""
    from rich.table import Table

    with client(controller, token) as api:
        rollouts = answer(api.rollouts)
    if as_json:
        print(json.dumps([r.model_dump(mode="json") for r in rollouts], indent=2))
        return
    table = Table("id", "bundle", "status", "wave", "devices by state", "reason")
    for r in rollouts:
        by_state = ", ".join(f"{state} {n}" for state, n in sorted(r.states.items()))
        table.add_row(str(r.id), f"{r.bundle} {r.version}", r.status, f"{r.wave}/{r.wave_count}", by_state, r.reason)
    console.print(table)


@rollout_app.command("status")
def rollout_status_cmd(
    rollout_id: Annotated[int, typer.Argument(help="Rollout id.")],
    controller: ControllerUrl = "http://127.0.0.1:8700",
    token: Token = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable.")] = False,
    state: Annotated[str | None, typer.Option(help="Only devices in this state (failed, timed_out, ...).")] = None,
    wave: Annotated[int | None, typer.Option(min=1, help="Only devices of this wave.")] = None,
    limit: Annotated[int, typer.Option(min=0, max=100_000, help="Devices shown; 0: counts only.")] = 1000,
    offset: Annotated[int, typer.Option(min=0, help="Devices skipped (the next page).")] = 0,
) -> None:
    """A rollout, its devices counted by state, and each device (a page of them): its wave, hardware
    class, state and what decided it."""
    from rich.table import Table

    with client(controller, token) as api:
        rollout = answer(lambda: api.rollout(rollout_id, state, wave, limit, offset))
    if as_json:
        print(rollout.model_dump_json(indent=2))
        return
    by_state = ", ".join(f"{name} {n}" for name, n in sorted(rollout.states.items()))
    console.print(
        f"rollout {rollout.id}: {rollout.bundle} {rollout.version} · {rollout.status} · wave "
        f"{rollout.wave}/{rollout.wave_count} · target {rollout.target}\n{by_state}"
        + (f"\n{rollout.reason}" if rollout.reason else "")
    )
    if not limit:
        return
    table = Table("wave", "device", "hardware class", "state", "since", "detail")
    for d in rollout.devices:
        table.add_row(str(d.wave), d.device_id, d.hardware_class, d.state, _ago(d.state_at), d.detail)
    console.print(table)
    if offset + len(rollout.devices) < rollout.devices_total:
        console.print(
            f"devices {offset + 1}-{offset + len(rollout.devices)} of {rollout.devices_total}: "
            f"--offset {offset + len(rollout.devices)} for more"
        )


def _rollout_action(action: str, done: str) -> None:
    @rollout_app.command(action)
    def command(
        rollout_id: Annotated[int, typer.Argument(help="Rollout id.")],
        controller: ControllerUrl = "http://127.0.0.1:8700",
        token: Token = None,
    ) -> None:
        with client(controller, token) as api:
            rollout = answer(lambda: api.rollout_action(rollout_id, action))
        console.print(f"[green]✓[/] rollout {rollout.id} {done}: {rollout.status}")

    command.__doc__ = f"{action.capitalize()} a rollout ({done}). Needs an admin token."


_rollout_action("pause", "paused: no further wave is told until it resumes")
_rollout_action("resume", "resumed")
_rollout_action("abort", "aborted where it is, without rollback")
_rollout_action("rollback", "rolled back: every device it switched is told its previous bundle")
_rollout_action("promote", "promoted: the current wave's healthy devices pass without the rest of their soak")


@app.command("simulate")
def simulate_cmd(
    devices: Annotated[int, typer.Option("--devices", "-n", min=1, max=100_000, help="Simulated devices.")] = 100,
    broker: Annotated[
        str,
        typer.Option(
            help="The fleet's broker: mqtt://HOST:PORT (with credentials: mqtt://USER:PASS@HOST:PORT); a cluster's "
            "nodes separated by commas, devices spread over them."
        ),
    ] = "mqtt://127.0.0.1:1883",
    profile: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, help="TOML: hardware classes, per-bundle failure and speed, churn."),
    ] = None,
    serving: Annotated[str | None, typer.Option(help="NAME:VERSION every device runs at the start.")] = None,
    fetch: Annotated[
        float, typer.Option(min=0, max=1, help="Share of devices that download a desired bundle's chunks for real.")
    ] = 0.0,
    prefix: Annotated[str, typer.Option(help="Device ids are PREFIX-00000, PREFIX-00001, ...")] = "sim",
    seed: Annotated[int, typer.Option(help="Same seed, same fleet: classes, failures, figures.")] = 0,
    duration: Annotated[float | None, typer.Option(min=1, help="Seconds to run; default: until Ctrl-C.")] = None,
) -> None:
    """N simulated agents in one process, speaking the real protocol to the broker: birth, presence,
    telemetry with acks, desired state to healthy or failed, rollbacks. For rollouts and load tests."""
    import time

    from rich.live import Live
    from rich.table import Table

    from slmops.errors import ConfigError

    from .simulator import FleetSimulator, Profile

    try:
        fleet = FleetSimulator(
            broker, devices, Profile.load(profile) if profile else None, prefix=prefix, serving=serving,
            fetch_share=fetch, seed=seed,
        )  # fmt: skip
    except (ConfigError, ValueError) as e:
        fail(str(e), code=2)
    fleet.start(duration)

    def table() -> Table:
        brokers = ", ".join(map(str, fleet.addresses))
        view = Table(title=f"{devices} simulated devices on {brokers}")
        view.add_column("")
        view.add_column("count", justify="right")
        for key, value in sorted(fleet.stats().items()):
            view.add_row(key, str(value))
        return view

    try:
        with Live(table(), console=console, refresh_per_second=1) as live:
            while fleet.running:
                time.sleep(1.0)
                live.update(table())
    except KeyboardInterrupt:
        pass
    finally:
        fleet.stop()
