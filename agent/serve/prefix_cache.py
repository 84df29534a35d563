"""Idle generators whose KV caches hold a prompt, for the next request that starts the same way.

    request done ─► its generator, holding the KV of the prompt it prefilled, goes idle here
    new request  ─► the idle generator (same sampling, room enough) sharing the longest prefix
                    with its prompt is taken out ─► rewound to that prefix ─► only the rest is
                    prefilled: a chat's follow-up turn, a fixed system prompt, a regenerated answer

By default only prefilled tokens are reused, not the tokens a generation decoded one by one:
onnxruntime rounds a decode step and a prefill differently, so reusing decoded KV can change the
tokens a follow-up gets. With prefilled tokens, a warm request gives exactly the tokens a cold one
does. `decoded=True` also keeps the reply's KV (as llama.cpp's server does): a follow-up then
prefills only its new turn, and its tokens may differ slightly from a cold request's.

The engine's one scheduler thread takes and puts, and a taken generator belongs to one request
until it is put back, so requests never share one. Idle generators are held within a byte budget
(their KV buffers: capacity × bytes per token); the least recently used go first.
"""

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnxruntime_genai as og

MIN_SHARED_TOKENS = 16
"""Fewer shared tokens are not worth taking a generator another conversation may come back to
(every chat prompt shares the template's first few tokens)."""


@dataclass
class Reuse:
    generator: "og.Generator"
    capacity: int
    """The generator's max_length: its KV buffer holds this many tokens."""
    tokens: int
    """How many leading prompt tokens its KV cache already holds."""


@dataclass
class _Idle:
    key: Hashable
    generator: "og.Generator"
    prompt: list[int]
    capacity: int


class PrefixCache:
    def __init__(self, budget_bytes: int, bytes_per_token: int, decoded: bool = False) -> None:
        self.budget_bytes = budget_bytes
        self.bytes_per_token = bytes_per_token
        self.decoded = decoded
        """Also reuse the KV of decoded tokens (faster follow-ups, not bit-exact with a cold request)."""
        self._idle: OrderedDict[int, _Idle] = OrderedDict()
        self._next_id = 0
        self.hits = 0
        self.misses = 0
        self.reused_tokens = 0

    @property
    def held_bytes(self) -> int:
        return sum(entry.capacity for entry in self._idle.values()) * self.bytes_per_token

    def __len__(self) -> int:
        return len(self._idle)

    def take(self, key: Hashable, prompt: list[int], needed: int) -> Reuse | None:
        """The idle generator for `key` with room for `needed` tokens that shares the longest prefix
        with `prompt`, out of the cache; None where none shares one. At least one prompt token is
        left to prefill: the first new token needs the logits of the last one."""
        best_id, best_tokens = None, MIN_SHARED_TOKENS - 1
        for entry_id, entry in self._idle.items():
            if entry.key != key or entry.capacity < needed:
                continue
            shared = min(_common_prefix(entry.prompt, prompt), len(prompt) - 1)
            if shared > best_tokens:
                best_id, best_tokens = entry_id, shared
        if best_id is None:
            self.misses += 1
            return None
        entry = self._idle.pop(best_id)
        self.hits += 1
        self.reused_tokens += best_tokens
        return Reuse(entry.generator, entry.capacity, best_tokens)

    def put(self, key: Hashable, generator: "og.Generator", prompt: list[int], capacity: int) -> None:
        """Keep a finished request's generator, whose KV cache holds `prompt` (the tokens it may serve
        again), for the next one."""
        if capacity * self.bytes_per_token > self.budget_bytes:
            return
        self._idle[self._next_id] = _Idle(key, generator, list(prompt), capacity)
        self._next_id += 1
        while self.held_bytes > self.budget_bytes:
            self._idle.popitem(last=False)  # the least recently used; its KV buffer is freed

    def clear(self) -> None:
        self._idle.clear()


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
