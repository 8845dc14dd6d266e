"""``bench compare A.json B.json``: two results files side by side, with B/A ratios.

Rows are matched by what was measured (backend, precision, batch, step for ``bench models``;
concurrency for ``bench serve``), so two runs, two machines or two backends' files line up.
A ratio below 1 for latency, or above 1 for throughput, means B is faster. To compare two
backends (or precisions), pick one on each side (``--a-backend ort-cpu --b-backend torch``,
``ort-cuda:fp16``): rows are then matched by (precision, batch, step) or (batch, step)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from compress.errors import UsageError

KINDS = ("bench-models", "bench-serve")


def read_results(path: Path) -> dict[str, Any]:
    """A results document, or a usage error saying what is wrong with the file."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("kind") not in KINDS:
        raise UsageError(f"{path} is not a results.json of `bench models` or `bench serve`")
    needed = "results" if doc["kind"] == "bench-models" else "levels"
    if not isinstance(doc.get(needed), list):
        raise UsageError(f"{path} has no '{needed}' list: not a complete {doc['kind']} results file")
    return doc


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or not a or math.isnan(a) or math.isnan(b):
        return "-"
    return f"{b / a:.2f}"


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _header(a: dict[str, Any], b: dict[str, Any], path_a: Path, path_b: Path) -> list[str]:
    lines = ["| | A | B |", "|---|---|---|", f"| file | {path_a} | {path_b} |",
             f"| measured | {a.get('created', '-')} | {b.get('created', '-')} |"]
    for label, key in (("run", "run_dir"), ("target", "url")):
        if key in a or key in b:
            lines.append(f"| {label} | {a.get(key, '-')} | {b.get(key, '-')} |")
    ma, mb = a.get("machine", {}), b.get("machine", {})
    gpu = lambda m: (m.get("gpu") or {}).get("name", "none")  # noqa: E731
    lines += [f"| CPU | {ma.get('cpu', '-')} ({ma.get('usable_cores', '?')} cores) | {mb.get('cpu', '-')} "
              f"({mb.get('usable_cores', '?')} cores) |",
              f"| threads | {ma.get('threads') or 'default'} | {mb.get('threads') or 'default'} |",
              f"| GPU | {gpu(ma)} | {gpu(mb)} |",
              f"| host | {ma.get('hostname', '-')} | {mb.get('hostname', '-')} |"]
    return lines


def parse_pick(text: str | None) -> tuple[str, str | None] | None:
    """``"ort-cuda:fp16"`` -> ``("ort-cuda", "fp16")``; ``"torch"`` -> ``("torch", None)``."""
    if not text:
        return None
    backend, _, precision = text.partition(":")
    return backend, precision or None


def _pick_rows(doc: dict[str, Any], pick: tuple[str, str | None] | None, path: Path) -> list[dict[str, Any]]:
    if pick is None:
        return doc["results"]
    rows = [r for r in doc["results"] if r["backend"] == pick[0] and pick[1] in (None, r["precision"])]
    if not rows:
        measured = sorted({f"{r['backend']}:{r['precision']}" for r in doc["results"]})
        raise UsageError(f"{path} has no {':'.join(p for p in pick if p)} results; it has {', '.join(measured) or 'none'}")
    return rows


def compare_models(a: dict[str, Any], b: dict[str, Any], pick_a: tuple[str, str | None] | None = None,
                   pick_b: tuple[str, str | None] | None = None, paths: tuple[Path, Path] = (Path("A"), Path("B"))) -> list[str]:
    """Rows matched by (backend, precision, batch, step); with a pick (one side's pick applies
    to both when only one is given), by what the picks leave free."""
    pick_a, pick_b = pick_a or pick_b, pick_b or pick_a
    fields = ["backend", "precision", "batch", "step"]
    if pick_a and pick_b:
        fields = ["batch", "step"] if pick_a[1] or pick_b[1] else ["precision", "batch", "step"]
    key = lambda r: tuple(r[f] for f in fields)  # noqa: E731
    rows_a = {key(r): r for r in _pick_rows(a, pick_a, paths[0])}
    rows_b = {key(r): r for r in _pick_rows(b, pick_b, paths[1])}
    lines = [f"| {' | '.join(fields)} | A p50 ms | B p50 ms | B/A latency | A img/s | B img/s | "
             "B/A throughput | A speed-up vs step 0 | B speed-up vs step 0 | A accuracy | B accuracy |",
             "|" + "---|" * (len(fields) + 10)]
    for k in sorted(set(rows_a) | set(rows_b)):
        ra, rb = rows_a.get(k, {}), rows_b.get(k, {})
        la, lb = ra.get("latency") or {}, rb.get("latency") or {}
        lines.append(f"| {' | '.join(map(str, k))} | {_num(la.get('p50_ms'))} | {_num(lb.get('p50_ms'))} | "
                     f"{_ratio(la.get('p50_ms'), lb.get('p50_ms'))} | {_num(la.get('throughput'), 0)} | "
                     f"{_num(lb.get('throughput'), 0)} | {_ratio(la.get('throughput'), lb.get('throughput'))} | "
                     f"{_num(ra.get('speedup'), 2)} | {_num(rb.get('speedup'), 2)} | "
                     f"{_num(ra.get('accuracy'), 4)} | {_num(rb.get('accuracy'), 4)} |")
    return lines


def compare_serve(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    levels_a = {lvl["concurrency"]: lvl for lvl in a["levels"]}
    levels_b = {lvl["concurrency"]: lvl for lvl in b["levels"]}
    lines = ["| concurrency | A req/s | B req/s | B/A req/s | A p50 ms | B p50 ms | B/A p50 | A p99 ms | B p99 ms | "
             "B/A p99 | A error rate | B error rate |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in sorted(set(levels_a) | set(levels_b)):
        la, lb = levels_a.get(c, {}), levels_b.get(c, {})
        pa, pb = la.get("latency") or {}, lb.get("latency") or {}
        rate = lambda lvl: f"{lvl['error_rate']:.1%}" if lvl else "-"  # noqa: E731
        lines.append(f"| {c} | {_num(la.get('requests_per_s'), 1)} | {_num(lb.get('requests_per_s'), 1)} | "
                     f"{_ratio(la.get('requests_per_s'), lb.get('requests_per_s'))} | {_num(pa.get('p50_ms'), 1)} | "
                     f"{_num(pb.get('p50_ms'), 1)} | {_ratio(pa.get('p50_ms'), pb.get('p50_ms'))} | "
                     f"{_num(pa.get('p99_ms'), 1)} | {_num(pb.get('p99_ms'), 1)} | {_ratio(pa.get('p99_ms'), pb.get('p99_ms'))} | "
                     f"{rate(la)} | {rate(lb)} |")
    return lines


def compare_files(path_a: Path, path_b: Path, a_backend: str | None = None, b_backend: str | None = None) -> str:
    """The Markdown comparison of two results files of the same kind; ``a_backend`` and
    ``b_backend`` (``BACKEND[:PRECISION]``) pick one backend on each side of a models comparison."""
    a, b = read_results(path_a), read_results(path_b)
    if a["kind"] != b["kind"]:
        raise UsageError(f"cannot compare a {a['kind']} result ({path_a}) with a {b['kind']} result ({path_b})")
    if a["kind"] == "bench-models":
        body = compare_models(a, b, parse_pick(a_backend), parse_pick(b_backend), (Path(path_a), Path(path_b)))
    elif a_backend or b_backend:
        raise UsageError("--a-backend/--b-backend apply to `bench models` results only")
    else:
        body = compare_serve(a, b)
    title = "models" if a["kind"] == "bench-models" else "load tests"
    header = _header(a, b, Path(path_a), Path(path_b))
    if a_backend or b_backend:
        header.append(f"| compared | {a_backend or b_backend} | {b_backend or a_backend} |")
    return "\n".join([f"# Comparison of two {title}: B against A", "", *header, "",
                      "Ratios are B / A: below 1 for latency, above 1 for throughput, means B is faster.", "",
                      *body, ""])
