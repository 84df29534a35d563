"""Carry a GGUF's quantized blocks into an int4 variant the model builder made from the same
weights, so that every weight of the variant is the GGUF's own (issue 13's `--from-gguf exact`).

    builder's variant (re-rounded int4)      GGUF blocks (gguf_blocks.py)
    qkv_proj  ◄─ rows of attn_q, attn_k (un-permuted as transformers does), attn_v
    o_proj, gate_proj, up_proj, down_proj ◄─ attn_output, ffn_gate, ffn_up, ffn_down
    lm_head + the tied embedding (GatherBlockQuantized) ◄─ token_embd (8 bits for Q8_0)

A Q4_1 matrix keeps the stock int4 kernel on its own nibbles and scales, d·(q − 8), and gains
the rest of each weight, the block's offset 8·d + m, as the block sums of the input times the
offsets: Reshape [.., K/32, 32] → ReduceSum → MatMul (offsets [K/32, N]) → Add.
"""

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from slmops.errors import BuildError

from .gguf_blocks import BLOCK, BlockWeight, block_weights

if TYPE_CHECKING:
    import onnx

MODEL_FILE, DATA_FILE = "model.onnx", "model.onnx.data"
LAYER_MATRICES = {
    "attn_output": "attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
"""GGUF's names of a layer's matrices → the builder's (model.layers.N.<name>.MatMul)."""


@dataclass(frozen=True)
class Carried:
    """What a transcode put in: matrices per GGUF block type, and those with an offset term."""

    by_type: dict[str, int]
    with_offsets: int


def carry_blocks(variant: Path, gguf: Path, heads: int, kv_heads: int) -> Carried:
    """Replace the weights of `variant` (model.onnx + model.onnx.data) with the GGUF's blocks.
    `heads` and `kv_heads` undo llama.cpp's row permutation of attn_q and attn_k."""
    import onnx

    weights = {w.name: w for w in block_weights(gguf)}
    model = onnx.load(str(variant / MODEL_FILE))
    graph = _Graph(model.graph)
    layers = sorted({int(name.split(".")[1]) for name in weights if name.startswith("blk.")})
    for layer in layers:
        q = _permuted(_take(weights, f"blk.{layer}.attn_q.weight"), heads)
        k = _permuted(_take(weights, f"blk.{layer}.attn_k.weight"), kv_heads)
        v = _take(weights, f"blk.{layer}.attn_v.weight")
        graph.put(f"model.layers.{layer}.attn.qkv_proj.MatMul", _rows(q, k, v))
        for gguf_name, builder_name in LAYER_MATRICES.items():
            graph.put(f"model.layers.{layer}.{builder_name}.MatMul", _take(weights, f"blk.{layer}.{gguf_name}.weight"))
    graph.put("lm_head.MatMul", _take(weights, "token_embd.weight"), tied_embedding=True)
    (variant / DATA_FILE).unlink(missing_ok=True)  # loaded: onnx.save would append to it
    onnx.save(model, str(variant / MODEL_FILE), save_as_external_data=True, location=DATA_FILE)
    return Carried(by_type=graph.by_type, with_offsets=graph.with_offsets)


def _take(weights: dict[str, BlockWeight], name: str) -> BlockWeight:
    if name not in weights:
        raise BuildError(f"the GGUF has no block tensor {name}; it cannot be carried into this variant")
    return weights[name]


def _permuted(weight: BlockWeight, heads: int) -> BlockWeight:
    """Rows back in Hugging Face's order (transformers' `_reverse_permute_weights`): whole rows move,
    so every block stays as it is."""

    def rows(a: np.ndarray) -> np.ndarray:
        per_head = a.shape[0] // heads // 2
        return a.reshape(heads, per_head, 2, *a.shape[1:]).swapaxes(2, 1).reshape(a.shape)

    mins = None if weight.mins is None else rows(weight.mins)
    return replace(weight, packed=rows(weight.packed), scales=rows(weight.scales), mins=mins)


def _rows(*parts: BlockWeight) -> BlockWeight:
    """One matrix of these, stacked by rows (the builder's fused q, k, v)."""
    kinds = {(p.gguf_type, p.bits) for p in parts}
    if len(kinds) != 1:
        raise BuildError(
            f"{', '.join(p.name for p in parts)} mix block types {sorted(kinds)}: one fused matrix needs one"
        )
    first = parts[0]
    mins = None if first.mins is None else np.concatenate([p.mins for p in parts if p.mins is not None])
    return BlockWeight(
        name="+".join(p.name for p in parts),
        gguf_type=first.gguf_type,
        bits=first.bits,
        packed=np.concatenate([p.packed for p in parts]),
        scales=np.concatenate([p.scales for p in parts]),
        mins=mins,
    )


class _Graph:
    """The builder's graph, edited in place."""

    def __init__(self, graph: "onnx.GraphProto") -> None:
        self.graph = graph
        self.initializers = {i.name: i for i in graph.initializer}
        self.by_type: dict[str, int] = {}
        self.with_offsets = 0

    def put(self, prefix: str, weight: BlockWeight, tied_embedding: bool = False) -> None:
        from onnx import numpy_helper

        data, scales = f"{prefix}.weight_Q4", f"{prefix}.weight_scales"
        if data not in self.initializers:
            raise BuildError(f"the variant has no {data}: it is not a symmetric int4 graph this transcode knows")
        matmul = next(n for n in self.graph.node if n.op_type == "MatMulNBits" and n.input[1] == data)
        attributes = {a.name: a for a in matmul.attribute}
        n, k = weight.shape
        if (attributes["N"].i, attributes["K"].i) != (n, k):
            raise BuildError(
                f"{weight.name} is {n}×{k}, the variant's {prefix} {attributes['N'].i}×{attributes['K'].i}"
            )
        if attributes["block_size"].i != BLOCK or (len(matmul.input) > 3 and matmul.input[3]):
            raise BuildError(f"{prefix} is not blocked by {BLOCK} without zero points: export with block_size 32")
        self._replace(data, numpy_helper.from_array(weight.packed, data))
        self._replace(scales, numpy_helper.from_array(weight.scales, scales))
        attributes["bits"].i = weight.bits
        if tied_embedding:
            self._embedding(data, weight)
        if (offsets := weight.offsets()) is not None:
            exact = offsets.astype(np.float32)
            if not np.array_equal(exact.astype(np.float64), offsets):
                raise BuildError(f"{weight.name}: a block offset 8·d + m is not exact in float32")
            self._add_offsets(matmul, prefix, np.ascontiguousarray(exact.T), k)
        self.by_type[weight.gguf_type] = self.by_type.get(weight.gguf_type, 0) + 1

    def _replace(self, name: str, tensor: "onnx.TensorProto") -> None:
        self.initializers[name].CopyFrom(tensor)

    def _embedding(self, data: str, weight: BlockWeight) -> None:
        """The tied embedding gathers from the same blocks: its bit width and the Reshape to [N, K·bits/8]."""
        from onnx import numpy_helper

        gather = next(n for n in self.graph.node if n.op_type == "GatherBlockQuantized")
        reshape = next(n for n in self.graph.node if n.output[0] == gather.input[0])
        if reshape.op_type != "Reshape" or reshape.input[0] != data:
            raise BuildError("the variant's embedding does not gather from lm_head's blocks: not tied as expected")
        for attribute in gather.attribute:
            if attribute.name == "bits":
                attribute.i = weight.bits
        n, k = weight.shape
        shape = np.array([n, k * weight.bits // 8], dtype=np.int64)
        constant = next(node for node in self.graph.node if reshape.input[1] in node.output)
        constant.attribute[0].t.CopyFrom(numpy_helper.from_array(shape))

    def _add_offsets(self, matmul: "onnx.NodeProto", prefix: str, offsets_t: np.ndarray, k: int) -> None:
        from onnx import helper, numpy_helper

        x, y = matmul.input[0], matmul.output[0]
        base = f"{prefix}.offsets"
        matmul.output[0] = f"{y}_int4"
        self.graph.initializer.extend(
            [
                numpy_helper.from_array(offsets_t, f"{base}.weight"),
                numpy_helper.from_array(np.array([0, 0, k // BLOCK, BLOCK], dtype=np.int64), f"{base}.block_shape"),
                numpy_helper.from_array(np.array([-1], dtype=np.int64), f"{base}.axes"),
            ]
        )
        at = list(self.graph.node).index(matmul) + 1
        nodes = [
            helper.make_node("Reshape", [x, f"{base}.block_shape"], [f"{base}/blocks"], name=f"{base}/Reshape"),
            helper.make_node(
                "ReduceSum", [f"{base}/blocks", f"{base}.axes"], [f"{base}/sums"], name=f"{base}/ReduceSum", keepdims=0
            ),
            helper.make_node("MatMul", [f"{base}/sums", f"{base}.weight"], [f"{base}/product"], name=f"{base}/MatMul"),
            helper.make_node("Add", [f"{y}_int4", f"{base}/product"], [y], name=f"{base}/Add"),
        ]
        for offset, node in enumerate(nodes):
            self.graph.node.insert(at + offset, node)
        self.with_offsets += 1
