"""`slmops agent ...`: the device side, standalone: probe, choose, serve, chat, telemetry."""

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from slmops.errors import SlmopsError
from slmops.terminal import console, err_console, fail

if TYPE_CHECKING:
    from slmops.agent.choice import Candidate
    from slmops.manifest import Manifest

app = typer.Typer(
    help="The device side: pick the variant that fits this device and serve it locally "
    "(OpenAI and Ollama APIs), offline; `agent run` also joins the fleet and follows its desired state.",
    no_args_is_help=True,
)


@app.command("chat")
def chat_cmd(
    bundle_dir: Annotated[Path, typer.Argument(help="Bundle folder.", exists=True, file_okay=False)],
    prompt: Annotated[str, typer.Argument(help="The user's message.")],
    variant: Annotated[
        str | None, typer.Option(help="Variant id to run (default: the one `agent choose` picks).")
    ] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="Most tokens to generate.")] = 256,
    repetition_penalty: Annotated[
        float, typer.Option(min=0.01, max=2.0, help="> 1 discourages repeats (1 = plain greedy).")
    ] = 1.1,
    trusted_key: Annotated[
        list[Path] | None, typer.Option("--trusted-key", "-k", help="Public key to trust.", exists=True)
    ] = None,
) -> None:
    """Verify a bundle, then answer one chat message from it (greedy), streaming the reply."""
    from slmops.agent import config as agent_config
    from slmops.agent.host import load_best_variant
    from slmops.agent.serve.runtime import LoadedVariant, Sampling
    from slmops.bundle import verify_bundle
    from slmops.signing import trusted_keys

    try:
        bundle = verify_bundle(bundle_dir, trusted_keys(trusted_key or []))
        fallbacks: list[str] = []
        if variant is None:
            chosen, loaded = load_best_variant(bundle, agent_config.load(), fallbacks)
            variant = chosen.id
            for note in fallbacks:
                err_console.print(f"[yellow]fell back: {note}[/]")
        else:
            loaded = LoadedVariant.load(
                bundle.variant_dir(variant), device_class=bundle.manifest.variant(variant).device_class
            )
    except SlmopsError as e:
        fail(str(e))
    ids = loaded.encode(loaded.chat_prompt([{"role": "user", "content": prompt}]))
    sampling = Sampling(repetition_penalty=repetition_penalty)
    generation = loaded.start(ids, min(max_tokens, loaded.context_length - len(ids)), sampling)
    for piece in loaded.stream_text(iter(generation.step, None)):
        console.print(piece, end="", highlight=False, markup=False)
    console.print()
    stats = generation.stats
    err_console.print(
        f"[dim]{bundle.manifest.name} {bundle.manifest.version} {variant}: {stats.new_tokens} tokens, "
        f"first after {stats.time_to_first_token_s * 1000:.0f} ms, {stats.decode_tokens_per_s:.1f} tokens/s[/]"
    )


@app.command("probe")
def probe_cmd(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable profile.")] = False) -> None:
    """This device's hardware profile: CPU and ISA, memory, disk, OS, accelerators onnxruntime can use."""
    from rich.table import Table

    from slmops.agent.hardware import probe

    profile = probe()
    if as_json:
        print(profile.model_dump_json(indent=2))
        return
    table = Table(title="hardware profile", show_header=False)
    table.add_row(
        "CPU",
        f"{profile.cpu_model} ({profile.cpu_cores_physical or '?'} cores, "
        f"{profile.cpu_cores_logical} threads, {profile.arch})",
    )
    table.add_row("ISA", " ".join(profile.isa) or "–")
    table.add_row(
        "memory",
        f"{profile.memory_total_bytes / 2**30:.1f} GiB, {profile.memory_available_bytes / 2**30:.1f} GiB available",
    )
    table.add_row("disk free", f"{profile.disk_free_bytes / 2**30:.1f} GiB")
    table.add_row("OS", profile.os)
    for a in profile.accelerators:
        memory = f", {a.memory_bytes / 2**30:.1f} GiB" if a.memory_bytes else ""
        table.add_row(f"provider {a.provider}", f"{a.onnxruntime_name}{' ' + a.device if a.device else ''}{memory}")
    console.print(table)


ConfigFile = Annotated[
    Path | None, typer.Option("--config", "-c", help="Agent TOML file (SLMOPS_AGENT_* variables override it).")
]


@app.command("choose")
def choose_cmd(
    bundle_dir: Annotated[Path, typer.Argument(help="Bundle folder.", exists=True, file_okay=False)],
    config: ConfigFile = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable decision.")] = False,
) -> None:
    """Which variant this device would run, and why each other variant was not taken."""
    import json

    from slmops.agent import choice, hardware
    from slmops.agent import config as agent_config
    from slmops.bundle import Bundle

    try:
        settings = agent_config.load(config)
        manifest = Bundle.open(bundle_dir).manifest
    except SlmopsError as e:
        fail(str(e))
    candidates = choice.rank(manifest, hardware.probe(), settings)
    if as_json:
        decision = [
            {"variant": c.variant.id, "provider": c.variant.execution_provider, "usable": c.usable, "reason": c.reason}
            for c in candidates
        ]
        print(json.dumps(decision, indent=2))
    else:
        _print_choice(manifest, candidates)
    if not any(c.usable for c in candidates):
        raise typer.Exit(1)


def _print_choice(manifest: "Manifest", candidates: "list[Candidate]") -> None:
    from rich.table import Table

    table = Table(title=f"{manifest.name} {manifest.version} on this device")
    for column in ("variant", "provider", "precision", "min memory MiB", "decision"):
        table.add_column(column)
    for c in candidates:
        decision = f"[green]{c.reason}[/]" if c.reason == "chosen" else c.reason if c.usable else f"[red]{c.reason}[/]"
        table.add_row(
            c.variant.id,
            c.variant.execution_provider,
            c.variant.precision,
            f"{c.variant.min_memory_bytes / 2**20:.0f}",
            decision,
        )
    console.print(table)


@app.command("serve")
def serve_cmd(
    bundle_dir: Annotated[
        Path | None,
        typer.Argument(
            help="Bundle folder to serve. Without one the server starts empty (health 503) "
            "until `POST /admin/load` names a bundle.",
            exists=True,
            file_okay=False,
        ),
    ] = None,
    config: ConfigFile = None,
    host: Annotated[str | None, typer.Option(help="Listen address (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 8765).")] = None,
    api_key: Annotated[str | None, typer.Option(help="Require this bearer key.", envvar="SLMOPS_AGENT_API_KEY")] = None,
    trusted_key: Annotated[
        list[Path] | None, typer.Option("--trusted-key", "-k", help="Public key to trust.", exists=True)
    ] = None,
) -> None:
    """Serve a bundle on an OpenAI- and Ollama-compatible HTTP API (localhost by default)."""
    from slmops.agent import config as agent_config
    from slmops.agent import daemon

    try:
        settings = agent_config.load(config, host=host, port=port, api_key=api_key, trusted_keys=trusted_key)
    except SlmopsError as e:
        fail(str(e), code=2)
    try:
        daemon.run(settings, bundle_dir)
    except daemon.PortTaken as e:
        fail(str(e))


@app.command("run")
def run_cmd(config: ConfigFile = None) -> None:
    """The device daemon: serve locally and, with `broker_url` set, join the fleet (presence, birth,
    telemetry). Everything comes from the config file and SLMOPS_AGENT_* variables."""
    from slmops.agent import config as agent_config
    from slmops.agent import daemon

    try:
        settings = agent_config.load(config)
    except SlmopsError as e:
        fail(str(e), code=2)
    try:
        daemon.run(settings)
    except daemon.PortTaken as e:
        fail(str(e))


@app.command("telemetry")
def telemetry_cmd(
    config: ConfigFile = None,
    last: Annotated[int, typer.Option(help="Show this many of the newest records.")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable summary and records.")] = False,
) -> None:
    """What the telemetry queue holds, waiting to be sent to the controller."""
    import json
    from datetime import datetime

    from rich.table import Table

    from slmops.agent import config as agent_config
    from slmops.agent.telemetry import TelemetryQueue

    try:
        settings = agent_config.load(config)
    except SlmopsError as e:
        fail(str(e), code=2)
    queue = TelemetryQueue(settings.telemetry_db, settings.telemetry_max_rows, settings.telemetry_retention_s)
    summary = queue.summary()
    after = max((summary["last_seq"] or 0) - last, 0)
    records = queue.pending(limit=last, after_seq=after)
    queue.close()
    if as_json:
        print(json.dumps({"summary": summary, "records": [r.__dict__ for r in records]}, indent=2))
        return
    console.print(
        f"{summary['records']} records queued in {settings.telemetry_db} "
        f"({summary['size_bytes'] / 2**20:.2f} MiB, seq {summary['first_seq']}–{summary['last_seq']}, "
        f"{summary['dropped_total']} dropped by bounds)"
    )
    table = Table()
    for column in ("seq", "time", "kind", "payload"):
        table.add_column(column)
    for r in records:
        table.add_row(
            str(r.seq), datetime.fromtimestamp(r.created).strftime("%H:%M:%S"), r.kind, json.dumps(r.payload)[:120]
        )
    console.print(table)
