"""The catalogue model's default cpu-int4 variant keeps the model's quality: its GGUF blocks are
carried in exactly (`--from-gguf exact`), so its perplexity is the float model's, where the
builder's re-rounding of the dequantized weights cost +29 %."""

from pathlib import Path

import pytest

from slmops.build.evaluate import evaluate
from slmops.build.export import Recipe, export


@pytest.mark.real_model
def test_the_default_cpu_int4_is_within_2_percent_of_fp32(smollm2_export: Path, tmp_path: Path) -> None:
    reference = tmp_path / "fp32"
    export(Recipe(source="smollm2-135m-instruct", targets=["cpu-fp32"]), reference)
    int4 = evaluate(smollm2_export / "variants" / "cpu-int4", perplexity=True, speed=False).perplexity
    fp32 = evaluate(reference / "variants" / "cpu-fp32", perplexity=True, speed=False).perplexity
    assert int4 is not None and fp32 is not None
    assert int4 <= fp32 * 1.02, f"cpu-int4 perplexity {int4:.3f} against fp32 {fp32:.3f}"
