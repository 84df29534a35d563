"""Write block-quantized weights into the int4 CPU graph the model builder made from the same
model, in place of its re-rounded ones (the GGUF's own blocks, or slmops' quantizers').

    model.layers.N.attn.qkv_proj.MatMul     q, k, v stacked by rows
    model.layers.N.attn.o_proj.MatMul, model.layers.N.mlp.{gate,up,down}_proj.MatMul
    model.layers.N.mlp.gate_up_proj.MatMul  gate and up stacked by rows, where the builder fused
                                            them (fuse_mlp_gate_up, as export asks for CPU targets)
    lm_head.MatMul                          and the tied embedding's GatherBlockQuantized,
                                            which reads the same blocks (its bit width follows)

Each MatMulNBits takes the blocks' levels and scales (4 or 8 bits). Blocks with offsets keep
the stock kernel for d·(q − 8) and gain o as the block sums of the input times the offsets:
Reshape [.., K/32, 32] → ReduceSum → MatMul (offsets [K/32, N]) → Add.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from slmops.errors import BuildError

from .blocks import BLOCK, BlockWeight, stacked

if TYPE_CHECKING:
    import onnx

MODEL_FILE, DATA_FILE = "model.onnx", "model.onnx.data"
QKV = "attn.qkv_proj"
LM_HEAD = "lm_head.MatMul"
GATE, UP, GATE_UP = "mlp.gate_proj", "mlp.up_proj", "mlp.gate_up_proj"


def layer_matrix(layer: int, name: str) -> str:
    return f"model.layers.{layer}.{name}.MatMul"


@dataclass(frozen=True)
class Written:
    """What went in: matrices per block kind, and those with an offset term."""

    by_kind: dict[str, int]
    with_offsets: int


def write_blocks(variant: Path, matrices: Mapping[str, BlockWeight]) -> Written:
    """Replace the weights of `variant` (model.onnx + model.onnx.data) named by `matrices`' keys."""
    import onnx

    model = onnx.load(str(variant / MODEL_FILE))
    graph = _Graph(model.graph)
    for prefix, weight in graph.as_built(matrices).items():
        graph.put(prefix, weight)
    (variant / DATA_FILE).unlink(missing_ok=True)  # loaded: onnx.save would append to it
    onnx.save(model, str(variant / MODEL_FILE), save_as_external_data=True, location=DATA_FILE)
    return Written(by_kind=graph.by_kind, with_offsets=graph.with_offsets)


class _Graph:
    """The builder's graph, edited in place."""

    def __init__(self, graph: "onnx.GraphProto") -> None:
        self.graph = graph
        self.initializers = {i.name: i for i in graph.initializer}
        self.by_kind: dict[str, int] = {}
        self.with_offsets = 0

    def as_built(self, matrices: Mapping[str, BlockWeight]) -> dict[str, BlockWeight]:
        """`matrices` keyed as this graph holds them: where the builder fused a layer's gate and up
        projections into one MatMul, their blocks stacked by rows (gate first, as the builder does)."""
        built = dict(matrices)
        for gate in [name for name in matrices if name.endswith(f".{GATE}.MatMul")]:
            up, fused = gate.replace(GATE, UP), gate.replace(GATE, GATE_UP)
            if f"{fused}.weight_Q4" in self.initializers and up in built:
                built[fused] = stacked(built.pop(gate), built.pop(up))
        return built

    def put(self, prefix: str, weight: BlockWeight) -> None:
        from onnx import numpy_helper

        data, scales = f"{prefix}.weight_Q4", f"{prefix}.weight_scales"
        if data not in self.initializers:
            raise BuildError(f"the variant has no {data}: it is not a symmetric int4 graph these blocks fit")
        matmul = next(n for n in self.graph.node if n.op_type == "MatMulNBits" and n.input[1] == data)
        attributes = {a.name: a for a in matmul.attribute}
        n, k = weight.shape
        if (attributes["N"].i, attributes["K"].i) != (n, k):
            raise BuildError(
                f"{weight.name} is {n}×{k}, the variant's {prefix} {attributes['N'].i}×{attributes['K'].i}"
            )
        if attributes["block_size"].i != BLOCK or (len(matmul.input) > 3 and matmul.input[3]):
            raise BuildError(f"{prefix} is not blocked by {BLOCK} without zero points: export with block_size 32")
        self.initializers[data].CopyFrom(numpy_helper.from_array(weight.packed, data))
        self.initializers[scales].CopyFrom(numpy_helper.from_array(weight.scales, scales))
        attributes["bits"].i = weight.bits
        self._tied_embedding(data, weight)
        if weight.offsets is not None:
            self._add_offsets(matmul, prefix, np.ascontiguousarray(weight.offsets.T), k)
        self.by_kind[weight.kind] = self.by_kind.get(weight.kind, 0) + 1

    def _tied_embedding(self, data: str, weight: BlockWeight) -> None:
        """An embedding that gathers from these blocks follows their bit width (and its Reshape to
        [N, K·bits/8]); it cannot add offsets, so offset blocks are refused there."""
        from onnx import numpy_helper

        reshape = next((n for n in self.graph.node if n.op_type == "Reshape" and n.input[0] == data), None)
        gather = reshape and next(
            (n for n in self.graph.node if n.op_type == "GatherBlockQuantized" and n.input[0] == reshape.output[0]),
            None,
        )
        if reshape is None or gather is None:
            return
        if weight.offsets is not None:
            raise BuildError(f"{weight.name} has block offsets, which the tied embedding's gather cannot add")
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
