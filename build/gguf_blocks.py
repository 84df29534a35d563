"""A GGUF's quantized blocks as onnxruntime's block-quantized operators take them, bit for bit.

    GGUF   a block of 32 weights            BlockWeight (blocks.py)
    Q4_0   d·(q − 8)                        bits 4, scales d
    Q4_1   d·q + m                          bits 4 on the same nibbles and d, offset o = 8·d + m:
                                            d·q + m = d·(q − 8) + (8·d + m)
    Q8_0   d·q (q signed)                   bits 8, scales d, levels q + 128

GGUF packs element j of a block in the low nibble of byte j and element j + 16 in its high
nibble. `d` and `m` are float16, so d and 8·d + m are exact in float32.

`gguf_matrices` maps llama.cpp's tensors onto the model builder's MatMuls (issue 13's
`--from-gguf exact`): q and k rows un-permuted as transformers does on load, q, k and v
stacked as the builder fuses them, the tied token embedding as lm_head.
"""

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np

from slmops.errors import BuildError

from .block_graph import LM_HEAD, QKV, layer_matrix
from .blocks import BlockWeight, packed, stacked

PLAIN = ("F32", "F16", "BF16")
"""Types of tensors that are not block-quantized (norms): nothing to carry, they load as they are."""
_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}
LAYER_MATRICES = {
    "attn_output": "attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
"""GGUF's names of a layer's matrices → the builder's."""


def block_weight(name: str, gguf_type: str, data: np.ndarray) -> BlockWeight:
    """The blocks of one tensor (`data`: GGUFReader's [rows, bytes per row] uint8)."""
    if gguf_type not in _BLOCK_BYTES:
        carried = ", ".join(_BLOCK_BYTES)
        raise BuildError(
            f"{name} is {gguf_type}: slmops carries {carried} blocks exactly (K-quants are next); "
            "export with --from-gguf dequantize to re-quantize this model from float weights"
        )
    blocks = np.ascontiguousarray(data).reshape(data.shape[0], -1, _BLOCK_BYTES[gguf_type])
    scales = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    if gguf_type == "Q8_0":
        levels = blocks[..., 2:].view(np.int8).astype(np.int16) + 128
        return BlockWeight(name, gguf_type, 8, packed(levels, 8), scales, None)
    offsets = None
    if gguf_type == "Q4_1":
        mins = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float64)
        exact = 8 * scales.astype(np.float64) + mins
        offsets = exact.astype(np.float32)
        if not np.array_equal(offsets.astype(np.float64), exact):
            raise BuildError(f"{name}: a block offset 8·d + m is not exact in float32")
    nibbles = blocks[..., 4:] if gguf_type == "Q4_1" else blocks[..., 2:]
    levels = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1)  # [rows, blocks, 32] in element order
    return BlockWeight(name, gguf_type, 4, packed(levels, 4), scales, offsets)


def block_weights(path: Path) -> Iterator[BlockWeight]:
    """Every block-quantized tensor of a GGUF file, in file order; a block type not carried yet is
    a BuildError naming the tensor and its type."""
    from gguf import GGUFReader

    for tensor in GGUFReader(path).tensors:
        if tensor.tensor_type.name not in PLAIN:
            yield block_weight(tensor.name, tensor.tensor_type.name, tensor.data)


def gguf_matrices(path: Path, heads: int, kv_heads: int) -> dict[str, BlockWeight]:
    """The GGUF's blocks keyed by the model builder's MatMul each one replaces.
    `heads` and `kv_heads` undo llama.cpp's row permutation of attn_q and attn_k."""
    weights = {w.name: w for w in block_weights(path)}
    matrices: dict[str, BlockWeight] = {}
    layers = sorted({int(name.split(".")[1]) for name in weights if name.startswith("blk.")})
    for layer in layers:
        q = _permuted(_take(weights, f"blk.{layer}.attn_q.weight"), heads)
        k = _permuted(_take(weights, f"blk.{layer}.attn_k.weight"), kv_heads)
        v = _take(weights, f"blk.{layer}.attn_v.weight")
        matrices[layer_matrix(layer, QKV)] = stacked(q, k, v)
        for gguf_name, builder_name in LAYER_MATRICES.items():
            matrices[layer_matrix(layer, builder_name)] = _take(weights, f"blk.{layer}.{gguf_name}.weight")
    matrices[LM_HEAD] = _take(weights, "output.weight" if "output.weight" in weights else "token_embd.weight")
    return matrices


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

    offsets = None if weight.offsets is None else rows(weight.offsets)
    return replace(weight, packed=rows(weight.packed), scales=rows(weight.scales), offsets=offsets)
