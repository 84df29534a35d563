"""A qnn-npu variant (build.qnn_graph): a static-shape decoder in a QNN HTP context binary.

    variant folder (model_ctx.onnx, qnn.json, tokenizer.json, chat_template.jinja)
      ─► onnxruntime with onnxruntime-qnn's HTP backend as a plugin execution provider
      ─► one graph: one token in; the request's own KV cache (host memory, float32, filled from
         the left, the empty rest masked) in; logits and the token's keys and values out
      ─► a prompt goes in token by token (the graph has one shape), then the reply; greedy or
         sampled here (temperature, top-k, top-p, seed, repetition penalty) from the logits

Tokenizer and chat template come from the variant's files through `tokenizers` and jinja2,
as transformers would render them. No prefix cache: each request fills its own cache.
On an x86-64 machine onnxruntime-qnn runs the binary on its HTP simulator (tests).
"""

import json
import time
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from slmops.errors import RuntimeLoadError

from . import chat_template
from .runtime import Generation, GenerationStats, LoadedVariant, Sampling, TextStream

if TYPE_CHECKING:
    import onnxruntime as ort
    from tokenizers import Tokenizer

CONFIG_FILE = "qnn.json"


def is_qnn_folder(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file()


def qnn_session_options(provider_options: dict[str, str] | None = None) -> "ort.SessionOptions":
    """Session options with onnxruntime-qnn's HTP backend added as a plugin execution provider."""
    import onnxruntime as ort

    try:
        import onnxruntime_qnn
    except ImportError:
        raise RuntimeLoadError(
            "this variant is a QNN context binary, and onnxruntime-qnn is not installed here: "
            "pip install --no-deps onnxruntime-qnn==2.7.0"
        ) from None
    if "QNNExecutionProvider" not in {d.ep_name for d in ort.get_ep_devices()}:
        ort.register_execution_provider_library("QNNExecutionProvider", onnxruntime_qnn.get_library_path())
    devices = [d for d in ort.get_ep_devices() if d.ep_name == "QNNExecutionProvider"]
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: the plugin warns of Windows-only features on every session
    options.add_provider_for_devices(devices, {"backend_type": "htp", **(provider_options or {})})
    return options


class QnnVariant(LoadedVariant):
    def __init__(self, path: Path, session: "ort.InferenceSession", tokenizer: "Tokenizer", config: dict) -> None:
        self.path = path
        self.session = session
        self.tokenizer = tokenizer
        self.config = config
        self.context_length = int(config["context_length"])
        self.vocab_size = int(config["vocab_size"])
        self.eos_token_ids = _eos_ids(path)
        template = chat_template.load(path)
        if template is None:
            raise RuntimeLoadError(f"{path} has no {chat_template.TEMPLATE_FILE}")
        self._template = template

    @classmethod
    def open(cls, path: Path) -> "QnnVariant":
        import onnxruntime as ort
        from tokenizers import Tokenizer

        config = json.loads((path / CONFIG_FILE).read_text())
        try:
            session = ort.InferenceSession(str(path / config["model_file"]), sess_options=qnn_session_options())
        except RuntimeLoadError:
            raise
        except Exception as e:  # onnxruntime raises its own exception types for every load failure
            raise RuntimeLoadError(f"onnxruntime-qnn cannot load {path}: {e}") from None
        return cls(path, session, Tokenizer.from_file(str(path / "tokenizer.json")), config)

    @property
    def runtime(self) -> str:
        return f"onnxruntime-qnn {version('onnxruntime-qnn')} (HTP, {self.config['soc']})"

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        return str(self._template.render(messages=messages, add_generation_prompt=True))

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def text_stream(self) -> TextStream:
        return _QnnTextStream(self.tokenizer)

    def _generation(
        self, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling, adapter: str | None
    ) -> Generation:
        return QnnGeneration(self, prompt_ids, max_new_tokens, sampling)

    def new_cache(self) -> "KvCache":
        c = self.config
        return KvCache(c["layers"], c["kv_heads"], c["head_dim"], self.context_length - 1, float(c["mask"]))

    def step(self, cache: "KvCache", token: int, position: int) -> np.ndarray:
        return step(self.session, cache, token, position)

    def token_logits(self, token_ids: list[int]) -> Any:
        return token_logits(self.session, self.new_cache(), token_ids)


def step(session: "ort.InferenceSession", cache: "KvCache", token: int, position: int) -> np.ndarray:
    """One pass of the static graph: the logits after `token` at `position`, its KV written into `cache`."""
    outputs = session.run(None, cache.feed(token, position))
    cache.write(outputs[1:], position)
    return np.asarray(outputs[0][0, 0])


def token_logits(session: "ort.InferenceSession", cache: "KvCache", token_ids: list[int]) -> np.ndarray:
    """[len, vocab]: `token_ids` through the static graph one by one, from `cache` empty."""
    return np.stack([step(session, cache, token, position) for position, token in enumerate(token_ids)])


class KvCache:
    """One request's cache for the static graph: `past` positions filled from the left, and the
    mask hiding the empty ones (the new token's own key and value come last)."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, past: int, mask: float) -> None:
        self.past, self.mask_value = past, mask
        self.tensors = [np.zeros((1, kv_heads, past, head_dim), np.float32) for _ in range(2 * layers)]
        self.names = [f"past_{kv}_{i}" for i in range(layers) for kv in ("key", "value")]

    def feed(self, token: int, position: int) -> dict[str, np.ndarray]:
        if position >= self.past:
            raise ValueError(f"the static cache holds {self.past} positions; position {position} is past it")
        mask = np.full((1, 1, 1, self.past + 1), self.mask_value, np.float32)
        mask[..., :position] = 0
        mask[..., self.past] = 0
        feed = {
            "input_ids": np.array([[token]], np.int32),
            "position_ids": np.array([[position]], np.int32),
            "attention_mask": mask,
        }
        feed.update(zip(self.names, self.tensors, strict=True))
        return feed

    def write(self, presents: list[np.ndarray], position: int) -> None:
        for tensor, present in zip(self.tensors, presents, strict=True):
            tensor[:, :, position] = present[:, :, 0]


class QnnGeneration:
    def __init__(self, variant: QnnVariant, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling) -> None:
        self.variant = variant
        self.sampling = sampling
        self.max_new_tokens = max_new_tokens
        self.stats = GenerationStats(prompt_tokens=len(prompt_ids))
        self.done = False
        self._prompt = prompt_ids
        self._sequence = list(prompt_ids)
        self._stops = sampling.stops(variant.eos_token_ids)
        self._cache: KvCache | None = variant.new_cache()
        self._rng = np.random.default_rng(sampling.seed)
        self._logits: np.ndarray | None = None
        self._started = 0.0

    def step(self) -> int | None:
        if self.done:
            return None
        assert self._cache is not None
        if self._logits is None:
            self._started = time.perf_counter()
            for position, token in enumerate(self._prompt):
                self._logits = self.variant.step(self._cache, token, position)
        if self.stats.new_tokens >= self.max_new_tokens:
            self._end("length")
            return None
        assert self._logits is not None
        token = sample(self._logits, self.sampling, self._sequence, self._rng)
        self.stats.timed(time.perf_counter() - self._started)
        if token in self._stops:
            self._end("stop")
            return None
        self.stats.new_tokens += 1
        self._sequence.append(token)
        if self.stats.new_tokens < self.max_new_tokens:  # the last token's KV is never needed
            self._logits = self.variant.step(self._cache, token, len(self._sequence) - 1)
        return token

    def _end(self, reason: str) -> None:
        self.stats.finish_reason = reason
        self.done = True
        self._cache = None

    def release(self) -> None:
        self.done = True
        self._cache = None


def sample(logits: np.ndarray, sampling: Sampling, sequence: list[int], rng: np.random.Generator) -> int:
    """The next token from one position's logits: greedy at temperature 0, else temperature, top-k
    and top-p sampling; a repetition penalty divides (or, below zero, multiplies) the logits of
    tokens already in the sequence, as transformers' does."""
    scores = logits.astype(np.float64)
    if sampling.repetition_penalty != 1.0 and sequence:
        seen = np.unique(sequence)
        picked = scores[seen]
        scores[seen] = np.where(picked > 0, picked / sampling.repetition_penalty, picked * sampling.repetition_penalty)
    if sampling.temperature <= 0:
        return int(scores.argmax())
    scores = scores / sampling.temperature
    if 0 < sampling.top_k < len(scores):
        cut = np.partition(scores, -sampling.top_k)[-sampling.top_k]
        scores = np.where(scores >= cut, scores, -np.inf)
    probs = np.exp(scores - scores.max())
    probs /= probs.sum()
    if sampling.top_p < 1.0:
        order = np.argsort(-probs)
        keep = np.cumsum(probs[order]) - probs[order] < sampling.top_p  # the smallest set reaching top_p
        mask = np.zeros_like(probs, dtype=bool)
        mask[order[keep]] = True
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum()
    return int(rng.choice(len(probs), p=probs))


class _QnnTextStream:
    def __init__(self, tokenizer: "Tokenizer") -> None:
        from tokenizers.decoders import DecodeStream

        self._tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)

    def decode(self, token: int) -> str:
        return self._stream.step(self._tokenizer, token) or ""  # None while a character is incomplete

    def flush(self) -> str:
        return ""


def _eos_ids(path: Path) -> frozenset[int]:
    config = (
        json.loads((path / "generation_config.json").read_text()) if (path / "generation_config.json").is_file() else {}
    )
    eos = config.get("eos_token_id", [])
    return frozenset(eos if isinstance(eos, list) else [eos])
