"""What machine a measurement ran on: numbers without it are not comparable.

Torch-free: the GPU is described by ``nvidia-smi``, and by torch only when the caller has
already imported it (the service never does)."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata as importlib_metadata
from typing import Any

VERSION_PACKAGES = ("torch", "torchvision", "torch-pruning", "onnx", "onnxruntime-gpu", "onnxruntime", "openvino", "numpy",
                    "pillow", "bentoml", "resnet-compress")


def library_versions() -> dict[str, str]:
    """Python and the versions of the libraries a figure depends on (those installed)."""
    versions = {"python": platform.python_version()}
    for name in VERSION_PACKAGES:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            continue
    return versions


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
    """GPU name, memory and driver (nvidia-smi), with the CUDA and cuDNN versions torch was
    built with when torch is already loaded; None without an NVIDIA GPU."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        out = None
    info: dict[str, Any] = {}
    if out is not None and out.returncode == 0 and out.stdout.strip():
        name, memory, driver = (part.strip() for part in out.stdout.strip().splitlines()[0].split(",")[:3])
        info = {"name": name, "memory_gib": round(float(memory) / 1024, 1), "driver": driver}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.setdefault("name", props.name)
        info.setdefault("memory_gib", round(props.total_memory / 2**30, 1))
        info.setdefault("driver", None)
        info.update({"cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()})
    return info or None


def load_average() -> list[float] | None:
    """1, 5 and 15-minute load averages: a load near or above the core count while measuring
    means other programs competed for the CPU, and the absolute figures are pessimistic."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def machine_info(threads: int | None = None) -> dict[str, Any]:
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
