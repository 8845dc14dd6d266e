"""The ``bench`` command line (typer): ``bench models``, ``bench serve``, ``bench ensemble``,
``bench campaign``, ``bench compare``.

Exit codes as for ``compress`` (shared wrapper): 0 success, 2 bad usage or bad input (one
line on stderr), 1 unexpected failure."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from compress.errors import UsageError

app = typer.Typer(
    name="bench",
    help="Latency, throughput and accuracy benchmarks of a compress run's models on ONNX Runtime and PyTorch, "
         "and HTTP load tests of the service. Writes JSON + Markdown + PNG.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None,
)

MODELS_EXAMPLES = """
Examples:

  bench models runs/digits                                   # ort-cpu, ort-cuda, torch at batch 1, 8, 64

  bench models runs/c10 --backends ort-cuda,torch-cuda --batch-sizes 1,64,256,1024

  bench models runs/c10 --backends ort-cuda --cuda-graphs --batch-sizes 1,8,64,256,1024

  bench models runs/digits --backends ort-cpu --threads 1 --steps 0,3 --out /tmp/b1
  bench models runs/digits --backends ort-cpu,openvino --batch-sizes 1,32      # against OpenVINO on the same files
"""

SERVE_EXAMPLES = """
Examples:

  bench serve http://127.0.0.1:3000 --images tests/images --concurrency 1,8,32 --requests 500 --duration 30
"""


def parse_ints(text: str, option: str, minimum: int = 1) -> list[int]:
    """``"1,8,64"`` -> ``[1, 8, 64]``: integers >= ``minimum``, distinct, in the given order."""
    values: list[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            value = int(part)
        except ValueError:
            raise UsageError(f"{option}: '{part}' is not an integer (expected e.g. 1,8,64)") from None
        if value < minimum:
            raise UsageError(f"{option}: values must be >= {minimum}, got {value}")
        if value not in values:
            values.append(value)
    return values


def parse_names(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise UsageError("--backends: no backend given")
    return list(dict.fromkeys(names))


def output_dir(out: Path | None, default_parent: Path) -> Path:
    """``out`` or ``default_parent/<timestamp>`` (never an existing folder: runs are kept)."""
    if out is not None:
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {out} exists and is not a folder")
        return out
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate, index = default_parent / stamp, 1
    while candidate.exists():
        index += 1
        candidate = default_parent / f"{stamp}-{index}"
    return candidate


@app.command(epilog=MODELS_EXAMPLES)
def models(
    run_dir: Annotated[Path, typer.Argument(help="A run directory made by `compress run`.")],
    backends: Annotated[str, typer.Option(help="Comma-separated: ort-cpu, ort-cuda, torch (CUDA if present, else CPU), "
                                               "torch-cpu, torch-cuda, torch-cuda-graphs, openvino (OpenVINO CPU on the same ONNX files). "
                                               "Backends that cannot run here are skipped, with the reason.")]
        = "ort-cpu,ort-cuda,torch",
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,8,64",
    threads: Annotated[Optional[int], typer.Option(help="CPU threads (ORT intra-op, torch); default: the libraries' own.")] = None,
    steps: Annotated[Optional[str], typer.Option(help="Comma-separated steps to measure (step 0 is always included).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default: RUN_DIR/bench/<timestamp>).")] = None,
    warmup: Annotated[int, typer.Option(help="Untimed calls per model before timing.")] = 5,
    rounds: Annotated[int, typer.Option(help="Interleaved rounds (each times every step in turn).")] = 20,
    min_seconds: Annotated[float, typer.Option(help="Keep timing a (backend, batch) group at least this long.")] = 1.0,
    max_seconds: Annotated[float, typer.Option(help="Stop timing a (backend, batch) group after this long.")] = 8.0,
    accuracy: Annotated[bool, typer.Option("--accuracy/--no-accuracy", help="Measure validation accuracy through each backend.")] = True,
    precisions: Annotated[Optional[str], typer.Option(help="Comma-separated precision variants to measure (default: every variant the run has).")] = None,
    cuda_graphs: Annotated[bool, typer.Option("--cuda-graphs", help="Also time PyTorch CUDA graphs (torch-cuda-graphs: "
                                                                    "captured once per batch size, replayed) next to "
                                                                    "eager torch-cuda; skipped without CUDA.")] = False,
) -> None:
    """Latency (p50/p90/p95/p99, mean), throughput and accuracy of every step and precision variant of a run,
    per backend and batch size; speed-ups against step 0 fp32 measured interleaved in the same run."""
    from compress.backends import check_options
    from compress.runtime.precisions import parse_precisions

    backend_list, batch_list = parse_names(backends), parse_ints(batch_sizes, "--batch-sizes")
    if cuda_graphs:
        backend_list = list(dict.fromkeys([*backend_list, "torch-cuda", "torch-cuda-graphs"]))
    step_list = parse_ints(steps, "--steps", minimum=0) if steps is not None else None
    check_options(backend_list, batch_list, threads)
    if warmup < 0 or rounds < 1 or min_seconds < 0 or max_seconds <= 0:
        raise UsageError("--warmup must be >= 0, --rounds >= 1, --min-seconds >= 0 and --max-seconds > 0")
    if not run_dir.is_dir():
        raise UsageError(f"run directory not found: {run_dir}")
    try:
        precision_list = list(parse_precisions(precisions)) if precisions is not None else None
    except ValueError as exc:
        raise UsageError(f"--precisions: {exc}") from None
    from compress.latency import benchmark_run  # torch, onnxruntime: imported once the options are known good
    from .report import write_models_report

    doc = benchmark_run(run_dir, backends=backend_list, batch_sizes=batch_list, threads=threads, steps=step_list,
                        warmup=warmup, rounds=rounds, min_seconds=min_seconds, max_seconds=max_seconds,
                        measure_accuracy=accuracy, precisions=precision_list)
    files = write_models_report(doc, output_dir(out, run_dir / "bench"))
    if not doc["results"]:  # every backend asked for was skipped: say so, as `compress --device cuda` would
        reasons = "; ".join(f"{s['backend']} {s['precision']}: {s['reason']}" for s in doc["skipped"])
        raise UsageError(f"nothing measured, every backend was skipped ({reasons}); see {files['report']}")
    typer.echo(f"{files['report']}")
    typer.echo(f"results: {files['results']}; {len(doc['results'])} measurements in {doc['seconds']:.0f} s"
               + (f"; skipped: {', '.join(s['backend'] + ' ' + s['precision'] for s in doc['skipped'])}"
                  if doc["skipped"] else ""))


@app.command(epilog=SERVE_EXAMPLES)
def serve(
    url: Annotated[str, typer.Argument(help="Base URL of the service, e.g. http://127.0.0.1:3000 (loopback unless --allow-remote).")],
    images: Annotated[Path, typer.Option(help="Folder of image files to send (searched recursively), or one file.")],
    concurrency: Annotated[str, typer.Option(help="Comma-separated concurrency levels (closed loop: each worker sends "
                                                  "its next request when the previous one is answered).")] = "1,8,32",
    requests: Annotated[int, typer.Option(help="At most this many requests per concurrency level.")] = 200,
    duration: Annotated[float, typer.Option(help="At most this many seconds per level (requests in flight are awaited).")] = 30.0,
    endpoint: Annotated[str, typer.Option(help="Path appended to URL.")] = "/classify",
    field: Annotated[str, typer.Option(help="Multipart field name of the image.")] = "image",
    warmup: Annotated[Optional[int], typer.Option(help="Untimed requests per level (default: one per worker).")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds before one request counts as a timeout error.")] = 30.0,
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default: bench-serve/<timestamp>).")] = None,
    allow_remote: Annotated[bool, typer.Option("--allow-remote", help="Allow a target that is not this machine.")] = False,
    baseline: Annotated[Optional[str], typer.Option(help="RUN_DIR[:STEP]: also time that model in this process (one ONNX "
                                                         "Runtime CPU session, batch 1 and the service's mean batch) and "
                                                         "report the service's fraction of it and the server's CPU per "
                                                         "request (local services only).")] = None,
    baseline_provider: Annotated[str, typer.Option(help="Where --baseline runs: cpu, or cuda (ONNX Runtime CUDA provider "
                                                        "with IO binding: the raw GPU throughput).")] = "cpu",
    baseline_batches: Annotated[Optional[str], typer.Option(help="Comma-separated extra batch sizes --baseline times "
                                                                 "(besides 1 and the service's mean batch).")] = None,
    files_per_request: Annotated[int, typer.Option(help="Files per request in --field (e.g. 32 for /classify_batch "
                                                        "with --field images); images/s counts them all.")] = 1,
) -> None:
    """Closed-loop HTTP load test: latency percentiles, requests/s and errors by status code per concurrency."""
    from urllib.parse import urlsplit

    from .load import check_target, is_loopback, load_images, run_sweep

    levels = parse_ints(concurrency, "--concurrency")
    if requests < 1 or duration <= 0 or timeout <= 0 or (warmup is not None and warmup < 0) or files_per_request < 1:
        raise UsageError("--requests and --files-per-request must be >= 1, --warmup >= 0, --duration and --timeout > 0")
    if baseline_provider not in ("cpu", "cuda"):
        raise UsageError(f"--baseline-provider must be cpu or cuda, not {baseline_provider!r}")
    extra_batches = parse_ints(baseline_batches, "--baseline-batches") if baseline_batches else []
    target = check_target(url, endpoint, allow_remote=allow_remote)
    payloads = load_images(images)
    server_cpu = None
    if baseline is not None:
        from .baseline import ServerProbe, fractions, in_process_throughput, mean_batch_size, parse_baseline

        run_dir, step = parse_baseline(baseline)
        parts = urlsplit(target)
        if not is_loopback(parts.hostname or ""):
            raise UsageError("--baseline needs a service on this machine (its CPU time is read from its processes)")
        server_cpu = ServerProbe(target, parts.port or 80)
    from .gpu_monitor import GpuMonitor

    monitor = GpuMonitor.start() if is_loopback(urlsplit(target).hostname or "") else "the service is not on this machine"
    try:
        doc = run_sweep(target, payloads, levels, requests=requests, duration=duration, timeout=timeout, field=field,
                        warmup=warmup, server_cpu=server_cpu, files_per_request=files_per_request,
                        gpu_monitor=None if isinstance(monitor, str) else monitor)
    finally:
        sampler = {"skipped": monitor} if isinstance(monitor, str) else monitor.stop()
    doc["gpu_utilisation"] = sampler
    doc["images"]["source"] = str(images)
    if baseline is not None:
        mean_batch = mean_batch_size(target)
        level_batches = server_cpu.level_batches()  # type: ignore[union-attr]
        batches = sorted({1, *extra_batches, *(max(1, round(b)) for b in [mean_batch, *level_batches] if b)})
        doc["baseline"] = in_process_throughput(run_dir, step, batches, provider=baseline_provider)
        doc["baseline"]["service_mean_batch_size"] = mean_batch
        fractions(doc, doc["baseline"], level_batches)
    from .report import write_serve_report

    files = write_serve_report(doc, output_dir(out, Path("bench-serve")))
    typer.echo(f"{files['report']}")
    best = max(doc["levels"], key=lambda level: level["requests_per_s"])
    per_image = f" ({best['images_per_s']:.1f} images/s)" if files_per_request > 1 else ""
    typer.echo(f"results: {files['results']}; best {best['requests_per_s']:.1f} requests/s{per_image} at concurrency "
               f"{best['concurrency']}; errors: {sum(level['errors'] for level in doc['levels'])}")


@app.command()
def container(
    image: Annotated[str, typer.Argument(help="The image, e.g. resnet-classifier:cpu (`make image`).")],
    images: Annotated[Path, typer.Option(help="Image file (or folder: its first image) the requests in flight send.")],
    starts: Annotated[int, typer.Option(help="Containers started and stopped to time start-up.")] = 3,
    in_flight: Annotated[int, typer.Option(help="Requests in flight when SIGTERM is sent.")] = 4,
    hold: Annotated[float, typer.Option(help="Seconds after SIGTERM before those requests send the rest of their body.")] = 2.0,
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default: bench-container/<timestamp>).")] = None,
) -> None:
    """Image size and largest layers, `docker create` and `docker start` to ready, and the drain on `docker stop`
    with requests in flight."""
    from .container import docker_unavailable_reason, measure, write_report
    from .load import load_images

    if starts < 1 or in_flight < 0 or hold < 0:
        raise UsageError("--starts must be >= 1, --in-flight and --hold >= 0")
    reason = docker_unavailable_reason()
    if reason is not None:
        raise UsageError(reason)
    payload = load_images(images)[0]
    doc = measure(image, image_bytes=payload.data, starts=starts, in_flight=in_flight, hold=hold)
    files = write_report(doc, output_dir(out, Path("bench-container")))
    typer.echo(f"{files['report']}")
    drained = doc["drain"]
    typer.echo(f"created in {min(doc['create_s']):.2f}-{max(doc['create_s']):.2f} s, ready "
               f"{min(doc['start_to_ready_s']):.2f}-{max(doc['start_to_ready_s']):.2f} s after start; drained "
               f"{drained['statuses'].count(200)}/{drained['in_flight']} in {drained['stop_s']:.2f} s, exit {drained['exit_code']}")


@app.command(name="serve-options")
def serve_options(
    model: Annotated[str, typer.Argument(help="RUN_DIR[:STEP] (default step: the recommended one) or an .onnx file.")],
    precision: Annotated[str, typer.Option(help="Which variant of the run's step: fp32, fp16 or int8.")] = "fp32",
    provider: Annotated[str, typer.Option(help="auto (CUDA when it runs, else CPU), cuda or cpu.")] = "auto",
    max_batch_size: Annotated[int, typer.Option(help="The service's SERVE_MAX_BATCH_SIZE.")] = 64,
    batch_sizes: Annotated[str, typer.Option(help="Batch sizes of the cuDNN comparison (CUDA only).")] = "1,8,64",
    seconds: Annotated[float, typer.Option(help="Seconds each case is timed per round.")] = 2.0,
    rounds: Annotated[int, typer.Option(help="Rounds (every case once per round; medians are reported).")] = 3,
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default: bench-serve-options/<timestamp>).")] = None,
) -> None:
    """Measure the service's runtime options for one model here (cuDNN search and workspace on CUDA, padded
    or exact batch shapes, model threads with shared or per-thread sessions) and print the SERVE_* settings
    the figures point to."""
    from compress.rundir import atomic_write_json, atomic_write_text
    from compress.runtime.precisions import PRECISIONS
    from compress.runtime.sessions import PROVIDERS, ProviderUnavailable

    if precision not in PRECISIONS or provider not in PROVIDERS:
        raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)} and --provider one of {', '.join(PROVIDERS)}")
    sizes = parse_ints(batch_sizes, "--batch-sizes")
    if max_batch_size < 1 or seconds <= 0 or rounds < 1 or max(sizes) > 8192:
        raise UsageError("--max-batch-size and --rounds must be >= 1, --seconds > 0, batch sizes at most 8192")
    path = _model_file(model, precision)
    from .serve_options import measure, report_markdown

    try:
        doc = measure(path, provider=provider, max_batch_size=max_batch_size, batch_sizes=sizes, seconds=seconds,
                      rounds=rounds)
    except ProviderUnavailable as exc:
        raise UsageError(f"--provider cuda: {exc}") from None
    folder = output_dir(out, Path("bench-serve-options"))
    atomic_write_json(folder / "results.json", doc)
    atomic_write_text(folder / "report.md", report_markdown(doc))
    typer.echo(f"{folder / 'report.md'}")
    typer.echo("settings: " + " ".join(f"{k}={v}" for k, v in doc["recommended_env"].items()))


def _model_file(text: str, precision: str) -> Path:
    """``model.onnx`` as it is, or the ``precision`` file of ``RUN_DIR[:STEP]``."""
    if text.endswith(".onnx"):
        if not Path(text).is_file():
            raise UsageError(f"model file not found: {text}")
        return Path(text)
    from .baseline import parse_baseline, step_model

    try:
        run_dir, step = parse_baseline(text)
    except UsageError:
        raise UsageError(f"{text} is neither an .onnx file nor a run directory (RUN_DIR[:STEP])") from None
    return step_model(run_dir, step, precision).path


@app.command()
def ensemble(
    members: Annotated[list[str], typer.Argument(help="RUN_DIR[:STEP] of each member (default step: the run's recommended one).")],
    single: Annotated[str, typer.Option(help="RUN_DIR[:STEP] of the single model to compare with (e.g. an unpruned step 0).")],
    provider: Annotated[str, typer.Option(help="ONNX Runtime provider: cpu or cuda (IO binding; never CPU under CUDA's name).")] = "cpu",
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes for throughput.")] = "1,64",
    precision: Annotated[str, typer.Option(help="Precision variant of the members (the single model runs fp32).")] = "fp32",
    max_seconds: Annotated[float, typer.Option(help="Stop timing one batch size after this long.")] = 8.0,
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default: bench-ensemble/<timestamp>).")] = None,
) -> None:
    """A voting ensemble (soft and hard, the service's voting) against one single model: accuracy on the
    validation split and throughput, measured in one process."""
    from .ensemble import measure, parse_model, write_report

    if provider not in ("cpu", "cuda"):
        raise UsageError(f"--provider must be cpu or cuda, not {provider!r}")
    if max_seconds <= 0:
        raise UsageError("--max-seconds must be > 0")
    batches = parse_ints(batch_sizes, "--batch-sizes")
    doc = measure([parse_model(m) for m in members], parse_model(single), provider=provider, batch_sizes=batches,
                  precision=precision, max_seconds=max_seconds)
    files = write_report(doc, output_dir(out, Path("bench-ensemble")))
    row = doc["throughput"][-1]
    typer.echo(f"{files['report']}")
    typer.echo(f"ensemble top-1 {doc['accuracy']['ensemble_soft']:.4f} (soft) / {doc['accuracy']['ensemble_hard']:.4f} "
               f"(hard), single {doc['accuracy']['single']:.4f}; batch {row['batch']}: ensemble "
               f"{row['ensemble']['throughput']:.0f} images/s, single {row['single']['throughput']:.0f}")


CAMPAIGN_EXAMPLES = """
Examples:

  bench campaign --data .gpu-data/cifar10-jpg.tar.xz --out /tmp/evidence --max-minutes 6.5 --bundle $OUT/evidence.tar.gz

  bench campaign --dry-run --data .gpu-data/cifar10-jpg.tar.xz --out /tmp/evidence      # the plan, each part's budget

  bench campaign --smoke --out /tmp/campaign-smoke          # CPU rehearsal on generated images (under a minute)
"""


@app.command(epilog=CAMPAIGN_EXAMPLES)
def campaign(
    out: Annotated[Path, typer.Option(help="Results folder (small: JSON, Markdown, PNG, logs; campaign.json is its state).")],
    data: Annotated[Optional[Path], typer.Option(help="CIFAR-10 as an image folder (train/ and test/) or the "
                                                      "cifar10-jpg.tar.xz archive (unpacked once into the work folder). "
                                                      "Optional with --smoke (then images are generated).")] = None,
    smoke: Annotated[bool, typer.Option("--smoke", help="Rehearse the same parts on the CPU on a few images per class, "
                                                        "tiny epochs and sweeps.")] = False,
    max_minutes: Annotated[float, typer.Option(help="The whole call ends within this many minutes: each part runs "
                                                    "within its budget, budgets scaled down to fit.")] = 6.5,
    work: Annotated[Optional[Path], typer.Option(help="Work folder for the big files: data, run directories, ONNX "
                                                      "models, the model store (default: runs/campaign/<OUT name>).")] = None,
    bundle: Annotated[Optional[Path], typer.Option(help="Also write FILE.tar.gz of the results folder, and evidence.md "
                                                        "+ evidence.json beside it, after every part.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan (every part, its budget, what it runs) "
                                                            "and exit.")] = False,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="Run parts that failed in an earlier call again.")] = False,
) -> None:
    """The GPU evidence in one time-boxed call: the machine and the GPU tests, CIFAR-10 training, ORT CUDA vs
    PyTorch eager and CUDA graphs, the service on the GPU, one summary; each part within its own budget, its
    results written the moment it finishes. Without a CUDA device only --smoke (and --dry-run) run."""
    import sys

    from .campaign import cuda_status, plan_lines, run_campaign
    from .campaign_parts import parts, profile
    from .campaign_report import write_evidence

    if max_minutes <= 0:
        raise UsageError("--max-minutes must be > 0")
    if data is None and not smoke:
        raise UsageError("--data is required (the CIFAR-10 image folder or cifar10-jpg.tar.xz), except with --smoke")
    if data is not None:
        if not data.exists():
            raise UsageError(f"--data {data}: no such file or folder")
        if data.is_file() and not data.name.endswith((".tar.xz", ".tar.gz", ".tgz", ".tar")):
            raise UsageError(f"--data {data}: expected an image folder (train/ and test/) or a .tar.xz archive of one")
        if data.is_dir() and not ((data / "train").is_dir() and ((data / "test").is_dir() or (data / "val").is_dir())):
            raise UsageError(f"--data {data}: expected train/<class>/* and test/<class>/* (or val/) inside")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    if bundle is not None and not bundle.name.endswith(".tar.gz"):
        raise UsageError(f"--bundle {bundle}: expected a .tar.gz file name")
    settings = dict(profile(smoke))
    cuda = None if smoke else cuda_status()
    if dry_run:
        for line in plan_lines(parts(), smoke=smoke, max_minutes=max_minutes, settings=settings, cuda=cuda):
            typer.echo(line)
        return
    notes: list[str] = []
    if cuda is not None:
        device, ort = cuda
        if device is not None:
            raise UsageError(device)
        if ort is not None:  # still run: torch's figures, the training and the service (on the CPU provider)
            settings["serve_provider_override"] = "cpu"
            notes.append(f"ONNX Runtime's CUDA provider is MISSING ({ort}): ort-cuda is skipped with that reason, "
                         "the service runs on the CPU provider")
    work = work if work is not None else Path("runs") / "campaign" / out.resolve().name
    if work.resolve() == out.resolve() or out.resolve() in work.resolve().parents:
        raise UsageError("--work must not be inside --out: the results folder stays small")
    data_text = str(data) if data is not None else "generated"  # as given: the checkout may sit elsewhere next time
    target = bundle.resolve() if bundle is not None else None
    if target is not None and out.resolve() in target.parents:
        raise UsageError("--bundle must not be inside --out: each bundle would carry the one before")
    code = run_campaign(parts(), out=out.resolve(), work=work.resolve(), data=data_text, smoke=smoke,
                        max_minutes=max_minutes, settings=settings, retry_failed=retry_failed,
                        echo=lambda line: (typer.echo(line), sys.stdout.flush()),
                        write_evidence=lambda ctx, listing: write_evidence(ctx, listing, target), notes=notes)
    if code:
        raise typer.Exit(code)


@app.command()
def compare(
    a: Annotated[Path, typer.Argument(help="results.json of `bench models` or `bench serve` (the baseline).")],
    b: Annotated[Path, typer.Argument(help="results.json of the same kind to compare against A.")],
    a_backend: Annotated[Optional[str], typer.Option(help="Models only: compare only this BACKEND[:PRECISION] of A "
                                                          "(e.g. ort-cpu, ort-cuda:fp16).")] = None,
    b_backend: Annotated[Optional[str], typer.Option(help="Models only: ... of B (default: as for A). Different "
                                                          "backends on each side compare backends.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Also write the Markdown table to this file.")] = None,
) -> None:
    """Side-by-side table of two results files with B/A ratios (runs, machines, backends)."""
    from .compare import compare_files
    from compress.rundir import atomic_write_text

    text = compare_files(a, b, a_backend, b_backend)
    if out is not None:
        atomic_write_text(out, text)
    typer.echo(text, nl=False)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    from compress.cli_support import run_app

    run_app(app, "bench", argv)


if __name__ == "__main__":
    main()
