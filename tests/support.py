"""Helpers every test folder uses: a free loopback port, and polling with a deadline.

Importable as `support` from any test (tests/conftest.py puts this folder on sys.path).
"""

import socket
import time
from collections.abc import Callable
from typing import Any


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition: Callable[[], Any], what: str, timeout_s: float = 10, poll_s: float = 0.05) -> Any:
    """Poll `condition` until it is truthy and return that; past `timeout_s`, fail saying `what`."""
    deadline = time.monotonic() + timeout_s
    while not (result := condition()):
        assert time.monotonic() < deadline, what
        time.sleep(poll_s)
    return result
