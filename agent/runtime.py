"""One bundle variant loaded into onnxruntime-genai: chat prompts in, tokens out.

Evaluation, `slmops agent chat` and the local server all generate through this
module, so a figure measured at build time is measured on the code path that serves.
"""

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import onnxruntime_genai as og

from slmops.errors import SlmopsError


class RuntimeLoadError(SlmopsError):
    """The variant cannot run here (missing files, or its execution provider is unavailable)."""


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    time_to_first_token_s: float = 0.0
    total_s: float = 0.0
    finish_reason: str = "length"

    @property
    def decode_tokens_per_s(self) -> float:
        decode_s = self.total_s - self.time_to_first_token_s
        return (self.new_tokens - 1) / decode_s if self.new_tokens > 1 and decode_s > 0 else 0.0


@dataclass
class LoadedVariant:
    path: Path
    model: og.Model
    tokenizer: og.Tokenizer
    context_length: int
    eos_token_ids: frozenset[int] = field(default_factory=frozenset)

    @classmethod
    def load(cls, path: Path) -> "LoadedVariant":
        config_path = path / "genai_config.json"
        if not config_path.is_file():
            raise RuntimeLoadError(f"{path} is not an onnxruntime-genai model folder: no genai_config.json")
        config = json.loads(config_path.read_text())
        try:
            model = og.Model(str(path))
        except Exception as e:  # onnxruntime-genai raises plain RuntimeError for every load failure
            raise RuntimeLoadError(f"onnxruntime-genai cannot load {path}: {e}") from None
        eos = config["model"].get("eos_token_id", [])
        return cls(
            path=path,
            model=model,
            tokenizer=og.Tokenizer(model),
            context_length=int(config["model"]["context_length"]),
            eos_token_ids=frozenset(eos if isinstance(eos, list) else [eos]),
        )

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """Messages through the variant's own chat template, ready for the assistant's turn."""
        return str(self.tokenizer.apply_chat_template(messages=json.dumps(messages), add_generation_prompt=True))

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text)]

    def generate(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        stats: GenerationStats | None = None,
        ignore_eos: bool = False,
    ) -> Iterator[int]:
        """Greedy tokens one at a time; with `ignore_eos`, exactly `max_new_tokens` of them."""
        stats = stats if stats is not None else GenerationStats()
        stats.prompt_tokens = len(prompt_ids)
        if len(prompt_ids) + max_new_tokens > self.context_length:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                f"context length of {self.context_length} tokens"
            )
        params = og.GeneratorParams(self.model)
        total = len(prompt_ids) + max_new_tokens
        params.set_search_options(
            max_length=total, min_length=total if ignore_eos else 0, do_sample=False, batch_size=1
        )
        generator = og.Generator(self.model, params)
        started = time.perf_counter()
        generator.append_tokens(prompt_ids)
        while not generator.is_done():
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            now = time.perf_counter() - started
            if stats.new_tokens == 0:
                stats.time_to_first_token_s = now
            stats.total_s = now
            if token in self.eos_token_ids and not ignore_eos:
                stats.finish_reason = "stop"
                return
            stats.new_tokens += 1
            yield token

    def stream_text(self, tokens: Iterator[int]) -> Iterator[str]:
        """Decode a token stream into text pieces as soon as they form whole characters."""
        stream = self.tokenizer.create_stream()
        for token in tokens:
            piece = stream.decode(token)
            if piece:
                yield piece

    def token_logits(self, token_ids: list[int]):
        """Logits for every position of one forward pass (numpy, [len, vocab])."""
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(token_ids) + 1, batch_size=1)
        generator = og.Generator(self.model, params)
        generator.append_tokens(token_ids)
        return generator.get_output("logits")[0]
