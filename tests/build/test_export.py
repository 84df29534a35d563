"""Export: variants onnxruntime-genai loads, GPU variants built without a GPU, clear refusals."""

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from slmops.agent.serve.runtime import LoadedVariant
from slmops.build.export import BuildRecord, QuantOptions, Recipe, export
from slmops.errors import ModelSourceError, TargetError


def test_export_writes_loadable_variants_and_provenance(tiny_export: Path) -> None:
    record = BuildRecord.load(tiny_export)
    assert set(record.variants) == {"cpu-int4", "cpu-fp32"}
    assert record.variants["cpu-int4"].build_options == {"block_size": 32, "is_symmetric": True}
    assert record.recipe_digest == record.recipe.digest()
    for variant_id in record.variants:
        variant = tiny_export / "variants" / variant_id
        assert (variant / "genai_config.json").is_file() and (variant / "chat_template.jinja").is_file()
        loaded = LoadedVariant.load(variant)
        tokens = list(loaded.generate(loaded.encode("Hello there"), max_new_tokens=5, ignore_eos=True))
        assert len(tokens) == 5
    assert (tiny_export / "logs" / "cpu-int4.log").read_text().startswith("$ ")


def test_int4_is_smaller_than_fp32(tiny_export: Path) -> None:
    def size(variant: str) -> int:
        return sum(p.stat().st_size for p in (tiny_export / "variants" / variant).rglob("*") if p.is_file())

    assert size("cpu-int4") < 0.5 * size("cpu-fp32")


def test_quantization_options_reach_the_builder(tiny_model: Path, tmp_path: Path) -> None:
    recipe = Recipe(source=str(tiny_model), targets=["cpu-int4"], quant=QuantOptions(block_size=64, accuracy_level=1))
    record = export(recipe, tmp_path / "out")
    assert record.variants["cpu-int4"].build_options == {
        "block_size": 64,
        "accuracy_level": 1,
        "is_symmetric": True,
    }
    log = (tmp_path / "out" / "logs" / "cpu-int4.log").read_text()
    assert "block_size=64" in log and "accuracy_level=1" in log


def test_gpu_variant_builds_on_a_machine_without_gpu(tiny_model: Path, tmp_path: Path) -> None:
    export(Recipe(source=str(tiny_model), targets=["cuda-fp16"]), tmp_path / "out")
    config = json.loads((tmp_path / "out" / "variants" / "cuda-fp16" / "genai_config.json").read_text())
    providers = config["model"]["decoder"]["session_options"]["provider_options"]
    assert any("cuda" in p for p in providers)


@pytest.mark.parametrize("npu", ["qnn-npu", "openvino-npu"])
def test_npu_target_fails_before_any_work_and_says_what_is_needed(tiny_model: Path, tmp_path: Path, npu: str) -> None:
    out = tmp_path / "out"
    with pytest.raises(TargetError, match=rf"{npu} cannot be built on this machine: it needs .*Olive"):
        export(Recipe(source=str(tiny_model), targets=["cpu-int4", npu]), out)
    assert not out.exists()


def test_unknown_target_is_a_validation_error(tiny_model: Path) -> None:
    with pytest.raises(ValidationError, match="unknown target 'tpu-int2'"):
        Recipe(source=str(tiny_model), targets=["tpu-int2"])


def test_duplicate_target_is_a_validation_error(tiny_model: Path) -> None:
    with pytest.raises(ValidationError, match="named twice"):
        Recipe(source=str(tiny_model), targets=["cpu-int4", "cpu-int4"])


def test_folder_without_config_is_not_a_model(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match=r"no config\.json"):
        export(Recipe(source=str(tmp_path), targets=["cpu-int4"]), tmp_path / "out")


def test_existing_output_needs_force(tiny_export: Path, tiny_model: Path) -> None:
    with pytest.raises(FileExistsError, match="--force"):
        export(Recipe(source=str(tiny_model), targets=["cpu-int4"]), tiny_export)


def test_a_variant_that_cannot_load_fails_the_export(tiny_model: Path, tmp_path: Path) -> None:
    """onnxruntime-genai 0.18's builder makes unloadable asymmetric int4 for tied embeddings: we say so."""
    with pytest.raises(TargetError, match="onnxruntime-genai cannot load"):
        export(
            Recipe(source=str(tiny_model), targets=["cpu-int4"], quant=QuantOptions(symmetric=False)), tmp_path / "o"
        )
