"""The campaign's evidence: ``README.md`` (the headline: every part's status, budget, wall time
and result line; the machine; the calls) and ``evidence.json``, rewritten after every part; with
``--bundle``, a ``.tar.gz`` of the whole results folder and ``evidence.md`` / ``evidence.json``
beside it, rewritten too, so a call cut off anywhere still hands back what it measured. A
part that has not run (or failed) is written as missing, with the reason; nothing is estimated."""
from __future__ import annotations

import os
import tarfile
import time
from pathlib import Path
from typing import Any, Sequence

from compress.render import machine_markdown
from compress.rundir import atomic_write_json, atomic_write_text

from .campaign import Context, Part


def part_result(record: dict[str, Any]) -> str:
    """A part's one line: its result, or why it has none."""
    status = record.get("status", "pending")
    line = (record.get("summary") or {}).get("line")
    if status in ("done", "cut-off") and line:
        return line
    if status == "failed":
        return f"missing: failed ({record.get('error', '')[:300]})"
    if status == "skipped":
        return f"missing: skipped ({record.get('error', '')})"
    return f"missing: {'running' if status == 'running' else 'not run yet'}" + (
        f" ({record['error']})" if record.get("error") else "")


def evidence_doc(ctx: Context, parts: Sequence[Part]) -> dict[str, Any]:
    records = {p.name: ctx.state["parts"].get(p.name, {}) for p in parts}
    return {"kind": "bench-campaign-evidence", "profile": ctx.settings["profile"], "data": ctx.state.get("data"),
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "notes": ctx.state.get("notes", []),
            "machine": ctx.state.get("machine"),
            "wall_seconds": round(sum(r.get("wall_seconds", 0.0) for r in records.values()), 1),
            "parts": {p.name: {"item": p.item, "title": p.title, "status": records[p.name].get("status", "pending"),
                               "budget_seconds": records[p.name].get("budget_seconds", p.seconds(ctx.smoke)),
                               "wall_seconds": records[p.name].get("wall_seconds"),
                               "line": part_result(records[p.name]), "error": records[p.name].get("error"),
                               "summary": records[p.name].get("summary")} for p in parts}}


def readme_text(ctx: Context, doc: dict[str, Any]) -> str:
    smoke = ctx.smoke
    title = "GPU evidence smoke (CPU rehearsal, tiny data: figures mean nothing)" if smoke else "GPU evidence"
    lines = [f"# {title}", "",
             f"Made by `bench campaign` ({'--smoke, ' if smoke else ''}profile {doc['profile']}) in one time-boxed "
             f"call; last update {doc['updated']}. Data: `{doc['data']}`. Each part's folder has its README.md (with "
             "the exact commands), summary.json and the `bench` reports; `logs/` has every command's output; "
             "`evidence.json` is this page as data. Figures not measured are named as missing.", ""]
    lines += [f"- {note}" for note in doc["notes"]] + ([""] if doc["notes"] else [])
    lines += ["| part | issue item | status | wall s / budget s | result |", "|---|---|---|---|---|"]
    for name, part in doc["parts"].items():
        link = f"[{name}]({name}/README.md)" if (ctx.out / name / "README.md").is_file() else name
        wall = "-" if part["wall_seconds"] is None else f"{part['wall_seconds']:.0f}"
        lines.append(f"| {link} | {part['item']} | {part['status']} | {wall} / {part['budget_seconds']:.0f} | "
                     f"{part['line'].replace('|', '/')} |")
    lines += ["", f"Parts' wall time: {doc['wall_seconds']:.0f} s.", "", "## Machine", "",
              machine_markdown(doc["machine"]) if doc["machine"] else "not recorded", "",
              "## Calls", "", "| started | --max-minutes | parts run |", "|---|---|---|",
              *[f"| {c['started']} | {c['max_minutes']:g} | {', '.join(c.get('parts_run', [])) or '-'} |"
                for c in ctx.state.get("calls", [])], ""]
    return "\n".join(lines)


def write_evidence(ctx: Context, parts: Sequence[Part], bundle: Path | None = None) -> None:
    """README.md + evidence.json in the results folder, then (``bundle``) the archive and the
    two files beside it; each written atomically (a reader never sees half a file)."""
    doc = evidence_doc(ctx, parts)
    text = readme_text(ctx, doc)
    atomic_write_json(ctx.out / "evidence.json", doc)
    atomic_write_text(ctx.out / "README.md", text)
    if bundle is None:
        return
    bundle.parent.mkdir(parents=True, exist_ok=True)
    partial = bundle.with_name(bundle.name + ".partial")
    with tarfile.open(partial, "w:gz") as archive:
        archive.add(ctx.out, arcname=ctx.out.name)
    os.replace(partial, bundle)
    atomic_write_json(bundle.parent / "evidence.json", doc)
    atomic_write_text(bundle.parent / "evidence.md", text)
