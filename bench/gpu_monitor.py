"""GPU utilisation during a load test, sampled with ``nvidia-smi`` (no torch, no NVML binding).

``nvidia-smi --query-gpu=... --format=csv,noheader,nounits -lms N`` prints one line per GPU
every N ms; a reader thread keeps the samples with the time they arrived, and each load level
asks for the mean and peak utilisation inside its own time window. Where ``nvidia-smi`` is
absent (a CPU machine) nothing starts and the results say why."""
from __future__ import annotations

import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any

QUERY = "index,utilization.gpu,memory.used"


@dataclass
class GpuMonitor:
    """A running ``nvidia-smi`` sampler; :meth:`window` summarises the samples between two times."""

    interval_ms: int = 200
    samples: list[tuple[float, int, float, float]] = field(default_factory=list)  # (time, gpu, util %, MiB used)
    errors: list[str] = field(default_factory=list)
    _process: subprocess.Popen | None = None
    _reader: threading.Thread | None = None

    @classmethod
    def start(cls, interval_ms: int = 200, executable: str = "nvidia-smi") -> "GpuMonitor | str":
        """A started monitor, or the reason none runs (as a string)."""
        path = shutil.which(executable)
        if path is None:
            return "nvidia-smi not found: GPU utilisation not sampled"
        monitor = cls(interval_ms=interval_ms)
        monitor._process = subprocess.Popen([path, f"--query-gpu={QUERY}", "--format=csv,noheader,nounits",
                                             f"-lms={interval_ms}"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                            stdin=subprocess.DEVNULL, text=True)
        monitor._reader = threading.Thread(target=monitor._read, daemon=True)
        monitor._reader.start()
        return monitor

    def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            parsed = parse_line(line)
            if parsed is None:
                if line.strip() and len(self.errors) < 5:
                    self.errors.append(line.strip()[:200])
                continue
            self.samples.append((time.time(), *parsed))

    def window(self, start: float, end: float) -> dict[str, Any]:
        """Mean and peak utilisation (percent) and peak memory per GPU between ``start`` and
        ``end`` (``time.time()`` values)."""
        inside = [s for s in list(self.samples) if start <= s[0] <= end]
        if not inside:
            return {"samples": 0, "note": "no nvidia-smi sample in this window"}
        gpus: dict[str, Any] = {}
        for index in sorted({s[1] for s in inside}):
            mine = [s for s in inside if s[1] == index]
            utils = [s[2] for s in mine]
            gpus[str(index)] = {"mean_util_pct": round(sum(utils) / len(utils), 1), "max_util_pct": max(utils),
                                "max_memory_mib": max(s[3] for s in mine), "samples": len(mine)}
        return {"samples": len(inside), "interval_ms": self.interval_ms, "gpus": gpus,
                "mean_util_pct": round(sum(g["mean_util_pct"] for g in gpus.values()) / len(gpus), 1)}

    def stop(self) -> dict[str, Any]:
        """Stop sampling; returns what the results record about the sampler itself."""
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=5)
        if self._reader is not None:
            self._reader.join(timeout=5)
        return {"source": f"nvidia-smi --query-gpu={QUERY} -lms={self.interval_ms}", "samples": len(self.samples),
                **({"unparsed_lines": self.errors} if self.errors else {})}


def parse_line(line: str) -> tuple[int, float, float] | None:
    """``"0, 87, 1234"`` -> ``(0, 87.0, 1234.0)``; None for anything else (``[N/A]``, errors)."""
    cells = [c.strip() for c in line.split(",")]
    if len(cells) != 3:
        return None
    try:
        return int(cells[0]), float(cells[1]), float(cells[2])
    except ValueError:
        return None
