"""The agent's local server: one loaded bundle behind the engine, and how bundles get loaded.

    load_bundle(path) ─► verify signature and files ─► probe ─► rank variants (choice.py)
        ─► load the best; a load failure falls back to the next and is recorded in `status`
        ─► engine.swap(): new requests go to the new model, in-flight ones finish on the old

Loading runs in a worker thread, so the API keeps answering (health says `loading`).
"""

import logging
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from slmops.bundle import Bundle, verify_bundle
from slmops.errors import RuntimeLoadError, SlmopsError
from slmops.manifest import Variant
from slmops.signing import trusted_keys

from . import choice, hardware
from .config import AgentConfig
from .serve.engine import Engine, ServedModel
from .serve.metrics import AgentMetrics
from .serve.runtime import GenerationStats, LoadedVariant

log = logging.getLogger(__name__)

SMOKE_RUNS = 3
"""The smoke test's speed is the best of these runs: a loaded machine should not fail a good variant."""


@dataclass
class Status:
    state: str = "empty"
    """empty | loading | ready | failed"""
    message: str = ""
    fallbacks: list[str] = field(default_factory=list)
    """Variants that failed to load, with the reason, before the one now served."""


class ModelHost:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.metrics = AgentMetrics()
        self.engine = Engine(config.max_active_requests, config.max_queued_requests, config.stream_interval_ms / 1000)
        self.status = Status()
        self.started_at = time.time()
        self._load_lock = threading.Lock()

    def start(self) -> None:
        """Start generating: the engine's scheduler thread."""
        self.engine.start()

    def load_bundle(
        self, path: Path, variant_id: str | None = None, smoke_test: bool = False, hashed: Collection[str] = ()
    ) -> ServedModel:
        """Verify, choose, load and switch to a bundle; raises SlmopsError when nothing can run.

        `variant_id` names the one variant a device slot holds. With `smoke_test` the loaded
        variant must generate, at no less than `smoke_min_speed_fraction` of its build-time
        speed, before it replaces what is served. `hashed`: files the caller checked against the
        manifest as it wrote them (verify_bundle does not read them again).
        """
        with self._load_lock:
            self.status = Status("loading", f"loading {path}", [])
            try:
                served = self._load(path, variant_id, hashed)
                if smoke_test:
                    self._smoke_test(served)
            except Exception as e:  # any failure, ours or onnxruntime's: the status says what is served
                reason = str(e) if isinstance(e, SlmopsError) else f"{type(e).__name__}: {e}"
                current = self.engine.current
                self.status = (
                    Status("failed", reason, self.status.fallbacks)
                    if current is None
                    else Status(
                        "ready", f"serving {current.model_id}; {path} not loaded: {reason}", self.status.fallbacks
                    )
                )
                if not isinstance(e, SlmopsError):
                    raise RuntimeLoadError(reason) from e
                raise
            self.engine.swap(served)
            self.metrics.serving(served.bundle, served.version, served.variant_id, served.provider)
            self.status = Status("ready", f"serving {served.model_id} on {served.provider}", self.status.fallbacks)
            log.info("serving %s (%s) from %s", served.model_id, served.provider, path)
            return served

    def load_bundle_in_background(self, path: Path, variant_id: str | None = None) -> threading.Thread:
        self.status = Status("loading", f"loading {path}", [])

        def run() -> None:
            try:
                self.load_bundle(path, variant_id)
            except SlmopsError as e:
                log.error("cannot serve %s: %s", path, e)

        thread = threading.Thread(target=run, name="slmops-load", daemon=True)
        thread.start()
        return thread

    def _load(self, path: Path, variant_id: str | None, hashed: Collection[str]) -> ServedModel:
        keys = trusted_keys(self.config.trusted_keys)
        if variant_id is None:
            bundle = verify_bundle(path, keys)
            variant, loaded = load_best_variant(bundle, self.config, self.status.fallbacks)
        else:
            bundle = verify_bundle(path, keys, [variant_id], hashed)
            variant = bundle.manifest.variant(variant_id)
            config = self.config
            loaded = LoadedVariant.load(
                bundle.variant_dir(variant_id),
                config.threads,
                config.prefix_cache_bytes,
                config.prefix_cache_replies,
                variant.device_class,
            )
        return self._served(bundle, variant.id, variant.execution_provider, loaded)

    def _smoke_test(self, served: ServedModel) -> None:
        loaded, tokens = served.variant, self.config.smoke_test_tokens
        prompt = loaded.encode(loaded.chat_prompt([{"role": "user", "content": "Say hello."}]))
        runs = []
        for _ in range(SMOKE_RUNS):  # the first run pays one-off allocations; build time measured warm too
            stats = GenerationStats()
            for _token in loaded.generate(prompt, tokens, stats, ignore_eos=True):
                pass
            runs.append(stats)
        stats = max(runs, key=lambda r: r.decode_tokens_per_s)
        if stats.new_tokens != tokens:
            raise RuntimeLoadError(f"smoke test: {served.variant_id} generated {stats.new_tokens} of {tokens} tokens")
        evaluation = served.manifest.variant(served.variant_id).evaluation
        built = evaluation.decode_tokens_per_s if evaluation and evaluation.decode_tokens_per_s else 0.0
        floor = built * self.config.smoke_min_speed_fraction
        if stats.decode_tokens_per_s < floor:
            raise RuntimeLoadError(
                f"smoke test: {served.variant_id} decodes {stats.decode_tokens_per_s:.1f} tokens/s, below "
                f"{self.config.smoke_min_speed_fraction:g} × its build-time {built:.1f}"
            )
        log.info("smoke test passed: %s at %.1f tokens/s", served.model_id, stats.decode_tokens_per_s)

    @staticmethod
    def _served(bundle: Bundle, variant_id: str, provider: str, loaded: LoadedVariant) -> ServedModel:
        m = bundle.manifest
        return ServedModel(loaded, f"{m.name}:{m.version}", m.name, m.version, variant_id, provider, m)

    def close(self) -> None:
        self.engine.close()


def load_best_variant(bundle: Bundle, config: AgentConfig, fallbacks: list[str]) -> tuple[Variant, LoadedVariant]:
    """Load the best variant that runs here, falling back down the ranking; failures go to `fallbacks`."""
    candidates = choice.rank(bundle.manifest, hardware.probe(config.data_dir), config)
    usable = [c for c in candidates if c.usable]
    if not usable:
        reasons = "; ".join(f"{c.variant.id}: {c.reason}" for c in candidates)
        raise RuntimeLoadError(f"no variant of {bundle.manifest.name} can run here ({reasons})")
    for candidate in usable:
        try:
            variant_dir = bundle.variant_dir(candidate.variant.id)
            loaded = LoadedVariant.load(
                variant_dir,
                config.threads,
                config.prefix_cache_bytes,
                config.prefix_cache_replies,
                candidate.variant.device_class,
            )
            return candidate.variant, loaded
        except RuntimeLoadError as e:
            note = f"{candidate.variant.id}: {e}"
            fallbacks.append(note)
            log.warning("variant failed to load, falling back: %s", note)
    raise RuntimeLoadError(f"no variant of {bundle.manifest.name} loaded: {'; '.join(fallbacks)}")
