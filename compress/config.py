"""Run options: defaults < ``--config FILE.yaml`` < command-line flags, resolved once and
recorded in the manifest. A run directory keeps the options it was made with; running it
again with different ones is an error unless ``--force``."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from .data import DIGITS, Augmentation, DataBundle, load_data
from .errors import UsageError
from .models import ARCHS
from .pruning import PruneSettings, validate_settings
from .training import TrainSettings

OPTIMIZERS = ("adam", "sgd", "adam-then-sgd")
BALANCE = ("none", "weights", "sampler")
SCHEDULES = ("cosine", "step")
DEVICES = ("auto", "cpu", "cuda")
LATENCY_BACKENDS = ("ort-cpu", "ort-cuda", "torch", "openvino")
# Options that change how a run executes but not what it computes: they may differ on resume.
EXECUTION_ONLY = ("device", "workers", "data_on_device", "trust_pickle", "timing_seconds")
# Options that only add precision variants next to the fp32 files: they may differ on resume
# (a new precision is built for every step; a changed int8 setting rebuilds the int8 files).
VARIANT_OPTIONS = ("precisions", "export_fp16", "calibration_images", "calibration_method", "int8_format",
                   "int8_reduce_range", "max_accuracy_drop")
DATA_ON_DEVICE = ("auto", "on", "off")


@dataclass
class RunConfig:
    """Every option of ``compress run``; names match the CLI flags (``--retrain-epochs`` ->
    ``retrain_epochs``) and the keys of a ``--config`` YAML file."""

    data: str = DIGITS
    arch: str | None = None  # default resnet18; with --model read from the file (given: checked against it)
    weights: str = "auto"  # auto = imagenet (cached or downloaded) for torchvision ResNets, else none
    model: str | None = None  # an already trained model file: step 0 as it is, no training
    checkpoint_key: str | None = None  # which entry of a checkpoint dict holds the weights (model, model_ema...)
    classes: str | None = None  # file of class names, one per line, in the order the model was trained with
    mean: str | None = None  # per-channel normalisation the model was trained with, "r,g,b" (default ImageNet's)
    std: str | None = None
    stem: str = "imagenet"
    input_size: int | None = None
    val_fraction: float = 0.2
    # fine-tuning
    epochs: int = 12
    batch_size: int = 64
    optimizer: str = "adam-then-sgd"
    lr: float = 1e-3
    sgd_lr: float = 0.01
    switch_epoch: int | None = None
    schedule: str = "cosine"
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    freeze_epochs: int | None = None  # auto: 1 with pretrained weights, else 0
    patience: int = 5
    balance: str = "none"
    aug_scale_min: float = 0.6
    aug_hflip: bool | None = None  # auto: off for digits (a mirrored digit is another glyph), on otherwise
    aug_rotation: float = 10.0
    aug_color_jitter: float = 0.2
    # pruning
    prune_steps: int = 3  # with target_speedup: the most steps to try
    target_macs: float = 0.4  # with target_speedup: the smallest model to try
    target_speedup: float | None = None  # stop pruning at the first step this much faster than step 0
    latency_backend: str = "ort-cpu"  # where target_speedup is measured

    retrain_epochs: int = 4
    retrain_lr: float = 0.01
    scope: str = "global"
    distill_weight: float = 0.0  # retraining: weight of distillation from step 0 (0 = off)
    distill_temperature: float = 4.0
    max_layer_ratio: float = 0.75
    layer_caps: str | None = None  # YAML from `compress sensitivity`: per-layer maximum ratios
    round_to: int = 8
    # export and report
    opset: int = 18
    export_fp16: bool = False  # alias of --precisions fp32,fp16
    precisions: str = "fp32"  # fp32 always; "fp32,fp16,int8" adds those variants of every step
    calibration_images: int = 512  # int8: training images (evaluation transform) to calibrate on
    calibration_method: str = "minmax"
    int8_format: str = "auto"  # auto: measure qdq-u8s8, qdq-s8s8 and qoperator here, keep the fastest within the drop
    int8_reduce_range: str = "first-conv"  # 7-bit weights there: no 16-bit saturation on CPUs without VNNI
    max_accuracy_drop: float = 0.01  # a variant losing more top-1 than this vs its step's fp32 is flagged
    parity_tolerance: float = 1e-3
    latency_batch: int = 32
    timing_seconds: float = 2.0  # least time of each latency measurement inside a run (more: steadier figures)
    # execution
    device: str = "auto"
    seed: int = 0
    workers: int | None = None
    data_on_device: str = "auto"  # hold the images as tensors on the device, augment there (auto: on CUDA when they fit)
    trust_pickle: bool = False

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> "RunConfig":
        """The options a run recorded (keys this version does not know are left out)."""
        return cls(**{k: v for k, v in manifest["config"].items() if k in cls.option_names()})

    def load_data(self, scan_record: Path | None = None) -> DataBundle:
        """The run's data as these options describe it (split, input size, ``--mean``/``--std``,
        ``--classes``); ``scan_record`` is the run's stored scan, so reopening reads no image."""
        return load_data(self.data, augment=self.augmentation(), val_fraction=self.val_fraction, seed=self.seed,
                         input_size=self.input_size, scan_record=scan_record,
                         normalisation=self.normalisation(), class_order=self.class_order())

    def augmentation(self) -> Augmentation:
        hflip = self.aug_hflip if self.aug_hflip is not None else self.data != DIGITS
        return Augmentation(self.aug_scale_min, hflip, self.aug_rotation, self.aug_color_jitter)

    def finetune_settings(self, pretrained: bool) -> TrainSettings:
        freeze = self.freeze_epochs if self.freeze_epochs is not None else (1 if pretrained else 0)
        return TrainSettings(epochs=self.epochs, optimizer=self.optimizer, lr=self.lr, sgd_lr=self.sgd_lr,
                             switch_epoch=self.switch_epoch, schedule=self.schedule, weight_decay=self.weight_decay,
                             label_smoothing=self.label_smoothing, freeze_epochs=freeze, patience=self.patience)

    def retrain_settings(self) -> TrainSettings:
        return TrainSettings(epochs=self.retrain_epochs, optimizer="sgd", sgd_lr=self.retrain_lr,
                             schedule=self.schedule, weight_decay=self.weight_decay,
                             label_smoothing=self.label_smoothing, patience=0,
                             distill_weight=self.distill_weight, distill_temperature=self.distill_temperature)

    def prune_settings(self) -> PruneSettings:
        from .sensitivity import load_layer_caps

        caps = load_layer_caps(Path(self.layer_caps)) if self.layer_caps else {}
        return PruneSettings(self.target_macs, self.prune_steps, self.scope, self.max_layer_ratio, self.round_to, caps)

    def precision_list(self) -> tuple[str, ...]:
        """The precisions every step gets (fp32 first); ``--export-fp16`` adds fp16."""
        from .runtime.precisions import parse_precisions

        return parse_precisions(self.precisions + (",fp16" if self.export_fp16 else ""))

    def int8_settings(self) -> Any:
        from .quantize import Int8Settings

        return Int8Settings(self.calibration_images, self.calibration_method, self.int8_format,
                            self.max_accuracy_drop, self.seed, self.int8_reduce_range)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        checks = [
            (self.optimizer in OPTIMIZERS, f"--optimizer must be one of {', '.join(OPTIMIZERS)}"),
            (self.balance in BALANCE, f"--balance must be one of {', '.join(BALANCE)}"),
            (self.schedule in SCHEDULES, f"--schedule must be one of {', '.join(SCHEDULES)}"),
            (self.device in DEVICES, f"--device must be one of {', '.join(DEVICES)}"),
            (self.data_on_device in DATA_ON_DEVICE, f"--data-on-device must be one of {', '.join(DATA_ON_DEVICE)}"),
            (self.epochs >= 0, "--epochs must be >= 0"),
            (self.retrain_epochs >= 0, "--retrain-epochs must be >= 0"),
            (self.batch_size >= 1, "--batch-size must be >= 1"),
            (0.0 < self.val_fraction < 1.0, "--val-fraction must be in (0, 1)"),
            (0.0 < self.aug_scale_min <= 1.0, "--aug-scale-min must be in (0, 1]"),
            (self.lr > 0 and self.sgd_lr > 0 and self.retrain_lr > 0, "learning rates must be > 0"),
            (0.0 < self.parity_tolerance, "--parity-tolerance must be > 0"),
            (17 <= self.opset, "--opset must be >= 17"),
            (self.latency_batch >= 1, "--latency-batch must be >= 1"),
            (0.0 < self.timing_seconds <= 600, "--timing-seconds must be over 0 and at most 600"),
            (self.target_speedup is None or self.target_speedup > 1.0, "--target-speedup must be > 1"),
            (self.latency_backend in LATENCY_BACKENDS, f"--latency-backend must be one of {', '.join(LATENCY_BACKENDS)}"),
            (0.0 <= self.distill_weight <= 1.0, "--distill-weight must be in [0, 1]"),
            (self.distill_temperature > 0, "--distill-temperature must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)
        try:
            self.precisions = ",".join(self.precision_list())
        except ValueError as exc:
            raise UsageError(f"--precisions: {exc}") from None
        self.int8_settings().validate()
        validate_settings(self.prune_settings())
        self.normalisation()
        if self.arch is not None and self.arch not in ARCHS:
            raise UsageError(f"unknown --arch {self.arch}; choose one of {', '.join(ARCHS)}")

    def normalisation(self) -> dict[str, tuple[float, float, float]]:
        """``--mean``/``--std`` as 3-tuples (only those given)."""
        out = {}
        for name in ("mean", "std"):
            text = getattr(self, name)
            if text is None:
                continue
            try:
                values = tuple(float(v) for v in str(text).replace(" ", "").split(","))
            except ValueError:
                values = ()
            if len(values) != 3 or (name == "std" and not all(v > 0 for v in values)):
                raise UsageError(f"--{name} {text!r}: expected three comma-separated numbers (one per RGB channel)"
                                 + (", all > 0" if name == "std" else ""))
            out[name] = values
        return out

    def class_order(self) -> list[str] | None:
        """``--classes FILE``: the class names in the order the model's outputs have them."""
        if self.classes is None:
            return None
        path = Path(self.classes)
        try:
            names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"--classes {path}: cannot read it ({type(exc).__name__})") from None
        if not names or len(set(names)) != len(names):
            raise UsageError(f"--classes {path}: expected one distinct class name per line")
        return names


def _coerce(name: str, value: Any, field_type: Any) -> Any:
    """YAML gives ints for floats and strings for paths; accept what is unambiguous."""
    if value is None:
        return None
    text = str(field_type)
    try:
        if text.startswith("bool"):
            if isinstance(value, bool):
                return value
            raise ValueError
        if text.startswith("int"):
            if isinstance(value, bool):
                raise ValueError
            return int(value)
        if text.startswith("float"):
            return float(value)
        if text.startswith("str"):
            return str(value)
    except (TypeError, ValueError):
        raise UsageError(f"option {name}: {value!r} is not a valid {text.split(' ')[0]}") from None
    return value


def load_yaml_options(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UsageError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UsageError(f"--config {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: expected a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def resolve_config(cli_options: dict[str, Any], config_file: Path | None) -> RunConfig:
    """Merge defaults, the YAML file and the flags actually given (``None`` = not given)."""
    merged: dict[str, Any] = {}
    if config_file is not None:
        merged.update(load_yaml_options(config_file))
    merged.update({k: v for k, v in cli_options.items() if v is not None})
    known = {f.name: f for f in fields(RunConfig)}
    unknown = sorted(set(merged) - set(known))
    if unknown:
        raise UsageError(f"unknown option(s) in --config: {', '.join(unknown)}")
    values = {name: _coerce(name, value, known[name].type) for name, value in merged.items()}
    for name in ("layer_caps", "classes"):  # recorded absolute, so a resume from another folder finds it
        if values.get(name):
            values[name] = str(Path(values[name]).expanduser().resolve())
    if values.get("arch") is None and values.get("model") is None:
        values["arch"] = "resnet18"
    config = RunConfig(**values)
    config.validate()
    return config


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Options (other than execution-only ones) whose values differ between two runs. An
    option missing from an older manifest counts as its default."""
    defaults = RunConfig().to_dict()
    if new.get("model") and new.get("arch") is None and old.get("model") == new.get("model"):
        # runs from before the architecture was read from --model's file recorded the --arch they got
        new = {**new, "arch": old.get("arch")}
    keys = (set(old) | set(new)) - set(EXECUTION_ONLY) - set(VARIANT_OPTIONS)
    return sorted(k for k in keys if old.get(k, defaults.get(k)) != new.get(k, defaults.get(k)))
