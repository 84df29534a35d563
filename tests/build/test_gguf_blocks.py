"""A GGUF's blocks carried into MatMulNBits bit for bit: checked by onnxruntime's own kernel on
tiny GGUF files written with the `gguf` package in each block type, and on the catalogue GGUF."""

from pathlib import Path

import numpy as np
import pytest

from slmops.build.blocks import BLOCK, BlockWeight
from slmops.build.gguf_blocks import block_weights
from slmops.errors import BuildError

N, K = 8, 96  # three blocks per row


def write_gguf(path: Path, tensors: dict[str, tuple[np.ndarray, str]], metadata=None) -> Path:
    """A GGUF of these tensors (float data is quantized to the type named); `metadata(writer)` adds keys."""
    import gguf
    from gguf.quants import quantize

    writer = gguf.GGUFWriter(path, "llama")
    if metadata is not None:
        metadata(writer)
    for name, (data, type_name) in tensors.items():
        kind = gguf.GGMLQuantizationType[type_name]
        raw = data if data.dtype == np.uint8 else quantize(data, kind)
        writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def kernel_weight(weight: BlockWeight) -> np.ndarray:
    """The [N, K] weight onnxruntime's MatMulNBits computes with: identity in, its product out."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    n, k = weight.shape
    node = helper.make_node(
        "MatMulNBits", ["A", "B", "S"], ["Y"], domain="com.microsoft", K=k, N=n, bits=weight.bits, block_size=BLOCK
    )
    graph = helper.make_graph(
        [node],
        "one-matmul",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [k, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [k, n])],
        initializer=[numpy_helper.from_array(weight.packed, "B"), numpy_helper.from_array(weight.scales.ravel(), "S")],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, ir_version=10, opset_imports=opsets)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    product = session.run(None, {"A": np.eye(k, dtype=np.float32)})[0].T.astype(np.float64)
    if weight.offsets is not None:  # asymmetric blocks: what the graph adds beside the int4 kernel
        product += np.repeat(weight.offsets.astype(np.float64), BLOCK, axis=1)
    return product


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q8_0"])
def test_every_block_type_carried_reaches_the_kernel_exactly(type_name: str, tmp_path: Path) -> None:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    floats = np.random.default_rng(7).standard_normal((N, K)).astype(np.float32) * 0.05
    path = write_gguf(tmp_path / "tiny.gguf", {"blk.0.ffn_up.weight": (floats, type_name)})
    (weight,) = block_weights(path)
    assert (weight.name, weight.kind, weight.shape) == ("blk.0.ffn_up.weight", type_name, (N, K))
    (tensor,) = GGUFReader(path).tensors
    gguf_weight = dequantize(tensor.data, tensor.tensor_type).astype(np.float64)
    assert np.abs(weight.dequantized() - gguf_weight).max() == 0
    assert np.abs(kernel_weight(weight) - gguf_weight).max() == 0


def test_a_block_type_not_carried_yet_names_the_tensor_and_its_type(tmp_path: Path) -> None:
    q4_k = np.random.default_rng(1).integers(0, 255, size=(N, 144), dtype=np.uint8)  # one 256-weight block a row
    floats = np.zeros((N, K), dtype=np.float32)
    path = write_gguf(
        tmp_path / "k.gguf", {"blk.0.attn_q.weight": (floats, "Q8_0"), "blk.0.attn_k.weight": (q4_k, "Q4_K")}
    )
    with pytest.raises(BuildError, match=r"blk\.0\.attn_k\.weight is Q4_K: slmops carries Q4_0, Q4_1, Q8_0"):
        list(block_weights(path))


def test_plain_tensors_are_not_blocks(tmp_path: Path) -> None:
    norm = np.ones(K, dtype=np.float32)
    path = write_gguf(tmp_path / "n.gguf", {"blk.0.attn_norm.weight": (norm.view(np.uint8), "F32")})
    assert list(block_weights(path)) == []


@pytest.mark.real_model
def test_the_catalogue_gguf_is_carried_whole_and_exactly() -> None:
    """SmolLM2-135M-Instruct.Q4_1.gguf: the tied embedding is Q8_0, the 210 body matrices Q4_1."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from slmops.build.models import CATALOGUE, gguf_path

    path = gguf_path(CATALOGUE["smollm2-135m-instruct"])
    weights = {w.name: w for w in block_weights(path)}
    assert sorted({w.kind for w in weights.values()}) == ["Q4_1", "Q8_0"]
    assert weights["token_embd.weight"].kind == "Q8_0"
    assert sum(w.kind == "Q4_1" for w in weights.values()) == 210
    for tensor in GGUFReader(path).tensors:
        if tensor.name in weights:
            exact = dequantize(tensor.data, tensor.tensor_type).astype(np.float64)
            assert np.abs(weights[tensor.name].dequantized() - exact).max() == 0, tensor.name
