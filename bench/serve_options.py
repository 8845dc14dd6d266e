"""``bench serve-options``: which of the service's runtime options are fastest for a model here.

The service's defaults on a GPU (``SERVE_CUDNN_ALGO_SEARCH``, ``SERVE_CUDNN_MAX_WORKSPACE``,
``SERVE_BATCH_SHAPES``, ``SERVE_MODEL_THREADS`` with ``SERVE_SESSIONS``) are choices that
depend on the GPU, the model and ONNX Runtime's version (ORT issue 20712: a ResNet slower with
cuDNN's max workspace on), so they are measured, not assumed. Three questions, each answered
with the service's own data path (:class:`compress.runtime.binding.BoundRunner`: one host
batch copied in, logits copied out):

1. cuDNN: every ``cudnn_conv_algo_search`` x ``cudnn_conv_use_max_workspace``: images/s at a
   few batch sizes, and what the first call of each new batch size costs (the warm-up, or the
   stall a request would pay without it). CUDA only.
2. Batch shapes: ``buckets`` (padded to powers of two) against ``exact`` on the same sequence of
   mixed batch sizes (what an adaptive batcher produces under changing load), with the time
   each needs to warm up every size it will see.
3. Model threads: 1, 2 and 4 threads calling the model at once, sharing one session or with a
   session each, at one batch size (closed loop: each thread calls again as soon as it has
   its answer).

Cases of a question are timed in rounds, each round visiting every case in turn, and the
median of the rounds is kept, so a drift of the machine hits all cases alike."""
from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from compress.runtime.binding import BoundRunner
from compress.runtime.sessions import SessionSettings, create_session

ALGO_SEARCHES = ("HEURISTIC", "EXHAUSTIVE", "DEFAULT")
THREAD_COUNTS = (1, 2, 4)


def _session_settings(provider: str, cuda_options: dict[str, str] | None = None) -> SessionSettings:
    """As the service makes them: intra-op spinning off."""
    options = cuda_options or {"cudnn_conv_algo_search": "HEURISTIC"}
    return SessionSettings(provider, spinning=False, cuda_options=dict(options))


def _images_per_s(call: Callable[[], int], seconds: float) -> float:
    """Images/s of repeated ``call()`` (returns the images it ran) for about ``seconds``."""
    images, start = 0, time.perf_counter()
    deadline = start + seconds
    while True:
        images += call()
        now = time.perf_counter()
        if now >= deadline:
            return images / (now - start)


def _rounds(cases: dict[str, Callable[[], float]], rounds: int) -> dict[str, dict[str, float]]:
    """Each case's measurement, ``rounds`` times in turn; median and spread per case."""
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, measure in cases.items():
            samples[name].append(measure())
    return {name: {"images_per_s": statistics.median(values), "min": min(values), "max": max(values)}
            for name, values in samples.items()}


def cudnn_options(path: Path, *, batch_sizes: list[int], seconds: float, rounds: int, rng: np.random.Generator,
                  sample_shape: tuple[int, ...]) -> dict[str, Any]:
    """Question 1 (CUDA): images/s per batch size and first-call cost per option pair."""
    runners: dict[str, BoundRunner] = {}
    first_call_ms: dict[str, dict[str, float]] = {}
    batches = {size: rng.normal(size=(size, *sample_shape)).astype(np.float32) for size in batch_sizes}
    for search in ALGO_SEARCHES:
        for workspace in ("1", "0"):
            name = f"{search.lower()}, max workspace {'on' if workspace == '1' else 'off'}"
            options = {"cudnn_conv_algo_search": search, "cudnn_conv_use_max_workspace": workspace}
            session, _ = create_session(path, _session_settings("cuda", options))
            runner = BoundRunner(session, device="cuda", max_batch_size=max(batch_sizes), shapes="exact")
            first_call_ms[name] = {}
            for size, batch in batches.items():
                start = time.perf_counter()
                runner.run(batch)
                first_call_ms[name][str(size)] = (time.perf_counter() - start) * 1e3
            runners[name] = runner
    per_size = {}
    for size, batch in batches.items():
        cases = {name: (lambda r=runner, b=batch: _images_per_s(lambda: len(r.run(b)), seconds))
                 for name, runner in runners.items()}
        per_size[str(size)] = _rounds(cases, rounds)
    return {"batch_sizes": batch_sizes, "first_call_ms": first_call_ms, "images_per_s": per_size}


def batch_shapes(path: Path, provider: str, *, max_batch_size: int, seconds: float, rounds: int,
                 rng: np.random.Generator, sample_shape: tuple[int, ...], calls: int = 200) -> dict[str, Any]:
    """Question 2: buckets against exact on one sequence of mixed batch sizes."""
    sizes = rng.integers(1, max_batch_size + 1, size=calls).tolist()
    pool = rng.normal(size=(max_batch_size, *sample_shape)).astype(np.float32)
    result: dict[str, Any] = {"max_batch_size": max_batch_size, "sequence_calls": calls, "warm_up": {}}
    cases: dict[str, Callable[[], float]] = {}
    for shapes in ("buckets", "exact"):
        session, device = create_session(path, _session_settings(provider))
        runner = BoundRunner(session, device=device, max_batch_size=max_batch_size, shapes=shapes)
        start = time.perf_counter()
        for size in runner.warm_up_sizes():
            runner.run(pool[:size])
        result["warm_up"][shapes] = {"sizes": len(runner.warm_up_sizes()), "seconds": time.perf_counter() - start}

        def sequence(r: BoundRunner = runner) -> int:
            for size in sizes:
                r.run(pool[:size])
            return sum(sizes)

        cases[shapes] = lambda s=sequence: _images_per_s(s, seconds)
    result["images_per_s"] = _rounds(cases, rounds)
    return result


def model_threads(path: Path, provider: str, *, batch_size: int, seconds: float, rounds: int,
                  rng: np.random.Generator, sample_shape: tuple[int, ...]) -> dict[str, Any]:
    """Question 3: 1, 2, 4 model threads, one shared session or one session per thread."""
    batch = rng.normal(size=(batch_size, *sample_shape)).astype(np.float32)
    shared, device = create_session(path, _session_settings(provider))
    own = [shared] + [create_session(path, _session_settings(provider))[0] for _ in range(max(THREAD_COUNTS) - 1)]
    cases: dict[str, Callable[[], float]] = {}
    for count in THREAD_COUNTS:
        for sessions in ("shared", "per-thread"):
            if count == 1 and sessions == "per-thread":
                continue  # the same as shared
            runners = [BoundRunner(shared if sessions == "shared" else own[i], device=device,
                                   max_batch_size=batch_size, shapes="buckets") for i in range(count)]
            for runner in runners:
                runner.run(batch)
            cases[f"{count} thread{'s' if count > 1 else ''}, {sessions}"] = (
                lambda rs=runners: _threads_images_per_s(rs, batch, seconds))
    return {"batch_size": batch_size, "images_per_s": _rounds(cases, rounds)}


def _threads_images_per_s(runners: list[BoundRunner], batch: np.ndarray, seconds: float) -> float:
    """Closed loop: every runner on its own thread, calling again as soon as it has its answer."""
    counts = [0] * len(runners)
    errors: list[BaseException] = []
    start = time.perf_counter()
    deadline = start + seconds

    def loop(index: int) -> None:
        try:
            while time.perf_counter() < deadline:
                counts[index] += len(runners[index].run(batch))
        except BaseException as exc:  # reported below: a failing case must not look slow
            errors.append(exc)

    threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(len(runners))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 60)
    if errors:
        raise RuntimeError(f"a model thread failed: {errors[0]}") from errors[0]
    return sum(counts) / (time.perf_counter() - start)


def measure(path: Path, *, provider: str, max_batch_size: int, batch_sizes: list[int], seconds: float,
            rounds: int, seed: int = 0) -> dict[str, Any]:
    """All three questions for one ONNX file; the cuDNN one only where the session runs on CUDA."""
    from compress.runtime.machine import machine_info

    rng = np.random.default_rng(seed)
    probe, device = create_session(path, _session_settings(provider))
    sample_shape = tuple(int(d) for d in probe.get_inputs()[0].shape[1:])
    doc: dict[str, Any] = {"model": str(path), "provider": device, "seconds_per_case": seconds, "rounds": rounds,
                           "session": _session_settings(device).describe(), "machine": machine_info()}
    started = time.perf_counter()
    if device == "cuda":
        doc["cudnn"] = cudnn_options(path, batch_sizes=batch_sizes, seconds=seconds, rounds=rounds, rng=rng,
                                     sample_shape=sample_shape)
    else:
        doc["cudnn"] = None
        doc["cudnn_skipped"] = "the CPU execution provider has no cuDNN options"
    doc["batch_shapes"] = batch_shapes(path, device, max_batch_size=max_batch_size, seconds=seconds, rounds=rounds,
                                       rng=rng, sample_shape=sample_shape)
    doc["model_threads"] = model_threads(path, device, batch_size=max_batch_size, seconds=seconds, rounds=rounds,
                                         rng=rng, sample_shape=sample_shape)
    doc["seconds"] = time.perf_counter() - started
    doc["recommended_env"] = recommended_env(doc)
    return doc


DEFAULTS = {"cudnn": "heuristic, max workspace on", "model_threads": "1 thread, shared"}


def _clear_winner(cases: dict[str, dict[str, float]], default: str) -> str:
    """The fastest case if it beat ``default`` in every round (its slowest round faster than the
    default's fastest), else ``default``: a difference inside the noise changes nothing."""
    best = max(cases, key=lambda n: cases[n]["images_per_s"])
    return best if best != default and cases[best]["min"] > cases[default]["max"] else default


def recommended_env(doc: dict[str, Any]) -> dict[str, str]:
    """The SERVE_* settings the measurements point to (the service's defaults unless a case won clearly)."""
    env: dict[str, str] = {}
    cudnn = doc.get("cudnn")
    if cudnn:
        largest = str(max(cudnn["batch_sizes"]))
        search, workspace = _clear_winner(cudnn["images_per_s"][largest], DEFAULTS["cudnn"]).split(", max workspace ")
        env["SERVE_CUDNN_ALGO_SEARCH"] = search
        env["SERVE_CUDNN_MAX_WORKSPACE"] = workspace
    default_shapes = "buckets" if doc["provider"] == "cuda" else "exact"
    env["SERVE_BATCH_SHAPES"] = _clear_winner(doc["batch_shapes"]["images_per_s"], default_shapes)
    threads, _, sessions = _clear_winner(doc["model_threads"]["images_per_s"], DEFAULTS["model_threads"]).partition(", ")
    env["SERVE_MODEL_THREADS"] = threads.split()[0]
    if env["SERVE_MODEL_THREADS"] != "1":
        env["SERVE_SESSIONS"] = sessions
    return env


def report_markdown(doc: dict[str, Any]) -> str:
    """The three tables, and the settings they point to."""
    lines = [f"# Service runtime options: {Path(doc['model']).name} on {doc['provider'].upper()}", "",
             f"Each case timed {doc['seconds_per_case']:g} s per round, {doc['rounds']} rounds (median, min-max); "
             f"sessions as the service makes them ({', '.join(f'{k} {v}' for k, v in doc['session'].items())}).", ""]
    cudnn = doc.get("cudnn")
    if cudnn:
        sizes = [str(s) for s in cudnn["batch_sizes"]]
        lines += ["## cuDNN options (images/s; first call of each size in ms)", "",
                  "| option | " + " | ".join(f"b{s} img/s" for s in sizes) + " | " + " | ".join(f"b{s} first call ms" for s in sizes) + " |",
                  "|---" * (1 + 2 * len(sizes)) + "|"]
        for name in cudnn["first_call_ms"]:
            speeds = [f"{cudnn['images_per_s'][s][name]['images_per_s']:,.0f}" for s in sizes]
            firsts = [f"{cudnn['first_call_ms'][name][s]:.1f}" for s in sizes]
            lines.append(f"| {name} | " + " | ".join(speeds) + " | " + " | ".join(firsts) + " |")
        lines += [""]
    else:
        lines += [f"cuDNN options: not measured ({doc.get('cudnn_skipped')}).", ""]
    shapes = doc["batch_shapes"]
    lines += [f"## Batch shapes ({shapes['sequence_calls']} calls of uniform random size 1..{shapes['max_batch_size']})", "",
              "| shapes | images/s (min-max) | warm-up: sizes, seconds |", "|---|---|---|"]
    for name, value in shapes["images_per_s"].items():
        warm = shapes["warm_up"][name]
        lines.append(f"| {name} | {value['images_per_s']:,.0f} ({value['min']:,.0f}-{value['max']:,.0f}) | "
                     f"{warm['sizes']}, {warm['seconds']:.2f} s |")
    threads = doc["model_threads"]
    lines += ["", f"## Model threads (batch {threads['batch_size']}, closed loop)", "",
              "| threads, sessions | images/s (min-max) |", "|---|---|"]
    for name, value in threads["images_per_s"].items():
        lines.append(f"| {name} | {value['images_per_s']:,.0f} ({value['min']:,.0f}-{value['max']:,.0f}) |")
    lines += ["", "## Settings these measurements point to", "",
              "The service's default unless another case was faster in every round:", "",
              "    " + " ".join(f"{k}={v}" for k, v in doc["recommended_env"].items()), "",
              f"Measured in {doc['seconds']:.0f} s.", ""]
    return "\n".join(lines)
