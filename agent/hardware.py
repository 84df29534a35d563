"""What this device is: CPU, memory, disk, OS, and the accelerators onnxruntime and OpenVINO use here.

`probe()` gathers a `HardwareProfile` from psutil, /proc, the onnxruntime build, OpenVINO's
devices where OpenVINO GenAI is installed, onnxruntime-qnn's NPUs where it is installed and,
where present, `nvidia-smi`. Each piece
degrades to "unknown" instead of failing: a probe must work on any box the agent lands on.
"""

import functools
import importlib.util
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import psutil

from slmops.messages import Accelerator, HardwareProfile

__all__ = ["Accelerator", "HardwareProfile", "describe", "inference_threads", "probe"]

log = logging.getLogger(__name__)

# onnxruntime provider name → the short name bundles use (slmops.targets). Not onnxruntime's
# OpenVINO provider: slmops' openvino variants are OpenVINO IR, served by OpenVINO GenAI.
PROVIDERS = {
    "CPUExecutionProvider": "cpu",
    "CUDAExecutionProvider": "cuda",
    "TensorrtExecutionProvider": "tensorrt",
    "NvTensorRTRTXExecutionProvider": "trt-rtx",
    "DmlExecutionProvider": "dml",
    "WebGpuExecutionProvider": "webgpu",
    "QNNExecutionProvider": "qnn",
    "CoreMLExecutionProvider": "coreml",
    "ROCMExecutionProvider": "rocm",
    "MIGraphXExecutionProvider": "migraphx",
    "VitisAIExecutionProvider": "vitisai",
}
ISA_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx_vnni",
    "amx_tile",
    "neon",
    "asimd",
    "asimddp",
    "sve",
    "i8mm",
    "dotprod",
)


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def describe() -> str:
    """One line for reports: CPU model, cores, architecture."""
    return f"{cpu_name()}, {os.cpu_count()} cores, {platform.machine()}"


def inference_threads() -> int:
    """Threads for onnxruntime's intra-op pool: the CPUs this process may run on (affinity mask,
    taskset, cgroup cpuset), no more than the physical cores (SMT siblings slow int4 matmuls)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(usable, psutil.cpu_count(logical=False) or usable))


def isa_features() -> list[str]:
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return ["neon"] if platform.machine().lower() in ("arm64", "aarch64") else []
    flags: set[str] = set()
    for line in cpuinfo.read_text(errors="replace").splitlines():
        if line.lower().startswith(("flags", "features")):
            flags.update(line.split(":", 1)[1].split())
    return [f for f in ISA_FLAGS if f in flags]


@functools.cache
def onnxruntime_provider_names() -> tuple[str, ...]:
    """The execution providers of the onnxruntime build that onnxruntime-genai loads.

    Asked in a child process: importing onnxruntime's Python module maps a second copy of
    the runtime next to the one onnxruntime-genai uses, 35 MiB of RSS for one list of names.
    """
    script = "import json, onnxruntime; print(json.dumps(onnxruntime.get_available_providers()))"
    return _names_from_child(
        script, "onnxruntime's execution providers", "assuming CPU only", ("CPUExecutionProvider",)
    )


def _names_from_child(script: str, what: str, otherwise: str, fallback: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The JSON list of names `script` prints last, run in a child Python; `fallback` (logged with
    `otherwise`) where it fails."""
    try:
        out = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
        ).stdout
        return tuple(str(name) for name in json.loads(out.strip().splitlines()[-1]))
    except (subprocess.SubprocessError, OSError, ValueError, IndexError) as e:
        log.warning("cannot list %s (%s); %s", what, e, otherwise)
        return fallback


def onnxruntime_accelerators() -> list[Accelerator]:
    found = []
    for name in onnxruntime_provider_names():
        short = PROVIDERS.get(name)
        if short is None:
            continue  # e.g. AzureExecutionProvider: a remote endpoint, not hardware here
        found.append(Accelerator(provider=short, onnxruntime_name=name))
    if any(a.provider == "cuda" for a in found):
        gpus = nvidia_gpus()
        for a in found:
            if a.provider == "cuda" and gpus:
                a.device, a.memory_bytes = gpus[0]
    return found


def nvidia_gpus() -> list[tuple[str, int]]:
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        name, _, mib = line.rpartition(",")
        if mib.strip().isdigit():
            gpus.append((name.strip(), int(mib.strip()) * 2**20))
    return gpus


@functools.cache
def openvino_devices() -> tuple[str, ...]:
    """OpenVINO's devices here (CPU, GPU.0, NPU…) where OpenVINO GenAI is installed, else none.
    Asked in a child process, as onnxruntime's providers are: OpenVINO's plugins are large."""
    if importlib.util.find_spec("openvino_genai") is None:
        return ()
    script = "import json, openvino; print(json.dumps(openvino.Core().available_devices))"
    return _names_from_child(script, "OpenVINO's devices", "OpenVINO variants will not be chosen")


def openvino_accelerators() -> list[Accelerator]:
    """One per OpenVINO device; `device` is OpenVINO's name, whose class (cpu, gpu, npu) an
    openvino variant's device class must match."""
    return [Accelerator(provider="openvino", onnxruntime_name="", device=d) for d in openvino_devices()]


def openvino_device_class(device: str) -> str:
    """GPU.0 → gpu."""
    return device.split(".")[0].lower()


@functools.cache
def qnn_npus() -> tuple[str, ...]:
    """The NPUs onnxruntime-qnn's HTP backend finds here, where it is installed. On an x86-64
    machine its devices are the HTP simulator, a CPU device: not an NPU, never chosen."""
    if importlib.util.find_spec("onnxruntime_qnn") is None:
        return ()
    script = (
        "import json, onnxruntime as ort, onnxruntime_qnn as q\n"
        "ort.register_execution_provider_library('QNNExecutionProvider', q.get_library_path())\n"
        "print(json.dumps([d.device.vendor or 'Qualcomm' for d in ort.get_ep_devices()\n"
        "    if d.ep_name == 'QNNExecutionProvider' and d.device.type == ort.OrtHardwareDeviceType.NPU]))"
    )
    return _names_from_child(script, "onnxruntime-qnn's devices", "QNN variants will not be chosen")


def qnn_accelerators() -> list[Accelerator]:
    return [Accelerator(provider="qnn", onnxruntime_name="QNNExecutionProvider", device=d) for d in qnn_npus()]


def probe(data_dir: Path | None = None) -> HardwareProfile:
    memory = psutil.virtual_memory()
    disk_path = data_dir if data_dir and data_dir.exists() else Path.home()
    return HardwareProfile(
        cpu_model=cpu_name(),
        cpu_cores_physical=psutil.cpu_count(logical=False),
        cpu_cores_logical=psutil.cpu_count() or 1,
        isa=isa_features(),
        memory_total_bytes=memory.total,
        memory_available_bytes=memory.available,
        disk_free_bytes=shutil.disk_usage(disk_path).free,
        os=f"{platform.system()} {platform.release()}",
        arch=platform.machine(),
        accelerators=onnxruntime_accelerators() + openvino_accelerators() + qnn_accelerators(),
    )
