"""Typed views of ``manifest.json``: what stages, ``bench``, ``register`` and the closing report
read from a run, instead of passing ``dict[str, Any]`` between packages.

The file stays plain JSON (the public contract). :meth:`StepRecord.from_dict` also reads
manifests written before precision variants existed (``onnx_fp16``/``fp16`` keys), so old
run directories keep working."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UsageError
from .runtime.precisions import PRECISIONS


@dataclass(frozen=True)
class VariantRecord:
    """One precision of a step: its ONNX file and how it compares with the step's fp32."""

    precision: str
    onnx: str  # relative to the run directory
    bytes: int | None = None
    accuracy: float | None = None  # top-1 on the whole validation split through ONNX Runtime
    top1_agreement: float | None = None  # with the same step's fp32
    max_abs_diff: float | None = None  # max |logit difference| from the same step's fp32
    accuracy_drop: float | None = None  # fp32 accuracy minus this one's (fraction)
    flagged: bool = False  # lost more than --max-accuracy-drop: kept, reported, never recommended
    details: dict[str, Any] = field(default_factory=dict)  # int8: calibration, format, formats tried

    @classmethod
    def from_dict(cls, precision: str, data: dict[str, Any]) -> VariantRecord:
        known = {"onnx", "bytes", "accuracy", "top1_agreement", "max_abs_diff", "accuracy_drop", "flagged"}
        return cls(precision, data["onnx"], data.get("bytes"), data.get("accuracy"), data.get("top1_agreement"),
                   data.get("max_abs_diff"), data.get("accuracy_drop"), bool(data.get("flagged", False)),
                   {k: v for k, v in data.items() if k not in known})

    def to_dict(self) -> dict[str, Any]:
        return {"onnx": self.onnx, "bytes": self.bytes, "accuracy": self.accuracy,
                "top1_agreement": self.top1_agreement, "max_abs_diff": self.max_abs_diff,
                "accuracy_drop": self.accuracy_drop, "flagged": self.flagged, **self.details}


@dataclass(frozen=True)
class StepRecord:
    """One step of a run as readers see it."""

    step: int
    macs: int
    params: int
    accuracy: float  # PyTorch top-1 on the validation split
    checkpoint: str | None
    onnx: str | None  # the fp32 file (the contract's top-level key)
    parity: dict[str, Any] | None
    variants: dict[str, VariantRecord]
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StepRecord:
        variants = {p: VariantRecord.from_dict(p, v) for p, v in (data.get("variants") or {}).items()}
        if data.get("onnx") and "fp32" not in variants:  # written before variants existed
            parity = data.get("parity") or {}
            variants["fp32"] = VariantRecord("fp32", data["onnx"], data.get("onnx_bytes"), None, 1.0, 0.0,
                                             details={"parity": parity} if parity else {})
        if data.get("onnx_fp16") and "fp16" not in variants:
            old = data.get("fp16") or {}
            variants["fp16"] = VariantRecord("fp16", data["onnx_fp16"], data.get("onnx_fp16_bytes"), None,
                                             old.get("top1_agreement"), old.get("max_abs_diff"))
        ordered = {p: variants[p] for p in PRECISIONS if p in variants}
        return cls(int(data["step"]), int(data["macs"]), int(data["params"]), float(data["accuracy"]),
                   data.get("checkpoint"), data.get("onnx"), data.get("parity"), ordered, data)

    def variant_path(self, run_dir: Path, precision: str) -> Path | None:
        variant = self.variants.get(precision)
        return Path(run_dir) / variant.onnx if variant else None

    def variant_accuracy(self, precision: str) -> float:
        """Top-1 of a variant through ONNX Runtime when measured, else the step's PyTorch top-1."""
        variant = self.variants.get(precision)
        return variant.accuracy if variant is not None and variant.accuracy is not None else self.accuracy


@dataclass(frozen=True)
class RunManifest:
    """The parts of a manifest that other stages and packages read."""

    classes: list[str]
    preprocessing: dict[str, Any]
    config: dict[str, Any]
    steps: list[StepRecord]
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunManifest:
        return cls(list(data["dataset"]["classes"]), dict(data.get("preprocessing") or {}), dict(data.get("config") or {}),
                   sorted((StepRecord.from_dict(s) for s in data.get("steps", [])), key=lambda s: s.step), data)

    @property
    def arch(self) -> str:
        """The run's architecture: ``--arch``, or the one read from the ``--model`` file."""
        return manifest_arch(self.raw)

    def step(self, number: int) -> StepRecord:
        found = next((s for s in self.steps if s.step == number), None)
        if found is None:
            known = ", ".join(str(s.step) for s in self.steps) or "none"
            raise UsageError(f"the run has no step {number} (steps: {known})")
        return found

    def precisions(self) -> list[str]:
        """Every precision some step has, fp32 first."""
        found = {p for s in self.steps for p in s.variants}
        return [p for p in PRECISIONS if p in found]


def manifest_arch(manifest: dict[str, Any]) -> str:
    """``--arch`` of a run, or for a run started from ``--model`` the architecture read from the
    file (``stages.import``)."""
    imported = (manifest.get("stages") or {}).get("import") or {}
    return str(imported.get("architecture", {}).get("arch") or (manifest.get("config") or {}).get("arch") or "")
