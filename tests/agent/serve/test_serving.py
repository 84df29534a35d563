"""The engine's hand-over of text (every token, or one piece per stream interval), and stop
sequences: text is held back while it may begin one, and cut at the first."""

import asyncio
from pathlib import Path

import pytest

from slmops.agent.serve.engine import Engine, Job, ServedModel
from slmops.agent.serve.runtime import LoadedVariant, Sampling
from slmops.agent.serve.serving import StopMatcher
from slmops.manifest import Manifest


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


def handed_over(bundle: Path, stream_interval_s: float) -> list[str]:
    """The text events of one forced 24-token greedy job on the bundle's cpu-int4 variant."""
    variant = LoadedVariant.load(bundle / "variants" / "cpu-int4")
    manifest = Manifest.model_validate_json((bundle / "manifest.json").read_text())
    engine = Engine(max_active=1, max_queued=0, stream_interval_s=stream_interval_s)
    engine.swap(ServedModel(variant, "tiny", "tiny", "1", "cpu-int4", "cpu", manifest))
    engine.start()

    async def run() -> list[str]:
        job = Job(variant.encode("The capital of France is"), 24, Sampling(ignore_eos=True), asyncio.get_running_loop())
        engine.submit(job)
        pieces = []
        while (event := await job.events.get())[0] == "text":
            pieces.append(event[1])
        assert event == ("done", "length")
        return pieces

    try:
        return asyncio.run(run())
    finally:
        engine.close()


def test_text_is_handed_over_once_per_stream_interval_and_none_is_lost(session_bundle: Path) -> None:
    every_token = handed_over(session_bundle, 0.0)
    assert len(every_token) >= 12, "without an interval each token's text goes at once"
    held = handed_over(session_bundle, 60.0)
    assert held == [every_token[0], "".join(every_token[1:])], "the first piece at once, the rest at the end"
