"""`--from-gguf exact`'s transcode: the tiny model's weights written as a GGUF in every block type
(as llama.cpp's converter writes them: its names, q and k rows permuted), carried into the tiny
cpu-int4 variant; every weight of the variant is then the GGUF's, and the variant still runs."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_gguf_blocks import kernel_weight, write_gguf

from slmops.build.block_graph import write_blocks
from slmops.build.blocks import BLOCK, BlockWeight
from slmops.build.gguf_blocks import LAYER_MATRICES, gguf_matrices

HF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj"} | {
    gguf: {"attn.o_proj": "self_attn.o_proj"}.get(builder, builder) for gguf, builder in LAYER_MATRICES.items()
}
TYPES = {0: "Q4_1", 1: "Q4_0"}  # block type of each layer's matrices; the embedding is Q8_0


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's permutation of q and k rows (transformers undoes it on load)."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    from safetensors.numpy import load_file

    config = json.loads((tiny_model / "config.json").read_text())
    hf = load_file(tiny_model / "model.safetensors")
    tensors = {"token_embd.weight": (hf["model.embed_tokens.weight"], "Q8_0")}
    for layer in range(config["num_hidden_layers"]):
        for gguf_name, hf_name in HF_NAMES.items():
            weight = hf[f"model.layers.{layer}.{hf_name}.weight"]
            if gguf_name == "attn_q":
                weight = llama_cpp_permute(weight, config["num_attention_heads"])
            elif gguf_name == "attn_k":
                weight = llama_cpp_permute(weight, config["num_key_value_heads"])
            tensors[f"blk.{layer}.{gguf_name}.weight"] = (weight, TYPES[layer])
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return write_gguf(path, tensors), config


def variant_weight(model, prefix: str) -> np.ndarray:
    """The [N, K] weight a MatMulNBits of the variant computes with, with its offset term if any."""
    from onnx import helper, numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    node = next(n for n in model.graph.node if n.op_type == "MatMulNBits" and n.input[1] == f"{prefix}.weight_Q4")
    bits = helper.get_attribute_value(next(a for a in node.attribute if a.name == "bits"))
    weight = BlockWeight(prefix, "", bits, inits[f"{prefix}.weight_Q4"], inits[f"{prefix}.weight_scales"], None)
    product = kernel_weight(weight)
    if f"{prefix}.offsets.weight" in inits:
        product += np.repeat(inits[f"{prefix}.offsets.weight"].T.astype(np.float64), BLOCK, axis=1)
    return product


def test_every_weight_of_the_variant_is_the_gguf_weight_and_it_runs(tiny_gguf, tiny_export: Path, tmp_path: Path):
    import onnx
    from gguf import GGUFReader
    from gguf.quants import dequantize

    gguf, config = tiny_gguf
    variant = tmp_path / "cpu-int4"
    shutil.copytree(tiny_export / "variants" / "cpu-int4", variant)
    matrices = gguf_matrices(gguf, config["num_attention_heads"], config["num_key_value_heads"])
    written = write_blocks(variant, matrices)
    assert written.by_kind == {"Q4_1": 5, "Q4_0": 5, "Q8_0": 1} and written.with_offsets == 5

    exact = {t.name: dequantize(t.data, t.tensor_type).astype(np.float64) for t in GGUFReader(gguf).tensors}
    model = onnx.load(str(variant / "model.onnx"))
    for layer in range(config["num_hidden_layers"]):
        heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
        wanted = np.concatenate(  # q, k in Hugging Face's row order, as the builder fused them
            [
                _unpermute(exact[f"blk.{layer}.attn_q.weight"], heads),
                _unpermute(exact[f"blk.{layer}.attn_k.weight"], kv_heads),
                exact[f"blk.{layer}.attn_v.weight"],
            ]
        )
        assert np.abs(variant_weight(model, f"model.layers.{layer}.attn.qkv_proj.MatMul") - wanted).max() == 0
        for gguf_name, builder_name in LAYER_MATRICES.items():
            got = variant_weight(model, f"model.layers.{layer}.{builder_name}.MatMul")
            assert np.abs(got - exact[f"blk.{layer}.{gguf_name}.weight"]).max() == 0, builder_name
    assert np.abs(variant_weight(model, "lm_head.MatMul") - exact["token_embd.weight"]).max() == 0
    assert np.abs(embedding_rows(model, np.arange(64)) - exact["token_embd.weight"][:64]).max() == 0

    import onnxruntime_genai as og

    og_model = og.Model(str(variant))
    tokenizer = og.Tokenizer(og_model)
    params = og.GeneratorParams(og_model)
    params.set_search_options(max_length=24, do_sample=False)
    generator = og.Generator(og_model, params)
    generator.append_tokens(tokenizer.encode("The capital of France is"))
    while not generator.is_done():
        generator.generate_next_token()
    assert len(generator.get_sequence(0)) == 24


def embedding_rows(model, ids: np.ndarray) -> np.ndarray:
    """The embedding as the variant gathers it (the tied lm_head's blocks): its subgraph run on `ids`."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    extracted = onnx.utils.Extractor(model).extract_model(
        ["input_ids"], ["/model/embed_tokens/GatherBlockQuantized/output_0"]
    )
    del extracted.graph.input[:]
    extracted.graph.input.append(helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, len(ids)]))
    session = ort.InferenceSession(extracted.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"input_ids": ids.reshape(1, -1).astype(np.int64)})[0][0].astype(np.float64)


def _unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
    per_head = weight.shape[0] // heads // 2
    return weight.reshape(heads, per_head, 2, *weight.shape[1:]).swapaxes(2, 1).reshape(weight.shape)
