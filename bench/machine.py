"""What machine a measurement ran on: numbers without it are not comparable."""
from __future__ import annotations

import os
import platform
import subprocess
from typing import Any


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_info() -> dict[str, Any] | None:
    """GPU name, memory and driver via torch and nvidia-smi, or None without CUDA."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    info: dict[str, Any] = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        info["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        info["driver"] = None
    return info


def load_average() -> list[float] | None:
    """1, 5 and 15-minute load averages: a load near or above the core count while measuring
    means other programs competed for the CPU, and the absolute figures are pessimistic."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def machine_info(threads: int | None = None) -> dict[str, Any]:
    from compress.pipeline import library_versions

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    return {
        "hostname": platform.node(),
        "os": f"{platform.system()} {platform.release()}",
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": affinity,
        "threads": threads,
        "gpu": gpu_info(),
        "load_average": load_average(),
        "versions": library_versions(),
    }
