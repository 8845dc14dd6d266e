"""Which GPU each worker serves: on a host with several, one worker per GPU.

BentoML starts every worker of a service with the same GPUs visible (all of them, or its own
allocation in ``CUDA_VISIBLE_DEVICES``), so every worker's CUDA sessions would land on the first
one. The service pins them itself: worker ``i`` (BentoML's ``server_context.worker_index``,
which counts from 1) runs its sessions on visible GPU ``(i - 1) mod N`` through the CUDA
execution provider's ``device_id``, so each worker has its own sessions and its own CUDA
context, on its own GPU. With ``SERVE_WORKERS`` unset there is one worker per visible GPU when
there are several (:func:`default_workers`); an explicit count spreads its workers over the GPUs
in the same round-robin order.

GPUs are counted without torch and without creating a CUDA context: from
``CUDA_VISIBLE_DEVICES`` when it is set (read the way CUDA reads it: the entries up to the first
invalid one; empty or ``-1``: none), else from NVML (nvidia-ml-py, a BentoML dependency), which
sees the GPUs the container runtime or Kubernetes' device plugin exposed. No driver (a CPU
host): no GPUs."""
from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

_DEVICE_ENTRY = re.compile(r"^(\d+|GPU-[0-9a-fA-F-]+|MIG-[\w/-]+)$")


@dataclass(frozen=True)
class Gpu:
    """A GPU the service may use. ``index`` is its place among the visible GPUs (ONNX Runtime's
    ``device_id``); ``id`` is how the host names it (the ``CUDA_VISIBLE_DEVICES`` entry, or
    NVML's index); ``name`` comes from NVML where it answers."""

    index: int
    id: str
    name: str | None = None

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


NvmlQuery = Callable[[], list[tuple[str, str]]]
"""Returns (name, uuid) of each GPU in NVML's order; empty without a driver."""


def parse_visible_devices(text: str) -> list[str]:
    """``CUDA_VISIBLE_DEVICES`` as CUDA reads it: comma-separated indices or ``GPU-``/``MIG-``
    UUIDs; the list ends at the first invalid entry (so ``-1`` or ``""`` hide every GPU)."""
    entries = []
    for entry in (part.strip() for part in text.split(",")):
        if not _DEVICE_ENTRY.match(entry):
            break
        entries.append(entry)
    return entries


def nvml_gpus() -> list[tuple[str, str]]:
    """(name, uuid) of every GPU NVML sees; empty when there is no NVIDIA driver."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except (pynvml.NVMLError, OSError):
        return []
    try:
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        return [(_text(pynvml.nvmlDeviceGetName(h)), _text(pynvml.nvmlDeviceGetUUID(h))) for h in handles]
    except pynvml.NVMLError:
        return []
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def visible_gpus(env: Mapping[str, str] | None = None, nvml: NvmlQuery = nvml_gpus) -> list[Gpu]:
    """The GPUs this process may use, in CUDA's order (see the module docstring)."""
    env = os.environ if env is None else env
    if "CUDA_VISIBLE_DEVICES" not in env:
        return [Gpu(index, str(index), name) for index, (name, _) in enumerate(nvml())]
    entries = parse_visible_devices(env["CUDA_VISIBLE_DEVICES"])
    if not entries:
        return []
    known = nvml()
    names = {str(i): name for i, (name, _) in enumerate(known)} | {uuid: name for name, uuid in known}
    return [Gpu(index, entry, names.get(entry)) for index, entry in enumerate(entries)]


def default_workers(gpus: Sequence[Gpu]) -> int:
    """Workers for ``SERVE_WORKERS=per-gpu`` (the default): one per GPU, at least one. The
    caller passes no GPUs where the models cannot run on CUDA (``SERVE_PROVIDER=cpu``, or an
    ONNX Runtime without the CUDA provider)."""
    return max(1, len(gpus))


def gpu_for_worker(worker_index: int | None, gpus: Sequence[Gpu]) -> Gpu | None:
    """The GPU of worker ``worker_index`` (1-based, as BentoML counts; None outside a
    ``bentoml serve`` worker: the first GPU), or None without GPUs."""
    if not gpus:
        return None
    if worker_index is not None and worker_index < 1:
        raise ValueError(f"worker indices count from 1, not {worker_index}")
    return gpus[0 if worker_index is None else (worker_index - 1) % len(gpus)]


def worker_devices(workers: int, gpus: Sequence[Gpu]) -> list[dict[str, object]]:
    """Every worker's GPU (what /metadata shows): ``[{"worker": 1, "gpu": {...} | None}, ...]``."""
    return [{"worker": index, "gpu": (gpu.to_dict() if (gpu := gpu_for_worker(index, gpus)) else None)}
            for index in range(1, workers + 1)]
