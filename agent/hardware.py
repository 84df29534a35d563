"""What this machine is, in the words a build record or a device profile uses."""

import os
import platform
from pathlib import Path


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
