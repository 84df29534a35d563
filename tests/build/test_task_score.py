"""The task score (slmops.build.task_score): exact match on the key fact after normalisation, ROUGE-L,
and bootstrap intervals that hold the mean and narrow with more items."""

import pytest

from slmops.build.task_score import bootstrap, exact_match, normalise, score


def test_the_key_fact_matches_whatever_the_case_punctuation_and_spacing() -> None:
    assert normalise("  To fix it, Reseat the   WAN-cable!") == "to fix it reseat the wan cable"
    assert exact_match("Error E41. To fix it: RESEAT the network cable, then restart.", "reseat the network cable") == 1
    assert exact_match("Error E41: restart it.", "reseat the network cable") == 0


def test_scores_and_their_intervals() -> None:
    references = ["Error E7 means scale. To fix it, run the descale cycle."] * 4
    keys = ["run the descale cycle"] * 4
    perfect = score(references, references, keys)
    assert perfect.items == 4 and perfect.exact_match.mean == 1 and perfect.rouge_l.mean == pytest.approx(1)
    assert perfect.exact_match.low == perfect.exact_match.high == 1
    half = score(["Run the descale cycle.", "No idea.", "run the DESCALE cycle", "Call us."], references, keys)
    assert half.exact_match.mean == 0.5 and 0 <= half.exact_match.low < 0.5 < half.exact_match.high <= 1
    assert 0 < half.rouge_l.mean < 1
    with pytest.raises(ValueError, match="need as many"):
        score(["a"], references, keys)


def test_the_bootstrap_interval_narrows_with_more_items() -> None:
    few, many = bootstrap([1.0, 0.0] * 10, seed=1), bootstrap([1.0, 0.0] * 500, seed=1)
    assert few.mean == many.mean == 0.5
    assert few.low <= 0.5 <= few.high and many.low <= 0.5 <= many.high
    assert many.high - many.low < (few.high - few.low) / 3
