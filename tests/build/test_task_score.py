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


def test_a_model_is_scored_on_held_out_items_through_transformers_and_its_variant(
    tiny_model, tiny_export, tmp_path
) -> None:
    import json
    import subprocess
    import sys
    from pathlib import Path

    from support import SLMOPS

    from slmops.build.chat_data import read_chat
    from slmops.build.task_score import score_model

    script = Path(__file__).resolve().parents[2] / "examples" / "support-task" / "make_data.py"
    subprocess.run([sys.executable, script, "--out", str(tmp_path)], check=True, capture_output=True, timeout=60)
    items = read_chat(tmp_path / "test.jsonl")[:3]
    for model in (tiny_model, tiny_export / "variants" / "cpu-fp32"):
        scored = score_model(model, items, max_new_tokens=6)
        assert scored.score.items == 3 and len(scored.answers) == 3
        for figure in (scored.score.exact_match, scored.score.rouge_l):
            assert 0 <= figure.low <= figure.mean <= figure.high <= 1
    command = [*SLMOPS, "build", "score", str(tiny_model), "--test", str(tmp_path / "test.jsonl"), "--limit", "2"]
    done = subprocess.run([*command, "--max-new-tokens", "4", "--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["score"]["items"] == 2
    keyless = tmp_path / "keyless.jsonl"
    keyless.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    refused = subprocess.run([*SLMOPS, "build", "score", str(tiny_model), "--test", str(keyless)], capture_output=True,
                             text=True, timeout=300)  # fmt: skip
    assert refused.returncode == 1 and "no `key`" in refused.stderr


def test_a_variant_is_scored_with_one_of_its_adapters_active(tiny_model, adapter_export) -> None:
    from pathlib import Path

    from slmops.build.chat_data import read_chat
    from slmops.build.task_score import score_model

    items = read_chat(Path(__file__).resolve().parents[2] / "examples" / "support-task" / "data" / "test.jsonl")[:3]
    variant = adapter_export / "variants" / "cpu-fp32"
    said = {name: score_model(variant, items, 8, adapter=name).answers for name in (None, "terse", "verbose")}
    assert said[None] != said["terse"] != said["verbose"] != said[None]
    with pytest.raises(ValueError, match="no adapter 'chatty'"):
        score_model(variant, items, 8, adapter="chatty")
    with pytest.raises(ValueError, match="Hugging Face folder"):
        score_model(tiny_model, items, 8, adapter="terse")
