"""``SERVE_WORKERS=auto``: how many worker processes this machine can hold.

Each worker is a whole copy of the service: its own event loop (which, on 2 cores with a
small model, is what limits throughput: see bench/results/cpu-2core-serve/), its own ONNX
Runtime sessions and its own decode buffers. So:

    workers = max(1, min(cores, floor(0.8 * available memory / memory per worker)))

- ``cores``: the CPUs this process may run on (``sched_getaffinity``), lowered to a cgroup
  CPU quota (``cpu.max``) when there is one;
- ``available memory``: what the kernel reports as available (``MemAvailable``), lowered to
  what is left under a cgroup memory limit (``memory.max`` minus ``memory.current``);
  80% of it, leaving room for the page cache and the rest of the machine;
- ``memory per worker`` = :data:`BASE_WORKER_BYTES` (Python, BentoML, ONNX Runtime and the
  HTTP stack, measured here at about 190 MiB without a model) + 3 x the served ONNX files
  (weights as loaded, ONNX Runtime's pre-packed copies, activation arenas) + the decode
  budget: up to ``min(4, cores)`` large images decoded at once, each up to ``SERVE_MAX_PIXELS``
  at :data:`DECODE_BYTES_PER_PIXEL`.

On a GPU each worker also holds its own CUDA context and sessions in GPU memory (a few hundred
MiB plus the model each); the rule above does not look at GPU memory, so set ``SERVE_WORKERS``
explicitly where that is scarce."""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

BASE_WORKER_BYTES = 256 * 1024 * 1024
"""Resident memory of a worker before its models and images (measured: 190 MiB, rounded up)."""
SESSION_BYTES_PER_FILE_BYTE = 3
DECODE_BYTES_PER_PIXEL = 8
"""A decoded image (4 bytes per pixel at most) plus its conversion to RGB, held together."""
MEMORY_SHARE = 0.8


@dataclass(frozen=True)
class WorkerPlan:
    workers: int
    cores: int
    memory_workers: int
    bytes_per_worker: int
    available_bytes: int

    def describe(self) -> str:
        limit = "cores" if self.workers == self.cores and self.cores <= self.memory_workers else "memory"
        return (f"SERVE_WORKERS=auto: {self.workers} worker(s), limited by {limit} ({self.cores} core(s); "
                f"memory for {self.memory_workers}: {self.bytes_per_worker / 2**20:.0f} MiB per worker, "
                f"{self.available_bytes / 2**30:.1f} GiB available)")


def plan(model_files: Sequence[Path], *, max_pixels: int, cores: int | None = None,
         available_bytes: int | None = None) -> WorkerPlan:
    """The worker count for these model files (one per member, the precision served)."""
    cores = usable_cores() if cores is None else cores
    available = available_memory() if available_bytes is None else available_bytes
    per_worker = (BASE_WORKER_BYTES + SESSION_BYTES_PER_FILE_BYTE * sum(_size(f) for f in model_files)
                  + min(4, cores) * max_pixels * DECODE_BYTES_PER_PIXEL)
    memory_workers = int(MEMORY_SHARE * available // per_worker)
    return WorkerPlan(max(1, min(cores, memory_workers)), cores, memory_workers, per_worker, available)


def _size(path: Path) -> int:
    """An ONNX file's bytes, with its external data files (``*.onnx.data`` and the like) if any."""
    path = Path(path)
    extra = sum(p.stat().st_size for p in path.parent.glob(f"{path.name}.*") if p.is_file())
    return path.stat().st_size + extra


def usable_cores() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def available_memory() -> int:
    import psutil

    available = psutil.virtual_memory().available
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            available = min(available, max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return available
