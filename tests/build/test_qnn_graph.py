"""qnn-npu: the tiny model as a static-shape decoder compiled by onnxruntime-qnn into a float16 HTP
context binary for a Snapdragon SoC; the binary runs here on the HTP simulator."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from pydantic import ValidationError

from slmops.agent.serve.runtime import LoadedVariant
from slmops.build import export as export_module
from slmops.build.export import Recipe, export
from slmops.errors import TargetError

PROMPT = [5, 17, 99, 1024, 7, 300, 42, 8]


@pytest.fixture(scope="module")
def qnn_export(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("qnn-export")
    export(Recipe(source=str(tiny_model), targets=["qnn-npu"], qnn_soc="x-elite"), out)
    return out


def test_the_whole_decoder_is_one_htp_context_binary_for_the_soc(qnn_export: Path) -> None:
    variant = qnn_export / "variants" / "qnn-npu"
    record = json.loads((qnn_export / "build.json").read_text())["variants"]["qnn-npu"]
    assert record["quant"] == "fp16" and record["build_options"] == {"soc": "x-elite"}
    accuracy = record["accuracy"]  # the binary itself, on the simulator, against its float graph
    assert accuracy["measured_on"].startswith("the binary on onnxruntime-qnn's HTP simulator")
    assert (
        accuracy["max_increase"] == 0.05 and abs(accuracy["perplexity"] / accuracy["reference_perplexity"] - 1) < 0.01
    )
    config = json.loads((variant / "qnn.json").read_text())
    assert (config["soc_model"], config["htp_arch"], config["context_length"]) == (60, 73, 512)
    graph = onnx.load(str(variant / config["model_file"]), load_external_data=False).graph
    assert {node.op_type for node in graph.node} == {"EPContext"}  # nothing left for the CPU
    binary = next(a for a in graph.node[0].attribute if a.name == "ep_cache_context")
    assert len(binary.s) > 1_000_000  # the compiled graph and its weights, embedded


def test_the_binary_runs_on_the_simulator_close_to_the_float_model(qnn_export: Path, tiny_model: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    with torch.inference_mode():
        reference = model(torch.tensor([PROMPT])).logits[0].numpy()
    loaded = LoadedVariant.load(qnn_export / "variants" / "qnn-npu")
    got = loaded.token_logits(PROMPT)  # one token per pass through the binary, its KV kept by the host
    assert got.shape == reference.shape
    assert np.abs(got - reference).max() < 0.02 * np.abs(reference).max()  # float16 on the HTP
    assert (got.argmax(-1) == reference.argmax(-1)).all()
    tokens = list(loaded.generate(PROMPT, 4, ignore_eos=True))
    assert len(tokens) == 4 and tokens[0] == int(got[-1].argmax())


def test_an_unknown_soc_is_a_validation_error(tiny_model: Path) -> None:
    with pytest.raises(ValidationError, match="qnn_soc"):
        Recipe(source=str(tiny_model), targets=["qnn-npu"], qnn_soc="sm0000")


def test_without_onnxruntime_qnn_the_target_says_what_to_install(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(export_module, "QNN_PACKAGE", "slmops_test_absent_package")
    with pytest.raises(TargetError, match=r"qnn-npu cannot be built on this machine: it needs onnxruntime-qnn"):
        export(Recipe(source=str(tiny_model), targets=["cpu-int4", "qnn-npu"]), tmp_path / "out")
    assert not (tmp_path / "out").exists()
