"""A supervised loop that raises is logged, counted and started again; one that returns ends."""

import logging
import time

import pytest

from slmops import supervision
from slmops.supervision import Supervised


def test_a_loop_that_raises_is_started_again_and_counted(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(supervision, "RESTART_MIN_S", 0.01)
    runs: list[int] = []

    def loop() -> None:
        runs.append(len(runs))
        if len(runs) < 3:
            raise RuntimeError(f"bug {len(runs)}")

    thread = Supervised("test-loop", loop)
    thread.start()
    deadline = time.monotonic() + 5
    while thread.alive and time.monotonic() < deadline:  # it ends once the loop returns
        time.sleep(0.01)
    assert runs == [0, 1, 2] and not thread.alive
    assert thread.status() == {"alive": False, "restarts": 2, "last_error": "RuntimeError: bug 2"}
    assert [r.levelno for r in caplog.records if "the test-loop thread failed" in r.getMessage()] == [logging.ERROR] * 2
