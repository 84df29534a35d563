"""slmops' own int4 quantizers for float checkpoints (every fine-tuned or distilled model is one).

float source ─► importance of every input of every matrix: mean x² over the calibration text
                shipped in slmops.build (data/calibration.txt, not the held-out text)
  ─► blocks of 32 fitted to minimise the importance-weighted squared error (llama.cpp's
     imatrix idea), per matrix:
       imatrix        symmetric d·(q − 8): the stock int4 kernel, nothing added
       imatrix-asym   d·(q − 8) + o with a float offset o per block: block_graph adds the
                      offset term (one small MatMul per matrix), the loss of an asymmetric grid
  ─► lm_head and the tied embedding: 8-bit blocks (Q8_0's d·q) that both read
  ─► BlockWeights keyed by the builder's MatMuls, for block_graph.write_blocks
"""

from collections.abc import Callable
from importlib import resources
from pathlib import Path

import numpy as np

from .block_graph import LM_HEAD, QKV, layer_matrix
from .blocks import BLOCK, BlockWeight, packed, stacked

CALIBRATION_WINDOW_TOKENS = 512
SCALE_CANDIDATES = np.linspace(6.5, 9.0, 26)
"""Symmetric blocks try d = −(the block's extreme weight)/f for each f; f = 8 is plain round-to-nearest
(the extreme weight lands on level −8), and each candidate is refined by weighted least squares."""
RANGE_SHRINKS = np.linspace(0.75, 1.0, 11)
"""Asymmetric blocks try their [min, max] range shrunk about its centre by each factor, then refit."""
REFITS = 3


def calibration_text() -> str:
    return resources.files("slmops.build").joinpath("data/calibration.txt").read_text(encoding="utf-8")


def float_matrices(
    source: Path, method: str, progress: Callable[[str], None] = lambda _: None
) -> dict[str, BlockWeight]:
    """Every matrix of the float checkpoint `source` quantized by `method` (a key of QUANTIZERS),
    keyed by the builder's MatMul."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .models import quiet_transformers

    quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    progress("measuring input importance on the calibration text")
    importance = _importance(model, tokenizer(calibration_text(), add_special_tokens=False)["input_ids"])
    quantize = QUANTIZERS[method]
    matrices: dict[str, BlockWeight] = {}
    layers = model.model.layers
    for index, layer in enumerate(layers):
        progress(f"quantizing layer {index + 1}/{len(layers)} ({method})")
        attn, mlp = layer.self_attn, layer.mlp
        matrices[layer_matrix(index, QKV)] = stacked(
            *(
                quantize(f"layer {index} {p}", _weight(getattr(attn, p)), importance[getattr(attn, p)])
                for p in ("q_proj", "k_proj", "v_proj")
            )
        )
        for builder_name, module in (
            ("attn.o_proj", attn.o_proj),
            ("mlp.gate_proj", mlp.gate_proj),
            ("mlp.up_proj", mlp.up_proj),
            ("mlp.down_proj", mlp.down_proj),
        ):
            matrices[layer_matrix(index, builder_name)] = quantize(
                f"layer {index} {builder_name}", _weight(module), importance[module]
            )
    progress("quantizing lm_head (8 bits)")
    matrices[LM_HEAD] = symmetric_int8("lm_head", _weight(model.lm_head))
    return matrices


def _weight(module) -> np.ndarray:
    return module.weight.detach().numpy().astype(np.float64)


def _importance(model, ids: list[int]) -> dict[object, np.ndarray]:
    """Mean square of every input of every Linear over the calibration windows."""
    import torch

    sums: dict[object, np.ndarray] = {}
    counts: dict[object, int] = {}

    def hook(module, inputs, _output) -> None:
        x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
        sums[module] = sums.get(module, 0) + (x * x).sum(dim=0).numpy()
        counts[module] = counts.get(module, 0) + x.shape[0]

    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    handles = [m.register_forward_hook(hook) for m in linears]
    try:
        with torch.inference_mode():
            for start in range(0, len(ids), CALIBRATION_WINDOW_TOKENS):
                model(torch.tensor([ids[start : start + CALIBRATION_WINDOW_TOKENS]]))
    finally:
        for handle in handles:
            handle.remove()
    importance = {}
    for module, total in sums.items():
        mean = total / counts[module]
        importance[module] = mean + 1e-6 * mean.mean() + 1e-30  # no input weighs nothing
    return importance


def _blocks(weight: np.ndarray) -> np.ndarray:
    n, k = weight.shape
    return weight.reshape(n, k // BLOCK, BLOCK)


def symmetric_int4(name: str, weight: np.ndarray, importance: np.ndarray) -> BlockWeight:
    """Blocks d·(q − 8), q in 0..15, with the d of least importance-weighted squared error."""
    x = _blocks(weight)
    h = importance.reshape(1, -1, BLOCK)
    extreme = np.take_along_axis(x, np.abs(x).argmax(axis=-1)[..., None], axis=-1)  # [N, B, 1], signed
    best_d = np.where(extreme == 0, 1.0, -extreme / 8)
    best_err = _sym_error(x, h, best_d)
    for f in SCALE_CANDIDATES:
        d = np.where(extreme == 0, 1.0, -extreme / f)
        for _ in range(2):
            err = _sym_error(x, h, d)
            better = err < best_err
            best_d, best_err = np.where(better, d, best_d), np.where(better, err, best_err)
            q = np.clip(np.rint(x / d), -8, 7)
            qq = (h * q * q).sum(axis=-1, keepdims=True)
            d = np.where(qq > 0, (h * q * x).sum(axis=-1, keepdims=True) / np.where(qq > 0, qq, 1), d)
            d = np.where(d == 0, 1.0, d)
    d32 = best_d.astype(np.float32)
    levels = np.clip(np.rint(x / d32.astype(np.float64)), -8, 7) + 8
    return BlockWeight(name, "imatrix", 4, packed(levels, 4), d32[..., 0], None)


def _sym_error(x: np.ndarray, h: np.ndarray, d: np.ndarray) -> np.ndarray:
    q = np.clip(np.rint(x / d), -8, 7)
    return (h * (x - d * q) ** 2).sum(axis=-1, keepdims=True)


def asymmetric_int4(name: str, weight: np.ndarray, importance: np.ndarray) -> BlockWeight:
    """Blocks d·q + m, q in 0..15 (GGUF's Q4_1 grid), (d, m) of least importance-weighted squared
    error; carried as d·(q − 8) + o with o = 8·d + m."""
    x = _blocks(weight)
    h = importance.reshape(1, -1, BLOCK)
    lo, hi = x.min(axis=-1, keepdims=True), x.max(axis=-1, keepdims=True)
    centre, half = (lo + hi) / 2, (hi - lo) / 2
    best_d, best_m = np.where(half > 0, 2 * half / 15, 1.0), lo
    best_err = _asym_error(x, h, best_d, best_m)
    for shrink in RANGE_SHRINKS:
        m = centre - half * shrink
        d = np.where(half > 0, 2 * half * shrink / 15, 1.0)
        for _ in range(REFITS):
            d, m = _asym_refit(x, h, d, m)
            err = _asym_error(x, h, d, m)
            better = err < best_err
            best_d, best_m = np.where(better, d, best_d), np.where(better, m, best_m)
            best_err = np.where(better, err, best_err)
    d32 = best_d.astype(np.float32)
    o32 = (8 * best_d + best_m).astype(np.float32)
    levels = np.clip(np.rint((x - best_m) / d32.astype(np.float64)), 0, 15)
    return BlockWeight(name, "imatrix-asym", 4, packed(levels, 4), d32[..., 0], o32[..., 0])


def _asym_error(x: np.ndarray, h: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    q = np.clip(np.rint((x - m) / d), 0, 15)
    return (h * (x - d * q - m) ** 2).sum(axis=-1, keepdims=True)


def _asym_refit(x: np.ndarray, h: np.ndarray, d: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted least squares of (d, m) for the levels (d, m) give."""
    q = np.clip(np.rint((x - m) / d), 0, 15)
    sw, sq, sqq = h.sum(-1, keepdims=True), (h * q).sum(-1, keepdims=True), (h * q * q).sum(-1, keepdims=True)
    sx, sqx = (h * x).sum(-1, keepdims=True), (h * q * x).sum(-1, keepdims=True)
    det = sw * sqq - sq * sq
    ok = det > 1e-30 * sw * sqq
    safe = np.where(ok, det, 1)
    new_d = np.where(ok, (sw * sqx - sq * sx) / safe, d)
    new_m = np.where(ok, (sqq * sx - sq * sqx) / safe, m)
    return np.where(new_d > 0, new_d, d), np.where(new_d > 0, new_m, m)


def symmetric_int8(name: str, weight: np.ndarray) -> BlockWeight:
    """Q8_0's blocks: d = max |w| / 127, q = round(w / d) in −127..127 (levels q + 128)."""
    x = _blocks(weight)
    amax = np.abs(x).max(axis=-1, keepdims=True)
    d32 = np.where(amax > 0, amax / 127, 1.0).astype(np.float32)
    levels = np.clip(np.rint(x / d32.astype(np.float64)), -127, 127) + 128
    return BlockWeight(name, "int8", 8, packed(levels, 8), d32[..., 0], None)


BODY_QUANTIZERS: dict[str, Callable[[str, np.ndarray, np.ndarray], BlockWeight]] = {
    "imatrix": symmetric_int4,
    "imatrix-asym": asymmetric_int4,
}
"""The --quant methods slmops runs itself: how each fits a layer's matrices (lm_head is 8-bit in all)."""
QUANTIZERS: dict[str, Callable[[str, np.ndarray, np.ndarray], BlockWeight]] = {
    **BODY_QUANTIZERS,
    "int8": lambda name, weight, _importance: symmetric_int8(name, weight),
}
"""Every way slmops makes blocks: the --quant methods and 8-bit symmetric (openvino-npu-int8's)."""
