"""One bundle variant loaded into its runtime: chat prompts in, tokens out.

`LoadedVariant.load` picks the runtime by the folder's files: onnxruntime-genai here
(`GenaiVariant`), OpenVINO GenAI in `openvino_runtime`, onnxruntime-qnn in `qnn_runtime`.
The engine, the server and the evaluations see only `LoadedVariant`, `Generation` and
`TextStream`.

Evaluation, `slmops agent chat` and the local server all generate through this
module, so a figure measured at build time is measured on the code path that serves.
"""

import json
import time
from abc import ABC, abstractmethod
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import version as _version
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from slmops.errors import RuntimeLoadError
from slmops.manifest import ADAPTER_SUFFIX, ADAPTERS_DIR

from ..hardware import inference_threads
from .prefix_cache import PrefixCache

FOLLOW_UP_TOKENS = 256
"""Room a cacheable generation keeps beyond its own prompt and reply for a follow-up's new turn
(the follow-up's reply gets max_new_tokens more): enough to reuse it for the next chat turn."""

if TYPE_CHECKING:
    import onnxruntime_genai as og


def kv_bytes_per_token(decoder: dict[str, Any], execution_provider: str) -> int:
    """KV cache bytes one token takes (genai_config.json's decoder): keys and values of every layer.
    The model builder keeps them in fp32 on CPU and in fp16 on accelerators; OpenVINO in 16 bits or fewer."""
    precision_bytes = 4 if execution_provider == "cpu" else 2
    return 2 * decoder["num_hidden_layers"] * decoder["num_key_value_heads"] * decoder["head_size"] * precision_bytes


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    """Leading prompt tokens whose KV cache came from an earlier request (not prefilled again)."""
    new_tokens: int = 0
    time_to_first_token_s: float = 0.0
    total_s: float = 0.0
    finish_reason: str = "length"

    def timed(self, elapsed_s: float) -> None:
        """A token came `elapsed_s` after the generation started (the first one sets the TTFT)."""
        if self.new_tokens == 0:
            self.time_to_first_token_s = elapsed_s
        self.total_s = elapsed_s

    @property
    def decode_tokens_per_s(self) -> float:
        decode_s = self.total_s - self.time_to_first_token_s
        return (self.new_tokens - 1) / decode_s if self.new_tokens > 1 and decode_s > 0 else 0.0


@dataclass(frozen=True)
class Sampling:
    """Decoding choices of one request; temperature 0 means greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    ignore_eos: bool = False
    """Generate exactly max_new_tokens (benchmarks, load tests)."""
    repetition_penalty: float = 1.0
    """> 1 discourages tokens already in the sequence (1.1 stops small models looping)."""

    def stops(self, eos_token_ids: frozenset[int]) -> frozenset[int]:
        """The tokens that end this request's reply (none with ignore_eos); they are not part of it."""
        return frozenset() if self.ignore_eos else eos_token_ids

    def cache_key(self) -> Hashable | None:
        """What a reused generator must share with this request (its search options are fixed when it
        is made); None where none may be reused: a seed must start a fresh random stream, and
        ignore_eos pins the generator's min_length."""
        if self.seed is not None or self.ignore_eos:
            return None
        return (self.temperature, self.top_p, self.top_k, self.repetition_penalty)

    def search_options(self, vocab_size: int | None = None) -> dict[str, float | int | bool]:
        """onnxruntime-genai's search options; a top_k past `vocab_size` means all of it (onnxruntime-genai
        refuses one larger)."""
        options: dict[str, float | int | bool] = {"do_sample": self.temperature > 0}
        if self.repetition_penalty != 1.0:
            options["repetition_penalty"] = self.repetition_penalty
        if self.temperature <= 0:
            return options
        options.update(temperature=self.temperature, top_p=self.top_p)
        if self.top_k > 0:
            options["top_k"] = self.top_k if vocab_size is None else min(self.top_k, vocab_size)
        if self.seed is not None:
            options["random_seed"] = self.seed
        return options


class TextStream(Protocol):
    """Tokens in, text out as soon as it forms whole characters."""

    def decode(self, token: int) -> str: ...

    def flush(self) -> str:
        """Text still held back when the generation ends."""
        ...


class Generation(Protocol):
    """One request's generator, advanced one token per `step()` by the engine's thread."""

    stats: GenerationStats
    done: bool

    def step(self) -> int | None:
        """The next token, or None when finished (stats.finish_reason says why)."""
        ...

    def release(self) -> None:
        """The request is over (finished, failed or cancelled): free or keep what it holds."""
        ...


class LoadedVariant(ABC):
    """A variant folder loaded into its runtime: onnxruntime-genai (genai_config.json),
    OpenVINO GenAI (openvino_model.xml, `openvino_runtime`) or onnxruntime-qnn (qnn.json,
    `qnn_runtime`)."""

    path: Path
    context_length: int

    @property
    @abstractmethod
    def runtime(self) -> str:
        """The runtime and its version, as evaluations record it."""

    @staticmethod
    def load(
        path: Path,
        threads: int | None = None,
        prefix_cache_bytes: int = 0,
        reuse_decoded: bool = False,
        device_class: str = "cpu",
    ) -> "LoadedVariant":
        """Load a variant folder with the runtime its files name; `threads` for the runtime's pool
        (default: `inference_threads()`); `prefix_cache_bytes` > 0 keeps that much of finished requests'
        KV caches for later prompts that start the same way (a server; measurements keep it off, so every
        request is cold); `reuse_decoded` keeps the replies' KV too (see prefix_cache); `device_class`
        is the variant's (cpu, gpu, npu), for runtimes that pick a device by name."""
        from .openvino_runtime import OpenVinoVariant, is_openvino_folder
        from .qnn_runtime import QnnVariant, is_qnn_folder

        threads = threads or inference_threads()
        if is_openvino_folder(path):
            return OpenVinoVariant.open(path, threads, prefix_cache_bytes, device_class)
        if is_qnn_folder(path):
            return QnnVariant.open(path)
        return GenaiVariant.open(path, threads, prefix_cache_bytes, reuse_decoded)

    @abstractmethod
    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """Messages through the variant's own chat template, ready for the assistant's turn."""

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def text_stream(self) -> TextStream: ...

    @abstractmethod
    def token_logits(self, token_ids: list[int]) -> Any:
        """Logits for every position of one forward pass (numpy, [len, vocab])."""

    @property
    def adapters(self) -> tuple[str, ...]:
        """The LoRA adapters a request may pick by name (the variant's adapters/ folder, build/adapters.py)."""
        return ()

    @abstractmethod
    def _generation(
        self, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling, adapter: str | None
    ) -> Generation:
        """`adapter` is None or one of `adapters` (start() checked)."""

    def start(
        self, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling | None = None, adapter: str | None = None
    ) -> Generation:
        """A generation that advances one token per `step()`; many can interleave on one model, each with
        its own adapter or none."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) + max_new_tokens > self.context_length:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                f"context length of {self.context_length} tokens"
            )
        if adapter is not None and adapter not in self.adapters:
            raise ValueError(f"{self.path.name} has no adapter {adapter!r}")
        return self._generation(prompt_ids, max_new_tokens, sampling or Sampling(), adapter)

    def generate(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        stats: GenerationStats | None = None,
        ignore_eos: bool = False,
        adapter: str | None = None,
    ) -> Iterator[int]:
        """Tokens one at a time, greedy (with `adapter` active)."""
        generation = self.start(prompt_ids, max_new_tokens, Sampling(ignore_eos=ignore_eos), adapter)
        if stats is not None:
            stats.prompt_tokens, stats.cached_prompt_tokens = len(prompt_ids), generation.stats.cached_prompt_tokens
            generation.stats = stats
        try:
            while (token := generation.step()) is not None:
                yield token
        finally:
            generation.release()

    def stream_text(self, tokens: Iterator[int]) -> Iterator[str]:
        """Decode a token stream into text pieces as soon as they form whole characters."""
        stream = self.text_stream()
        for token in tokens:
            if piece := stream.decode(token):
                yield piece
        if tail := stream.flush():
            yield tail


class _GenaiTextStream:
    def __init__(self, tokenizer: "og.Tokenizer") -> None:
        self._stream = tokenizer.create_stream()

    def decode(self, token: int) -> str:
        return str(self._stream.decode(token))  # empty while a multi-byte character is incomplete

    def flush(self) -> str:
        return ""  # onnxruntime-genai's stream holds back only an incomplete character


@dataclass
class GenaiVariant(LoadedVariant):
    path: Path
    model: "og.Model"
    tokenizer: "og.Tokenizer"
    context_length: int
    eos_token_ids: frozenset[int] = field(default_factory=frozenset)
    vocab_size: int | None = None
    prefix_cache: PrefixCache | None = None
    """Idle generators kept for requests that share a prompt prefix; None: every request prefills all."""
    adapter_set: "og.Adapters | None" = None
    """The variant's LoRA adapters, loaded once; a generator activates one of them by name."""
    adapter_names: tuple[str, ...] = ()

    @property
    def runtime(self) -> str:
        return f"onnxruntime-genai {_version('onnxruntime-genai')}"

    @property
    def adapters(self) -> tuple[str, ...]:
        return self.adapter_names

    @classmethod
    def open(cls, path: Path, threads: int, prefix_cache_bytes: int = 0, reuse_decoded: bool = False) -> "GenaiVariant":
        """Left to itself, onnxruntime-genai's pool decoded SmolLM2 int4 at 125-131 tokens/s on a
        2-CPU machine where an explicit 2 gave 209-213 (benchmarks/serving.py notes)."""
        config_path = path / "genai_config.json"
        if not config_path.is_file():
            raise RuntimeLoadError(
                f"{path} is not a model folder: no genai_config.json (onnxruntime-genai) "
                "nor openvino_model.xml (OpenVINO GenAI)"
            )
        config = json.loads(config_path.read_text())
        import onnxruntime_genai as og  # here, not at the top: an agent without a model stays small

        session = {"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}
        adapter_files = {
            f.name.removesuffix(ADAPTER_SUFFIX): f for f in sorted((path / ADAPTERS_DIR).glob(f"*{ADAPTER_SUFFIX}"))
        }
        try:
            og_config = og.Config(str(path))
            og_config.overlay(json.dumps(session))
            model = og.Model(og_config)
            adapter_set: og.Adapters | None = None
            if adapter_files:
                adapter_set = og.Adapters(model)
                for name, file in adapter_files.items():
                    adapter_set.load(str(file), name)
        except Exception as e:  # onnxruntime-genai raises plain RuntimeError for every load failure
            raise RuntimeLoadError(f"onnxruntime-genai cannot load {path}: {e}") from None
        eos = config["model"].get("eos_token_id", [])
        cache = None
        if prefix_cache_bytes > 0:
            decoder = config["model"]["decoder"]
            providers = decoder.get("session_options", {}).get("provider_options", [])
            provider = next(iter(providers[0]), "cpu") if providers else "cpu"
            cache = PrefixCache(prefix_cache_bytes, kv_bytes_per_token(decoder, provider), reuse_decoded)
        return cls(
            path=path,
            model=model,
            tokenizer=og.Tokenizer(model),
            context_length=int(config["model"]["context_length"]),
            eos_token_ids=frozenset(eos if isinstance(eos, list) else [eos]),
            vocab_size=int(config["model"]["vocab_size"]) if "vocab_size" in config["model"] else None,
            prefix_cache=cache,
            adapter_set=adapter_set,
            adapter_names=tuple(adapter_files),
        )

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        return str(self.tokenizer.apply_chat_template(messages=json.dumps(messages), add_generation_prompt=True))

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text)]

    def text_stream(self) -> TextStream:
        return _GenaiTextStream(self.tokenizer)

    def _generation(
        self, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling, adapter: str | None
    ) -> Generation:
        return GenaiGeneration(self, prompt_ids, max_new_tokens, sampling, adapter)

    def token_logits(self, token_ids: list[int]) -> Any:
        import onnxruntime_genai as og

        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(token_ids) + 1, batch_size=1)
        generator = og.Generator(self.model, params)
        generator.append_tokens(token_ids)
        return generator.get_output("logits")[0]


class GenaiGeneration:
    """One request's generator. Its KV cache is sized for prompt + max_new_tokens, not the full context;
    with a prefix cache, it may come from an earlier request that shared the prompt's beginning (and then
    keeps FOLLOW_UP_TOKENS more room, so that it can serve the next turn too). A generator with an adapter
    active is reused only for the same adapter."""

    def __init__(
        self,
        variant: GenaiVariant,
        prompt_ids: list[int],
        max_new_tokens: int,
        sampling: Sampling,
        adapter: str | None = None,
    ) -> None:
        self.variant = variant
        self.max_new_tokens = max_new_tokens
        self._stops = sampling.stops(variant.eos_token_ids)
        self.stats = GenerationStats(prompt_tokens=len(prompt_ids))
        total = len(prompt_ids) + max_new_tokens
        cache, sampling_key = variant.prefix_cache, sampling.cache_key()
        self._cache_key = None if sampling_key is None else (adapter, sampling_key)
        self._cacheable = cache is not None and self._cache_key is not None
        reuse = cache.take(self._cache_key, prompt_ids, total) if cache is not None and self._cacheable else None
        if reuse is not None:
            self._generator, self._capacity = reuse.generator, reuse.capacity
            self.stats.cached_prompt_tokens = reuse.tokens
        else:
            import onnxruntime_genai as og

            self._capacity = (
                min(variant.context_length, total + max_new_tokens + FOLLOW_UP_TOKENS) if self._cacheable else total
            )
            params = og.GeneratorParams(variant.model)
            params.set_search_options(
                max_length=self._capacity,
                min_length=total if sampling.ignore_eos else 0,
                batch_size=1,
                **sampling.search_options(variant.vocab_size),
            )
            self._generator = og.Generator(variant.model, params)
            if adapter is not None:
                self._generator.set_active_adapter(variant.adapter_set, adapter)
        self._prompt = prompt_ids
        self._started = 0.0
        self._failed = False
        self.done = False

    def release(self) -> None:
        """The request is over: its generator, whose KV cache holds the prompt, goes to the prefix cache
        for a later request (not after a failure, nor before its prompt was prefilled)."""
        cache = self.variant.prefix_cache
        if cache is not None and self._cacheable and self._started and not self._failed:
            held = self._prompt
            if cache.decoded and self.stats.new_tokens:
                held = [int(t) for t in self._generator.get_sequence(0)][:-1]  # the last one sampled has no KV yet
            cache.put(self._cache_key, self._generator, held, self._capacity)
        self.done = True

    def step(self) -> int | None:
        """The next token, or None when finished (stats.finish_reason says why)."""
        try:
            return self._step()
        except Exception:
            self._failed = True
            raise

    def _step(self) -> int | None:
        if self.done:
            return None
        if not self._started:
            self._started = time.perf_counter()
            if reused := self.stats.cached_prompt_tokens:
                self._generator.rewind_to(reused)
            self._generator.append_tokens(self._prompt[reused:])
        if self._generator.is_done() or self.stats.new_tokens >= self.max_new_tokens:
            self.done = True
            return None
        self._generator.generate_next_token()
        token = int(self._generator.get_next_tokens()[0])
        self.stats.timed(time.perf_counter() - self._started)
        if token in self._stops:
            self.stats.finish_reason = "stop"
            self.done = True
            return None
        self.stats.new_tokens += 1
        return token
