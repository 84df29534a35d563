"""A GGUF's quantized blocks as onnxruntime's block-quantized operators take them, bit for bit.

    GGUF   a block of 32 weights            MatMulNBits (block_size 32; B [N, K/32, blob], scales [N, K/32])
    Q4_0   d·(q − 8)                        bits 4, scales d, the default zero point 8
    Q4_1   d·q + m                          bits 4 on the same nibbles and d, plus the block's offset:
                                            d·q + m = d·(q − 8) + (8·d + m)
    Q8_0   d·q (q signed)                   bits 8, scales d, q + 128 with the default zero point 128

GGUF packs element j of a block in the low nibble of byte j and element j + 16 in its high
nibble; MatMulNBits packs element 2i low and 2i + 1 high. `d` and `m` are float16, so they are
carried as float32 exactly. The first step of issue 13's weight-exact export: these arrays go
into the ONNX graph in place of the builder's re-rounded ones.
"""

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slmops.errors import BuildError

BLOCK = 32
"""Weights per block in every block type carried here."""
PLAIN = ("F32", "F16", "BF16")
"""Types of tensors that are not block-quantized (norms): nothing to carry, they load as they are."""
_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}


@dataclass(frozen=True)
class BlockWeight:
    """One GGUF weight [N, K] in MatMulNBits' terms."""

    name: str
    gguf_type: str
    bits: int
    packed: np.ndarray
    """[N, K/32, 32·bits/8] uint8: MatMulNBits' B."""
    scales: np.ndarray
    """[N, K/32] float32: each block's d."""
    mins: np.ndarray | None
    """[N, K/32] float32: each block's m (Q4_1), else None."""

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], self.packed.shape[1] * BLOCK

    def offsets(self) -> np.ndarray | None:
        """Q4_1's per-block term 8·d + m that the int4 kernel's d·(q − 8) leaves out, in float64."""
        if self.mins is None:
            return None
        return 8 * self.scales.astype(np.float64) + self.mins

    def dequantized(self) -> np.ndarray:
        """[N, K] float64: the weight these arrays stand for, without rounding (every term is exact)."""
        if self.bits == 8:
            q = self.packed.astype(np.float64) - 128
        else:
            q = np.stack([self.packed & 0x0F, self.packed >> 4], axis=-1).reshape(*self.packed.shape[:2], BLOCK)
            q = q.astype(np.float64) - 8
        weight = q * self.scales.astype(np.float64)[..., None]
        if (offsets := self.offsets()) is not None:
            weight += offsets[..., None]
        return weight.reshape(self.shape)


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
        packed = (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return BlockWeight(name, gguf_type, 8, packed, scales, None)
    mins = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32) if gguf_type == "Q4_1" else None
    nibbles = blocks[..., 4:] if gguf_type == "Q4_1" else blocks[..., 2:]
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1)  # [rows, blocks, 32] in element order
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    return BlockWeight(name, gguf_type, 4, packed, scales, mins)


def block_weights(path: Path) -> Iterator[BlockWeight]:
    """Every block-quantized tensor of a GGUF file, in file order; a block type not carried yet is
    a BuildError naming the tensor and its type."""
    from gguf import GGUFReader

    for tensor in GGUFReader(path).tensors:
        if tensor.tensor_type.name not in PLAIN:
            yield block_weight(tensor.name, tensor.tensor_type.name, tensor.data)
