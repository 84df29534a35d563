"""slmops' own int4 quantizers: blocks that reach onnxruntime's kernel as fitted, never worse than
plain round-to-nearest on the error they minimise, lossless where the weights lie on their grid,
and variants built with them that load and keep the embedding tied."""

import json
from pathlib import Path

import numpy as np
import pytest
from test_gguf_blocks import kernel_weight

from slmops.agent.serve.runtime import LoadedVariant
from slmops.build.blocks import BLOCK
from slmops.build.export import BuildRecord, QuantOptions, Recipe, export
from slmops.build.quantize import asymmetric_int4, symmetric_int4, symmetric_int8

N, K = 16, 128


@pytest.fixture
def weights() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    weight = rng.standard_t(df=4, size=(N, K)) * 0.02  # heavy tails, as trained weights have
    importance = rng.gamma(0.5, size=K)  # a few inputs matter much more than the rest
    return weight, importance


def weighted_error(weight: np.ndarray, approx: np.ndarray, importance: np.ndarray) -> np.ndarray:
    """Per block: sum of importance × squared error."""
    return (importance * (weight - approx) ** 2).reshape(N, K // BLOCK, BLOCK).sum(axis=-1)


def symmetric_rtn(weight: np.ndarray) -> np.ndarray:
    """onnxruntime's symmetric RTN: the block's extreme weight lands on level −8."""
    blocks = weight.reshape(N, K // BLOCK, BLOCK)
    extreme = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1)
    d = -extreme / 8
    return (np.clip(np.rint(blocks / d), -8, 7) * d).reshape(N, K)


def asymmetric_rtn(weight: np.ndarray) -> np.ndarray:
    """llama.cpp's Q4_1 fit: the block's min and max land on levels 0 and 15."""
    blocks = weight.reshape(N, K // BLOCK, BLOCK)
    lo, hi = blocks.min(-1, keepdims=True), blocks.max(-1, keepdims=True)
    d = (hi - lo) / 15
    return (np.clip(np.rint((blocks - lo) / d), 0, 15) * d + lo).reshape(N, K)


@pytest.mark.parametrize("quantize", [symmetric_int4, asymmetric_int4])
def test_blocks_reach_the_kernel_as_fitted(quantize, weights) -> None:
    weight, importance = weights
    blocks = quantize("w", weight, importance)
    assert blocks.shape == (N, K)
    assert np.abs(kernel_weight(blocks) - blocks.dequantized()).max() < 1e-6


@pytest.mark.parametrize("quantize, baseline", [(symmetric_int4, symmetric_rtn), (asymmetric_int4, asymmetric_rtn)])
def test_no_block_is_worse_than_round_to_nearest_on_its_grid(quantize, baseline, weights) -> None:
    weight, importance = weights
    ours = weighted_error(weight, quantize("w", weight, importance).dequantized(), importance)
    rtn = weighted_error(weight, baseline(weight), importance)
    assert (ours <= rtn * (1 + 1e-6)).all()
    assert ours.sum() < 0.8 * rtn.sum()  # and much better in all


def test_asymmetric_blocks_recover_weights_on_their_grid(weights) -> None:
    """A dequantized Q4_1 model (the catalogue's) lies on this grid: its blocks come back exactly."""
    _, importance = weights
    rng = np.random.default_rng(5)
    d = rng.uniform(0.001, 0.01, size=(N, K // BLOCK, 1))
    m = rng.uniform(-0.08, -0.01, size=(N, K // BLOCK, 1))
    q = rng.integers(0, 16, size=(N, K // BLOCK, BLOCK))
    q[..., 0], q[..., 1] = 0, 15  # each block spans its grid, as Q4_1's min/max fit makes it
    on_grid = (d * q + m).reshape(N, K)
    blocks = asymmetric_int4("w", on_grid, importance)
    assert np.abs(blocks.dequantized() - on_grid).max() < 1e-8


def test_int8_blocks_are_q8_0s(weights) -> None:
    weight, _ = weights
    blocks = symmetric_int8("w", weight)
    amax = np.abs(weight.reshape(N, K // BLOCK, BLOCK)).max(-1)
    assert blocks.bits == 8 and np.allclose(blocks.scales, amax / 127)
    assert np.abs(blocks.dequantized() - weight).max() <= amax.max() / 254 + 1e-9
    assert np.abs(kernel_weight(blocks) - blocks.dequantized()).max() < 1e-6


def test_imatrix_asym_variant_loads_keeps_the_embedding_tied_and_generates(tiny_model: Path, tmp_path: Path) -> None:
    import onnx
    from test_gguf_transcode import embedding_rows, variant_weight

    recipe = Recipe(source=str(tiny_model), targets=["cpu-int4"], quant=QuantOptions(method="imatrix-asym"))
    record = export(recipe, tmp_path / "out")
    variant = record.variants["cpu-int4"]
    layers = json.loads((tiny_model / "config.json").read_text())["num_hidden_layers"]
    assert variant.quant == "imatrix-asym"
    assert variant.blocks == {"imatrix-asym": 4 * layers, "int8": 1, "with_offsets": 4 * layers}  # gate+up fused
    assert variant.accuracy is not None and variant.accuracy.passed
    path = tmp_path / "out" / "variants" / "cpu-int4"
    model = onnx.load(str(path / "model.onnx"))
    head = variant_weight(model, "lm_head.MatMul")
    assert np.abs(embedding_rows(model, np.arange(32)) - head[:32]).max() < 1e-6  # one set of 8-bit blocks
    loaded = LoadedVariant.load(path)
    assert len(list(loaded.generate(loaded.encode("Hello"), max_new_tokens=4, ignore_eos=True))) == 4
    assert BuildRecord.load(tmp_path / "out").recipe.quant.method == "imatrix-asym"
