"""`slmops agent ...`: the device side. For now: chat with a verified bundle, in the terminal."""

from pathlib import Path
from typing import Annotated

import typer

from slmops.errors import SlmopsError
from slmops.terminal import console, err_console, fail

app = typer.Typer(
    help="The device side: run a bundle's variant locally (the daemon and its server arrive in later issues).",
    no_args_is_help=True,
)


@app.command("chat")
def chat_cmd(
    bundle_dir: Annotated[Path, typer.Argument(help="Bundle folder.", exists=True, file_okay=False)],
    prompt: Annotated[str, typer.Argument(help="The user's message.")],
    variant: Annotated[str, typer.Option(help="Variant id to run.")] = "cpu-int4",
    max_tokens: Annotated[int, typer.Option(min=1, help="Most tokens to generate.")] = 256,
    trusted_key: Annotated[
        list[Path] | None, typer.Option("--trusted-key", "-k", help="Public key to trust.", exists=True)
    ] = None,
) -> None:
    """Verify a bundle, then answer one chat message from it, streaming the reply."""
    from slmops.agent.runtime import GenerationStats, LoadedVariant
    from slmops.bundle import verify_bundle
    from slmops.signing import trusted_keys

    try:
        bundle = verify_bundle(bundle_dir, trusted_keys(trusted_key or []))
        loaded = LoadedVariant.load(bundle.variant_dir(variant))
    except (SlmopsError, KeyError) as e:
        fail(str(e))
    ids = loaded.encode(loaded.chat_prompt([{"role": "user", "content": prompt}]))
    stats = GenerationStats()
    for piece in loaded.stream_text(loaded.generate(ids, min(max_tokens, loaded.context_length - len(ids)), stats)):
        console.print(piece, end="", highlight=False, markup=False)
    console.print()
    err_console.print(
        f"[dim]{bundle.manifest.name} {bundle.manifest.version} {variant}: {stats.new_tokens} tokens, "
        f"first after {stats.time_to_first_token_s * 1000:.0f} ms, {stats.decode_tokens_per_s:.1f} tokens/s[/]"
    )
