"""Inference figures: Prometheus series for /metrics, and windows the telemetry collector drains."""

import threading
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
SPEED_BUCKETS = (1, 5, 10, 25, 50, 75, 100, 150, 200, 300, 500, 1000)


@dataclass
class Window:
    """What happened since the collector last looked; percentiles come from these samples."""

    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    ttft_s: list[float] = field(default_factory=list)
    tokens_per_s: list[float] = field(default_factory=list)


class AgentMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("slmops_agent_requests", "Requests answered", ["endpoint", "status"], registry=r)
        self.generations = Counter(
            "slmops_agent_generations", "Generations by outcome: ok, cancelled, error", ["outcome"], registry=r
        )
        self.errors = Counter("slmops_agent_errors", "Requests that failed", ["type"], registry=r)
        self.prompt_tokens = Counter("slmops_agent_prompt_tokens", "Prompt tokens processed", registry=r)
        self.cached_prompt_tokens = Counter(
            "slmops_agent_cached_prompt_tokens", "Prompt tokens served from the prefix cache, not prefilled", registry=r
        )
        self.generated_tokens = Counter("slmops_agent_generated_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram(
            "slmops_agent_time_to_first_token_seconds", "Time to first token", buckets=LATENCY_BUCKETS_S, registry=r
        )
        self.latency = Histogram(
            "slmops_agent_request_duration_seconds", "Request latency", buckets=LATENCY_BUCKETS_S, registry=r
        )
        self.speed = Histogram(
            "slmops_agent_decode_tokens_per_second", "Decode speed per request", buckets=SPEED_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("slmops_agent_queue_depth", "Requests waiting for a slot", registry=r)
        self.active = Gauge("slmops_agent_active_requests", "Requests generating", registry=r)
        self.model_info = Gauge(
            "slmops_agent_model_info",
            "The model being served",
            ["bundle", "version", "variant", "provider"],
            registry=r,
        )
        self._lock = threading.Lock()
        self._window = Window()

    def observe(
        self,
        outcome: str,
        prompt_tokens: int,
        generated: int,
        ttft_s: float,
        tokens_per_s: float,
        duration_s: float,
        cached_prompt_tokens: int = 0,
    ) -> None:
        """One generation ended: `ok`, `cancelled` (client left) or `error`. Counted last, so a
        reader that sees the generation also sees its tokens."""
        if outcome == "error":
            self.error("generation")
        self.prompt_tokens.inc(prompt_tokens)
        self.cached_prompt_tokens.inc(cached_prompt_tokens)
        self.generated_tokens.inc(generated)
        self.latency.observe(duration_s)
        if generated:
            self.ttft.observe(ttft_s)
        if tokens_per_s:
            self.speed.observe(tokens_per_s)
        with self._lock:
            w = self._window
            w.requests += 1
            w.prompt_tokens += prompt_tokens
            w.generated_tokens += generated
            if generated:
                w.ttft_s.append(ttft_s)
            if tokens_per_s:
                w.tokens_per_s.append(tokens_per_s)
        self.generations.labels(outcome).inc()

    def error(self, kind: str) -> None:
        self.errors.labels(kind).inc()
        with self._lock:
            self._window.errors += 1

    def drain(self) -> Window:
        with self._lock:
            window, self._window = self._window, Window()
        return window

    def serving(self, bundle: str, version: str, variant: str, provider: str) -> None:
        self.model_info.clear()
        self.model_info.labels(bundle, version, variant, provider).set(1)
