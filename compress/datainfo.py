"""``compress data PATH``: what a run would see in a data set, before starting one.

Classes, images per class and split, the imbalance ratio, the files that would be skipped and
why, image size statistics, and the input size a run would choose; from the same scan a run
makes (headers only), so it is cheap on large folders; torch-free (``data_index``)."""
from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from .data_index import DataIndex, index_data


def _stats(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    array = np.asarray(values)
    return {"min": int(array.min()), "median": float(np.median(array)), "max": int(array.max()),
            "mean": round(float(array.mean()), 1)}


def describe(bundle: DataIndex) -> dict[str, Any]:
    """The data set's description as a JSON-ready dict (what ``--json`` prints)."""
    summary = bundle.summary()
    train_counts = summary["class_counts"]["train"]
    smallest = min(train_counts.values())
    info: dict[str, Any] = {
        "source": summary["source"], "layout": summary["layout"], "classes": summary["classes"],
        "train": summary["train"], "val": summary["val"], "class_counts": summary["class_counts"],
        "imbalance_ratio": round(max(train_counts.values()) / smallest, 3) if smallest else None,
        "skipped_files": summary["skipped_files"],
        "preprocessing": bundle.preprocessing.to_dict(),
    }
    if bundle.scan is not None:
        headers = list(bundle.scan.headers.values())  # [bytes, mtime_ns, width, height, mode, format]
        info["image_sizes"] = {
            "width": _stats([h[2] for h in headers]), "height": _stats([h[3] for h in headers]),
            "shorter_side": _stats([min(h[2], h[3]) for h in headers]),
            "bytes": _stats([h[0] for h in headers]),
            "formats": dict(Counter(h[5] for h in headers).most_common()),
            "modes": dict(Counter(h[4] for h in headers).most_common()),
        }
        info["scan"] = {k: v for k, v in bundle.scan.stats.items() if k != "removed"}
    else:
        info["image_sizes"] = {"embedded": "8x8 grey digits, upscaled"}
    return info


def format_text(info: dict[str, Any], *, max_skipped: int = 20) -> str:
    """The description as a few lines for a terminal."""
    counts = info["class_counts"]
    width = max(len(c) for c in info["classes"] + ["class"])
    lines = [f"data: {info['source']} (layout {info['layout']}, {len(info['classes'])} classes, "
             f"{info['train']} train + {info['val']} val images)",
             f"  {'class':<{width}}  {'train':>7}  {'val':>7}"]
    lines += [f"  {name:<{width}}  {counts['train'][name]:>7}  {counts['val'][name]:>7}" for name in info["classes"]]
    ratio = info["imbalance_ratio"]
    lines.append("imbalance (largest / smallest class in train): " + (f"{ratio:.2f}" if ratio else "a class is empty")
                 + ("  (consider --balance weights or sampler)" if ratio and ratio >= 3 else ""))
    sizes = info["image_sizes"]
    if "width" in sizes and sizes["width"]:
        w, h, s = sizes["width"], sizes["height"], sizes["shorter_side"]
        lines.append(f"image sizes: width {w['min']}..{w['max']} (median {w['median']:g}), height {h['min']}..{h['max']} "
                     f"(median {h['median']:g}), shorter side median {s['median']:g}")
        lines.append("formats: " + ", ".join(f"{k} {v}" for k, v in sizes["formats"].items())
                     + "; modes: " + ", ".join(f"{k} {v}" for k, v in sizes["modes"].items()))
    elif "embedded" in sizes:
        lines.append(f"image sizes: {sizes['embedded']}")
    pre = info["preprocessing"]
    lines.append(f"input size a run would choose: {pre['input_size']} (resize {pre['resize']}, centre crop "
                 f"{pre['input_size']}; --input-size overrides)")
    skipped = info["skipped_files"]
    lines.append(f"skipped files: {len(skipped)}")
    lines += [f"  {entry['path']}: {entry['reason']}" for entry in skipped[:max_skipped]]
    if len(skipped) > max_skipped:
        lines.append(f"  ... and {len(skipped) - max_skipped} more (--json lists them all)")
    if "scan" in info:
        scan = info["scan"]
        lines.append(f"scan: {scan['files']} files, {scan['headers_read']} headers read in {scan['seconds']:.1f} s"
                     + (f" on {scan['processes']} processes" if scan.get("processes") else ""))
    return "\n".join(lines)


def inspect(data: str, *, val_fraction: float = 0.2, seed: int = 0, input_size: int | None = None) -> dict[str, Any]:
    return describe(index_data(data, val_fraction=val_fraction, seed=seed, input_size=input_size))
