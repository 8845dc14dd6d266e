"""What a service's throughput is compared with: the same model run in-process, and the CPU
the service's processes spend per request.

``bench serve --baseline RUN_DIR[:STEP]`` times the served model's ONNX file in this process
(one ONNX Runtime session, CPU, intra-op spinning off as the service runs it) at batch 1 and
at the mean batch size the service's adaptive batcher reached, in the same run as the load
test, so "the service delivers X% of the model" is a ratio from one machine and one session.
The server's CPU time comes from its processes (found by the port they listen on, with their
parent ``bentoml serve`` and its children), read before and after each timed level, together
with the service's batching counters (``/metadata``), so each level also gets its own mean
model batch and the server's CPU per request outside the model: its CPU per request minus the
in-process CPU per image of the same model at that batch size (same session options, every
ONNX Runtime thread counted)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compress.errors import UsageError

if TYPE_CHECKING:
    from compress.manifest import RunManifest, StepRecord


def parse_baseline(text: str) -> tuple[Path, int | None]:
    """``RUN_DIR`` or ``RUN_DIR:STEP``."""
    path, _, step = text.rpartition(":") if ":" in text and text.rsplit(":", 1)[1].isdigit() else (text, "", "")
    run_dir = Path(path)
    if not (run_dir / "manifest.json").is_file():
        raise UsageError(f"--baseline {text}: {run_dir} is not a run directory (no manifest.json)")
    return run_dir, int(step) if step else None


@dataclass(frozen=True)
class StepModel:
    """One step of a run and the ONNX file of one of its precisions."""

    raw: dict[str, Any]  # the manifest as stored
    manifest: RunManifest
    record: StepRecord
    path: Path


def step_model(run_dir: Path, step: int | None, precision: str) -> StepModel:
    """The run's ``step`` (default: the recommended one) and its ``precision`` ONNX file, or a
    :class:`UsageError` saying which is missing (what ``--baseline``, ``bench ensemble`` and
    ``bench serve-options`` take)."""
    from compress.manifest import RunManifest
    from compress.registry import choose_step
    from compress.rundir import require_manifest

    raw = require_manifest(run_dir)
    manifest = RunManifest.from_dict(raw)
    record = manifest.step(choose_step(raw) if step is None else step)  # UsageError: no such step
    path = record.variant_path(run_dir, precision)
    if path is None or not path.is_file():
        raise UsageError(f"step {record.step} of {run_dir} has no {precision} ONNX file")
    return StepModel(raw, manifest, record, path)


class ServerProcesses:
    """The processes of a local ``bentoml serve`` on ``port``: CPU seconds they used so far."""

    def __init__(self, port: int) -> None:
        import psutil

        listening = {c.pid for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN
                     and c.laddr and c.laddr.port == port and c.pid}
        if not listening:
            raise UsageError(f"no process of this user listens on port {port}: cannot measure the server's CPU")
        top = psutil.Process(min(listening))
        while top.parent() is not None and "bentoml" in " ".join(top.parent().cmdline()):
            top = top.parent()
        self.processes = [top, *top.children(recursive=True)]

    def cpu_seconds(self) -> float:
        import psutil

        total = 0.0
        for process in self.processes:
            try:
                times = process.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += times.user + times.system
        return total


class ServerProbe:
    """What ``run_sweep`` calls before and after each level (``server_cpu``): the service's CPU
    seconds so far, and, on the side, its batching counters from ``/metadata`` (read outside
    the CPU window: before the CPU on a level's start, after it on its end)."""

    def __init__(self, url: str, port: int) -> None:
        self.url = url
        self.processes = ServerProcesses(port)
        self.snapshots: list[dict[str, float] | None] = []

    def __call__(self) -> float:
        starting = len(self.snapshots) % 2 == 0
        if starting:
            self.snapshots.append(batching_counters(self.url))
        cpu = self.processes.cpu_seconds()
        if not starting:
            self.snapshots.append(batching_counters(self.url))
        return cpu

    def level_batches(self) -> list[float | None]:
        """The mean model batch of each level, in order (None where the service does not say)."""
        means: list[float | None] = []
        for before, after in zip(self.snapshots[::2], self.snapshots[1::2]):
            calls = after["model_calls"] - before["model_calls"] if before and after else 0
            means.append((after["rows"] - before["rows"]) / calls if before and after and calls > 0 else None)
        return means


def batching_counters(url: str) -> dict[str, float] | None:
    """The service's model calls and rows so far (``/metadata`` batching stats), if it reports them."""
    import httpx

    base = url.rsplit("/", 1)[0]
    try:
        stats = httpx.post(f"{base}/metadata", timeout=10).json().get("batching") or {}
    except (httpx.HTTPError, ValueError, AttributeError):
        return None
    if not all(isinstance(stats.get(k), (int, float)) for k in ("model_calls", "rows")):
        return None
    return {"model_calls": float(stats["model_calls"]), "rows": float(stats["rows"])}


def cpu_ms_per_image(call: Any, batch: int, *, seconds: float = 1.0) -> float:
    """Process CPU milliseconds per image of ``call`` (one batch per call), every thread counted."""
    import time

    call()
    calls, start, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds or calls < 3:
        call()
        calls += 1
    return 1000 * (time.process_time() - cpu) / (calls * batch)


def in_process_throughput(run_dir: Path, step: int | None, batches: list[int], *, seconds: float = 3.0,
                          precision: str = "fp32", provider: str = "cpu") -> dict[str, Any]:
    """Images/s of the run's step (default: the recommended one) in one session, at each batch
    size. ``provider`` ``cuda``: ONNX Runtime's CUDA provider with IO binding (the model's own
    time, the raw throughput a GPU service is compared with); it must load, never CPU instead."""
    from compress.latency import batch_of, validation_arrays
    from compress.runtime.sessions import OrtModel, SessionSettings
    from compress.runtime.timing import interleaved, summarize

    try:
        chosen = step_model(run_dir, step, precision)
    except UsageError as exc:
        raise UsageError(f"--baseline: {exc}") from None
    raw, step, path = chosen.raw, chosen.record.step, chosen.path
    if provider == "cuda":
        import torch  # noqa: F401  (the CUDA build of onnxruntime finds its libraries once torch is loaded)
    from compress.runtime.sessions import ProviderUnavailable

    settings = SessionSettings(provider, spinning=False)
    try:
        model = OrtModel(path, settings)
    except ProviderUnavailable as exc:
        raise UsageError(f"--baseline-provider {provider}: {exc}") from None
    images, _ = validation_arrays(raw, limit=max(batches))
    out: dict[str, Any] = {"run_dir": str(run_dir), "step": step, "precision": precision, "session": settings.describe(),
                           "batches": {}}
    for batch in batches:
        timed = interleaved({"model": model.timed_call(batch_of(images, batch))}, rounds=5,
                            min_seconds=seconds / 2, max_seconds=seconds)
        stats = summarize(timed.samples["model"], batch)
        cpu = cpu_ms_per_image(model.timed_call(batch_of(images, batch)), batch, seconds=seconds / 3)
        out["batches"][str(batch)] = {"p50_ms": stats.p50_ms, "images_per_s": stats.throughput, "cpu_ms_per_image": cpu}
    return out


def fractions(doc: dict[str, Any], baseline: dict[str, Any], level_batches: list[float | None] | None = None) -> None:
    """Each level's images/s as a share of the in-process batch-1 throughput and of the best
    in-process throughput over the batch sizes timed, and, with the level's mean model batch,
    the server's CPU per request outside the model, written into its entry."""
    reference = baseline["batches"]["1"]["images_per_s"]
    best = max(v["images_per_s"] for v in baseline["batches"].values())
    for index, level in enumerate(doc["levels"]):
        served = level.get("images_per_s", level["ok_per_s"])
        level["fraction_of_in_process_b1"] = served / reference if reference else None
        level["fraction_of_in_process_best"] = served / best if best else None
        batch = level_batches[index] if level_batches and index < len(level_batches) else None
        if batch is None:
            continue
        level["model_mean_batch"] = round(batch, 2)
        model = baseline["batches"].get(str(max(1, round(batch))), {}).get("cpu_ms_per_image")
        server = level.get("server_cpu_ms_per_request")
        if model is not None and server is not None:
            level["model_cpu_ms_per_image"] = model
            level["server_cpu_ms_outside_model"] = server - model


def mean_batch_size(url: str) -> float | None:
    """The service's mean model batch so far (``/metadata`` batching stats), when it reports it."""
    import httpx

    base = url.rsplit("/", 1)[0]
    try:
        stats = httpx.post(f"{base}/metadata", timeout=10).json().get("batching") or {}
    except (httpx.HTTPError, ValueError):
        return None
    value = stats.get("mean_batch_size")
    return float(value) if isinstance(value, (int, float)) and value > 0 else None

