"""Stop sequences: text is held back while it may begin one, and cut at the first."""

import pytest

from slmops.agent.serve.engine import Engine
from slmops.agent.serve.serving import StopMatcher


def feed(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    matcher, out = StopMatcher(stops), []
    for piece in pieces:
        text, stopped = matcher.feed(piece)
        out.append(text)
        if stopped:
            return "".join(out), True
    return "".join(out) + matcher.flush(), False


@pytest.mark.parametrize(
    ("stops", "pieces", "expected"),
    [
        ([], ["Par", "is"], ("Paris", False)),
        (["\n"], ["Paris", "\nand"], ("Paris", True)),
        (["END"], ["Paris E", "N", "D more"], ("Paris ", True)),  # a stop split over three pieces
        (["END"], ["Paris E", "N", "o"], ("Paris ENo", False)),  # held back, then released
        (["ab", "b"], ["xab"], ("x", True)),  # the first stop in the text wins
    ],
)
def test_stop_sequences(stops: list[str], pieces: list[str], expected: tuple[str, bool]) -> None:
    assert feed(stops, pieces) == expected


def test_an_engine_does_nothing_until_started() -> None:
    engine = Engine(max_active=1, max_queued=0)
    with pytest.raises(RuntimeError, match="not running"):
        engine.submit(None)  # type: ignore[arg-type]
    engine.close()  # closing one never started is fine
