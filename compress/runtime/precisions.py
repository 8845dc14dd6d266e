"""Precision variants of a step's model, as data.

Every step has an fp32 ONNX file; ``fp16`` and ``int8`` are optional twins next to it. The
file names are fixed so that a run directory, the model store and the service agree on them
without special cases: code loops over :data:`PRECISIONS` instead of naming one."""
from __future__ import annotations

PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8")
VARIANT_FILES: dict[str, str] = {"fp32": "model.onnx", "fp16": "model_fp16.onnx", "int8": "model_int8.onnx"}


def parse_precisions(text: str | None) -> tuple[str, ...]:
    """``"int8,fp16"`` -> ``("fp32", "fp16", "int8")``: fp32 always, canonical order, no repeats.
    Raises ``ValueError`` naming an unknown precision."""
    asked = {part.strip().lower() for part in (text or "").split(",") if part.strip()}
    unknown = sorted(asked - set(PRECISIONS))
    if unknown:
        raise ValueError(f"unknown precision(s) {', '.join(unknown)}; choose from {', '.join(PRECISIONS)}")
    return tuple(p for p in PRECISIONS if p == "fp32" or p in asked)
