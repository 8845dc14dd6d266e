"""The ``compress`` command line (typer).

Exit codes: 0 success, 2 bad usage or bad input (one line on stderr, no traceback),
1 unexpected failure (one line on stderr; the traceback goes to a log file)."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Optional

import typer
from typing_extensions import Annotated

from .errors import ParityError, UsageError

app = typer.Typer(
    name="compress",
    help="Fine-tune a torchvision ResNet on an image folder, prune whole conv filters by L1 norm in steps "
         "with retraining, export every step to ONNX, and report accuracy vs latency.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None,
)

RUN_EXAMPLES = """
Examples:

  compress run                                   # the embedded digits demo into ./runs/digits

  compress run --data ~/flowers --out runs/flowers --arch resnet50 --weights imagenet --epochs 20

  compress run --data ~/cifar10 --out runs/c10 --stem cifar --target-macs 0.3 --prune-steps 5 --config c10.yaml

  compress run --data ~/cifar10 --out runs/c10b --model runs/c10/steps/step_00/model.pt   # reuse a fine-tuned model

  compress run --data ~/flowers --out runs/mine --model lightning.ckpt --classes classes.txt   # a ResNet trained elsewhere

Running the same command again on an existing --out resumes it.
"""

# --- options shared by `run` and `finetune` ------------------------------------------------------
Data = Annotated[Optional[str], typer.Option(help="Image folder (PATH/train + PATH/val|test, or PATH/<class>/*) or 'digits' (default).")]
Out = Annotated[Optional[Path], typer.Option("--out", help="Run directory (default: runs/<data name>).")]
Arch = Annotated[Optional[str], typer.Option(help="resnet18|34|50|101|152 (torchvision) or resnet20|32|56|110 (CIFAR-style); default resnet18, or with --model the architecture the file holds.")]
Weights = Annotated[Optional[str], typer.Option(help="imagenet (torchvision's, downloaded into the torch cache when missing), none, a state-dict FILE, or auto (imagenet for torchvision ResNets when cached or downloadable, else none with a warning).")]
Model = Annotated[Optional[str], typer.Option(help="Start from this trained ResNet as step 0, without training it: a state dict (.pth/.pt/.bin/.ckpt, also inside torchvision-references, Lightning, timm or DDP checkpoints), .safetensors, TorchScript, or this tool's model.pt. The architecture and widths are read from the weights.")]
CheckpointKey = Annotated[Optional[str], typer.Option(help="The entry of a checkpoint dict that holds the weights (default: state_dict, model, state_dict_ema, model_ema, the first found).")]
Classes = Annotated[Optional[Path], typer.Option("--classes", help="File of class names, one per line, in the order the model's outputs have them (default: the sorted folder names).")]
Mean = Annotated[Optional[str], typer.Option(help="Per-channel mean the model was trained with, e.g. 0.4914,0.4822,0.4465 (default ImageNet's); recorded for serving.")]
Std = Annotated[Optional[str], typer.Option(help="Per-channel std the model was trained with (default ImageNet's); recorded for serving.")]
Stem = Annotated[Optional[str], typer.Option(help="imagenet (7x7/2 + max-pool) or cifar (3x3/1) for torchvision ResNets.")]
InputSize = Annotated[Optional[int], typer.Option(help="Input resolution (default: 32 for small images, else 224).")]
Epochs = Annotated[Optional[int], typer.Option(help="Fine-tuning epochs.")]
BatchSize = Annotated[Optional[int], typer.Option(help="Training batch size (per process under torchrun: the global batch is this x the number of processes).")]
Optimizer = Annotated[Optional[str], typer.Option(help="adam, sgd or adam-then-sgd.")]
Lr = Annotated[Optional[float], typer.Option(help="Adam learning rate.")]
SgdLr = Annotated[Optional[float], typer.Option(help="SGD learning rate.")]
SwitchEpoch = Annotated[Optional[int], typer.Option(help="adam-then-sgd: first SGD epoch (default: half-way).")]
Schedule = Annotated[Optional[str], typer.Option(help="cosine or step learning-rate schedule.")]
WeightDecay = Annotated[Optional[float], typer.Option(help="Weight decay.")]
LabelSmoothing = Annotated[Optional[float], typer.Option(help="Label smoothing.")]
FreezeEpochs = Annotated[Optional[int], typer.Option(help="Head-only epochs with the backbone frozen (default: 1 with pretrained weights).")]
Patience = Annotated[Optional[int], typer.Option(help="Early stopping after N epochs without better val accuracy (0: off).")]
Balance = Annotated[Optional[str], typer.Option(help="Class imbalance: none, weights (weighted loss) or sampler (weighted sampler).")]
AugScaleMin = Annotated[Optional[float], typer.Option(help="Random resized crop: smallest area fraction.")]
AugHflip = Annotated[Optional[bool], typer.Option("--aug-hflip/--no-aug-hflip", help="Random horizontal flips (default: on, off for digits).")]
AugRotation = Annotated[Optional[float], typer.Option(help="Random rotation, degrees.")]
AugColorJitter = Annotated[Optional[float], typer.Option(help="Colour jitter strength.")]
ValFraction = Annotated[Optional[float], typer.Option(help="Validation fraction when one folder is split.")]
PruneSteps = Annotated[Optional[int], typer.Option(help="Number of pruning steps.")]
TargetMacs = Annotated[Optional[float], typer.Option(help="Fraction of step 0's MACs the last step keeps, e.g. 0.4.")]
RetrainEpochs = Annotated[Optional[int], typer.Option(help="Retraining epochs after each pruning step.")]
RetrainLr = Annotated[Optional[float], typer.Option(help="Retraining (SGD) learning rate.")]
Scope = Annotated[Optional[str], typer.Option(help="global (rank all filters together), uniform (same ratio per layer) or block (only the inner convs of residual blocks).")]
DistillWeight = Annotated[Optional[float], typer.Option(help="Retraining: weight of knowledge distillation from step 0 (0: off).")]
DistillTemperature = Annotated[Optional[float], typer.Option(help="Distillation temperature.")]
ExportFp16 = Annotated[Optional[bool], typer.Option("--export-fp16/--no-export-fp16", help="Alias of --precisions fp32,fp16.")]
Precisions = Annotated[Optional[str], typer.Option(help="Precision variants of every step: fp32 always, plus fp16 and/or int8, e.g. fp32,fp16,int8.")]
CalibrationImages = Annotated[Optional[int], typer.Option(help="int8: training images (evaluation transform, class-stratified) to calibrate on.")]
CalibrationMethod = Annotated[Optional[str], typer.Option(help="int8: minmax, entropy or percentile.")]
Int8Format = Annotated[Optional[str], typer.Option(help="int8: auto (measure the formats here, keep the fastest within the accuracy drop), qdq-u8s8, qdq-s8s8 or qoperator.")]
Int8ReduceRange = Annotated[Optional[str], typer.Option(help="int8: weights quantized to 7 bits: first-conv (default: the image's convolution, whose sums saturate on CPUs without VNNI), all, or none.")]
MaxAccuracyDrop = Annotated[Optional[float], typer.Option(help="A variant losing more top-1 than this (fraction) vs its step's fp32 is flagged and never recommended.")]
LayerCaps = Annotated[Optional[str], typer.Option(help="YAML of per-layer maximum ratios (from `compress sensitivity`; 0 = do not prune).")]
MaxLayerRatio = Annotated[Optional[float], typer.Option(help="No layer loses more than this fraction of its filters.")]
RoundTo = Annotated[Optional[int], typer.Option(help="Keep channel counts multiples of this.")]
ParityTolerance = Annotated[Optional[float], typer.Option(help="Max |logit difference| ONNX vs PyTorch.")]
LatencyBatch = Annotated[Optional[int], typer.Option(help="Batch size of --target-speedup and the larger batch of the closing latency report.")]
TargetSpeedup = Annotated[Optional[float], typer.Option(help="Prune step by step until this speed-up over step 0 is measured (bounded by --target-macs and --prune-steps).")]
TimingSeconds = Annotated[Optional[float], typer.Option(help="Least seconds each latency measurement of the run takes (--target-speedup, the int8 format and thread choices, the closing report; default 2). Less is quicker and noisier.")]
LatencyBackend = Annotated[Optional[str], typer.Option(help="Where --target-speedup is measured: ort-cpu, ort-cuda, torch or openvino.")]
Device = Annotated[Optional[str], typer.Option(help="auto, cpu or cuda.")]
Seed = Annotated[Optional[int], typer.Option(help="Random seed.")]
Workers = Annotated[Optional[int], typer.Option(help="DataLoader worker processes (default: auto).")]
DataOnDevice = Annotated[Optional[str], typer.Option(help="Hold the images as tensors on the training device and augment them there: auto (on a CUDA device when they fit), on or off.")]
TrustPickle = Annotated[Optional[bool], typer.Option("--trust-pickle", help="Allow loading pickled (code-carrying) model files.")]
ConfigFile = Annotated[Optional[Path], typer.Option("--config", help="YAML file of options; flags override it.")]
Force = Annotated[bool, typer.Option("--force", help="Start over if --out holds a run made with other options.")]
RunDir = Annotated[Path, typer.Argument(help="A run directory made by `compress run` or `compress finetune`.")]


def _resolve(options: dict[str, Any]) -> tuple[Any, Path, bool]:
    from .config import resolve_config

    config_file = options.pop("config_file")
    out = options.pop("out")
    force = options.pop("force")
    config = resolve_config(options, config_file)
    if out is None:
        out = Path("runs") / (Path(config.data).name or "run")
    return config, out, force


def _open(options: dict[str, Any]) -> Any:
    from .pipeline import open_run

    config, out, force = _resolve(options)
    return open_run(out, config, force=force)


@app.command(epilog=RUN_EXAMPLES)
def run(data: Data = None, out: Out = None, arch: Arch = None, weights: Weights = None, model: Model = None,
        checkpoint_key: CheckpointKey = None, classes: Classes = None, mean: Mean = None, std: Std = None,
        stem: Stem = None, input_size: InputSize = None, epochs: Epochs = None, batch_size: BatchSize = None,
        optimizer: Optimizer = None, lr: Lr = None, sgd_lr: SgdLr = None, switch_epoch: SwitchEpoch = None,
        schedule: Schedule = None, weight_decay: WeightDecay = None, label_smoothing: LabelSmoothing = None,
        freeze_epochs: FreezeEpochs = None, patience: Patience = None, balance: Balance = None,
        aug_scale_min: AugScaleMin = None, aug_hflip: AugHflip = None, aug_rotation: AugRotation = None,
        aug_color_jitter: AugColorJitter = None, val_fraction: ValFraction = None, prune_steps: PruneSteps = None,
        target_macs: TargetMacs = None, retrain_epochs: RetrainEpochs = None, retrain_lr: RetrainLr = None,
        scope: Scope = None, max_layer_ratio: MaxLayerRatio = None, round_to: RoundTo = None,
        layer_caps: LayerCaps = None,
        distill_weight: DistillWeight = None, distill_temperature: DistillTemperature = None,
        export_fp16: ExportFp16 = None, precisions: Precisions = None, calibration_images: CalibrationImages = None,
        calibration_method: CalibrationMethod = None, int8_format: Int8Format = None,
        int8_reduce_range: Int8ReduceRange = None,
        max_accuracy_drop: MaxAccuracyDrop = None, parity_tolerance: ParityTolerance = None, latency_batch: LatencyBatch = None,
        timing_seconds: TimingSeconds = None, target_speedup: TargetSpeedup = None, latency_backend: LatencyBackend = None, device: Device = None,
        seed: Seed = None, workers: Workers = None, data_on_device: DataOnDevice = None,
        trust_pickle: TrustPickle = None, config_file: ConfigFile = None, force: Force = False) -> None:
    """Fine-tune, prune in steps with retraining, export each step to ONNX, report. Resumable."""
    run_ = _open(dict(locals()))
    from .pipeline import console, run_all

    summary = run_all(run_)
    console.print(f"[bold green]done[/]: {run_.run_dir}/report.md (recommended: step {summary['recommended_step']} "
                  f"{summary.get('recommended_precision', 'fp32')})")


def _with_run_options(action: Any, doc: str) -> Any:
    """A command taking exactly `compress run`'s options (typer reads the signature through
    ``functools.wraps``), so stage commands never drift from `run`."""

    @functools.wraps(run)
    def command(**options: Any) -> None:
        action(_open(options))

    command.__doc__ = doc
    return command


def _finetune(run_: Any) -> None:
    from .pipeline import finetune as finetune_stage

    finetune_stage(run_)


app.command(name="finetune", epilog=RUN_EXAMPLES)(_with_run_options(
    _finetune, """Stage 1 alone: create the run directory and fine-tune step 0. The options are those of
    `compress run` and are fixed for the run's later stages (`prune`, `export`, `report`)."""))


def _reopen(run_dir: Path, device: str | None) -> Any:
    from .pipeline import open_run

    return open_run(run_dir, None, device=device)


@app.command()
def prune(run_dir: RunDir, device: Device = None) -> None:
    """Stage 2 alone: the pruning steps (prune + retrain) with the run's options."""
    from .pipeline import prune as prune_stage

    prune_stage(_reopen(run_dir, device))


@app.command()
def export(run_dir: RunDir) -> None:
    """Stage 3 alone: export every finished step to ONNX and check parity."""
    from .pipeline import export as export_stage

    export_stage(_reopen(run_dir, "cpu"))


@app.command()
def report(run_dir: RunDir) -> None:
    """Stage 4 alone: measure ONNX Runtime CPU latency of every step and write report.md and pareto.png."""
    from .pipeline import report as report_stage

    report_stage(_reopen(run_dir, "cpu"), redo=True)


@app.command()
def quantize(run_dir: RunDir,
             steps: Annotated[Optional[str], typer.Option(help="Comma-separated steps (default: every finished step).")] = None,
             precisions: Annotated[str, typer.Option(help="Variants to add (fp32 is always there).")] = "int8",
             calibration_images: CalibrationImages = None, calibration_method: CalibrationMethod = None,
             int8_format: Int8Format = None, int8_reduce_range: Int8ReduceRange = None,
             max_accuracy_drop: MaxAccuracyDrop = None) -> None:
    """Add precision variants (int8 by default) to the steps of an existing run: ONNX Runtime
    static quantization calibrated on training images, measured against each step's fp32 on
    the validation split. Resumable; refreshes report.md when the run has one."""
    import dataclasses

    from .runtime.precisions import parse_precisions

    try:
        chosen = None if steps is None else sorted({int(x) for x in steps.split(",") if x.strip()})
    except ValueError:
        raise UsageError(f"--steps {steps!r}: expected comma-separated step numbers, e.g. 0,3") from None
    try:
        wanted = parse_precisions(precisions)
    except ValueError as exc:
        raise UsageError(f"--precisions: {exc}") from None
    run_ = _reopen(run_dir, "cpu")
    given = {"calibration_images": calibration_images, "calibration_method": calibration_method,
             "int8_format": int8_format, "reduce_range": int8_reduce_range, "max_accuracy_drop": max_accuracy_drop}
    int8 = dataclasses.replace(run_.config.int8_settings(), **{k: v for k, v in given.items() if v is not None})
    int8.validate()
    from .pipeline import quantize as quantize_stage

    quantize_stage(run_, steps=chosen, int8=int8, precisions=wanted)


@app.command()
def register(run_dir: RunDir,
             step: Annotated[Optional[int], typer.Option(help="Step to register (default: the run's recommended step).")] = None,
             name: Annotated[Optional[str], typer.Option(help="Model name in the store (default: the run directory's name).")] = None) -> None:
    """Store a step's ONNX model with its class names, preprocessing and metrics in the BentoML
    model store (BENTOML_HOME) and print its tag, for `SERVE_MODELS=<tag> bentoml serve`."""
    from .registry import register as register_step

    typer.echo(register_step(run_dir, step=step, name=name))


@app.command(name="data")
def data_info(path: Annotated[str, typer.Argument(help="Image folder (PATH/train + PATH/val|test, or PATH/<class>/*) or 'digits'.")],
              json_output: Annotated[bool, typer.Option("--json", help="Print the description as JSON.")] = False,
              val_fraction: ValFraction = None, seed: Seed = None, input_size: InputSize = None) -> None:
    """Inspect a data set without a run: classes, images per class and split, imbalance ratio,
    skipped files with reasons, image size statistics and the input size a run would choose.
    Reads image headers only (in parallel), not the pixels."""
    import json

    from .datainfo import format_text, inspect

    if val_fraction is not None and not 0.0 < val_fraction < 1.0:
        raise UsageError("--val-fraction must be in (0, 1)")
    info = inspect(path, val_fraction=0.2 if val_fraction is None else val_fraction, seed=seed or 0,
                   input_size=input_size)
    typer.echo(json.dumps(info, indent=2) if json_output else format_text(info))


@app.command()
def sensitivity(run_dir: RunDir,
                step: Annotated[int, typer.Option(help="Which finished step to analyse.")] = 0,
                ratios: Annotated[str, typer.Option(help="Comma-separated pruning ratios.")] = "0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9",
                tolerance: Annotated[float, typer.Option(help="Accuracy drop (fraction) a layer may show at its cap.")] = 0.02,
                device: Device = None) -> None:
    """Prune each group alone at each ratio without retraining and measure accuracy; writes
    RUN_DIR/sensitivity/ (CSV, JSON, PNG) and layer_caps.yaml for `compress run --layer-caps`."""
    try:
        parsed = tuple(float(r) for r in ratios.split(",") if r.strip())
    except ValueError:
        raise UsageError(f"--ratios {ratios!r}: expected comma-separated numbers") from None
    if not parsed or not all(0.0 < r < 1.0 for r in parsed):
        raise UsageError("--ratios must be numbers in (0, 1)")
    if not 0.0 <= tolerance < 1.0:
        raise UsageError("--tolerance must be in [0, 1)")
    from .pipeline import sensitivity as sensitivity_stage

    sensitivity_stage(_reopen(run_dir, device), step=step, ratios=parsed, tolerance=tolerance)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    from .cli_support import run_app
    run_app(app, "compress", argv, failures=(ParityError,))


if __name__ == "__main__":
    main()
