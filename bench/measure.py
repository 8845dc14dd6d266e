"""Measuring latency: timing loops, interleaving, percentiles.

Two rules make the numbers trustworthy:
- warm-up runs are never timed (first calls allocate, tune kernels, fill caches);
- models that are compared are timed *interleaved* (A, B, A, B, ...) in one process, so
  that drift of the machine (thermal, other load, frequency) hits all of them alike and the
  ratio between them (the speed-up) stays meaningful even when absolute numbers wander."""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

Timer = Callable[[], float]
# A relative spread (p90 - p10) / p50 above this marks a measurement as noisy in reports.
NOISY_SPREAD = 0.25


@dataclass(frozen=True)
class LatencyStats:
    """Per-call latency of one (model, backend, batch size), in milliseconds."""

    batch: int
    samples: int
    mean_ms: float
    std_ms: float
    min_ms: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    throughput: float  # images per second at the median latency
    spread: float  # (p90 - p10) / p50

    @property
    def noisy(self) -> bool:
        return self.spread > NOISY_SPREAD

    def to_dict(self) -> dict[str, float | int | bool]:
        out = dict(self.__dict__)
        out["noisy"] = self.noisy
        return out


def percentile(values: list[float] | np.ndarray, q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def summarize(seconds: list[float], batch: int) -> LatencyStats:
    """Latency statistics of repeated calls that each processed ``batch`` images."""
    if not seconds:
        raise ValueError("no timing samples")
    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    p10, p50, p90, p95, p99 = (percentile(ms, q) for q in (10, 50, 90, 95, 99))
    return LatencyStats(
        batch=batch, samples=len(ms), mean_ms=float(ms.mean()), std_ms=float(ms.std(ddof=1)) if len(ms) > 1 else 0.0,
        min_ms=float(ms.min()), p50_ms=p50, p90_ms=p90, p95_ms=p95, p99_ms=p99,
        throughput=batch / (p50 / 1000.0) if p50 > 0 else math.inf, spread=(p90 - p10) / p50 if p50 > 0 else 0.0,
    )


def time_calls(run: Callable[[], object], repeats: int, timer: Timer = time.perf_counter) -> list[float]:
    """Wall time of each of ``repeats`` calls of ``run``."""
    samples = []
    for _ in range(repeats):
        start = timer()
        run()
        samples.append(timer() - start)
    return samples


def interleaved(runners: Mapping[str, Callable[[], object]], *, warmup: int = 5, rounds: int = 20,
                per_round: int = 5, min_seconds: float = 0.0, max_seconds: float = 60.0,
                timer: Timer = time.perf_counter) -> dict[str, list[float]]:
    """Time several runners in alternation: each round times ``per_round`` calls of every
    runner in turn. Goes on past ``rounds`` until ``min_seconds`` have passed (so fast models
    get enough samples) and stops early at ``max_seconds`` (so slow ones stay bounded), but
    always completes whole rounds so every runner has the same number of samples."""
    for run in runners.values():
        for _ in range(warmup):
            run()
    samples: dict[str, list[float]] = {name: [] for name in runners}
    started = timer()
    done = 0
    while True:
        for name, run in runners.items():
            samples[name].extend(time_calls(run, per_round, timer))
        done += 1
        elapsed = timer() - started
        if done >= rounds and elapsed >= min_seconds:
            break
        if elapsed >= max_seconds and done >= 2:
            break
    return samples


def speedup(base: LatencyStats, other: LatencyStats) -> float:
    """How many times faster ``other`` is than ``base``, by median latency."""
    return base.p50_ms / other.p50_ms if other.p50_ms > 0 else math.inf


def paired_speedup_spread(base: list[float], other: list[float], chunk: int) -> tuple[float, float]:
    """Speed-up computed per interleaved round (medians of each chunk of samples), as
    (low, high) = 10th and 90th percentiles: a band that says how stable the ratio is."""
    ratios = []
    for start in range(0, min(len(base), len(other)) - chunk + 1, chunk):
        a, b = statistics.median(base[start:start + chunk]), statistics.median(other[start:start + chunk])
        if b > 0:
            ratios.append(a / b)
    if not ratios:
        return math.nan, math.nan
    return percentile(ratios, 10), percentile(ratios, 90)
