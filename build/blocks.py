"""Block-quantized weights as onnxruntime's MatMulNBits takes them, whoever made the blocks.

    a block of 32 weights of one row:  w = d·(q − z) + o
      q   unsigned levels, 4 bits (z = 8) or 8 bits (z = 128): MatMulNBits' B, packed
      d   the block's scale: MatMulNBits' scales
      o   the block's offset, where the blocks have one (asymmetric blocks such as GGUF's Q4_1):
          not a MatMulNBits input, the graph adds it as block sums of the input times o

MatMulNBits packs 4-bit element 2i in the low nibble of a byte and 2i + 1 in its high nibble.
GGUF files (`gguf_blocks`) and slmops' own quantizers (`quantize`) both make BlockWeights, and
`block_graph` writes them into the model builder's int4 graph.
"""

from dataclasses import dataclass

import numpy as np

from slmops.errors import BuildError

BLOCK = 32
"""Weights per block in every block type here."""
ZERO_POINT = {4: 8, 8: 128}
"""MatMulNBits' default zero point per bit width (the graphs carry no zero-point input)."""


@dataclass(frozen=True)
class BlockWeight:
    """One weight [N, K] in MatMulNBits' terms."""

    name: str
    kind: str
    """What made the blocks: a GGUF type (Q4_0, Q4_1, Q8_0) or a quantizer's name."""
    bits: int
    packed: np.ndarray
    """[N, K/32, 32·bits/8] uint8: MatMulNBits' B."""
    scales: np.ndarray
    """[N, K/32] float32: each block's d."""
    offsets: np.ndarray | None
    """[N, K/32] float32: each block's o, where the blocks have an offset; else None."""

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], self.packed.shape[1] * BLOCK

    def levels(self) -> np.ndarray:
        """[N, K/32, 32] the unsigned levels q, unpacked."""
        if self.bits == 8:
            return self.packed
        return np.stack([self.packed & 0x0F, self.packed >> 4], axis=-1).reshape(*self.packed.shape[:2], BLOCK)

    def dequantized(self) -> np.ndarray:
        """[N, K] float64: the weight these arrays stand for, without rounding (every term is exact)."""
        q = self.levels().astype(np.float64) - ZERO_POINT[self.bits]
        weight = q * self.scales.astype(np.float64)[..., None]
        if self.offsets is not None:
            weight += self.offsets.astype(np.float64)[..., None]
        return weight.reshape(self.shape)


def packed(levels: np.ndarray, bits: int) -> np.ndarray:
    """[N, K/32, 32] unsigned levels → MatMulNBits' B [N, K/32, 32·bits/8] uint8."""
    levels = levels.astype(np.uint8)
    if bits == 8:
        return np.ascontiguousarray(levels)
    return np.ascontiguousarray(levels[..., 0::2] | (levels[..., 1::2] << 4))


def stacked(*parts: BlockWeight) -> BlockWeight:
    """One matrix of these, stacked by rows (the builder's fused q, k, v)."""
    kinds = {(p.kind, p.bits, p.offsets is None) for p in parts}
    if len(kinds) != 1:
        raise BuildError(
            f"{', '.join(p.name for p in parts)} mix block types {sorted(kinds)}: one fused matrix needs one"
        )
    first = parts[0]
    offsets = None if first.offsets is None else np.concatenate([p.offsets for p in parts if p.offsets is not None])
    return BlockWeight(
        name="+".join(p.name for p in parts),
        kind=first.kind,
        bits=first.bits,
        packed=np.concatenate([p.packed for p in parts]),
        scales=np.concatenate([p.scales for p in parts]),
        offsets=offsets,
    )
