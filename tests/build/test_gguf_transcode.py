"""`--from-gguf exact` from a local .gguf file: the tiny model written as llama.cpp's converter
writes it (its names and metadata, q and k rows permuted) in every block type carried, exported
by path; every weight of the variant is then the GGUF's, and the variant runs."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_gguf_blocks import kernel_weight, write_gguf

from slmops.agent.serve.runtime import LoadedVariant
from slmops.build import models
from slmops.build.blocks import BLOCK, BlockWeight
from slmops.build.export import Recipe, export
from slmops.build.gguf_blocks import LAYER_MATRICES
from slmops.errors import ModelSourceError
from slmops.manifest import sha256_file

HF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj"} | {
    gguf: {"attn.o_proj": "self_attn.o_proj"}.get(builder, builder) for gguf, builder in LAYER_MATRICES.items()
}
TYPES = {0: "Q4_1", 1: "Q4_0"}  # block type of each layer's matrices; the embedding is Q8_0


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's permutation of q and k rows (transformers undoes it on load)."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def llama_metadata(config: dict):
    """What llama.cpp's converter writes for this config, with the catalogue GGUF's tokenizer."""
    from gguf import GGUFReader, GGUFValueType

    from slmops.build.models import CATALOGUE, gguf_path

    tokenizer = {
        key: field
        for key, field in GGUFReader(gguf_path(CATALOGUE["smollm2-135m-instruct"])).fields.items()
        if key.startswith("tokenizer.")
    }

    def write(writer) -> None:
        writer.add_context_length(config["max_position_embeddings"])
        writer.add_embedding_length(config["hidden_size"])
        writer.add_block_count(config["num_hidden_layers"])
        writer.add_feed_forward_length(config["intermediate_size"])
        writer.add_head_count(config["num_attention_heads"])
        writer.add_head_count_kv(config["num_key_value_heads"])
        writer.add_rope_dimension_count(config["hidden_size"] // config["num_attention_heads"])
        writer.add_rope_freq_base(config.get("rope_theta") or config["rope_parameters"]["rope_theta"])
        writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
        writer.add_vocab_size(config["vocab_size"])
        for key, field in tokenizer.items():
            kind = field.types[0]
            sub = field.types[1] if kind == GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), kind, sub_type=sub)

    return write


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The tiny model as llama.cpp's converter would write it, in Q4_1 (layer 0), Q4_0 (layer 1) and
    Q8_0 (the tied embedding) blocks: a .gguf file a user could point `build export` at."""
    from safetensors.numpy import load_file

    config = json.loads((tiny_model / "config.json").read_text())
    hf = load_file(tiny_model / "model.safetensors")
    tensors = {"token_embd.weight": (hf["model.embed_tokens.weight"], "Q8_0")}
    for layer in range(config["num_hidden_layers"]):
        tensors[f"blk.{layer}.attn_norm.weight"] = (hf[f"model.layers.{layer}.input_layernorm.weight"], "F32")
        tensors[f"blk.{layer}.ffn_norm.weight"] = (hf[f"model.layers.{layer}.post_attention_layernorm.weight"], "F32")
        for gguf_name, hf_name in HF_NAMES.items():
            weight = hf[f"model.layers.{layer}.{hf_name}.weight"]
            if gguf_name == "attn_q":
                weight = llama_cpp_permute(weight, config["num_attention_heads"])
            elif gguf_name == "attn_k":
                weight = llama_cpp_permute(weight, config["num_key_value_heads"])
            tensors[f"blk.{layer}.{gguf_name}.weight"] = (weight, TYPES[layer])
    tensors["output_norm.weight"] = (hf["model.norm.weight"], "F32")
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return write_gguf(path, tensors, llama_metadata(config)), config


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


def test_a_local_gguf_exports_exactly_by_default_and_runs(tiny_gguf, tmp_path: Path) -> None:
    import onnx
    from gguf import GGUFReader
    from gguf.quants import dequantize

    gguf, config = tiny_gguf
    record = export(Recipe(source=str(gguf), targets=["cpu-int4"]), tmp_path / "out")
    carried = record.variants["cpu-int4"]
    assert carried.quant == "gguf-exact"
    assert carried.blocks == {"Q4_1": 4, "Q4_0": 4, "Q8_0": 1, "with_offsets": 4}  # gate and up are one matrix
    assert carried.accuracy is not None and carried.accuracy.passed  # its reference: the GGUF dequantized
    source = json.loads((Path(record.source_path) / "slmops-source.json").read_text())
    assert source["gguf"] == {"path": str(gguf.resolve()), "sha256": sha256_file(gguf)}

    variant = tmp_path / "out" / "variants" / "cpu-int4"
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
        gate_up = np.concatenate([exact[f"blk.{layer}.ffn_gate.weight"], exact[f"blk.{layer}.ffn_up.weight"]])
        assert np.abs(variant_weight(model, f"model.layers.{layer}.mlp.gate_up_proj.MatMul") - gate_up).max() == 0
        for gguf_name in ("attn_output", "ffn_down"):
            builder_name = LAYER_MATRICES[gguf_name]
            got = variant_weight(model, f"model.layers.{layer}.{builder_name}.MatMul")
            assert np.abs(got - exact[f"blk.{layer}.{gguf_name}.weight"]).max() == 0, builder_name
    assert np.abs(variant_weight(model, "lm_head.MatMul") - exact["token_embd.weight"]).max() == 0
    assert np.abs(embedding_rows(model, np.arange(64)) - exact["token_embd.weight"][:64]).max() == 0

    loaded = LoadedVariant.load(variant)
    assert len(list(loaded.generate(loaded.encode("The capital of France is"), 8, ignore_eos=True))) == 8


def test_a_gguf_that_changed_since_it_was_dequantized_is_refused(tiny_gguf, tmp_path: Path) -> None:
    gguf = tmp_path / "copy.gguf"
    shutil.copy(tiny_gguf[0], gguf)
    materialized = models.materialize_gguf(gguf)
    assert models.source_gguf(materialized) == gguf.resolve()
    with gguf.open("ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelSourceError, match="changed since"):
        models.source_gguf(materialized)
    gguf.unlink()
    with pytest.raises(ModelSourceError, match="which is gone"):
        models.source_gguf(materialized)


def test_the_same_gguf_moved_is_found_where_it_is_now(tiny_gguf, tmp_path: Path) -> None:
    first, moved = tmp_path / "a" / "model.gguf", tmp_path / "b" / "model.gguf"
    for path in (first, moved):
        path.parent.mkdir()
    shutil.copy(tiny_gguf[0], first)
    materialized = models.materialize_gguf(first)
    first.rename(moved)
    assert models.materialize_gguf(moved) == materialized  # the same bytes: not dequantized again
    assert models.source_gguf(materialized) == moved.resolve()


def test_two_materializing_one_gguf_at_once_make_it_once(tiny_gguf, tmp_path: Path) -> None:
    """Two builds at once (or a controller's build workers) on one slmops home: the second waits for the
    first's folder instead of replacing it while it is read."""
    import io
    import threading
    import uuid

    from rich.console import Console

    gguf = tmp_path / f"race-{uuid.uuid4().hex[:8]}.gguf"  # a name of its own: not made by an earlier run
    shutil.copy(tiny_gguf[0], gguf)
    start, outputs, made = threading.Barrier(2), [io.StringIO(), io.StringIO()], [None, None]

    def materialize(i: int) -> None:
        start.wait()
        made[i] = models.materialize_gguf(gguf, console=Console(file=outputs[i]))

    threads = [threading.Thread(target=materialize, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert made[0] == made[1] and (made[0] / models.SOURCE_RECORD).is_file()
    assert sum("✓" in output.getvalue() for output in outputs) == 1, "dequantized once, found made once"
    shutil.rmtree(made[0])
    (made[0].parent / f".{made[0].name}.lock").unlink()


def test_a_file_that_is_not_a_gguf_is_refused_clearly(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"this is not a model" * 10)
    with pytest.raises(ModelSourceError, match=r"cannot read .*bad\.gguf as a model"):
        export(Recipe(source=str(bad), targets=["cpu-int4"]), tmp_path / "out")
    assert not (tmp_path / "out").exists()


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
