"""LoRA adapters beside one base graph: built from peft adapters, checked against peft, refused when they
cannot ship (build/adapters.py)."""

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from slmops.build.adapters import read_adapter
from slmops.build.export import BuildRecord, Recipe, export
from slmops.bundle import Bundle
from slmops.errors import BuildError

TOKENS = [1, 17, 230, 5, 99, 41, 8, 150]


def genai_logits(variant: Path, adapter: str | None) -> np.ndarray:
    """One forward pass of the variant in onnxruntime-genai, with the adapter file of that name active."""
    import onnxruntime_genai as og

    model = og.Model(str(variant))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(TOKENS) + 1)
    generator = og.Generator(model, params)
    if adapter is not None:
        adapters = og.Adapters(model)
        adapters.load(str(variant / "adapters" / f"{adapter}.onnx_adapter"), adapter)
        generator.set_active_adapter(adapters, adapter)
    generator.append_tokens(TOKENS)
    return np.array(generator.get_output("logits")[0])


def peft_logits(model: Path, adapter: Path | None) -> np.ndarray:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    network = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    if adapter is not None:
        network = PeftModel.from_pretrained(network, adapter)
    with torch.no_grad():
        return network(torch.tensor([TOKENS])).logits[0].numpy()


def test_each_adapter_on_the_float_graph_computes_what_peft_computes(
    adapter_export: Path, tiny_model: Path, tiny_adapters: dict[str, Path]
) -> None:
    variant = adapter_export / "variants" / "cpu-fp32"
    base = genai_logits(variant, None)
    np.testing.assert_allclose(base, peft_logits(tiny_model, None), atol=1e-4)
    for name, folder in tiny_adapters.items():
        reference = peft_logits(tiny_model, folder)
        assert np.abs(reference - base).max() > 0.1, "the adapter should move the logits"
        np.testing.assert_allclose(genai_logits(variant, name), reference, atol=1e-4)


def test_on_the_int4_graph_the_adapters_move_the_logits_as_peft_does(
    adapter_export: Path, tiny_model: Path, tiny_adapters: dict[str, Path]
) -> None:
    """The LoRA matmuls stay float beside the int4 base: the adapter's change of the logits is peft's,
    up to what int4 changes in the activations they see."""
    variant = adapter_export / "variants" / "cpu-int4"
    base, peft_base = genai_logits(variant, None), peft_logits(tiny_model, None)
    for name, folder in tiny_adapters.items():
        expected = peft_logits(tiny_model, folder) - peft_base
        change = genai_logits(variant, name) - base
        assert np.corrcoef(change.ravel(), expected.ravel())[0, 1] > 0.95


def test_an_adapter_on_asymmetric_int4_blocks_reads_the_matmuls_input(
    tiny_model: Path, tiny_adapters: dict[str, Path], tmp_path: Path
) -> None:
    """Asymmetric blocks (imatrix-asym, a GGUF's Q4_1) add an offsets term after each MatMulNBits: the
    linear's output is an Add's, its input the MatMul's."""
    from slmops.build.export import QuantOptions

    recipe = Recipe(source=str(tiny_model), targets=["cpu-int4"], quant=QuantOptions(method="imatrix-asym"),
                    adapters={"verbose": str(tiny_adapters["verbose"])})  # fmt: skip
    export(recipe, tmp_path / "asym", max_ppl_increase=None)
    variant = tmp_path / "asym" / "variants" / "cpu-int4"
    import onnx

    branches = {i.name for i in onnx.load(str(variant / "model.onnx"), load_external_data=False).graph.input}
    assert "model.layers.1.mlp.down_proj.lora_A" in branches and "model.layers.1.attn.qkv_proj.lora_B" in branches
    assert not any("o_proj" in name or "gate_up" in name for name in branches), "verbose adapts q, v, down only"
    expected = peft_logits(tiny_model, tiny_adapters["verbose"]) - peft_logits(tiny_model, None)
    change = genai_logits(variant, "verbose") - genai_logits(variant, None)
    assert np.corrcoef(change.ravel(), expected.ravel())[0, 1] > 0.95


def test_the_base_graph_without_an_adapter_is_unchanged(adapter_export: Path, tiny_export: Path) -> None:
    for variant in ("cpu-int4", "cpu-fp32"):
        np.testing.assert_array_equal(
            genai_logits(adapter_export / "variants" / variant, None),
            genai_logits(tiny_export / "variants" / variant, None),
        )


def test_the_build_record_and_the_bundle_list_the_adapters(adapter_export: Path, adapter_bundle: Path) -> None:
    record = BuildRecord.load(adapter_export)
    for variant in ("cpu-int4", "cpu-fp32"):
        cards = {a.name: a for a in record.variants[variant].adapters}
        assert set(cards) == {"terse", "verbose"}
        assert cards["verbose"].rank == 4 and cards["verbose"].modules == ["down_proj", "q_proj", "v_proj"]
        assert len(cards["terse"].modules) == 7
    manifest = Bundle.open(adapter_bundle).manifest
    variant = manifest.variant("cpu-int4")
    paths = {f.path for f in variant.files}
    assert [a.name for a in variant.adapters] == ["terse", "verbose"]
    assert {"adapters/terse.onnx_adapter", "adapters/verbose.onnx_adapter"} <= paths


def test_an_adapter_is_refused_with_what_it_cannot_ship(
    tiny_model: Path, tiny_adapters: dict[str, Path], tmp_path: Path
) -> None:
    dora = tmp_path / "dora"
    shutil.copytree(tiny_adapters["verbose"], dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps(config | {"use_dora": True}))
    with pytest.raises(BuildError, match=r"DoRA .* merge it into the model"):
        read_adapter("dora", dora)
    with pytest.raises(BuildError, match="not a peft adapter folder"):
        read_adapter("merged", tiny_model)

    from support import lora_adapter

    with warnings.catch_warnings():  # peft warns of the tied head (what this adapter is made to do)
        warnings.simplefilter("ignore")
        head = lora_adapter(tiny_model, tmp_path / "head", seed=3, rank=2, targets=["q_proj", "lm_head"])
    with pytest.raises(BuildError, match=r"lm_head.*only the decoder layers"):
        read_adapter("head", head)


def test_an_adapter_trained_on_another_model_is_refused_before_the_builder_runs(
    tiny_model: Path, tiny_adapters: dict[str, Path], tmp_path: Path
) -> None:
    stranger = tmp_path / "stranger"
    shutil.copytree(tiny_adapters["verbose"], stranger)
    (stranger / "finetune.json").write_text(json.dumps({"base": {"digest": "ab" * 32}}))
    recipe = Recipe(source=str(tiny_model), targets=["cpu-fp32"], adapters={"stranger": str(stranger)})
    with pytest.raises(BuildError, match="trained on another model"):
        export(recipe, tmp_path / "out", max_ppl_increase=None)
    assert not (tmp_path / "out" / "variants").exists()


def test_a_recipe_with_adapters_names_the_targets_and_names_that_cannot_take_them(tiny_model: Path) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="onnxruntime-genai targets only, not openvino-cpu"):
        Recipe(source=str(tiny_model), targets=["cpu-int4", "openvino-cpu"], adapters={"terse": "x"})
    with pytest.raises(ValidationError, match="adapter name 'Bad Name'"):
        Recipe(source=str(tiny_model), targets=["cpu-int4"], adapters={"Bad Name": "x"})
