"""A variant in OpenVINO IR (the openvino-cpu/-npu targets), served by OpenVINO GenAI.

    variant folder (openvino_model.xml, openvino_tokenizer.xml, …)
      ─► ContinuousBatchingPipeline on the device the variant is for (CPU, GPU, NPU):
         every running request advances in one batched `step()`; its paged KV cache keeps
         finished prompts for requests that start the same way (OpenVINO's prefix caching)
      ─► one GenerationHandle per request, read a token at a time by `OpenVinoGeneration`

Needs the `openvino` extra (openvino-genai, which brings openvino and openvino-tokenizers);
without it, loading says so. Perplexity is scored with plain OpenVINO on the same IR
(the pipeline gives no logits).
"""

import json
import math
import time
from collections import deque
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from slmops.errors import RuntimeLoadError

from .runtime import Generation, GenerationStats, LoadedVariant, Sampling, TextStream

if TYPE_CHECKING:
    import openvino as ov
    import openvino_genai as ov_genai

MODEL_XML = "openvino_model.xml"
DEVICES = {"cpu": "CPU", "gpu": "GPU", "npu": "NPU"}
"""A variant's device class → OpenVINO's device name."""
DEFAULT_KV_CACHE_BYTES = 256 * 2**20
"""The paged KV cache when no prefix cache is asked for: room for the running requests only."""


def is_openvino_folder(path: Path) -> bool:
    return (path / MODEL_XML).is_file()


def _genai() -> Any:
    try:
        import openvino_genai
    except ImportError:
        raise RuntimeLoadError(
            "this variant is an OpenVINO IR, and OpenVINO GenAI is not installed here: "
            "pip install 'slmops[agent,openvino]'"
        ) from None
    return openvino_genai


class OpenVinoVariant(LoadedVariant):
    def __init__(self, path: Path, pipeline: "ov_genai.ContinuousBatchingPipeline", device: str, threads: int) -> None:
        self.path = path
        self.pipeline = pipeline
        self.tokenizer = pipeline.get_tokenizer()
        self.device = device
        self.threads = threads
        config = json.loads((path / "config.json").read_text())
        self.context_length = int(config["max_position_embeddings"])
        eos = self.tokenizer.get_eos_token_id()
        self.eos_token_ids = frozenset([eos] if eos >= 0 else [])
        self._next_request = 0
        self._scorer: tuple[ov.CompiledModel, ov.InferRequest] | None = None

    @classmethod
    def open(
        cls, path: Path, threads: int, prefix_cache_bytes: int = 0, device_class: str = "cpu"
    ) -> "OpenVinoVariant":
        genai = _genai()
        device = DEVICES[device_class]
        scheduler = genai.SchedulerConfig()
        scheduler.cache_size = math.ceil((prefix_cache_bytes or DEFAULT_KV_CACHE_BYTES) / 2**30)
        scheduler.enable_prefix_caching = prefix_cache_bytes > 0
        properties = {"INFERENCE_NUM_THREADS": threads} if device == "CPU" else {}
        try:
            pipeline = genai.ContinuousBatchingPipeline(str(path), scheduler, device, properties)
        except Exception as e:  # OpenVINO raises RuntimeError for every load failure
            raise RuntimeLoadError(f"OpenVINO GenAI cannot load {path} on {device}: {e}") from None
        return cls(path, pipeline, device, threads)

    @property
    def runtime(self) -> str:
        return f"OpenVINO GenAI {version('openvino-genai')} on {self.device}"

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        return str(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True))

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).input_ids
        return [int(t) for t in ids.data[0]]

    def text_stream(self) -> TextStream:
        return _OpenVinoTextStream(self.tokenizer)

    def _generation(self, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling) -> Generation:
        self._next_request += 1
        return OpenVinoGeneration(self, self._next_request, prompt_ids, max_new_tokens, sampling)

    def token_logits(self, token_ids: list[int]) -> Any:
        """One forward pass of the same IR in plain OpenVINO, from an empty KV cache."""
        if self._scorer is None:
            import openvino as ov

            compiled = ov.Core().compile_model(
                self.path / MODEL_XML, self.device, {"INFERENCE_NUM_THREADS": self.threads}
            )
            self._scorer = compiled, compiled.create_infer_request()
        compiled, request = self._scorer
        request.reset_state()
        n = len(token_ids)
        inputs = {
            "input_ids": np.array([token_ids], np.int64),
            "attention_mask": np.ones((1, n), np.int64),
            "position_ids": np.arange(n, dtype=np.int64)[None],
            "beam_idx": np.zeros(1, np.int32),
        }
        return request.infer(inputs)[compiled.output("logits")][0]


class _OpenVinoTextStream:
    """OpenVINO GenAI's own incremental detokenizer (TextStreamer), which may hold text back
    until later tokens show how it decodes."""

    def __init__(self, tokenizer: "ov_genai.Tokenizer") -> None:
        genai = _genai()
        self._pieces: list[str] = []
        self._running = genai.StreamingStatus.RUNNING
        self._streamer = genai.TextStreamer(tokenizer, self._collect)

    def _collect(self, text: str) -> Any:
        self._pieces.append(text)
        return self._running

    def decode(self, token: int) -> str:
        self._streamer.write(token)
        return self._drain()

    def flush(self) -> str:
        self._streamer.end()
        return self._drain()

    def _drain(self) -> str:
        text = "".join(self._pieces)
        self._pieces.clear()
        return text


class OpenVinoGeneration:
    """One request in the pipeline. A `step()` that finds no token of its own waiting runs the
    pipeline's batched step, which advances every running request: interleaved by the engine,
    n requests cost one batched step per round."""

    def __init__(
        self, variant: OpenVinoVariant, request_id: int, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling
    ) -> None:
        import openvino as ov

        genai = _genai()
        self.variant = variant
        self.stats = GenerationStats(prompt_tokens=len(prompt_ids))
        self.done = False
        config = genai.GenerationConfig()
        config.max_new_tokens = max_new_tokens
        config.ignore_eos = sampling.ignore_eos
        config.repetition_penalty = sampling.repetition_penalty
        config.do_sample = sampling.temperature > 0
        if config.do_sample:
            config.temperature, config.top_p = sampling.temperature, sampling.top_p
            if sampling.top_k > 0:
                config.top_k = sampling.top_k
            if sampling.seed is not None:
                config.rng_seed = sampling.seed
        self._status, self._stop = genai.GenerationStatus.RUNNING, genai.GenerationFinishReason.STOP
        self._pending: deque[int] = deque()
        self._stops = frozenset() if sampling.ignore_eos else variant.eos_token_ids
        """The end-of-sequence token the pipeline stops on is not part of the reply."""
        self._finish: Any = None
        self._started = time.perf_counter()
        prompt = ov.Tensor(np.array([prompt_ids], np.int64))
        self._handle = variant.pipeline.add_request(request_id, prompt, config)

    def step(self) -> int | None:
        if self.done:
            return None
        while not self._pending:
            if self._handle.can_read():
                for output in self._handle.read().values():
                    self._pending.extend(int(t) for t in output.generated_ids if int(t) not in self._stops)
                    self._finish = output.finish_reason
            elif self._handle.get_status() != self._status:
                self._end()
                return None
            else:
                self.variant.pipeline.step()
        token = self._pending.popleft()
        now = time.perf_counter() - self._started
        if self.stats.new_tokens == 0:
            self.stats.time_to_first_token_s = now
        self.stats.total_s = now
        self.stats.new_tokens += 1
        return token

    def _end(self) -> None:
        self.stats.finish_reason = "stop" if self._finish == self._stop else "length"
        self.done = True

    def release(self) -> None:
        if self._handle.get_status() == self._status:
            self._handle.cancel()  # a client that left: the pipeline drops the request and its KV blocks
        self.done = True
