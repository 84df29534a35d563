"""Which variant of a bundle this device runs, and why.

    variants ─► drop: provider not available here (for OpenVINO: no device of the variant's class)
                      · forbidden by config · min memory > available
             ─► rank: preferred providers (config order) · device class NPU > GPU > CPU
                      · precision (int4 > int8 > fp16 > bf16 > fp32: smaller reads, faster decode)
             ─► first is chosen; the rest stay, in order, as fallbacks when loading fails

Every variant gets a reason, so `slmops agent choose` can explain the decision.
"""

from dataclasses import dataclass

from slmops.manifest import Manifest, Variant

from .config import AgentConfig
from .hardware import HardwareProfile, openvino_device_class

DEVICE_CLASS_RANK = {"npu": 0, "gpu": 1, "cpu": 2}
PRECISION_RANK = {"int4": 0, "int8": 1, "fp16": 2, "bf16": 3, "fp32": 4}


@dataclass(frozen=True)
class Candidate:
    variant: Variant
    usable: bool
    reason: str


def _unavailable(v: Variant, profile: HardwareProfile) -> str | None:
    """Why `v` cannot run here, or None. An openvino variant needs an OpenVINO device of its class."""
    if v.execution_provider == "openvino":
        devices = [a.device for a in profile.accelerators if a.provider == "openvino"]
        if not devices:
            return "OpenVINO GenAI is not installed here (pip install 'slmops[agent,openvino]')"
        if v.device_class not in {openvino_device_class(d) for d in devices}:
            return f"OpenVINO has no {v.device_class.upper()} device here (devices: {', '.join(devices)})"
        return None
    if v.execution_provider not in profile.providers:
        available = ", ".join(dict.fromkeys(profile.providers)) or "none"
        return f"provider {v.execution_provider} is not available here (available: {available})"
    return None


def rank(manifest: Manifest, profile: HardwareProfile, config: AgentConfig) -> list[Candidate]:
    """Usable variants first, best first; then the rejected ones with their reasons."""
    usable: list[Variant] = []
    rejected: list[Candidate] = []
    for v in manifest.variants:
        if v.execution_provider in config.forbid_providers:
            rejected.append(Candidate(v, False, f"provider {v.execution_provider} is forbidden by the configuration"))
        elif (missing := _unavailable(v, profile)) is not None:
            rejected.append(Candidate(v, False, missing))
        elif v.min_memory_bytes > profile.memory_available_bytes:
            rejected.append(
                Candidate(
                    v,
                    False,
                    f"needs {v.min_memory_bytes / 2**20:.0f} MiB, {profile.memory_available_bytes / 2**20:.0f} MiB "
                    "available",
                )
            )
        else:
            usable.append(v)

    def order(v: Variant) -> tuple[int, int, int]:
        preferred = (
            config.prefer_providers.index(v.execution_provider)  # type: ignore[arg-type,unused-ignore]
            if v.execution_provider in config.prefer_providers
            else len(config.prefer_providers)
        )
        return preferred, DEVICE_CLASS_RANK[v.device_class], PRECISION_RANK[v.precision]

    usable.sort(key=order)
    ranked = [
        Candidate(v, True, "chosen" if i == 0 else f"fallback #{i}: ranked after {usable[i - 1].id}")
        for i, v in enumerate(usable)
    ]
    return ranked + rejected
