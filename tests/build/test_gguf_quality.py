"""The catalogue model's default cpu-int4 variant keeps the model's quality: its GGUF blocks are
carried in exactly (`--from-gguf exact`), so its perplexity is the float model's. Re-quantizing
the dequantized weights instead loses more than the default accuracy gate allows (imatrix +7.5 %,
the builder's RTN +29 %), and the gate says what to use."""

from pathlib import Path

import pytest

from slmops.build.export import BuildRecord, Recipe, export
from slmops.errors import GateFailed


@pytest.mark.real_model
def test_the_default_cpu_int4_is_within_2_percent_of_the_float_model(smollm2_export: Path) -> None:
    record = BuildRecord.load(smollm2_export)
    assert record.reference is not None and 20 < record.reference.perplexity < 30
    accuracy = record.variants["cpu-int4"].accuracy
    assert accuracy is not None and accuracy.passed
    assert accuracy.increase <= 0.02, (
        f"cpu-int4 perplexity {accuracy.perplexity:.3f} against {accuracy.reference_perplexity:.3f}"
    )


@pytest.mark.real_model
def test_the_default_gate_fails_the_re_quantized_variant_and_says_what_to_use(tmp_path: Path) -> None:
    recipe = Recipe(source="smollm2-135m-instruct", targets=["cpu-int4"], from_gguf="dequantize")
    with pytest.raises(GateFailed) as failed:
        export(recipe, tmp_path / "out")
    message = str(failed.value)
    assert "cpu-int4: perplexity" in message and "the bound is 5.0%" in message
    assert "--from-gguf exact" in message and "--quant imatrix-asym" in message
    variant = BuildRecord.load(tmp_path / "out").variants["cpu-int4"]
    assert variant.quant == "imatrix" and variant.accuracy is not None and not variant.accuracy.passed
    assert 0.05 < variant.accuracy.increase < 0.15  # measured +7.5 %; the builder's RTN loses +29 %
