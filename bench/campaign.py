"""``bench campaign``: the GPU evidence in ONE time-boxed call, each part with its own budget.

A GPU machine is lent for 15 minutes of device time in all (its start, every call and every idle
wait count), so the whole evidence is one command in one device call: it runs the parts in
order, each within its own time budget (scaled down when ``--max-minutes`` is smaller than
their sum), and writes each part's results the moment it finishes, so a cut-off still leaves
evidence.

Design:
- parts are data (:class:`Part`, listed in :mod:`bench.campaign_parts`): a name, the issue item
  it answers, what it runs, its budget in seconds on the GPU (and in the CPU smoke), which
  earlier parts it needs, and what it reports when its budget runs out (``partial``: e.g. the
  tests' results so far);
- every part runs the project's own CLIs as subprocesses (``python -m compress ...``,
  ``python -m bench ...``, ``python -m bentoml serve``), the exact commands recorded with the
  results; at the part's deadline the running command gets SIGINT (``compress`` then stops after
  its last finished epoch or step), then SIGTERM, then SIGKILL, and the next part starts;
- the results folder (small: JSON, Markdown, PNG, logs; meant to be copied back and committed)
  holds ``campaign.json`` (the state, written atomically after every command), ``README.md``
  and ``evidence.json`` (the summary: rewritten after every part, figures not measured named as
  missing) and, with ``--bundle``, a ``.tar.gz`` of it all plus ``evidence.md``/``evidence.json``
  beside it, rewritten after every part; the work folder holds data, run directories, ONNX
  files and the model store (big, never committed). Called again on the same results folder,
  it runs only the parts that have not finished or been cut off.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from compress.errors import UsageError
from compress.rundir import atomic_write_json

STATE = "campaign.json"
STATE_FORMAT = 2  # 2: one time-boxed call, parts with budgets (1: resumable calls)
REPO = Path(__file__).resolve().parents[1]


class DeadlineReached(Exception):
    """The call's ``--max-minutes`` ran out while a part was running (its progress is kept)."""


class PartFailed(Exception):
    """A command of a part failed; the message says which and where its log is."""


class PartSkipped(Exception):
    """A part cannot run because an earlier part left nothing for it (e.g. cut off before its
    first model): not a failure of its own; the message says what is missing."""


@dataclass(frozen=True)
class Part:
    """One part of the campaign.

    ``run`` does the work through :class:`Context` (commands it runs are recorded) and returns
    the part's summary: the figures the evidence reads (``line``: one sentence of them).
    ``budget`` / ``smoke_budget``: its seconds on the GPU / in the CPU smoke. ``partial``, when
    the budget runs out while it runs, returns what the part got so far (its summary then)."""

    name: str
    item: str  # the issue item it answers (a..e)
    title: str
    budget: float
    smoke_budget: float
    run: Callable[["Context"], dict[str, Any]]
    needs: tuple[str, ...] = ()
    partial: Callable[["Context"], dict[str, Any]] | None = None
    plan: Callable[[dict[str, Any]], str] | None = None  # what it runs with a profile's settings, for --dry-run

    def seconds(self, smoke: bool) -> float:
        return self.smoke_budget if smoke else self.budget


@dataclass
class Context:
    """What a part works with: the folders, the profile's settings, the deadline, the state."""

    out: Path
    work: Path
    smoke: bool
    settings: dict[str, Any]
    deadline: float
    state: dict[str, Any]
    part: Part | None = None
    echo: Callable[[str], None] = print
    extra_env: dict[str, str] = field(default_factory=dict)

    # --- folders and state -------------------------------------------------------------------
    @property
    def part_state(self) -> dict[str, Any]:
        assert self.part is not None
        return self.state["parts"].setdefault(self.part.name, {})

    @property
    def part_out(self) -> Path:
        """The part's results folder (inside the results folder)."""
        assert self.part is not None
        return self.out / self.part.name

    def summary_of(self, name: str) -> dict[str, Any]:
        return self.state["parts"].get(name, {}).get("summary") or {}

    @property
    def data_dir(self) -> Path:
        """The image folder in use: recorded relative to the work folder when it lies there
        (unpacked or subset), so the state stays right if the checkout moves."""
        recorded = Path(self.state["data_dir"])
        return recorded if recorded.is_absolute() else self.work / recorded

    def save(self) -> None:
        save_state(self.out, self.state)

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    # --- commands -------------------------------------------------------------------------
    def python(self, *args: str) -> list[str]:
        return [sys.executable, *args]

    def shown(self, argv: Sequence[str], env: dict[str, str] | None = None) -> str:
        """The command as a user types it in the repository root: ``python -m ...`` with the
        environment it needed, paths inside the checkout relative to it."""
        root = str(REPO) + os.sep

        def local(word: str) -> str:
            return word.replace(root, "") if root in word else word

        words = [Path(argv[0]).name if argv[0] == sys.executable else argv[0], *map(local, argv[1:])]
        prefix = " ".join(f"{k}={shlex.quote(local(v))}" for k, v in (env or {}).items())
        return (prefix + " " if prefix else "") + shlex.join(words)

    def record(self, text: str) -> None:
        commands = self.part_state.setdefault("commands", [])
        if text not in commands:
            commands.append(text)

    def done(self, key: str) -> bool:
        return key in self.part_state.get("finished", [])

    def mark_done(self, key: str) -> None:
        finished = self.part_state.setdefault("finished", [])
        if key not in finished:
            finished.append(key)
        self.save()

    def run(self, key: str, argv: Sequence[str], *, env: dict[str, str] | None = None, grace: float | None = None,
            timeout: float | None = None, check: bool = True) -> int:
        """Run one command of the current part unless a former call finished it (``key``).

        Its output goes to ``logs/<part>/<key>.log`` in the results folder. At the deadline it
        gets SIGINT (then SIGTERM and SIGKILL after ``grace`` seconds each) and
        :class:`DeadlineReached` is raised; a failure (non-zero exit) raises :class:`PartFailed`
        unless ``check`` is false. ``timeout`` bounds this command alone (a hang is a failure)."""
        text = self.shown(argv, env)
        self.record(text)
        if self.done(key):
            self.echo(f"  = {text}  (finished in an earlier call)")
            return 0
        log = self.out / "logs" / self.part.name / f"{key.replace('/', '_')}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        self.echo(f"  $ {text}")
        self.save()
        started = time.monotonic()
        environment = {**os.environ, **self.extra_env, **(env or {})}
        with open(log, "ab") as handle:
            handle.write(f"\n# {time.strftime('%Y-%m-%dT%H:%M:%S%z')} $ {text}\n".encode())
            handle.flush()
            process = subprocess.Popen(list(argv), cwd=REPO, env=environment, stdout=handle, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
            limit = self.remaining() if timeout is None else min(self.remaining(), timeout)
            try:
                code = process.wait(timeout=max(limit, 0.1))
            except subprocess.TimeoutExpired:
                stop_process_group(process, grace if grace is not None else self.settings["grace_seconds"])
                seconds = time.monotonic() - started
                if timeout is not None and self.remaining() > 0:
                    raise PartFailed(f"{text} did not finish within {timeout:.0f} s (log: {log})") from None
                self.echo(f"  ! stopped at the deadline after {seconds:.0f} s (log: {log})")
                raise DeadlineReached(text) from None
        seconds = time.monotonic() - started
        if code != 0 and check:
            raise PartFailed(f"exit code {code} after {seconds:.0f} s: {text}: {last_line(log)} (log: {log})")
        self.echo(f"    {'ok' if code == 0 else f'exit code {code}'} in {seconds:.1f} s")
        self.part_state.setdefault("command_seconds", {})[key] = round(seconds, 1)
        self.mark_done(key)
        return code


def stop_process_group(process: subprocess.Popen, grace: float) -> None:
    """SIGINT (a graceful stop: ``compress`` keeps its finished epochs), then SIGTERM, then
    SIGKILL, to the command's whole process group, each given ``grace`` seconds."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def last_line(log: Path) -> str:
    """The last non-empty line of a log (a CLI's one-line error)."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


# --- state ----------------------------------------------------------------------------------
def load_state(out: Path) -> dict[str, Any] | None:
    path = out / STATE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path} is not valid JSON ({exc.msg}); move it away to start the campaign again") from None


def save_state(out: Path, state: dict[str, Any]) -> None:
    state["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    atomic_write_json(out / STATE, state)


def new_state(smoke: bool, data: str, work: Path) -> dict[str, Any]:
    return {"format": STATE_FORMAT, "kind": "bench-campaign", "profile": "smoke" if smoke else "gpu",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "data": data, "work": str(work), "parts": {},
            "calls": []}


# --- the driver ------------------------------------------------------------------------------
def cuda_status() -> tuple[str | None, str | None]:
    """(why torch has no CUDA device, why ONNX Runtime has no CUDA provider): None where it works.
    Without a device only --smoke runs; without ORT's provider the campaign still runs, and says so."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device: run on a GPU machine, or --smoke", None
    from compress.runtime.sessions import cuda_unavailable_reason

    return None, cuda_unavailable_reason()


def open_state(out: Path, work: Path, smoke: bool, data: str) -> dict[str, Any]:
    state = load_state(out)
    profile = "smoke" if smoke else "gpu"
    if state is None:
        if out.is_dir() and any(p for p in out.iterdir() if not p.name.startswith(".")):
            raise UsageError(f"--out {out} exists, is not empty and holds no {STATE}: use another --out")
        return new_state(smoke, data, work)
    if state.get("kind") != "bench-campaign" or state.get("format") != STATE_FORMAT:
        raise UsageError(f"{out / STATE} is not a campaign state file of this version: use another --out")
    if state.get("profile") != profile:
        raise UsageError(f"{out} holds a {state.get('profile')} campaign; this call is a {profile} one: use another --out")
    if state.get("data") != data:
        raise UsageError(f"{out} was started with --data {state.get('data')}, not {data}: use the same data or another --out")
    state["work"] = str(work)
    return state


def budgets(parts: Sequence[Part], smoke: bool, max_minutes: float, reserve: float) -> dict[str, float]:
    """Each part's seconds in this call: its budget, all scaled down alike when their sum does
    not fit in ``max_minutes`` less ``reserve`` (the last writes)."""
    total = sum(p.seconds(smoke) for p in parts)
    scale = min(1.0, max(max_minutes * 60 - reserve, 0.0) / total) if total else 1.0
    return {p.name: p.seconds(smoke) * scale for p in parts}


def plan_lines(parts: Sequence[Part], *, smoke: bool, max_minutes: float, settings: dict[str, Any],
               cuda: tuple[str | None, str | None] | None) -> list[str]:
    """What ``--dry-run`` prints: every part with its budget, what it runs, and the total."""
    reserve = reserve_seconds(settings, max_minutes)
    shares = budgets(parts, smoke, max_minutes, reserve)
    planned = sum(p.seconds(smoke) for p in parts)
    lines = [f"campaign plan ({'smoke: CPU, tiny data' if smoke else 'gpu'}), --max-minutes {max_minutes:g} "
             f"({max_minutes * 60:.0f} s, {reserve:.0f} s kept for the last writes):"]
    for index, part in enumerate(parts, 1):
        scaled = "" if abs(shares[part.name] - part.seconds(smoke)) < 0.5 else f" (planned {part.seconds(smoke):.0f} s)"
        lines.append(f"  {index}. {part.name} [issue item {part.item}] budget {shares[part.name]:.0f} s{scaled}: "
                     f"{part.title}")
        if part.plan is not None:
            lines.append(f"       {part.plan(settings)}")
    total = sum(shares.values())
    lines.append(f"  total {total:.0f} s of parts + {reserve:.0f} s reserve = {total + reserve:.0f} s"
                 + (f"; the planned {planned:.0f} s were scaled to fit --max-minutes" if planned > total + 0.5 else ""))
    if cuda is not None:
        device, ort = cuda
        lines.append("  this machine: " + (device or ("CUDA device present; ONNX Runtime's CUDA provider: "
                                                      + ("loads" if ort is None else f"MISSING ({ort})"))))
    return lines


def reserve_seconds(settings: dict[str, Any], max_minutes: float) -> float:
    """Seconds kept at the end of the call: a graceful stop (SIGINT, then SIGTERM, each given
    the grace period) of the last command and the last writes end within ``max_minutes``."""
    return min(2 * settings["grace_seconds"] + 5, 0.1 * max_minutes * 60)


def run_campaign(parts: Sequence[Part], *, out: Path, work: Path, data: str, smoke: bool, max_minutes: float,
                 settings: dict[str, Any], retry_failed: bool = False, echo: Callable[[str], None] = print,
                 write_evidence: Callable[[Context, Sequence[Part]], None] | None = None,
                 notes: Sequence[str] = ()) -> int:
    """Run every part not finished yet, each within its budget, in one call; after every part
    ``write_evidence`` rewrites the summary (and the bundle). Returns the exit code: 0, or 1
    when a part failed (a part cut off at its budget is not a failure: it reports what it got)."""
    started = time.monotonic()
    reserve = reserve_seconds(settings, max_minutes)
    deadline = started + max_minutes * 60 - reserve
    shares = budgets(parts, smoke, max_minutes, reserve)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    state = open_state(out, work, smoke, data)
    ctx = Context(out=out, work=work, smoke=smoke, settings=settings, deadline=deadline, state=state, echo=echo)
    from compress.runtime.machine import machine_info

    if smoke:
        ctx.extra_env["CUDA_VISIBLE_DEVICES"] = ""  # the rehearsal runs on the CPU even where a GPU is
    call = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "max_minutes": max_minutes, "argv": sys.argv[1:],
            "machine": machine_info(), "parts_run": [], "notes": list(notes),
            "budgets": {k: round(v, 1) for k, v in shares.items()}}
    state["calls"].append(call)
    state["machine"] = call["machine"]
    state["notes"] = list(notes)
    for note in notes:
        echo(f"campaign: {note}")

    def refresh() -> None:
        save_state(out, state)
        if write_evidence is not None:
            write_evidence(ctx, parts)

    refresh()
    failed_now: list[str] = []
    for index, part in enumerate(parts, 1):
        record = state["parts"].setdefault(part.name, {"status": "pending"})
        status = record.get("status", "pending")
        label = f"campaign: part {index}/{len(parts)} {part.name}"
        if status in ("done", "cut-off"):
            echo(f"{label}: {status} in an earlier call")
            continue
        if status == "failed" and not retry_failed:
            echo(f"{label}: failed in an earlier call ({record.get('error')}); --retry-failed runs it again")
            continue
        blocked = [n for n in part.needs if state["parts"].get(n, {}).get("status") not in ("done", "cut-off")]
        if blocked:
            record.update(status="skipped", error=f"needs {', '.join(blocked)}, which did not finish")
            echo(f"{label}: skipped ({record['error']})")
            refresh()
            continue
        left = deadline - time.monotonic()
        if left < 1:
            record.update(status="pending", error=f"not started: --max-minutes {max_minutes:g} ran out")
            echo(f"{label}: not started (--max-minutes {max_minutes:g} ran out); run the same command again")
            refresh()
            continue
        part_started = time.monotonic()
        ctx.part, ctx.deadline = part, min(part_started + shares[part.name], deadline)
        record.update(status="running", calls=record.get("calls", 0) + 1, budget_seconds=round(shares[part.name], 1))
        record.pop("error", None)
        call["parts_run"].append(part.name)
        echo(f"{label}: {part.title} (budget {shares[part.name]:.0f} s)")
        save_state(out, state)
        try:
            summary = part.run(ctx)
            record["status"] = "done"
        except DeadlineReached:
            summary = part.partial(ctx) if part.partial is not None else {}
            summary.setdefault("line", "cut off at its budget: nothing measured")
            record["status"] = "cut-off"
        except PartSkipped as exc:
            summary = None
            record.update(status="skipped", error=str(exc))
        except (PartFailed, UsageError) as exc:
            summary = None
            record.update(status="failed", error=str(exc))
            failed_now.append(part.name)
        record["wall_seconds"] = round(time.monotonic() - part_started, 1)
        if summary is not None:
            record.update(summary=summary, finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        refresh()
        if record["status"] in ("failed", "skipped"):
            echo(f"campaign: part {part.name} {record['status'].upper()} after {record['wall_seconds']:.0f} s: "
                 f"{record['error']}")
        else:
            echo(f"campaign: part {part.name} {'done' if record['status'] == 'done' else 'CUT OFF at its budget'} "
                 f"in {record['wall_seconds']:.0f} s" + (f": {summary['line']}" if summary.get("line") else ""))
    ctx.part, ctx.deadline = None, deadline
    refresh()
    statuses = {p.name: state["parts"].get(p.name, {}).get("status") for p in parts}
    wall = time.monotonic() - started
    unfinished = [n for n, s in statuses.items() if s not in ("done", "cut-off")]
    cut = [n for n, s in statuses.items() if s == "cut-off"]
    if unfinished:
        echo(f"campaign: finished in {wall:.0f} s with part(s) not done: "
             + ", ".join(f"{n} ({statuses[n]})" for n in unfinished) + f" (see {out / 'README.md'})")
    else:
        echo(f"campaign: done in {wall:.0f} s" + (f"; cut off at their budget: {', '.join(cut)}" if cut else "")
             + f" ({out / 'README.md'})")
    return 1 if failed_now else 0
