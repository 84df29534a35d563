"""What a rollout is asked to do, parsed and checked before anything is stored: the target
selector, the waves, the failure bound; and how a target becomes waves.

    'group=lab,provider=cpu,tag:site=berlin,min_memory=2GiB'   every term must hold
    '5,10%,50%,100%'   a canary of 5 devices, then 10 %, 50 % and all of the target (cumulative)
    '5%'               at most 5 % of the devices that answered may fail or time out
    'tokens_per_s>=0.8x', 'ttft_ms_p95<=800', 'error_rate<=1%'   gates on what a device measures
                       while it soaks; `x` scales the device's own figure before the switch

Waves are cut once, at creation, so membership never changes. The first wave takes one device
of every hardware class in the target (best provider · memory band · CPU model) before any
second one of a class, and grows past its size when the target has more classes than that:
a variant that breaks on one kind of hardware is caught by the first wave, not the last.
"""

import hashlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from slmops.errors import Rejected

SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
SIZE_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})
GPU_PROVIDERS = ("cuda", "tensorrt", "trt-rtx", "dml", "webgpu", "rocm", "migraphx", "coreml")
NPU_PROVIDERS = ("qnn", "openvino", "vitisai")


def parse_size(text: str) -> int:
    """'2GiB', '512MB', '1048576' → bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if match is None or match.group(2).lower() not in SIZE_UNITS:
        raise Rejected(f"{text!r} is not a size (e.g. 2GiB, 512MB)")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2).lower()])


def parse_share(text: str, name: str) -> float:
    """'5%' or '0.05' → 0.05."""
    try:
        share = float(text[:-1]) / 100 if text.strip().endswith("%") else float(text)
    except ValueError:
        raise Rejected(f"{name}: {text!r} is not a share (e.g. 5% or 0.05)") from None
    if not 0 <= share <= 1:
        raise Rejected(f"{name}: {text!r} is not between 0 and 100 %")
    return share


@dataclass(frozen=True)
class Selector:
    """Which devices a rollout targets; every term must hold."""

    groups: tuple[str, ...] = ()
    providers: tuple[str, ...] = ()
    tags: tuple[tuple[str, str], ...] = ()
    min_memory_bytes: int = 0

    @classmethod
    def parse(cls, text: str) -> "Selector":
        groups: list[str] = []
        providers: list[str] = []
        tags: list[tuple[str, str]] = []
        min_memory = 0
        for term in (t.strip() for t in text.split(",")):
            if not term:
                continue
            key, sep, value = term.partition("=")
            key, value = key.strip(), value.strip()
            if not sep or not value:
                raise Rejected(f"target term {term!r} is not KEY=VALUE")
            if key == "group":
                groups.append(value)
            elif key == "provider":
                providers.append(value)
            elif key.startswith("tag:") and key[4:]:
                tags.append((key[4:], value))
            elif key == "min_memory":
                min_memory = parse_size(value)
            else:
                raise Rejected(f"target term {term!r}: the keys are group, provider, tag:NAME and min_memory")
        return cls(tuple(groups), tuple(providers), tuple(tags), min_memory)

    def matches(self, groups: Sequence[str], tags: dict[str, Any], profile: dict[str, Any]) -> bool:
        providers = {a.get("provider") for a in profile.get("accelerators", [])}
        return (
            all(g in groups for g in self.groups)
            and all(p in providers for p in self.providers)
            and all(str(tags.get(k)) == v for k, v in self.tags)
            and profile.get("memory_total_bytes", 0) >= self.min_memory_bytes
        )


@dataclass(frozen=True)
class WaveSize:
    """A wave's cumulative size: a count of devices, or a share of the target."""

    count: int | None = None
    share: float | None = None

    def cumulative(self, total: int) -> int:
        return min(total, self.count) if self.count is not None else math.ceil((self.share or 0) * total)


def parse_waves(text: str) -> list[WaveSize]:
    """'5,10%,50%,100%': cumulative sizes; they may not shrink, and the last takes the whole target."""
    waves: list[WaveSize] = []
    for term in (t.strip() for t in text.split(",")):
        if term.endswith("%"):
            share = parse_share(term, "waves")
            if share == 0:
                raise Rejected(f"waves: {term!r} is an empty wave")
            waves.append(WaveSize(share=share))
        elif term.isdigit() and int(term) > 0:
            waves.append(WaveSize(count=int(term)))
        else:
            raise Rejected(f"waves: {term!r} is neither a device count (5) nor a share of the target (10%)")
    shares = [w.share for w in waves if w.share is not None]
    if shares != sorted(shares):
        raise Rejected(f"waves: {text!r} shrinks; each wave's share is of the whole target, cumulative")
    if not waves or waves[-1].share != 1.0:
        raise Rejected(f"waves: {text!r} must end with 100% (the whole target)")
    return waves


def hardware_class(profile: dict[str, Any]) -> str:
    """What a device is, as far as a variant may care: its best provider, memory band, CPU model."""
    providers = {a.get("provider") for a in profile.get("accelerators", [])}
    best = next((p for p in (*NPU_PROVIDERS, *GPU_PROVIDERS) if p in providers), "cpu")
    memory_gib = profile.get("memory_total_bytes", 0) / 2**30
    band = 2 ** math.floor(math.log2(memory_gib)) if memory_gib >= 1 else 0
    return f"{best} · {band}+ GiB · {profile.get('cpu_model') or 'unknown CPU'}"


def plan_waves(devices: dict[str, str], waves: Sequence[WaveSize], salt: str) -> list[list[str]]:
    """Device ids (id → hardware class) cut into waves. Within a class the order is a hash of the
    rollout (`salt`) and the id: stable for a rollout, different between rollouts, so the same
    devices are not always the canaries. Every class has a device in the first wave."""

    def order(device_id: str) -> str:
        return hashlib.sha256(f"{salt}/{device_id}".encode()).hexdigest()

    by_class: dict[str, list[str]] = {}
    for device_id in sorted(devices, key=order):
        by_class.setdefault(devices[device_id], []).append(device_id)
    # round robin over the classes: the first len(by_class) devices cover every class
    queue: list[str] = []
    for rank in range(max((len(ids) for ids in by_class.values()), default=0)):
        queue += [ids[rank] for _, ids in sorted(by_class.items()) if rank < len(ids)]
    plan: list[list[str]] = []
    taken = 0
    for index, wave in enumerate(waves):
        size = wave.cumulative(len(queue))
        if index == 0:
            size = max(size, len(by_class))
        if size > taken:
            plan.append(queue[taken:size])
            taken = size
    return plan


GATE_METRICS = ("tokens_per_s", "ttft_ms_p50", "ttft_ms_p95", "error_rate")
"""What a device's inference telemetry gives, per soak (medians of its samples; errors over requests)."""


@dataclass(frozen=True)
class Gate:
    """A bound on what a device measures while it soaks: absolute (`ttft_ms_p95<=800`,
    `error_rate<=1%`) or relative to the device's own figure before the switch (`tokens_per_s>=0.8x`)."""

    metric: str
    op: str
    bound: float
    relative: bool
    text: str

    @classmethod
    def parse(cls, text: str) -> "Gate":
        match = re.fullmatch(r"\s*([a-z0-9_]+)\s*(>=|<=)\s*([0-9.]+)\s*(x|%)?\s*", text)
        if match is None or match.group(1) not in GATE_METRICS:
            raise Rejected(f"gate {text!r} is not METRIC>=BOUND or METRIC<=BOUND; metrics: {', '.join(GATE_METRICS)}")
        metric, op, number, unit = match.groups()
        try:
            bound = float(number) / (100 if unit == "%" else 1)
        except ValueError:
            raise Rejected(f"gate {text!r}: {number!r} is not a number") from None
        return cls(metric, op, bound, unit == "x", text.strip())

    def limit(self, before: float | None) -> float | None:
        """The bound in the metric's units; None for a relative gate without a figure to scale."""
        if not self.relative:
            return self.bound
        return None if before is None else self.bound * before

    def holds(self, value: float, limit: float) -> bool:
        return value >= limit if self.op == ">=" else value <= limit
