"""What every benchmark shares: where results go, how a report is written, a free port, a poll."""

import json
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

RESULTS = Path(__file__).resolve().parent / "results"


def write_report(name: str, report: dict[str, Any], console: Console) -> Path:
    """The run's figures as results/<name>.json, next to the table printed from them."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"wrote {out}")
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition: Callable[[], Any], what: str, timeout_s: float = 600, poll_s: float = 0.05) -> Any:
    """Poll `condition` until it is truthy and return that; TimeoutError saying `what` past `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(poll_s)
    return result
