"""What a service's throughput is compared with: the same model run in-process, and the CPU
the service's processes spend per request.

``bench serve --baseline RUN_DIR[:STEP]`` times the served model's ONNX file in this process
(one ONNX Runtime session, CPU, intra-op spinning off as the service runs it) at batch 1 and
at the mean batch size the service's adaptive batcher reached, in the same run as the load
test, so "the service delivers X% of the model" is a ratio from one machine and one session.
The server's CPU time comes from its processes (found by the port they listen on, with their
parent ``bentoml serve`` and its children), read before and after each timed level."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from compress.errors import UsageError


def parse_baseline(text: str) -> tuple[Path, int | None]:
    """``RUN_DIR`` or ``RUN_DIR:STEP``."""
    path, _, step = text.rpartition(":") if ":" in text and text.rsplit(":", 1)[1].isdigit() else (text, "", "")
    run_dir = Path(path)
    if not (run_dir / "manifest.json").is_file():
        raise UsageError(f"--baseline {text}: {run_dir} is not a run directory (no manifest.json)")
    return run_dir, int(step) if step else None


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


def in_process_throughput(run_dir: Path, step: int | None, batches: list[int], *, seconds: float = 3.0,
                          precision: str = "fp32", provider: str = "cpu") -> dict[str, Any]:
    """Images/s of the run's step (default: the recommended one) in one session, at each batch
    size. ``provider`` ``cuda``: ONNX Runtime's CUDA provider with IO binding (the model's own
    time, the raw throughput a GPU service is compared with); it must load, never CPU instead."""
    from compress.latency import batch_of, validation_arrays
    from compress.manifest import RunManifest
    from compress.registry import choose_step
    from compress.rundir import require_manifest
    from compress.runtime.sessions import OrtModel, SessionSettings
    from compress.runtime.timing import interleaved, summarize

    raw = require_manifest(run_dir)
    step = choose_step(raw) if step is None else step
    record = RunManifest.from_dict(raw).step(step)
    path = record.variant_path(run_dir, precision)
    if path is None or not path.is_file():
        raise UsageError(f"--baseline: step {step} of {run_dir} has no {precision} ONNX file")
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
        out["batches"][str(batch)] = {"p50_ms": stats.p50_ms, "images_per_s": stats.throughput}
    return out


def fractions(doc: dict[str, Any], baseline: dict[str, Any]) -> None:
    """Each level's images/s as a share of the in-process batch-1 throughput, and of the best
    in-process throughput over the batch sizes timed, written into its entry."""
    reference = baseline["batches"]["1"]["images_per_s"]
    best = max(v["images_per_s"] for v in baseline["batches"].values())
    for level in doc["levels"]:
        served = level.get("images_per_s", level["ok_per_s"])
        level["fraction_of_in_process_b1"] = served / reference if reference else None
        level["fraction_of_in_process_best"] = served / best if best else None


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

