"""A variant in OpenVINO IR (the openvino-cpu/-npu targets), served by OpenVINO GenAI.

    variant folder (openvino_model.xml, openvino_tokenizer.xml, …)
      ├─ CPU, GPU: ContinuousBatchingPipeline: every running request advances in one batched
      │  `step()`; its paged KV cache keeps finished prompts for requests that start the same
      │  way (OpenVINO's prefix caching); one GenerationHandle per request, read a token at a
      │  time by `OpenVinoGeneration`
      └─ NPU: LLMPipeline (continuous batching runs on CPU and GPU only), which reshapes the
         model to static prompt and reply lengths and compiles it for the NPU at first load;
         one request at a time, each generating in its own thread into a queue that
         `SequentialGeneration` reads

Needs the `openvino` extra (openvino-genai, which brings openvino and openvino-tokenizers);
without it, loading says so. Perplexity is scored with plain OpenVINO on the same IR
(the pipeline gives no logits).
"""

import json
import math
import queue
import threading
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
SEQUENTIAL_CLASSES = {"npu"}
"""Device classes served by LLMPipeline, one request at a time (no continuous batching there)."""
NPU_MAX_PROMPT_TOKENS, NPU_MIN_REPLY_TOKENS = 1024, 256
"""The static shapes LLMPipeline compiles for the NPU: the longest prompt, the reply room."""


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
    def __init__(
        self,
        path: Path,
        pipeline: "ov_genai.ContinuousBatchingPipeline | ov_genai.LLMPipeline",
        device: str,
        threads: int,
        sequential: bool,
    ) -> None:
        self.path = path
        self.pipeline = pipeline
        self.tokenizer = pipeline.get_tokenizer()
        self.device = device
        self.threads = threads
        self.sequential = sequential
        self.lock = threading.Lock()
        """Held by the one generation a sequential pipeline runs."""
        config = json.loads((path / "config.json").read_text())
        self.context_length = int(config["max_position_embeddings"])
        if sequential:
            self.context_length = min(self.context_length, NPU_MAX_PROMPT_TOKENS + NPU_MIN_REPLY_TOKENS)
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
        sequential = device_class in SEQUENTIAL_CLASSES
        properties: dict[str, object] = {"INFERENCE_NUM_THREADS": threads} if device == "CPU" else {}
        if device == "NPU":
            properties.update(MAX_PROMPT_LEN=NPU_MAX_PROMPT_TOKENS, MIN_RESPONSE_LEN=NPU_MIN_REPLY_TOKENS)
        try:
            if sequential:
                pipeline = genai.LLMPipeline(str(path), device, **properties)
            else:
                scheduler = genai.SchedulerConfig()
                scheduler.cache_size = math.ceil((prefix_cache_bytes or DEFAULT_KV_CACHE_BYTES) / 2**30)
                scheduler.enable_prefix_caching = prefix_cache_bytes > 0
                pipeline = genai.ContinuousBatchingPipeline(str(path), scheduler, device, properties)
        except Exception as e:  # OpenVINO raises RuntimeError for every load failure
            raise RuntimeLoadError(f"OpenVINO GenAI cannot load {path} on {device}: {e}") from None
        return cls(path, pipeline, device, threads, sequential)

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

    def _generation(
        self, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling, adapter: str | None
    ) -> Generation:
        if self.sequential:
            if len(prompt_ids) > NPU_MAX_PROMPT_TOKENS:
                raise ValueError(
                    f"the prompt has {len(prompt_ids)} tokens; this NPU variant takes at most {NPU_MAX_PROMPT_TOKENS}"
                )
            return SequentialGeneration(self, prompt_ids, max_new_tokens, sampling)
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


def generation_config(sampling: Sampling, max_new_tokens: int) -> Any:
    """OpenVINO GenAI's GenerationConfig for one request."""
    config = _genai().GenerationConfig()
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
    return config


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
        config = generation_config(sampling, max_new_tokens)
        self._status, self._stop = genai.GenerationStatus.RUNNING, genai.GenerationFinishReason.STOP
        self._pending: deque[int] = deque()
        self._stops = sampling.stops(variant.eos_token_ids)
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
        self.stats.timed(time.perf_counter() - self._started)
        self.stats.new_tokens += 1
        return token

    def _end(self) -> None:
        self.stats.finish_reason = "stop" if self._finish == self._stop else "length"
        self.done = True

    def release(self) -> None:
        if self._handle.get_status() == self._status:
            self._handle.cancel()  # a client that left: the pipeline drops the request and its KV blocks
        self.done = True


_END = object()
"""What a sequential generation's thread puts after the last token (or an exception)."""


class SequentialGeneration:
    """One request on an LLMPipeline (the NPU's). Its first `step()` starts the generation in a
    thread, which waits for the pipeline (one request at a time) and streams the tokens into a
    queue; `step()` takes them one by one, waiting while the next is not there yet."""

    def __init__(
        self, variant: OpenVinoVariant, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling
    ) -> None:
        self.variant = variant
        self.max_new_tokens = max_new_tokens
        self.stats = GenerationStats(prompt_tokens=len(prompt_ids))
        self.done = False
        self._prompt = prompt_ids
        self._config = generation_config(sampling, max_new_tokens)
        self._stops = sampling.stops(variant.eos_token_ids)
        self._tokens: queue.Queue[Any] = queue.Queue()
        self._cancelled = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = 0.0

    def _run(self) -> None:
        import openvino as ov

        genai = _genai()
        tokens, cancelled = self._tokens, self._cancelled

        class Streamer(genai.StreamerBase):  # type: ignore[name-defined]
            def write(self, token: Any) -> Any:
                for t in token if isinstance(token, list) else [token]:
                    tokens.put(int(t))
                return genai.StreamingStatus.CANCEL if cancelled.is_set() else genai.StreamingStatus.RUNNING

            def end(self) -> None:
                pass

        try:
            with self.variant.lock:
                if not cancelled.is_set():
                    prompt = ov.Tensor(np.array([self._prompt], np.int64))
                    self.variant.pipeline.generate(prompt, self._config, Streamer())
        except Exception as e:  # surfaced by step() in the engine's thread
            tokens.put(e)
        finally:
            tokens.put(_END)

    def step(self) -> int | None:
        if self.done:
            return None
        if self._thread is None:
            self._started = time.perf_counter()
            self._thread = threading.Thread(target=self._run, name="slmops-openvino-npu", daemon=True)
            self._thread.start()
        while True:
            item = self._tokens.get()
            if isinstance(item, Exception):
                self.done = True
                raise RuntimeError(f"OpenVINO GenAI failed: {item}")
            if item is _END or self.stats.new_tokens >= self.max_new_tokens:
                self.stats.finish_reason = "length" if self.stats.new_tokens >= self.max_new_tokens else "stop"
                self.release()
                return None
            if item not in self._stops:
                break
        self.stats.timed(time.perf_counter() - self._started)
        self.stats.new_tokens += 1
        return int(item)

    def release(self) -> None:
        self._cancelled.set()  # the streamer cancels at its next token; the pipeline is then free
        self.done = True
