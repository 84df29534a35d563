"""openvino-cpu and openvino-npu variants: slmops' own OpenVINO IR of the tiny model, carrying the
int4 blocks cpu-int4 carries, stateful as OpenVINO GenAI wants it, and scored by the accuracy gate."""

import json
from pathlib import Path

import numpy as np
import pytest

from slmops.build import export as export_module
from slmops.build.export import BuildRecord, QuantOptions, Recipe, export
from slmops.build.openvino_ir import MODEL_XML, checkpoint_weights
from slmops.build.quantize import float_matrices
from slmops.errors import GateFailed, TargetError

PROMPT = [5, 17, 99, 1024, 7, 300, 42, 8, 2048, 11, 64]


def ir_weights(variant: Path) -> dict[str, np.ndarray]:
    """Every weight the IR decompresses from blocks, as OpenVINO computes it (float32)."""
    import openvino as ov

    model = ov.Core().read_model(variant / MODEL_XML)
    outputs = {
        op.get_friendly_name().removesuffix("/decompressed"): op.output(0)
        for op in model.get_ops()
        if op.get_friendly_name().endswith("/decompressed")
    }
    values = ov.Core().compile_model(ov.Model(list(outputs.values()), [], "weights"), "CPU")({})
    return {name: np.asarray(values[i]) for i, name in enumerate(outputs)}


def exact_logits(variant: Path, ids: list[int], prefill: int) -> np.ndarray:
    """Logits of `ids`: the first `prefill` tokens in one pass, then one token per pass through the
    model's own KV state; float32 compute, no dynamic quantization of activations."""
    import openvino as ov

    properties = {
        "INFERENCE_PRECISION_HINT": "f32",
        "KV_CACHE_PRECISION": "f32",
        "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0",
    }
    compiled = ov.Core().compile_model(variant / MODEL_XML, "CPU", properties)
    request = compiled.create_infer_request()

    def run(start: int, end: int) -> np.ndarray:
        inputs = {
            "input_ids": np.array([ids[start:end]], np.int64),
            "attention_mask": np.ones((1, end), np.int64),
            "position_ids": np.arange(start, end, dtype=np.int64)[None],
            "beam_idx": np.zeros(1, np.int32),
        }
        return request.infer(inputs)[compiled.output("logits")][0]

    return np.concatenate([run(0, prefill), *(run(i, i + 1) for i in range(prefill, len(ids)))])


def torch_logits(source: Path, weights: dict[str, np.ndarray], ids: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    state = model.state_dict()
    for name, weight in weights.items():
        state[name].copy_(torch.from_numpy(weight).float())
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].numpy()


@pytest.mark.parametrize("method", ["imatrix", "imatrix-asym"])
def test_openvino_variant_carries_the_blocks_and_computes_what_torch_does(
    tiny_model: Path, tmp_path: Path, method: str
) -> None:
    record = export(
        Recipe(source=str(tiny_model), targets=["openvino-cpu"], quant=QuantOptions(method=method)), tmp_path / "out"
    )
    carried = record.variants["openvino-cpu"]
    config = json.loads((tiny_model / "config.json").read_text())
    layers = config["num_hidden_layers"]
    assert carried.quant == method
    assert carried.blocks == {
        method: 7 * layers,
        "int8": 1,
        "with_offsets": 7 * layers if method == "imatrix-asym" else 0,
    }
    assert carried.accuracy is not None and carried.accuracy.passed

    from transformers import AutoConfig

    wanted = {
        name: weight.dequantized()
        for name, weight in checkpoint_weights(
            float_matrices(tiny_model, method), AutoConfig.from_pretrained(tiny_model)
        ).items()
    }
    variant = tmp_path / "out" / "variants" / "openvino-cpu"
    got = ir_weights(variant)
    assert set(got) == set(wanted) and len(got) == 7 * layers + 1  # the tied embedding once, for both uses
    for name, weight in wanted.items():
        assert np.abs(got[name] - weight).max() <= 1e-6 * np.abs(weight).max(), name

    reference = torch_logits(tiny_model, wanted, PROMPT)
    stepped = exact_logits(variant, PROMPT, prefill=4)  # 4 at once, then 7 single steps on the kept KV state
    assert np.abs(stepped - reference).max() < 1e-4 * np.abs(reference).max()


def test_npu_variants_have_symmetric_blocks_scored_on_the_cpu_plugin(tiny_model: Path, tmp_path: Path) -> None:
    quant = QuantOptions(method="imatrix-asym")
    targets = ["openvino-cpu", "openvino-npu", "openvino-npu-int8"]
    record = export(Recipe(source=str(tiny_model), targets=targets, quant=quant), tmp_path / "o")
    assert record.variants["openvino-cpu"].quant == "imatrix-asym"
    layers = json.loads((tiny_model / "config.json").read_text())["num_hidden_layers"]
    npu, npu8 = record.variants["openvino-npu"], record.variants["openvino-npu-int8"]
    assert npu.quant == "imatrix" and npu.blocks == {"imatrix": 7 * layers, "int8": 1, "with_offsets": 0}
    assert npu8.quant == "int8" and npu8.blocks == {"int8": 7 * layers + 1, "with_offsets": 0}
    for v in (npu, npu8):  # no NPU here: the same IR on OpenVINO's CPU plugin stands for it
        assert v.accuracy is not None and "CPU plugin" in v.accuracy.measured_on and v.accuracy.passed
    assert BuildRecord.load(tmp_path / "o").variants["openvino-npu"].builder.startswith("slmops openvino_ir")


def test_a_failing_npu_variant_is_told_of_the_int8_one(tiny_model: Path, tmp_path: Path) -> None:
    with pytest.raises(GateFailed, match=r"openvino-npu: perplexity .* Try the openvino-npu-int8 target"):
        export(Recipe(source=str(tiny_model), targets=["openvino-npu"]), tmp_path / "o", max_ppl_increase=-0.5)


def test_openvino_targets_refuse_the_builders_quantizers_before_any_work(tiny_model: Path, tmp_path: Path) -> None:
    recipe = Recipe(source=str(tiny_model), targets=["cpu-int4", "openvino-cpu"], quant=QuantOptions(method="rtn"))
    with pytest.raises(
        TargetError, match=r"openvino-cpu takes --quant imatrix or imatrix-asym .*rtn is the model builder's"
    ):
        export(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_openvino_target_without_the_extra_says_what_to_install(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(export_module, "OPENVINO_PACKAGES", ("openvino", "slmops_test_absent_package"))
    with pytest.raises(TargetError, match=r"openvino-npu cannot be built on this machine: it needs the openvino extra"):
        export(Recipe(source=str(tiny_model), targets=["openvino-npu"]), tmp_path / "out")
