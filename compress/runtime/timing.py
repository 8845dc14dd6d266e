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
from typing import Any, Callable, Mapping

import numpy as np

Timer = Callable[[], float]
# A relative spread (p90 - p10) / p50 above this marks a measurement as noisy in reports.
NOISY_SPREAD = 0.25
# A speed-up whose per-round band (p90 - p10 of the ratios) is wider than this fraction of the
# speed-up itself is flagged too: the ratio moved a lot from round to round.
NOISY_SPEEDUP_BAND = 0.25
# Most consecutive calls of one model in an interleaved round.
MAX_PER_ROUND = 200
# Fewer samples than this make p95/p99 little more than the maximum: flagged in reports.
FEW_SAMPLES = 20


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


@dataclass(frozen=True)
class Interleaved:
    """Samples of runners timed in alternation; ``per_round`` is the number of consecutive calls
    of one runner in a round (the chunk that per-round speed-ups are computed over)."""

    samples: dict[Any, list[float]]
    per_round: int
    rounds: int
    seconds: float


def interleaved(runners: Mapping[Any, Callable[[], object]], *, warmup: int = 5, rounds: int = 20,
                per_round: int | None = None, chunk_seconds: float = 0.1, min_seconds: float = 0.0,
                max_seconds: float = 60.0, timer: Timer = time.perf_counter) -> Interleaved:
    """Time several runners in alternation: each round times ``per_round`` consecutive calls of
    every runner in turn. Goes on past ``rounds`` until ``min_seconds`` have passed (so fast
    models get enough samples) and stops early at ``max_seconds`` (so slow ones stay bounded),
    but always completes whole rounds so every runner has the same number of samples.

    ``per_round`` defaults to about ``chunk_seconds`` of calls (at most ``MAX_PER_ROUND``): the
    first calls after switching models run with cold caches, and with chunks of a few calls a
    small model would be timed mostly cold, which a service running one model never is
    (measured on the digits run: 5-call chunks gave 2.2x for a speed-up that 100 ms chunks and
    separate processes both put near 2.6x). 0.1 s chunks are still short against machine drift.
    Rounds are shrunk (down to one call per runner) when ``rounds`` rounds would not fit in
    ``max_seconds``. Warm-up calls are never in the samples; they size the rounds, and a slow
    model's warm-up stops after a tenth of ``max_seconds`` (at least two calls: the first one
    allocates)."""
    warm_budget = max_seconds / 10 / max(len(runners), 1)
    call_seconds = 0.0
    for run in runners.values():
        spent, last = 0.0, 0.0
        for index in range(max(warmup, 1)):
            start = timer()
            run()
            last = timer() - start
            spent += last
            if index >= 1 and spent >= warm_budget:
                break
        call_seconds += last
    if per_round is None:
        mean_call = call_seconds / max(len(runners), 1)
        per_round = max(1, min(MAX_PER_ROUND, int(chunk_seconds / mean_call))) if mean_call > 0 else MAX_PER_ROUND
    if call_seconds > 0 and rounds > 0:
        per_round = max(1, min(per_round, int(max_seconds / rounds / call_seconds)))
    samples: dict[Any, list[float]] = {name: [] for name in runners}
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
    return Interleaved(samples, per_round, done, elapsed)


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


def compare_interleaved(runners: Mapping[Any, Callable[[], object]], batch: int, baseline: Any,
                        **timing: Any) -> dict[Any, dict[str, Any]]:
    """Time ``runners`` interleaved (:func:`interleaved`) and give, per key, its latency and its
    speed-up against ``baseline`` with the band of per-round ratios, flagged noisy when that band
    is wide; the speed-up fields are None/NaN when ``baseline`` is not among the runners."""
    timed = interleaved(runners, **timing)
    stats = {key: summarize(samples, batch) for key, samples in timed.samples.items()}
    out: dict[Any, dict[str, Any]] = {}
    for key, stat in stats.items():
        ratio, low, high = None, math.nan, math.nan
        if baseline in stats:
            ratio = speedup(stats[baseline], stat)
            low, high = paired_speedup_spread(timed.samples[baseline], timed.samples[key], timed.per_round)
        out[key] = {"latency": stat.to_dict(), "speedup": ratio, "speedup_band": [low, high],
                    "speedup_noisy": bool(ratio is not None and key != baseline and not math.isnan(high)
                                          and (high - low) > NOISY_SPEEDUP_BAND * ratio),
                    "rounds": timed.rounds, "per_round": timed.per_round}
    return out
