"""Long-lived worker threads that outlive their own bugs.

    Supervised(name, loop).start() ─► a daemon thread runs loop()
        loop() returns ─► the thread ends (it was told to stop)
        loop() raises  ─► logged with its traceback, counted (`restarts`, `last_error`), and
                          loop() runs again after RESTART_MIN_S, doubling up to RESTART_MAX_S
                          while it keeps failing within a minute of its last start

Each loop already catches what one piece of its work can raise; this is the net under that,
so that no message, disk or bug can leave a daemon serving with a worker gone quietly. Both
daemons show `status()` of theirs in /health.
"""

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

RESTART_MIN_S, RESTART_MAX_S = 0.5, 30.0
STEADY_S = 60.0
"""A loop that ran this long before it failed starts again after the shortest delay."""


class Supervised:
    def __init__(self, name: str, loop: Callable[[], None]) -> None:
        self.name, self.loop = name, loop
        self.restarts = 0
        self.last_error = ""
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float) -> None:
        """Wait for the thread to end (its loop was told to stop); stops restarting it."""
        self._stopping.set()
        if self._thread.ident is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def status(self) -> dict[str, Any]:
        return {"alive": self.alive, "restarts": self.restarts, "last_error": self.last_error}

    def _run(self) -> None:
        delay = RESTART_MIN_S
        while True:
            started = time.monotonic()
            try:
                self.loop()
                return
            except Exception as e:
                self.restarts += 1
                self.last_error = f"{type(e).__name__}: {e}"[:500]
                delay = RESTART_MIN_S if time.monotonic() - started > STEADY_S else min(RESTART_MAX_S, delay * 2)
                log.exception("the %s thread failed; starting it again in %.1f s", self.name, delay)
            if self._stopping.wait(delay):
                return
