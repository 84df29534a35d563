"""The qnn-npu variant: a static-shape decoder compiled into a Qualcomm HTP context binary.

    float checkpoint (Llama family) ─► StaticDecoder: one new token in; the KV cache of
        CONTEXT − 1 positions as inputs (masked where empty); logits and the new token's keys
        and values out (the host writes them into its cache). Static shapes and plain ops
        (MatMul, Softmax, Mul, Add, Concat …) are what QNN's HTP takes; onnxruntime-genai's
        graph (GroupQueryAttention, SkipSimplifiedLayerNormalization, dynamic shapes) is not.
      ─► ONNX (torch.onnx.export, opset 17)
      ─► onnxruntime-qnn's HTP backend compiles it for one SoC, in float16, into an EPContext
         model with the context binary embedded (model_ctx.onnx): what the device's NPU loads
         without compiling
      ─► the binary scored on the HTP simulator against the float graph (SCORE_TOKENS)
      ─► + qnn.json (shapes, mask, SoC) and the tokenizer files

float16, not integer QDQ: SmolLM2's residual stream carries a ~22,500 activation at its first
position, so a uint16 activation grid over that range steps by ~0.7 and the QDQ graph scored
perplexity 26,055 (float 23.8), per-channel weights or not; float16 keeps both ends. Its
RMSNorm is rewritten to scale its input first (norm_scale), so that squaring that activation
does not overflow float16.

onnxruntime-qnn's Linux x86-64 wheel carries Qualcomm's HTP libraries, its compiler and a
simulator, so the binary is built here and also runs here (slowly: ~1.4 s per token for
SmolLM2) for scoring and tests. The wheel asks for a newer onnxruntime than
onnxruntime-genai 0.18's; it is installed without its dependencies and loads as a plugin
execution provider into the pinned onnxruntime.
"""

import json
import math
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from slmops.agent.serve.qnn_runtime import CONFIG_FILE, KvCache, qnn_session_options, token_logits
from slmops.errors import BuildError

from .evaluate import heldout_text, perplexity
from .quantize import calibration_text

CONTEXT = 512
"""Positions the static KV cache holds (the variant's context length)."""
MASK = -100.0
"""The additive attention mask of an empty position: softmax gives it nothing (e^-100), and
float16 holds it."""
NORM_PEAK = 128.0
"""RMSNorm's input is scaled so that its largest magnitude on the calibration text is at most this
(its square, 16,384, stays well inside float16's 65,504; see norm_scale)."""
CALIBRATION_TOKENS = 512
"""Tokens of the shipped calibration text that set norm_scale."""
SCORE_TOKENS = 48
"""Held-out tokens the build scores the binary on, on the HTP simulator (~1.4 s a token for
SmolLM2), against the float graph on the same tokens."""
MODEL_FILE = "model_ctx.onnx"
QUANT = "fp16"
"""What made the variant's weights, as build.json records it."""


@dataclass(frozen=True)
class Soc:
    soc_model: int
    htp_arch: int
    description: str


QnnSoc = Literal["sm8650", "sm8750", "sm8550", "x-elite"]
SOCS: dict[QnnSoc, Soc] = {
    "sm8650": Soc(57, 75, "Snapdragon 8 Gen 3"),
    "sm8750": Soc(69, 79, "Snapdragon 8 Elite"),
    "sm8550": Soc(43, 73, "Snapdragon 8 Gen 2"),
    "x-elite": Soc(60, 73, "Snapdragon X Elite"),
}
DEFAULT_SOC: QnnSoc = "sm8650"


def qnn_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxruntime_qnn") is not None


@dataclass(frozen=True)
class Score:
    """The binary against the float graph it was compiled from, on the same held-out tokens."""

    perplexity: float
    """The context binary's, on the HTP simulator."""
    float_perplexity: float
    """The float graph's, on onnxruntime's CPU provider."""
    tokens: int


def write_qnn(
    source: Path,
    dest: Path,
    soc: QnnSoc = DEFAULT_SOC,
    progress: Callable[[str], None] = lambda _: None,
    score: bool = False,
) -> Score | None:
    """Build the qnn-npu variant of `source` into `dest`; with `score`, score the binary."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .models import quiet_transformers

    quiet_transformers()
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    if model.config.model_type != "llama":
        raise BuildError(f"qnn-npu is built for Llama-family decoders; {source} is {model.config.model_type!r}")
    tokenizer = AutoTokenizer.from_pretrained(source)
    calibration = tokenizer(calibration_text(), add_special_tokens=False)["input_ids"][:CALIBRATION_TOKENS]
    decoder = StaticDecoder(model, norm_scale(model, calibration))
    dest.mkdir(parents=True, exist_ok=True)
    result = None
    with tempfile.TemporaryDirectory(prefix="slmops-qnn-") as work:
        float_path = Path(work) / "model.onnx"
        progress("exporting the static decoder")
        decoder.export(float_path)
        progress(f"compiling the HTP context binary (float16) for {SOCS[soc].description}")
        _compile(float_path, dest / MODEL_FILE, SOCS[soc])
        if score:
            progress(f"scoring the binary on the HTP simulator ({SCORE_TOKENS} tokens)")
            ids = tokenizer(heldout_text(), add_special_tokens=False)["input_ids"][:SCORE_TOKENS]
            float_graph = ort_session(float_path)
            binary = ort_session(dest / MODEL_FILE, qnn_session_options())
            result = Score(decoder.perplexity(binary, ids), decoder.perplexity(float_graph, ids), len(ids) - 1)
    config = {
        "model_file": MODEL_FILE,
        "context_length": CONTEXT,
        "mask": MASK,
        "layers": decoder.layers,
        "kv_heads": decoder.kv_heads,
        "head_dim": decoder.head_dim,
        "vocab_size": model.config.vocab_size,
        "soc": soc,
        "soc_model": SOCS[soc].soc_model,
        "htp_arch": SOCS[soc].htp_arch,
        "precision": "fp16",
        "norm_scale": decoder.norm_scale,
    }
    (dest / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.save_pretrained(dest)
    model.config.save_pretrained(dest)
    model.generation_config.save_pretrained(dest)
    return result


def ort_session(path: Path, options: Any = None) -> Any:
    import onnxruntime as ort

    if options is None:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return ort.InferenceSession(str(path), sess_options=options)


class StaticDecoder:
    """The checkpoint as one decode step with static shapes (a Llama written out in plain ops)."""

    def __init__(self, model: Any, norm_scale: float = 1.0) -> None:
        config = model.config
        self.model = model
        self.norm_scale = norm_scale
        self.layers = config.num_hidden_layers
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.past = CONTEXT - 1

    def input_names(self) -> list[str]:
        return ["input_ids", "position_ids", "attention_mask"] + [
            f"past_{kv}_{i}" for i in range(self.layers) for kv in ("key", "value")
        ]

    def output_names(self) -> list[str]:
        return ["logits"] + [f"present_{kv}_{i}" for i in range(self.layers) for kv in ("key", "value")]

    def export(self, path: Path) -> None:
        import torch

        module = _module(self.model, self.heads, self.kv_heads, self.head_dim, self.norm_scale)
        example = (
            torch.zeros(1, 1, dtype=torch.int32),
            torch.zeros(1, 1, dtype=torch.int32),
            torch.zeros(1, 1, 1, CONTEXT),
            *(torch.zeros(1, self.kv_heads, self.past, self.head_dim) for _ in range(2 * self.layers)),
        )
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
            torch.onnx.export(
                module,
                example,
                str(path),
                input_names=self.input_names(),
                output_names=self.output_names(),
                opset_version=17,
                dynamo=False,
            )

    def perplexity(self, session: Any, ids: list[int]) -> float:
        """A session of this graph (float or compiled) scored on `ids`, one token per pass, in
        windows its cache holds."""

        def window_logits(chunk: list[int]) -> np.ndarray:
            return token_logits(session, KvCache(self.layers, self.kv_heads, self.head_dim, self.past, MASK), chunk)

        return perplexity(ids, window_logits, self.past)[0]


def norm_scale(model: Any, ids: list[int]) -> float:
    """The power of two RMSNorm divides its input by: the largest input magnitude of any RMSNorm
    on `ids` brought to NORM_PEAK or below (1 where it already is)."""
    import torch

    peak = 0.0

    def hook(_module: Any, inputs: tuple, _output: Any) -> None:
        nonlocal peak
        peak = max(peak, float(inputs[0].abs().max()))

    norms = [m for name, m in model.named_modules() if name.endswith(("layernorm", "norm")) and hasattr(m, "weight")]
    handles = [m.register_forward_hook(hook) for m in norms]
    try:
        with torch.inference_mode():
            model(torch.tensor([ids]))
    finally:
        for handle in handles:
            handle.remove()
    return float(2 ** max(0, math.ceil(math.log2(peak / NORM_PEAK)))) if peak > NORM_PEAK else 1.0


def _module(model: Any, heads: int, kv_heads: int, head_dim: int, norm_scale: float) -> Any:
    import torch

    config = model.config
    rope = getattr(config, "rope_parameters", None) or {}
    theta = float(rope.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0)
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    freqs = torch.arange(CONTEXT, dtype=torch.float)[:, None] * inv_freq[None, :]
    angles = torch.cat((freqs, freqs), dim=-1)
    group, eps = heads // kv_heads, config.rms_norm_eps

    def rms(x, weight):
        # Scaled first: x² of a massive activation (SmolLM2's first position carries ~22,500)
        # overflows float16, which the HTP computes in; RMSNorm does not change with the scale
        # (eps follows it). A per-row scale (x / max|x|) lost the small rows on the HTP instead.
        y = x * (1 / norm_scale)
        return weight * (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps / norm_scale**2))

    def rotated(x):
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    class Step(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m, self.lm_head = model.model, model.lm_head
            self.register_buffer("cos", angles.cos(), persistent=False)
            self.register_buffer("sin", angles.sin(), persistent=False)

        def forward(self, input_ids, position_ids, attention_mask, *past):
            x = self.m.embed_tokens(input_ids)
            cos, sin = self.cos[position_ids].unsqueeze(1), self.sin[position_ids].unsqueeze(1)
            presents = []
            for i, layer in enumerate(self.m.layers):
                attn = layer.self_attn
                h = rms(x, layer.input_layernorm.weight)
                q = attn.q_proj(h).view(1, 1, heads, head_dim).transpose(1, 2)
                k = attn.k_proj(h).view(1, 1, kv_heads, head_dim).transpose(1, 2)
                v = attn.v_proj(h).view(1, 1, kv_heads, head_dim).transpose(1, 2)
                q, k = q * cos + rotated(q) * sin, k * cos + rotated(k) * sin
                presents += [k, v]
                keys, values = torch.cat([past[2 * i], k], dim=2), torch.cat([past[2 * i + 1], v], dim=2)
                grouped = q.reshape(1, kv_heads, group, head_dim)  # GQA without repeating keys
                scores = torch.matmul(grouped, keys.transpose(2, 3)) * head_dim**-0.5
                scores = scores.reshape(1, heads, 1, -1) + attention_mask
                weights = torch.softmax(scores, dim=-1).reshape(1, kv_heads, group, -1)
                out = torch.matmul(weights, values).reshape(1, 1, heads * head_dim)
                x = x + attn.o_proj(out)
                h = rms(x, layer.post_attention_layernorm.weight)
                x = x + layer.mlp.down_proj(torch.nn.functional.silu(layer.mlp.gate_proj(h)) * layer.mlp.up_proj(h))
            return (self.lm_head(rms(x, self.m.norm.weight)), *presents)

    return Step().eval()


def _compile(float_path: Path, out: Path, soc: Soc) -> None:
    import onnx
    import onnxruntime as ort

    options = qnn_session_options(
        {
            "soc_model": str(soc.soc_model),
            "htp_arch": str(soc.htp_arch),
            "htp_graph_finalization_optimization_mode": "3",
            "enable_htp_fp16_precision": "1",  # the float graph runs in float16 on the HTP
        }
    )
    options.add_session_config_entry("ep.context_enable", "1")
    options.add_session_config_entry("ep.context_file_path", str(out))
    options.add_session_config_entry("ep.context_embed_mode", "1")
    try:
        ort.InferenceSession(str(float_path), sess_options=options)
    except Exception as e:  # onnxruntime raises its own exception types for every failure
        raise BuildError(f"onnxruntime-qnn could not compile the decoder for {soc.description}: {e}") from None
    if not out.is_file():
        raise BuildError(f"onnxruntime-qnn wrote no context binary for {soc.description}")
    left = sorted({n.op_type for n in onnx.load(str(out), load_external_data=False).graph.node} - {"EPContext"})
    if left:
        out.unlink()
        raise BuildError(f"QNN's HTP backend did not take the whole decoder: {', '.join(left)} would run on the CPU")
