"""The `slmops` command: one typer app, one sub-app per area.

    slmops build ...       model pipeline (slmops.build.cli)   needs the `build` extra
    slmops bundle ...      create, inspect, verify, sign, keygen, unpack
    slmops agent ...       the device side (slmops.agent.cli)
    slmops controller ...  the fleet service (slmops.controller.cli)
    slmops fleet ...       fleet operations against a controller (slmops.controller.fleet_cli)

Each area's sub-app is imported only when its group is run (or listed by `--help`), and
sub-apps import heavy packages inside their commands: `--help` stays instant, the agent's
commands run without torch, and an agent never imports the build pipeline (numpy and the
block code were 14 MiB of an idle agent's RSS).
"""

import importlib
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from typer.core import TyperGroup

from slmops.errors import SlmopsError
from slmops.terminal import console, err_console, fail

AREAS = {
    "build": "slmops.build.cli",
    "agent": "slmops.agent.cli",
    "controller": "slmops.controller.cli",
    "fleet": "slmops.controller.fleet_cli",
}
"""Each area's group and the module whose `app` it is."""


class _Root(TyperGroup):
    """The `slmops` group: `bundle` lives here; the areas' groups are loaded when asked for."""

    def list_commands(self, ctx: Any) -> list[str]:
        return [*AREAS, *super().list_commands(ctx)]

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if cmd_name in AREAS:
            # Mounted as add_typer mounts it (a one-command sub-app such as `controller` stays a group).
            holder = typer.Typer()
            holder.add_typer(importlib.import_module(AREAS[cmd_name]).app, name=cmd_name)
            return typer.main.get_command(holder).get_command(ctx, cmd_name)  # type: ignore[attr-defined]
        return super().get_command(ctx, cmd_name)


app = typer.Typer(
    name="slmops",
    cls=_Root,
    help="SLMOps for edge fleets: build signed, hardware-specific model bundles and run them on devices.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
bundle_app = typer.Typer(
    help="Signed model bundles: create them from an export, inspect, verify, sign, unpack; make signing keys.",
    no_args_is_help=True,
)


TrustedKeys = Annotated[
    list[Path] | None,
    typer.Option(
        "--trusted-key",
        "-k",
        help="Public key (.pub) to trust; repeat for several. Default: every .pub in the trusted-keys folder.",
        exists=True,
        dir_okay=False,
    ),
]


@bundle_app.command("keygen")
def keygen(
    stem: Annotated[Path, typer.Argument(help="Writes STEM.key (private, owner-only) and STEM.pub.")],
) -> None:
    """Make an Ed25519 signing key pair."""
    from slmops.signing import generate_keypair, key_id, load_public_key

    try:
        private, public = generate_keypair(stem)
    except FileExistsError as e:
        fail(str(e))
    console.print(f"private key {private} (keep it secret)\npublic key  {public}  id {key_id(load_public_key(public))}")


@bundle_app.command("create")
def create(
    build_dir: Annotated[Path, typer.Argument(help="An export folder (from `slmops build export`).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Bundle folder to write.")],
    name: Annotated[str, typer.Option(help="Bundle name, e.g. smollm2-135m-instruct.")],
    version: Annotated[str, typer.Option(help="Bundle version, e.g. 1.0.0.")],
    description: Annotated[str, typer.Option(help="Free text for operators.")] = "",
    key: Annotated[Path | None, typer.Option(help="Private key to sign with.", exists=True)] = None,
    archive: Annotated[Path | None, typer.Option(help="Also write the bundle as one .tar here.")] = None,
    variant: Annotated[list[str] | None, typer.Option(help="Only these variants (default: all).")] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing bundle folder.")] = False,
) -> None:
    """Assemble a bundle from exported (and evaluated) variants; sign it with --key."""
    from slmops.build.bundle import create as create_bundle

    try:
        bundle = create_bundle(build_dir, out, name, version, description, key, archive, variant, force)
    except (SlmopsError, FileExistsError, FileNotFoundError) as e:
        fail(str(e))
    signed = f"signed by {bundle.signature.key_id}" if bundle.signature else "[yellow]unsigned[/]"
    console.print(f"[green]✓[/] bundle {out} ({len(bundle.manifest.variants)} variants, {signed})")
    if archive:
        console.print(f"[green]✓[/] archive {archive} ({archive.stat().st_size / 2**20:.1f} MiB)")


@bundle_app.command("sign")
def sign_cmd(
    bundle_dir: Annotated[Path, typer.Argument(help="Bundle folder.")],
    key: Annotated[Path, typer.Option(help="Private key (.key).", exists=True)],
) -> None:
    """Sign (or re-sign) a bundle folder's manifest."""
    from slmops.bundle import Bundle
    from slmops.signing import load_private_key

    try:
        bundle = Bundle.open(bundle_dir).sign(load_private_key(key))
    except SlmopsError as e:
        fail(str(e))
    assert bundle.signature is not None
    console.print(f"[green]✓[/] signed {bundle_dir} with key {bundle.signature.key_id}")


@bundle_app.command("verify")
def verify_cmd(
    path: Annotated[Path, typer.Argument(help="Bundle folder or .tar archive.", exists=True)],
    trusted_key: TrustedKeys = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable result.")] = False,
) -> None:
    """Check signature, file list and every digest. Exit code 1 and the reason when anything is off."""
    from slmops.bundle import verify_archive, verify_bundle
    from slmops.signing import trusted_keys

    try:
        keys = trusted_keys(trusted_key or [])
        manifest = verify_bundle(path, keys).manifest if path.is_dir() else verify_archive(path, keys)
    except SlmopsError as e:
        if as_json:
            print(json.dumps({"ok": False, "error": str(e), "kind": type(e).__name__}))
            raise typer.Exit(1) from None
        fail(f"{path} is not trustworthy: {e}")
    if as_json:
        print(json.dumps({"ok": True, "name": manifest.name, "version": manifest.version}))
    else:
        files = sum(len(v.files) for v in manifest.variants)
        console.print(f"[green]✓[/] {path}: {manifest.name} {manifest.version}, signature and {files} files verified")


@bundle_app.command("unpack")
def unpack_cmd(
    archive: Annotated[Path, typer.Argument(help="Bundle .tar archive.", exists=True, dir_okay=False)],
    dest: Annotated[Path, typer.Argument(help="New folder to unpack into.")],
    trusted_key: TrustedKeys = None,
) -> None:
    """Verify while unpacking; the folder appears only when everything checks out."""
    from slmops.bundle import verify_archive
    from slmops.signing import trusted_keys

    try:
        manifest = verify_archive(archive, trusted_keys(trusted_key or []), extract_to=dest)
    except (SlmopsError, FileExistsError) as e:
        fail(f"{archive} was not unpacked: {e}")
    console.print(f"[green]✓[/] {manifest.name} {manifest.version} unpacked and verified in {dest}")


@bundle_app.command("push")
def push_cmd(
    path: Annotated[Path, typer.Argument(help="Bundle folder or .tar archive.", exists=True)],
    controller: Annotated[
        str, typer.Option(envvar="SLMOPS_CONTROLLER_URL", help="Controller base URL.")
    ] = "http://127.0.0.1:8700",
    token: Annotated[str | None, typer.Option(envvar="SLMOPS_TOKEN", help="Admin API token.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the registry's answer as JSON.")] = False,
) -> None:
    """Upload a bundle to the controller, which verifies signature and digests before registering it."""
    import tempfile

    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    from slmops.bundle import Bundle, write_archive
    from slmops.client import ControllerClient
    from slmops.errors import ControllerError

    if token is None:
        fail("no API token: pass --token or set SLMOPS_TOKEN", code=2)
    with tempfile.TemporaryDirectory() as scratch:
        try:
            archive = path if path.is_file() else write_archive(Bundle.open(path), Path(scratch) / "bundle.tar")
        except SlmopsError as e:
            fail(str(e))
        with (
            Progress(
                *Progress.get_default_columns()[:1],
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                console=err_console,
                transient=True,
            ) as progress,
            ControllerClient(controller, token) as client,
        ):
            task = progress.add_task(f"pushing {path.name}", total=archive.stat().st_size)
            try:
                summary, new = client.push(archive, lambda sent: progress.advance(task, sent))
            except ControllerError as e:
                if as_json:
                    print(json.dumps({"ok": False, "status": e.status, "error": e.message}))
                if e.status is None:
                    fail(e.message)
                fail(f"the controller refused {path.name} ({e.status}): {e.message}")
    if as_json:
        print(json.dumps({"ok": True, "new": new, **summary.model_dump(mode="json")}))
        return
    state = "registered" if new else "already registered"
    console.print(f"[green]✓[/] {summary.name} {summary.version} {state} (digest {summary.digest[:12]})")


@bundle_app.command("inspect")
def inspect_cmd(
    path: Annotated[Path, typer.Argument(help="Bundle folder.", exists=True, file_okay=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
) -> None:
    """Show a bundle's variants, their figures and provenance (no verification: use `verify`)."""
    from slmops.bundle import Bundle

    try:
        bundle = Bundle.open(path)
    except SlmopsError as e:
        fail(str(e))
    m = bundle.manifest
    if as_json:
        print(json.dumps(m.model_dump(mode="json"), indent=2))
        return
    signed = f"signed by key {bundle.signature.key_id}" if bundle.signature else "[yellow]unsigned[/]"
    console.print(f"[bold]{m.name}[/] {m.version}  created {m.created:%Y-%m-%d %H:%M} UTC  {signed}")
    console.print(f"source {m.source.model}  sha256 {m.source.digest[:16]}…  recipe {m.recipe_digest[:16]}…")
    table = Table(title="variants")
    for column in (
        "variant",
        "provider",
        "precision",
        "size MiB",
        "min mem MiB",
        "ppl",
        "vs float",
        "tok/s",
        "TTFT ms",
        "peak RSS MiB",
    ):
        table.add_column(column, justify="left" if column in ("variant", "provider", "precision") else "right")
    for v in m.variants:
        figures = v.evaluation
        table.add_row(
            v.id,
            v.execution_provider,
            v.precision,
            f"{v.size_bytes / 2**20:.1f}",
            f"{v.min_memory_bytes / 2**20:.0f}",
            f"{figures.perplexity:.2f}" if figures and figures.perplexity else "–",
            f"{figures.perplexity_increase:+.2%}" if figures and figures.perplexity_increase is not None else "–",
            f"{figures.decode_tokens_per_s:.1f}" if figures and figures.decode_tokens_per_s else "–",
            f"{figures.time_to_first_token_ms:.1f}" if figures and figures.time_to_first_token_ms is not None else "–",
            f"{figures.peak_rss_bytes / 2**20:.0f}" if figures else "–",
        )
    console.print(table)


app.add_typer(bundle_app, name="bundle")


def main() -> None:
    try:
        app()
    except SlmopsError as e:  # a deliberate error that a command did not catch: print it, no traceback
        err_console.print(f"[bold red]error:[/] {e}", highlight=False)
        sys.exit(1)
