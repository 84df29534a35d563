"""The catalogue of hardware targets a bundle variant can be built for.

A target names one execution provider and one precision. The builder fields say
how onnxruntime-genai's model builder makes it; the openvino targets are OpenVINO IR
that slmops writes itself (build.openvino_ir), qnn-npu a QNN context binary
(build.qnn_graph); `requires` names what a machine needs to build a target beyond the
build extra (the NPU targets).
The agent reads the same table to map a variant onto an onnxruntime provider.
"""

from dataclasses import dataclass
from typing import Literal

DeviceClass = Literal["npu", "gpu", "cpu"]


@dataclass(frozen=True)
class Target:
    id: str
    execution_provider: str
    """onnxruntime-genai's provider name (`cpu`, `cuda`, `dml`, `webgpu`, `qnn`, `openvino`)."""
    device_class: DeviceClass
    precision: Literal["int4", "int8", "fp16", "fp32", "bf16"]
    builder_precision: str | None
    """Precision argument of the model builder; None where the model builder cannot make it."""
    builder_provider: str | None
    description: str
    requires: str = ""
    """What a machine needs to build this target, where the model builder alone is not enough."""

    @property
    def quantized(self) -> bool:
        return self.precision in ("int4", "int8")

    @property
    def openvino(self) -> bool:
        """An OpenVINO IR (build.openvino_ir), not an onnxruntime-genai folder."""
        return self.execution_provider == "openvino"

    @property
    def qnn(self) -> bool:
        """A QNN context binary (build.qnn_graph), not an onnxruntime-genai folder."""
        return self.execution_provider == "qnn"


OPENVINO_REQUIRES = (
    "the openvino extra: pip install 'slmops[build,openvino]' (openvino, openvino-tokenizers, openvino-genai)"
)

TARGETS: dict[str, Target] = {
    t.id: t
    for t in (
        Target(
            "cpu-int4",
            "cpu",
            "cpu",
            "int4",
            "int4",
            "cpu",
            "block-wise int4 weights, int8 compute (MatMulNBits)",
        ),
        Target("cpu-int8", "cpu", "cpu", "int8", "int8", "cpu", "block-wise int8 weights"),
        Target("cpu-fp32", "cpu", "cpu", "fp32", "fp32", "cpu", "full precision, the quality reference"),
        Target("cuda-fp16", "cuda", "gpu", "fp16", "fp16", "cuda", "NVIDIA GPUs, half precision"),
        Target("cuda-int4", "cuda", "gpu", "int4", "int4", "cuda", "NVIDIA GPUs, block-wise int4 weights"),
        Target("dml-int4", "dml", "gpu", "int4", "int4", "dml", "DirectML (any Windows GPU), int4 weights"),
        Target("webgpu-int4", "webgpu", "gpu", "int4", "int4", "webgpu", "WebGPU (Dawn), int4 weights"),
        Target(
            "qnn-npu",
            "qnn",
            "npu",
            "fp16",
            None,
            None,
            "Qualcomm Hexagon NPU (HTP): a static-shape decoder in float16, compiled into a context "
            "binary for one SoC (--qnn-soc); SmolLM2: 371 MiB, +4 % perplexity on the simulator",
            requires=(
                "onnxruntime-qnn, whose Linux x86-64 wheel carries Qualcomm's HTP compiler: "
                "pip install --no-deps onnxruntime-qnn==2.7.0 (its own dependencies ask for a newer onnxruntime)"
            ),
        ),
        Target(
            "openvino-cpu",
            "openvino",
            "cpu",
            "int4",
            None,
            None,
            "OpenVINO IR served by OpenVINO GenAI on the CPU, the int4 blocks of cpu-int4",
            requires=OPENVINO_REQUIRES,
        ),
        Target(
            "openvino-npu",
            "openvino",
            "npu",
            "int4",
            None,
            None,
            "Intel NPU through OpenVINO GenAI, symmetric int4 weights (imatrix), compiled on the device; "
            "+8 % perplexity on SmolLM2, past the default gate",
            requires=OPENVINO_REQUIRES,
        ),
        Target(
            "openvino-npu-int8",
            "openvino",
            "npu",
            "int8",
            None,
            None,
            "Intel NPU through OpenVINO GenAI, symmetric 8-bit weights: +0.7 % perplexity on SmolLM2 "
            "at ~1.5 × openvino-npu's size",
            requires=OPENVINO_REQUIRES,
        ),
    )
}


def target(target_id: str) -> Target:
    from slmops.errors import TargetError

    try:
        return TARGETS[target_id]
    except KeyError:
        known = ", ".join(TARGETS)
        raise TargetError(f"unknown target {target_id!r}; known targets: {known}") from None
