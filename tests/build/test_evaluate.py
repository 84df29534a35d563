"""Evaluation figures and the gates that fail a build."""

from pathlib import Path

import pytest

from slmops.build.evaluate import Gates, evaluate, parse_fraction
from slmops.errors import GateFailed
from slmops.manifest import Evaluation


@pytest.fixture(scope="module")
def int4_figures(tiny_export: Path) -> Evaluation:
    return Evaluation.model_validate_json((tiny_export / "evaluation" / "cpu-int4.json").read_text())


def test_evaluation_measures_every_figure(int4_figures: Evaluation, tiny_export: Path) -> None:
    e = int4_figures
    vocab = 49152
    # a random-initialized model is about as perplexed as a uniform guess over its vocabulary
    assert e.perplexity is not None and 0.5 * vocab < e.perplexity < 2 * vocab
    assert e.perplexity_tokens and e.perplexity_tokens > 1000
    assert e.decode_tokens_per_s > 0 and e.time_to_first_token_ms > 0
    assert e.peak_rss_bytes > 10 * 2**20
    on_disk = sum(p.stat().st_size for p in (tiny_export / "variants" / "cpu-int4").rglob("*") if p.is_file())
    assert e.size_bytes == on_disk
    assert e.runtime.startswith("onnxruntime-genai")


def test_quantization_changes_perplexity_only_a_little(tiny_export: Path, int4_figures: Evaluation) -> None:
    reference = evaluate(tiny_export / "variants" / "cpu-fp32", speed=False)
    assert reference.perplexity is not None and int4_figures.perplexity is not None
    assert abs(int4_figures.perplexity / reference.perplexity - 1) < 0.05


@pytest.mark.parametrize("text, expected", [("15%", 0.15), ("0.15", 0.15), (" 2.5 % ", 0.025)])
def test_fractions(text: str, expected: float) -> None:
    assert parse_fraction(text) == pytest.approx(expected)


def test_bad_fraction_is_refused() -> None:
    with pytest.raises(ValueError, match="not a fraction"):
        parse_fraction("fifteen")


def test_passing_gates_raise_nothing(int4_figures: Evaluation) -> None:
    Gates(
        min_tokens_per_s=0.001,
        max_size_mb=10_000,
        max_ppl_increase="50%",
        reference_perplexity=int4_figures.perplexity,
    ).check(int4_figures, "cpu-int4")


def test_each_failed_gate_names_its_figure_and_bound(int4_figures: Evaluation) -> None:
    gates = Gates(
        min_tokens_per_s=1e9,
        max_ttft_ms=1e-6,
        max_peak_rss_mb=1,
        max_size_mb=0.001,
        max_ppl_increase="15%",
        reference_perplexity=int4_figures.perplexity / 2,  # type: ignore[operator]
    )
    with pytest.raises(GateFailed) as raised:
        gates.check(int4_figures, "cpu-int4")
    message = str(raised.value)
    assert "fails 5 gate(s)" in message
    assert "decode speed" in message and "below the bound 1e+09" in message
    assert "time to first token" in message and "peak RSS" in message and "size" in message
    assert "100.0% above the reference" in message and "the bound is 15.0%" in message


def test_ppl_gate_without_reference_fails_clearly(int4_figures: Evaluation) -> None:
    unreferenced = int4_figures.model_copy(update={"reference_perplexity": None})
    assert Gates(max_ppl_increase=0.1).failures(unreferenced) == [
        "max-ppl-increase needs a reference perplexity (--reference) and a measured one"
    ]


def test_ppl_gate_compares_with_the_float_reference_recorded_at_export(int4_figures: Evaluation) -> None:
    assert int4_figures.perplexity_increase is not None and 0 < int4_figures.perplexity_increase < 0.01
    assert Gates(max_ppl_increase="1%").failures(int4_figures) == []
    assert "above the reference" in Gates(max_ppl_increase="0%").failures(int4_figures)[0]


def test_evaluating_something_that_is_not_a_variant_fails_clearly(tmp_path: Path) -> None:
    from slmops.errors import SlmopsError

    with pytest.raises(SlmopsError, match=r"no genai_config\.json"):
        evaluate(tmp_path)


def test_peak_rss_is_the_variants_not_its_callers(tiny_export: Path) -> None:
    """An export holds torch when it evaluates; the child's figure must not carry the parent's peak
    (getrusage's ru_maxrss does, across fork and exec)."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "ballast = b'\\1' * (700 * 2**20)\n"  # the caller's own peak: 700 MiB, resident
        "from slmops.build.evaluate import evaluate\n"
        "print(evaluate(Path(sys.argv[1]), runs=1, new_tokens=4, perplexity=False).peak_rss_bytes)\n"
    )
    result = subprocess.run(
        [sys.executable, "-P", "-c", script, str(tiny_export / "variants" / "cpu-int4")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert 10 * 2**20 < int(result.stdout.split()[-1]) < 500 * 2**20
