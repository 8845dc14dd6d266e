"""The speed-up of one step against step 0, measured on a given backend and batch size,
interleaved in one process: what `compress run --target-speedup` steers by."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .backends import prepare
from .measure import interleaved, paired_speedup_spread, speedup, summarize
from .models_bench import batch_of, validation_arrays


def measure_step_speedup(run_dir: Path, manifest: dict[str, Any], step: int, *, backend: str = "ort-cpu",
                         batch: int = 1, rounds: int = 20, per_round: int | None = None, min_seconds: float = 2.0,
                         max_seconds: float = 20.0, data: Any = None) -> dict[str, Any]:
    """Median-latency ratio step 0 / ``step`` on ``backend`` at ``batch`` (raises
    ``BackendUnavailable`` when the backend cannot run here)."""
    run_dir = Path(run_dir)
    entries = {s["step"]: s for s in manifest["steps"]}
    images, _ = validation_arrays(manifest, limit=max(batch, 64), data=data)
    data = batch_of(images, batch)
    runners = {}
    device = None
    for k in (0, step):
        prepared = prepare(backend, onnx_path=run_dir / entries[k]["onnx"], checkpoint=run_dir / entries[k]["checkpoint"],
                           threads=None)
        device = prepared.device
        runners[k] = prepared.make_timed(data)
    timed = interleaved(runners, rounds=rounds, per_round=per_round, min_seconds=min_seconds, max_seconds=max_seconds)
    samples = timed.samples
    base, other = summarize(samples[0], batch), summarize(samples[step], batch)
    low, high = paired_speedup_spread(samples[0], samples[step], timed.per_round)
    return {"backend": backend, "device": device, "batch": batch, "speedup": speedup(base, other),
            "speedup_band": [low, high], "step0_p50_ms": base.p50_ms, "p50_ms": other.p50_ms}
