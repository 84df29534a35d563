"""LoRA adapters beside one base graph: the agent picks one per request.

    peft adapter folder (adapter_config.json + adapter_model.safetensors, finetune.json)
      ─► read_adapter: every lora_A/lora_B pair by layer and module, B scaled by alpha/r
    variant folder from the model builder (model.onnx, int4 or float)
      ─► add_lora_inputs: after each linear's MatMul (MatMulNBits on int4)
             x ─► MatMul(A) ─► MatMul(B) ─► Add(base output)
         A and B are graph inputs whose default initializers are empty (rank 0): without an adapter
         the graph computes the base model; the LoRA matmuls stay in the graph's float type, never int4
      ─► write_adapter: adapters/<name>.onnx_adapter (onnxruntime's AdapterFormat), the tensors named
         as those inputs; onnxruntime-genai feeds them when a generator sets that adapter active

The builder packs q/k/v into one qkv_proj MatMul (and gate/up into gate_up_proj on CPU). An adapter's
modules of a packed MatMul become one pair: A is their A matrices side by side ([in, r_q + r_k + r_v]),
B is block-diagonal, so each module's delta lands in its own columns of the packed output. A module an
adapter leaves alone has no block, and a MatMul it leaves alone is not fed (the empty default); a MatMul
no adapter of the variant adapts gets no branch at all (an empty one still costs decode time).
"""

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from slmops.errors import BuildError
from slmops.manifest import ADAPTER_SUFFIX, ADAPTERS_DIR, Adapter

if TYPE_CHECKING:
    import numpy as np
    import onnx

MODEL_FILE = "model.onnx"

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
GRAPH_LINEARS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attn/qkv_proj", ("q_proj", "k_proj", "v_proj")),
    ("attn/q_proj", ("q_proj",)),
    ("attn/k_proj", ("k_proj",)),
    ("attn/v_proj", ("v_proj",)),
    ("attn/o_proj", ("o_proj",)),
    ("mlp/gate_up_proj", ("gate_proj", "up_proj")),
    ("mlp/gate_proj", ("gate_proj",)),
    ("mlp/up_proj", ("up_proj",)),
    ("mlp/down_proj", ("down_proj",)),
)
"""The model builder's MatMul of each decoder layer (its name under /model/layers.N/) and the Hugging
Face modules whose outputs it computes, in the order of its output's columns."""
PEFT_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


@dataclass
class LoraAdapter:
    """A peft LoRA adapter as matrices: (layer, module) -> (A [in, r], B [r, out] scaled)."""

    name: str
    path: Path
    rank: int
    alpha: float
    base_digest: str | None
    pairs: dict[tuple[int, str], tuple["np.ndarray", "np.ndarray"]] = field(default_factory=dict)

    def card(self) -> Adapter:
        return Adapter(
            name=self.name,
            path=f"{ADAPTERS_DIR}/{self.name}{ADAPTER_SUFFIX}",
            rank=self.rank,
            alpha=self.alpha,
            modules=sorted({module for _, module in self.pairs}),
            base_digest=self.base_digest,
        )


def read_adapter(name: str, path: Path) -> LoraAdapter:
    """The adapter in `path` (what `slmops build finetune` writes without --merge), checked: LoRA only,
    on the decoder layers' linears only."""
    import numpy as np
    from safetensors.numpy import load_file

    config_file, weights_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not config_file.is_file() or not weights_file.is_file():
        raise BuildError(f"adapter {name}: {path} is not a peft adapter folder (adapter_config.json and "
                         "adapter_model.safetensors); a merged model is a source, not an adapter")  # fmt: skip
    config = json.loads(config_file.read_text())
    unsupported = [
        what
        for what, present in (
            (f"peft_type {config.get('peft_type')}", config.get("peft_type") != "LORA"),
            ("DoRA (use_dora)", config.get("use_dora")),
            ("trained biases (lora_bias)", config.get("lora_bias")),
            ("per-module alphas (alpha_pattern)", config.get("alpha_pattern")),
        )
        if present
    ]
    if unsupported:
        raise BuildError(f"adapter {name}: {', '.join(unsupported)} cannot ship as a runtime adapter; "
                         "merge it into the model instead (build finetune --merge)")  # fmt: skip
    alpha = float(config["lora_alpha"])
    tensors = load_file(str(weights_file))
    halves: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        match = PEFT_KEY.search(key)
        if match is None or match[2] not in ATTENTION + MLP:
            raise BuildError(f"adapter {name}: {key} adapts what a runtime adapter cannot (only the decoder "
                             "layers' attention and MLP linears); merge it into the model instead")  # fmt: skip
        halves.setdefault((int(match[1]), match[2]), {})[match[3]] = value.astype(np.float32)
    if not halves:
        raise BuildError(f"adapter {name}: {weights_file} holds no LoRA weights")
    adapter = LoraAdapter(name, path, rank=int(config["r"]), alpha=alpha, base_digest=_base_digest(path))
    for where, half in sorted(halves.items()):
        if set(half) != {"A", "B"}:
            raise BuildError(f"adapter {name}: layer {where[0]} {where[1]} has lora_{''.join(half)} only")
        a, b = half["A"], half["B"]  # peft: A [r, in], B [out, r]
        r = a.shape[0]
        scale = alpha / (r**0.5 if config.get("use_rslora") else r)
        adapter.pairs[where] = (np.ascontiguousarray(a.T), np.ascontiguousarray(b.T * scale))
    return adapter


def _base_digest(path: Path) -> str | None:
    from .finetune import PROVENANCE

    record = path / PROVENANCE
    if not record.is_file():
        return None
    return json.loads(record.read_text()).get("base", {}).get("digest")


@dataclass(frozen=True)
class Slot:
    """One MatMul of the base graph that adapters can add to."""

    layer: int
    graph_name: str
    """Under /model/layers.N/, e.g. attn/qkv_proj."""
    modules: tuple[tuple[str, int], ...]
    """The Hugging Face modules it computes and their output widths, in column order."""
    in_features: int
    x: str
    """The MatMul's input (what the LoRA branch reads too)."""

    @property
    def a_input(self) -> str:
        return f"model.layers.{self.layer}.{self.graph_name.replace('/', '.')}.lora_A"

    @property
    def b_input(self) -> str:
        return f"model.layers.{self.layer}.{self.graph_name.replace('/', '.')}.lora_B"

    @property
    def output(self) -> str:
        return f"/model/layers.{self.layer}/{self.graph_name}/MatMul/output_0"


def slots(graph: "onnx.GraphProto", config: dict) -> list[Slot]:
    """Every linear of every decoder layer in the builder's graph, with its modules' widths (from the
    source's config.json); BuildError where one of a layer's seven linears has no MatMul of its own. Its
    output may come from another node than the MatMul (an Add of the offsets of asymmetric int4 blocks)."""
    heads, kv_heads, hidden = config["num_attention_heads"], config["num_key_value_heads"], config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // heads
    width = {
        "q_proj": heads * head_dim, "k_proj": kv_heads * head_dim, "v_proj": kv_heads * head_dim,
        "o_proj": hidden, "gate_proj": config["intermediate_size"], "up_proj": config["intermediate_size"],
        "down_proj": hidden,
    }  # fmt: skip
    in_features = {"o_proj": heads * head_dim, "down_proj": config["intermediate_size"]}
    matmuls = {n.name: n for n in graph.node if n.op_type in ("MatMul", "MatMulNBits")}
    outputs = {out for node in graph.node for out in node.output}
    found: list[Slot] = []
    for layer in range(config["num_hidden_layers"]):
        covered: list[str] = []
        for graph_name, modules in GRAPH_LINEARS:
            prefix = f"/model/layers.{layer}/{graph_name}/MatMul"
            node = matmuls.get(prefix) or matmuls.get(f"{prefix}_Q4") or matmuls.get(f"{prefix}_Q8")
            if node is None or f"{prefix}/output_0" not in outputs:
                continue
            found.append(Slot(layer, graph_name, tuple((m, width[m]) for m in modules),
                              in_features.get(modules[0], hidden), node.input[0]))  # fmt: skip
            covered += modules
        missing = sorted(set(ATTENTION + MLP) - set(covered))
        if missing:
            raise BuildError(f"the graph has no MatMul of its own for layer {layer}'s {', '.join(missing)}: "
                             "this model's export cannot take runtime adapters")  # fmt: skip
    return found


@dataclass(frozen=True)
class Branches:
    """What add_lora_inputs gave a graph: its slots, and the float type of their inputs (the graph's)."""

    slots: list[Slot]
    dtype: "np.dtype"


def add_lora_inputs(variant: Path, config: dict, adapters: list[LoraAdapter]) -> Branches:
    """Give each linear of `variant`'s graph that one of `adapters` adapts a LoRA branch fed by two graph
    inputs (see the module's docstring). A linear no adapter touches keeps no
    branch: each costs decode time even when empty. The weights stay in their external data file; only
    the graph changes."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    path = variant / MODEL_FILE
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    if any(i.name.endswith(".lora_A") for i in graph.input):
        raise BuildError(f"{path} already has LoRA inputs")
    elem_type = next(o.type.tensor_type.elem_type for o in graph.output if o.name == "logits")
    dtype = helper.tensor_dtype_to_np_dtype(elem_type)
    adapted = {where for adapter in adapters for where in adapter.pairs}
    found = [s for s in slots(graph, config) if any((s.layer, module) in adapted for module, _ in s.modules)]
    producers = {out: node for node in graph.node for out in node.output}
    for slot in found:
        base = producers[slot.output]
        base_output = slot.output.replace("/output_0", "/base_output_0")
        base.output[list(base.output).index(slot.output)] = base_output
        prefix = f"/model/layers.{slot.layer}/{slot.graph_name}"
        out_features = sum(w for _, w in slot.modules)
        graph.input.extend([
            helper.make_tensor_value_info(slot.a_input, elem_type, [slot.in_features, None]),
            helper.make_tensor_value_info(slot.b_input, elem_type, [None, out_features]),
        ])  # fmt: skip
        graph.initializer.extend([
            numpy_helper.from_array(np.zeros((slot.in_features, 0), dtype), slot.a_input),
            numpy_helper.from_array(np.zeros((0, out_features), dtype), slot.b_input),
        ])  # fmt: skip
        graph.node.extend([
            helper.make_node("MatMul", [slot.x, slot.a_input], [f"{prefix}/lora_A/output_0"],
                             f"{prefix}/lora_A/MatMul"),
            helper.make_node("MatMul", [f"{prefix}/lora_A/output_0", slot.b_input], [f"{prefix}/lora_B/output_0"],
                             f"{prefix}/lora_B/MatMul"),
            helper.make_node("Add", [base_output, f"{prefix}/lora_B/output_0"], [slot.output], f"{prefix}/lora/Add"),
        ])  # fmt: skip
    _topological(graph)
    onnx.save(model, str(path))
    return Branches(found, np.dtype(dtype))


def _topological(graph: "onnx.GraphProto") -> None:
    """Reorder the nodes so each comes after what it reads (the new ones were appended)."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise BuildError("the graph has a cycle or reads a tensor nothing makes")
        for node in ready:
            ordered.append(node)
            available.update(node.output)
        taken = {id(node) for node in ready}
        pending = [n for n in pending if id(n) not in taken]
    del graph.node[:]
    graph.node.extend(ordered)


def write_adapter(variant: Path, adapter: LoraAdapter, branches: Branches) -> Adapter:
    """`adapter` as variants/<id>/adapters/<name>.onnx_adapter, its tensors named as the graph's inputs."""
    import numpy as np
    import onnxruntime as ort

    found, dtype = branches.slots, branches.dtype
    placed = {(slot.layer, module) for slot in found for module, _ in slot.modules}
    stray = sorted(set(adapter.pairs) - placed)
    if stray:
        raise BuildError(f"adapter {adapter.name} adapts layer {stray[0][0]}'s {stray[0][1]}, which the graph's "
                         f"adapter inputs do not cover: was it trained on another model?")  # fmt: skip
    parameters = {}
    for slot in found:
        blocks = [(adapter.pairs.get((slot.layer, module)), width) for module, width in slot.modules]
        if all(pair is None for pair, _ in blocks):
            continue
        rank = sum(pair[0].shape[1] for pair, _ in blocks if pair is not None)
        a = np.zeros((slot.in_features, rank), np.float32)
        b = np.zeros((rank, sum(width for _, width in blocks)), np.float32)
        row = column = 0
        for pair, width in blocks:
            if pair is not None:
                r = pair[0].shape[1]
                a[:, row : row + r], b[row : row + r, column : column + width] = pair
                row += r
            column += width
        parameters[slot.a_input] = ort.OrtValue.ortvalue_from_numpy(a.astype(dtype))
        parameters[slot.b_input] = ort.OrtValue.ortvalue_from_numpy(b.astype(dtype))
    card = adapter.card()
    out = variant / card.path
    out.parent.mkdir(exist_ok=True)
    adapter_format = ort.AdapterFormat()
    adapter_format.set_adapter_version(1)
    adapter_format.set_model_version(1)
    adapter_format.set_parameters(parameters)
    adapter_format.export_adapter(str(out))
    return card
