"""The campaign's ``README.md``: the headline table, every part's status and wall time, and the
machine, rewritten after every part. A figure whose part has not run (or failed) is written
as missing, with the reason; nothing is estimated."""
from __future__ import annotations

from typing import Sequence

from compress.render import machine_markdown
from compress.rundir import atomic_write_text

from .campaign import Context, Part, format_minutes


def _missing(ctx: Context, part: str) -> str:
    record = ctx.state["parts"].get(part, {})
    status = record.get("status", "pending")
    if status == "failed":
        return f"missing: part {part} failed ({record.get('error', '')[:120]})"
    return f"missing: part {part} {'not run yet' if status == 'pending' else status}"


def _pct(value: float | None) -> str:
    return "missing" if value is None else f"{value * 100:.2f}%"


def _x(value: float | None) -> str:
    return "missing" if value is None else f"{value:.2f}x"


def headline_rows(ctx: Context) -> list[tuple[str, str, str]]:
    """(figure, value, goal or reference) rows."""
    rows: list[tuple[str, str, str]] = []
    base = ctx.summary_of("1-baselines").get("models")
    for role, label in (("primary", "resnet18 (CIFAR stem)"), ("deep", "resnet56")):
        if base:
            m = base[role]
            name = m["name"] + (f" (standing in for {m['stands_for']})" if m.get("stands_for") else "")
            rows.append((f"baseline top-1, {name}", f"{_pct(m['accuracy'])} after {m['epochs']} epochs "
                         f"({m['train_seconds']} s)", f">= {m['goal'] * 100:.0f}%: {'reached' if m['goal_reached'] else 'NOT reached'}"))
        else:
            rows.append((f"baseline top-1, {label}", _missing(ctx, "1-baselines"), ""))
    pruned = ctx.summary_of("2-prune").get("models")
    bench = ctx.summary_of("3-bench-models").get("models")
    for role in ("primary", "deep"):
        if not pruned:
            rows.append((f"pruned {role} model", _missing(ctx, "2-prune"), ">= 2.0x within 0.5 pt (moonshot 2.5x)"))
            continue
        p = pruned[role]
        c = p["chosen"]
        text = (f"step {c['step']}: {c['macs_ratio']:.1%} of MACs, top-1 {_pct(c['accuracy'])} "
                f"({c['accuracy_delta'] * 100:+.2f} pt{'' if c['within_tolerance'] else ', OUTSIDE 0.5 pt'}); "
                f"steering measure {c['measured']['speedup']:.2f}x on {c['measured']['backend']} batch {c['measured']['batch']}")
        rows.append((f"pruned {p['name']} (chosen step)", text, ">= 2.0x within 0.5 pt (moonshot 2.5x)"))
        if bench:
            h = bench[role]["headline"]
            rows.append((f"{p['name']} step {c['step']} speed-up, {h['backend']} fp32",
                         f"{_x(h['speedup_at_saturating'])} at the saturating batch {h['saturating_batch']}; "
                         f"{_x(h['speedup_at_256'])} at 256", "vs step 0 fp32, same run"))
            rows.append((f"{p['name']} step {c['step']} fp16 on top, {h['backend']}",
                         f"{_x(h['fp16_speedup_at_saturating'])} at {h['saturating_batch']}; "
                         f"{_x(h['fp16_speedup_at_256'])} at 256", "vs step 0 fp32, same run"))
        else:
            rows.append((f"{p['name']} speed-up at the saturating batch and at 256", _missing(ctx, "3-bench-models"), ""))
    published = ctx.summary_of("4-published").get("runs")
    if published:
        for r in published.values():
            ref = r["reference"]
            rows.append((f"{ctx.summary_of('4-published')['model']} vs {ref['name']}",
                         f"{_pct(r['accuracy'])} at {r['macs_reduction']:.2f}x fewer MACs (our step 0 {_pct(r['step0_accuracy'])})",
                         f"published {_pct(ref['accuracy_after'])} at {1 / ref['keep_macs']:.2f}x fewer"))
    else:
        rows.append(("resnet56 vs Li et al. / Torch-Pruning", _missing(ctx, "4-published"), "93.06% / 92.93%"))
    ensemble = ctx.summary_of("5-ensemble")
    if ensemble.get("accuracy"):
        acc, last = ensemble["accuracy"], ensemble["throughput"][-1]
        rows.append(("ensemble of 3 pruned vs single unpruned", f"top-1 {_pct(acc['ensemble_soft'])} soft / "
                     f"{_pct(acc['ensemble_hard'])} hard vs {_pct(acc['single'])}; batch {last['batch']}: "
                     f"{last['ensemble']['throughput']:.0f} vs {last['single']['throughput']:.0f} images/s "
                     f"({', '.join(ensemble['providers'])})", ""))
    else:
        rows.append(("ensemble of 3 pruned vs single unpruned", _missing(ctx, "5-ensemble"), ""))
    options = ctx.summary_of("6a-serve-options")
    rows.append(("service runtime options (measured on its model)",
                 options.get("line") or _missing(ctx, "6a-serve-options"), "defaults unless clearly faster"))
    service = ctx.summary_of("6-service")
    if service.get("best"):
        b = service["best"]
        fraction = "missing" if b["fraction_of_raw_best"] is None else f"{b['fraction_of_raw_best']:.0%}"
        rows.append(("service vs raw ORT (best operating point)",
                     f"{fraction} of raw {service['provider']} ({b['images_per_s']:.0f} vs {b['raw_best_images_per_s'] or 0:.0f} "
                     f"images/s at batch {b['raw_best_batch']}): {b['workers']} worker(s), /{b['endpoint']}, "
                     f"concurrency {b['concurrency']}", ">= 80%"))
    else:
        rows.append(("service vs raw ORT (best operating point)", _missing(ctx, "6-service"), ">= 80%"))
    tests = ctx.summary_of("7-tests")
    if tests.get("runs"):
        for run in tests["runs"]:
            rows.append((f"`{run['command']}`", run["result"], f"exit code {run['exit_code']}"))
    else:
        rows.append(("test suite on this machine", _missing(ctx, "7-tests"), ""))
    total = sum(r.get("wall_seconds", 0.0) for r in ctx.state["parts"].values())
    done = all(r.get("status") == "done" for r in ctx.state["parts"].values()) and len(ctx.state["parts"]) > 0
    rows.append(("campaign wall time (sum of parts)", format_minutes(total) + ("" if done else " so far"),
                 "about 25 min on an H100"))
    return rows


def write_readme(ctx: Context, parts: Sequence[Part]) -> None:
    smoke = ctx.smoke
    title = "Campaign smoke (CPU rehearsal, tiny subset: figures mean nothing)" if smoke else "GPU campaign"
    lines = [f"# {title}", "",
             f"Made by `bench campaign` ({'--smoke, ' if smoke else ''}profile {ctx.settings['profile']}); state in "
             f"`campaign.json`; last update {ctx.state.get('updated', '')}. Data: `{ctx.state['data']}`. Each part's "
             "folder has its README.md (with the exact commands), JSON and plots; `logs/` has every command's output. "
             "Figures not measured yet are named as missing.", "",
             "## Headline", "", "| figure | measured | goal / reference |", "|---|---|---|",
             *[f"| {a} | {b} | {c} |" for a, b, c in headline_rows(ctx)], "",
             "## Parts", "",
             "| part | what | status | calls | wall time | planned (GPU min) | result |", "|---|---|---|---|---|---|---|"]
    for part in parts:
        record = ctx.state["parts"].get(part.name, {})
        summary = record.get("summary") or {}
        result = summary.get("line") or record.get("error") or record.get("redo_reason") or ""
        wall = format_minutes(record["wall_seconds"]) if "wall_seconds" in record else "-"
        link = f"[{part.name}]({part.name}/README.md)" if (ctx.out / part.name / "README.md").is_file() else part.name
        lines.append(f"| {link} | {part.title} | {record.get('status', 'pending')} | {record.get('calls', 0)} | {wall} | "
                     f"{part.gpu_minutes:g} | {result.replace('|', '/')} |")
    machine = ctx.state.get("machine")
    lines += ["", "## Machine (latest call)", "", machine_markdown(machine) if machine else "not recorded", "",
              "## Calls", "", "| started | --max-minutes | parts run |", "|---|---|---|",
              *[f"| {c['started']} | {c['max_minutes']:g} | {', '.join(c.get('parts_run', [])) or '-'} |"
                for c in ctx.state.get("calls", [])], ""]
    atomic_write_text(ctx.out / "README.md", "\n".join(lines))
