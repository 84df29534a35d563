"""Variant choice on synthetic devices: what runs where, and why the rest does not."""

import pytest

from slmops.agent import config as agent_config
from slmops.agent.choice import rank
from slmops.agent.hardware import Accelerator, HardwareProfile
from slmops.manifest import FileEntry, Manifest, Variant

GiB = 2**30


def variant(id_: str, provider: str, device_class: str, precision: str, memory_gib: float = 0.5) -> Variant:
    return Variant(
        id=id_,
        execution_provider=provider,
        device_class=device_class,
        precision=precision,
        files=[FileEntry(path="model.onnx", size=1, sha256="0" * 64)],
        min_memory_bytes=int(memory_gib * GiB),
        context_length=2048,
    )


ALL = [
    variant("cpu-fp32", "cpu", "cpu", "fp32"),
    variant("cpu-int4", "cpu", "cpu", "int4"),
    variant("cpu-int8", "cpu", "cpu", "int8"),
    variant("cuda-fp16", "cuda", "gpu", "fp16"),
    variant("cuda-int4", "cuda", "gpu", "int4"),
    variant("qnn-npu", "qnn", "npu", "int8"),
]


def manifest(*variants: Variant) -> Manifest:
    return Manifest.model_construct(name="m", version="1", variants=list(variants))


def device(*providers: str, available_gib: float = 8) -> HardwareProfile:
    return HardwareProfile(
        cpu_model="test CPU",
        cpu_cores_physical=4,
        cpu_cores_logical=8,
        isa=["avx2"],
        memory_total_bytes=16 * GiB,
        memory_available_bytes=int(available_gib * GiB),
        disk_free_bytes=100 * GiB,
        os="Linux",
        arch="x86_64",
        accelerators=[Accelerator(provider=p, onnxruntime_name=p) for p in ("cpu", *providers)],
    )


def order(candidates) -> list[str]:
    return [c.variant.id for c in candidates if c.usable]


def test_npu_before_gpu_before_cpu_then_smaller_precision() -> None:
    candidates = rank(manifest(*ALL), device("cuda", "qnn"), agent_config.load())
    assert order(candidates) == ["qnn-npu", "cuda-int4", "cuda-fp16", "cpu-int4", "cpu-int8", "cpu-fp32"]
    assert candidates[0].reason == "chosen"
    assert candidates[1].reason == "fallback #1: ranked after qnn-npu"


def test_a_cpu_only_device_gets_the_int4_variant_and_reasons_for_the_rest() -> None:
    candidates = rank(manifest(*ALL), device(), agent_config.load())
    assert order(candidates) == ["cpu-int4", "cpu-int8", "cpu-fp32"]
    rejected = {c.variant.id: c.reason for c in candidates if not c.usable}
    assert rejected == {
        "cuda-fp16": "provider cuda is not available here (available: cpu)",
        "cuda-int4": "provider cuda is not available here (available: cpu)",
        "qnn-npu": "provider qnn is not available here (available: cpu)",
    }


def test_variants_that_need_more_memory_than_is_free_are_rejected() -> None:
    big = variant("cpu-fp32", "cpu", "cpu", "fp32", memory_gib=6)
    small = variant("cpu-int4", "cpu", "cpu", "int4", memory_gib=1)
    candidates = rank(manifest(big, small), device(available_gib=2), agent_config.load())
    assert order(candidates) == ["cpu-int4"]
    assert candidates[-1].reason == "needs 6144 MiB, 2048 MiB available"
    assert not any(c.usable for c in rank(manifest(big, small), device(available_gib=0.5), agent_config.load()))


def test_operator_can_forbid_and_prefer_providers() -> None:
    forbidding = agent_config.load(forbid_providers=["qnn"])
    candidates = rank(manifest(*ALL), device("cuda", "qnn"), forbidding)
    assert order(candidates)[0] == "cuda-int4"
    assert {c.variant.id: c.reason for c in candidates if not c.usable} == {
        "qnn-npu": "provider qnn is forbidden by the configuration"
    }
    preferring = agent_config.load(prefer_providers=["cpu"])
    assert order(rank(manifest(*ALL), device("cuda", "qnn"), preferring))[:2] == ["cpu-int4", "cpu-int8"]


def test_unknown_provider_names_in_the_config_are_refused() -> None:
    with pytest.raises(agent_config.ConfigError, match=r"forbid_providers\.0"):
        agent_config.load(forbid_providers=["tpu"])
