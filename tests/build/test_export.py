"""Export: variants onnxruntime-genai loads, GPU variants built without a GPU, clear refusals."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from pydantic import ValidationError
from support import SLMOPS

from slmops.agent.serve.runtime import LoadedVariant
from slmops.build.bundle import create
from slmops.build.export import BuildRecord, QuantOptions, Recipe, export
from slmops.errors import BuildError, ModelSourceError, TargetError


def test_export_writes_loadable_variants_and_provenance(tiny_export: Path) -> None:
    record = BuildRecord.load(tiny_export)
    assert set(record.variants) == {"cpu-int4", "cpu-fp32"}
    assert record.variants["cpu-int4"].build_options == {"fuse_mlp_gate_up": True, "block_size": 32}
    assert record.variants["cpu-int4"].quant == "imatrix" and record.variants["cpu-fp32"].quant is None
    assert record.variants["cpu-int4"].blocks == {"imatrix": 8, "int8": 1, "with_offsets": 0}  # gate+up: one matrix
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
    quant = QuantOptions(method="rtn", block_size=64, accuracy_level=1)
    record = export(Recipe(source=str(tiny_model), targets=["cpu-int4"], quant=quant), tmp_path / "out")
    options = {"fuse_mlp_gate_up": True, "block_size": 64, "accuracy_level": 1}
    assert record.variants["cpu-int4"].build_options == options
    assert record.variants["cpu-int4"].quant == "rtn" and record.variants["cpu-int4"].blocks is None
    log = (tmp_path / "out" / "logs" / "cpu-int4.log").read_text()
    assert "block_size=64" in log and "accuracy_level=1" in log


def test_k_quant_mixed_is_the_builders_and_loads_with_tied_embeddings(tiny_model: Path, tmp_path: Path) -> None:
    quant = QuantOptions(method="k-quant-mixed")
    record = export(Recipe(source=str(tiny_model), targets=["cpu-int4"], quant=quant), tmp_path / "out")
    assert record.variants["cpu-int4"].build_options == {
        "fuse_mlp_gate_up": True,
        "block_size": 32,
        "algo_config": "k_quant_mixed",
    }
    assert "algo_config=k_quant_mixed" in (tmp_path / "out" / "logs" / "cpu-int4.log").read_text()
    loaded = LoadedVariant.load(tmp_path / "out" / "variants" / "cpu-int4")
    assert len(list(loaded.generate(loaded.encode("Hello"), max_new_tokens=4, ignore_eos=True))) == 4


def test_own_quantizers_need_blocks_of_32() -> None:
    with pytest.raises(ValidationError, match="makes blocks of 32"):
        QuantOptions(method="imatrix", block_size=64)


def test_gpu_variant_builds_on_a_machine_without_gpu(tiny_model: Path, tmp_path: Path) -> None:
    export(Recipe(source=str(tiny_model), targets=["cuda-fp16"]), tmp_path / "out")
    config = json.loads((tmp_path / "out" / "variants" / "cuda-fp16" / "genai_config.json").read_text())
    providers = config["model"]["decoder"]["session_options"]["provider_options"]
    assert any("cuda" in p for p in providers)


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


def test_a_variant_that_cannot_load_is_refused(tiny_export: Path, tmp_path: Path) -> None:
    """The builder can emit graphs onnxruntime rejects (0.18's asymmetric int4 with tied embeddings did)."""
    from slmops.build.export import _check_loads
    from slmops.targets import target

    variant = tmp_path / "cpu-int4"
    shutil.copytree(tiny_export / "variants" / "cpu-int4", variant)
    (variant / "model.onnx").write_bytes((variant / "model.onnx").read_bytes()[:1000])
    with pytest.raises(TargetError, match="onnxruntime-genai cannot load"):
        _check_loads(variant, target("cpu-int4"))


def test_export_scores_every_cpu_variant_against_the_float_source(tiny_export: Path) -> None:
    record = BuildRecord.load(tiny_export)
    assert record.reference is not None and record.reference.measured_with.startswith("transformers")
    fp32, int4 = record.variants["cpu-fp32"].accuracy, record.variants["cpu-int4"].accuracy
    assert fp32 is not None and int4 is not None and fp32.passed and int4.passed
    # transformers and onnxruntime-genai score the same tokens in the same windows
    assert fp32.perplexity == pytest.approx(record.reference.perplexity, rel=1e-5)
    assert int4.max_increase == 0.05 and int4.perplexity != fp32.perplexity
    kept = json.loads((tiny_export / "evaluation" / "cpu-fp32.json").read_text())
    assert kept["reference_perplexity"] == record.reference.perplexity


def test_a_variant_over_the_bound_fails_the_build_and_bundle_create_refuses_it(
    tiny_model: Path, tmp_path: Path, signing_key: tuple[Path, Path]
) -> None:
    out = tmp_path / "out"
    # the builder's int4 costs the tiny model +0.007 % (measured): over a bound of 0 %
    command = [*SLMOPS, "build", "export", str(tiny_model), "-t", "cpu-int4", "--quant", "rtn", "-o", str(out)]
    result = subprocess.run(
        [*command, "--max-ppl-increase", "0%"],
        capture_output=True,
        text=True,
        check=False,
        env=os.environ | {"COLUMNS": "200"},
    )
    assert result.returncode == 3, result.stderr
    assert "the accuracy gate failed" in result.stderr and "the bound is 0.0%" in result.stderr
    assert "cpu-int8" in result.stderr and "failed" in result.stdout  # the table still shows every variant
    accuracy = BuildRecord.load(out).variants["cpu-int4"].accuracy
    assert accuracy is not None and not accuracy.passed and accuracy.increase > 0
    with pytest.raises(BuildError, match="cpu-int4 failed the accuracy gate at export"):
        create(out, tmp_path / "bundle", name="tiny", version="1.0.0", key=signing_key[0])


def test_gate_off_records_without_gating(tiny_model: Path, tmp_path: Path) -> None:
    record = export(Recipe(source=str(tiny_model), targets=["cpu-int4"]), tmp_path / "out", max_ppl_increase=None)
    accuracy = record.variants["cpu-int4"].accuracy
    assert accuracy is not None and accuracy.max_increase is None and accuracy.passed


def test_a_bound_that_is_not_a_fraction_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    command = [*SLMOPS, "build", "export", str(tiny_model), "-t", "cpu-int4", "-o", str(tmp_path / "out")]
    result = subprocess.run([*command, "--max-ppl-increase", "lots"], capture_output=True, text=True, check=False)
    assert result.returncode == 2 and "--max-ppl-increase" in result.stderr and "not a fraction" in result.stderr
    assert not (tmp_path / "out").exists()
