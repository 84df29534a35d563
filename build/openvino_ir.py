"""A checkpoint as an OpenVINO IR that OpenVINO GenAI serves, with slmops' own int4 blocks in it.

    float checkpoint ─► torch module with the KV cache as plain inputs and outputs
      ─► openvino.convert_model (traced) ─► stateful: KV cache inputs/outputs become variables,
         a beam_idx input reorders them, zeros of the batch's shape start them (what
         optimum-intel does; its release caps transformers below ours, so slmops does it here)
      ─► every matrix with a BlockWeight: its float constant becomes OpenVINO's compressed-weight
         pattern  u4/u8 levels ─► Convert ─► Subtract(zero point) ─► Multiply(scale) ─► Reshape,
         which the CPU and NPU plugins run without unpacking
      ─► openvino_model.xml/.bin + openvino_tokenizer/detokenizer.xml (openvino-tokenizers)
         + the tokenizer's and model's JSON files (chat template, generation config)

The blocks are the very BlockWeights the cpu-int4 ONNX variant carries (a GGUF's own, or
slmops' quantizers'), so both variants stand for the same weights. An offset o (Q4_1,
imatrix-asym) enters as the float zero point z' = 8 − o/d: d·(q − z') = d·(q − 8) + o.
"""

import contextlib
import itertools
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from slmops.errors import BuildError

from .block_graph import LM_HEAD, QKV, layer_matrix
from .blocks import BLOCK, ZERO_POINT, BlockWeight

if TYPE_CHECKING:
    import openvino as ov

MODEL_XML = "openvino_model.xml"
TOKENIZER_XML, DETOKENIZER_XML = "openvino_tokenizer.xml", "openvino_detokenizer.xml"
TRACE_PAST, TRACE_NEW = 3, 2
"""Lengths of the cache and of the new tokens in the example the model is traced on (both > 1:
a single new token takes transformers' one-token mask branch, which does not generalise)."""
LAYER_WEIGHTS = {
    "attn.o_proj": "self_attn.o_proj",
    "mlp.gate_proj": "mlp.gate_proj",
    "mlp.up_proj": "mlp.up_proj",
    "mlp.down_proj": "mlp.down_proj",
}
"""The model builder's matrix names (the key of slmops' BlockWeights) → the checkpoint's modules."""


def write_ir(
    source: Path,
    dest: Path,
    matrices: Mapping[str, BlockWeight] | None,
    progress: Callable[[str], None] = lambda _: None,
) -> dict[str, int]:
    """Write `source` as an OpenVINO GenAI model folder `dest`; `matrices` (keyed by the builder's
    MatMul names) replace the float weights they name. Returns the matrices written per block kind
    (and how many have an offset), as block_graph.write_blocks does."""
    import openvino as ov
    import torch
    from openvino_tokenizers import convert_tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from .models import quiet_transformers

    quiet_transformers()
    dest.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    progress("tracing the model for OpenVINO")
    ov_model = _stateful(_converted(model), model.config.num_hidden_layers)
    by_kind: dict[str, int] = {}
    if matrices is not None:
        progress("writing the int4 blocks into the IR")
        weights = checkpoint_weights(matrices, model.config)
        by_kind = _compress(ov_model, weights)
    ov.save_model(ov_model, dest / MODEL_XML, compress_to_fp16=False)
    progress("converting the tokenizer (openvino-tokenizers)")
    tokenizer = AutoTokenizer.from_pretrained(source)
    ov_tokenizer, ov_detokenizer = convert_tokenizer(tokenizer, with_detokenizer=True)
    ov.save_model(ov_tokenizer, dest / TOKENIZER_XML)
    ov.save_model(ov_detokenizer, dest / DETOKENIZER_XML)
    tokenizer.save_pretrained(dest)
    model.config.save_pretrained(dest)
    with contextlib.suppress(OSError):  # no generation_config.json: OpenVINO GenAI then uses its defaults
        GenerationConfig.from_pretrained(source).save_pretrained(dest)
    return by_kind


def checkpoint_weights(matrices: Mapping[str, BlockWeight], config: Any) -> dict[str, BlockWeight]:
    """The BlockWeights keyed by the checkpoint's weight names (the fused q/k/v split back by rows)."""
    head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    q_rows, kv_rows = config.num_attention_heads * head, config.num_key_value_heads * head
    weights: dict[str, BlockWeight] = {}
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}"
        qkv = matrices.get(layer_matrix(layer, QKV))
        if qkv is not None:
            for name, part in zip(("q_proj", "k_proj", "v_proj"), rows(qkv, [q_rows, kv_rows, kv_rows]), strict=True):
                weights[f"{prefix}.self_attn.{name}.weight"] = part
        for builder_name, module in LAYER_WEIGHTS.items():
            if (weight := matrices.get(layer_matrix(layer, builder_name))) is not None:
                weights[f"{prefix}.{module}.weight"] = weight
    if (lm_head := matrices.get(LM_HEAD)) is not None:
        tied = getattr(config, "tie_word_embeddings", False)
        weights["model.embed_tokens.weight" if tied else "lm_head.weight"] = lm_head
    return weights


def rows(weight: BlockWeight, sizes: list[int]) -> list[BlockWeight]:
    """`weight` cut into consecutive row ranges of `sizes` (blocks.stacked undone)."""
    if sum(sizes) != weight.shape[0]:
        raise BuildError(f"{weight.name} has {weight.shape[0]} rows, not {sum(sizes)}")
    bounds = np.cumsum([0, *sizes])
    return [
        BlockWeight(
            name=f"{weight.name}[{start}:{end}]",
            kind=weight.kind,
            bits=weight.bits,
            packed=weight.packed[start:end],
            scales=weight.scales[start:end],
            offsets=None if weight.offsets is None else weight.offsets[start:end],
        )
        for start, end in itertools.pairwise(bounds)
    ]


def _converted(model: Any) -> "ov.Model":
    """The model traced with its KV cache as inputs past_key_values.{i}.key/value and outputs
    present.{i}.key/value, beside input_ids, attention_mask and position_ids → logits."""
    import openvino as ov
    import torch
    from transformers import DynamicCache

    config = model.config
    layers = config.num_hidden_layers
    head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    class WithPlainCache(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = DynamicCache(config=config)
            for i, layer in enumerate(cache.layers):  # set, not update(): cat onto an empty tensor does not trace
                layer.lazy_initialization(past[2 * i], past[2 * i + 1])
                layer.keys, layer.values = past[2 * i], past[2 * i + 1]
            out = self.m(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
            )
            return (out.logits, *(t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)))

    total = TRACE_PAST + TRACE_NEW
    example = (
        torch.ones(1, TRACE_NEW, dtype=torch.long),
        torch.ones(1, total, dtype=torch.long),
        torch.arange(TRACE_PAST, total).unsqueeze(0),
        *(torch.zeros(1, config.num_key_value_heads, TRACE_PAST, head) for _ in range(2 * layers)),
    )
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns at every Python branch on a tensor's value or shape: expected, the
        # example's lengths (TRACE_PAST, TRACE_NEW) pick the branches that hold for any length.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecated attributes, read by the tracer
        ov_model = ov.convert_model(WithPlainCache(), example_input=example)
    kv = [f"{i}.{part}" for i in range(layers) for part in ("key", "value")]
    inputs = ["input_ids", "attention_mask", "position_ids", *(f"past_key_values.{n}" for n in kv)]
    for port, name in zip(ov_model.inputs, inputs, strict=True):
        port.get_tensor().set_names({name})
    for port, name in zip(ov_model.outputs, ["logits", *(f"present.{n}" for n in kv)], strict=True):
        port.get_tensor().set_names({name})
    ov_model.reshape(
        {
            port: [-1, config.num_key_value_heads, -1, head] if port.get_any_name().startswith("past") else [-1, -1]
            for port in ov_model.inputs
        }
    )
    return ov_model


def _stateful(ov_model: "ov.Model", layers: int) -> "ov.Model":
    """KV cache inputs and outputs hidden as variables, as OpenVINO GenAI expects its models."""
    import openvino as ov
    from openvino import opset13 as ops
    from openvino._offline_transformations import apply_make_stateful_transformation

    beam_idx = ops.parameter([-1], ov.Type.i32, name="beam_idx")
    beam_idx.output(0).get_tensor().set_names({"beam_idx"})
    ov_model.add_parameters([beam_idx])
    pairs = {f"past_key_values.{i}.{p}": f"present.{i}.{p}" for i in range(layers) for p in ("key", "value")}
    for name in pairs:
        port = ov_model.input(name)
        consumers = list(port.get_target_inputs())
        reordered = ops.gather(port, beam_idx, ops.constant(0))
        for consumer in consumers:
            consumer.replace_source_output(reordered.output(0))
    apply_make_stateful_transformation(ov_model, pairs)
    batch = ops.gather(ops.shape_of(ov_model.input("input_ids"), output_type="i64"), ops.constant([0]), ops.constant(0))
    for op in ov_model.get_ops():
        if op.get_type_name() == "ReadValue":  # start each variable as zeros [batch, heads, 0, head]
            dims = [ops.constant(np.array([d.min_length], dtype=np.int64)) for d in op.get_output_partial_shape(0)]
            dims[0] = batch
            zero = ops.constant(0.0, dtype=op.get_output_element_type(0))
            op.set_arguments([ops.broadcast(zero, ops.concat(dims, axis=0))])
    ov_model.validate_nodes_and_infer_types()
    return ov_model


def _compress(ov_model: "ov.Model", weights: Mapping[str, BlockWeight]) -> dict[str, int]:
    """Replace each float weight constant named by `weights` with its blocks."""
    by_name = {}
    for op in ov_model.get_ops():
        if op.get_type_name() == "Constant":
            by_name[op.get_friendly_name().removeprefix("self.m.")] = op
    missing = sorted(set(weights) - set(by_name))
    if missing:
        raise BuildError(f"the traced OpenVINO model has no weight {missing[0]} (of {len(missing)} missing)")
    by_kind: dict[str, int] = {}
    for name, weight in weights.items():
        constant = by_name[name]
        if tuple(constant.get_output_shape(0)) != weight.shape:
            raise BuildError(
                f"{name}: the blocks are {weight.shape}, the model's weight is {tuple(constant.get_output_shape(0))}"
            )
        decompressed = decompression(weight, name)
        for consumer in list(constant.output(0).get_target_inputs()):
            consumer.replace_source_output(decompressed)
        by_kind[weight.kind] = by_kind.get(weight.kind, 0) + 1
        by_kind["with_offsets"] = by_kind.get("with_offsets", 0) + (weight.offsets is not None)
    ov_model.validate_nodes_and_infer_types()
    return by_kind


def decompression(weight: BlockWeight, name: str) -> "ov.Output":
    """OpenVINO's compressed-weight pattern for `weight`: levels (u4 or u8) ─► f32 ─► − zero point
    ─► × scale ─► [N, K]."""
    import openvino as ov
    from openvino import opset13 as ops

    n, k = weight.shape
    blocks = k // BLOCK
    levels = ov.Tensor(ov.Type.u4 if weight.bits == 4 else ov.Type.u8, [n, blocks, BLOCK])
    levels.data[...] = weight.packed.reshape(levels.data.shape)  # u4 is packed, as MatMulNBits packs it
    scale = weight.scales.astype(np.float32)[..., None]
    zero_point: Any
    if weight.offsets is None:
        zero_point = ops.convert(ops.constant(np.full((1, 1, 1), ZERO_POINT[weight.bits], np.uint8), ov.Type.u8), "f32")
    else:
        safe = np.where(scale == 0, 1.0, scale)
        zero_point = ops.constant((ZERO_POINT[weight.bits] - weight.offsets[..., None] / safe).astype(np.float32))
    dequantized = ops.multiply(ops.subtract(ops.convert(ov.op.Constant(levels), "f32"), zero_point), scale)
    reshaped = ops.reshape(dequantized, ops.constant(np.array([n, k], np.int64)), special_zero=False)
    reshaped.set_friendly_name(f"{name}/decompressed")
    return reshaped.output(0)
