"""What every `slmops` command prints with: results on stdout, progress and errors on stderr."""

from typing import NoReturn

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int = 1) -> NoReturn:
    """One red line naming what went wrong, then exit: 1 for errors, 2 for usage, 3 for failed gates."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)
