"""``bench campaign``: the GPU evidence as a list of resumable parts, run within a deadline.

A GPU machine is lent now and then, for calls of a few minutes, and starts bare; so the whole
evidence is one command called again and again: each call does the next part(s) within
``--max-minutes``, writes each part's results into the results folder the moment it finishes,
and the next call picks up where the last one stopped. ``campaign: done`` says nothing is left.

Design:
- parts are data (:class:`Part`, listed in :mod:`bench.campaign_parts`): a name, what it runs,
  the minutes it is planned to take on the GPU (and in the CPU smoke), whether an interrupted
  run of it keeps its progress, and which earlier parts' work files it reads;
- every part runs the project's own CLIs as subprocesses (``python -m compress ...``,
  ``python -m bench ...``, ``python -m bentoml serve``), the exact commands recorded with the
  results; at the deadline the running command gets SIGINT (``compress`` then stops after its
  last finished epoch or step, and resumes there next call), then SIGTERM, then SIGKILL;
- two folders: the results folder (small: JSON, Markdown, PNG, logs; meant to be copied back
  and committed) with ``campaign.json`` (the state, written atomically after every command)
  and ``README.md`` (the headline table, rewritten after every part: figures not measured yet
  are named as missing); and the work folder (data, run directories, ONNX files, the model
  store: big, never committed). A part whose work files are gone (a fresh machine) while a later
  part still needs them is run again.
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
from typing import Any, Callable, Iterator, Sequence

from compress.errors import UsageError
from compress.rundir import atomic_write_json

STATE = "campaign.json"
STATE_FORMAT = 1
REPO = Path(__file__).resolve().parents[1]


class DeadlineReached(Exception):
    """The call's ``--max-minutes`` ran out while a part was running (its progress is kept)."""


class PartFailed(Exception):
    """A command of a part failed; the message says which and where its log is."""


@dataclass(frozen=True)
class Part:
    """One part of the campaign.

    ``run`` does the work through :class:`Context` (commands it runs are recorded, skipped on a
    later call once finished) and returns the part's summary: the figures the README's
    headline table reads. ``outputs`` lists the work files later parts read (a part done on a
    machine that has gone away is redone when a later part needs them). ``resumable``: a run
    interrupted by the deadline keeps its progress, so the part may start with less time left
    than planned."""

    name: str
    title: str
    gpu_minutes: float
    smoke_minutes: float
    run: Callable[["Context"], dict[str, Any]]
    resumable: bool = False
    needs: tuple[str, ...] = ()
    outputs: Callable[["Context"], list[Path]] = lambda ctx: []
    smoke_only_note: str = ""

    def minutes(self, smoke: bool) -> float:
        return self.smoke_minutes if smoke else self.gpu_minutes


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


def format_minutes(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


# --- the driver ------------------------------------------------------------------------------
def check_cuda() -> str | None:
    """Why the full campaign cannot run here (no CUDA device, or no ORT CUDA provider), or None."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device: run on a GPU machine, or --smoke"
    from compress.runtime.sessions import cuda_unavailable_reason

    reason = cuda_unavailable_reason()
    if reason is not None:
        return f"no CUDA for ONNX Runtime ({reason}): install onnxruntime-gpu, or --smoke"
    return None


def open_state(out: Path, work: Path, smoke: bool, data: str) -> dict[str, Any]:
    state = load_state(out)
    profile = "smoke" if smoke else "gpu"
    if state is None:
        if out.is_dir() and any(p for p in out.iterdir() if not p.name.startswith(".")):
            raise UsageError(f"--out {out} exists, is not empty and holds no {STATE}: use another --out")
        return new_state(smoke, data, work)
    if state.get("kind") != "bench-campaign":
        raise UsageError(f"{out / STATE} is not a campaign state file")
    if state.get("profile") != profile:
        raise UsageError(f"{out} holds a {state.get('profile')} campaign; this call is a {profile} one: use another --out")
    if state.get("data") != data:
        raise UsageError(f"{out} was started with --data {state.get('data')}, not {data}: use the same data or another --out")
    state["work"] = str(work)
    return state


def invalidate_lost_work(parts: Sequence[Part], ctx: Context) -> list[str]:
    """Parts done on a machine whose work folder is gone, whose files a pending part needs:
    marked pending again (their results stay until they are redone). Returns their names."""
    redo: list[str] = []
    pending = {p.name for p in parts if ctx.state["parts"].get(p.name, {}).get("status") != "done"}
    changed = True
    while changed:  # a redone part makes the parts it needs needed again
        changed = False
        needed = {n for p in parts if p.name in pending for n in p.needs}
        for part in parts:
            record = ctx.state["parts"].get(part.name, {})
            if part.name in needed and record.get("status") == "done":
                ctx.part = part
                missing = [path for path in part.outputs(ctx) if not path.exists()]
                if missing:
                    record.update(status="pending", finished=[], redo_reason=f"work files missing: {missing[0]}")
                    pending.add(part.name)
                    redo.append(part.name)
                    changed = True
    ctx.part = None
    return redo


def run_campaign(parts: Sequence[Part], *, out: Path, work: Path, data: str, smoke: bool, max_minutes: float,
                 settings: dict[str, Any], retry_failed: bool = False, echo: Callable[[str], None] = print,
                 write_readme: Callable[[Context, Sequence[Part]], None] | None = None) -> int:
    """Run the next parts within ``max_minutes``; returns the exit code (0, or 1 when a part failed)."""
    started = time.monotonic()
    # commands stop this much before --max-minutes, so that a graceful stop (SIGINT, then SIGTERM,
    # each given the grace period) and the last writes still end within it
    reserve = min(2 * settings["grace_seconds"] + 10, 0.25 * max_minutes * 60)
    deadline = started + max_minutes * 60 - reserve
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    state = open_state(out, work, smoke, data)
    ctx = Context(out=out, work=work, smoke=smoke, settings=settings, deadline=deadline, state=state, echo=echo)
    from compress.runtime.machine import machine_info

    if smoke:
        ctx.extra_env["CUDA_VISIBLE_DEVICES"] = ""  # the rehearsal runs on the CPU even where a GPU is
    call = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "max_minutes": max_minutes, "argv": sys.argv[1:],
            "machine": machine_info(), "parts_run": []}
    state["calls"].append(call)
    state["machine"] = call["machine"]
    for name in invalidate_lost_work(parts, ctx):
        echo(f"campaign: part {name} is run again: {state['parts'][name]['redo_reason']}")
    save_state(out, state)
    failed_now: list[str] = []
    ran = 0

    def refresh() -> None:
        save_state(out, state)
        if write_readme is not None:
            write_readme(ctx, parts)

    for index, part in enumerate(parts, 1):
        record = state["parts"].setdefault(part.name, {"status": "pending"})
        status = record.get("status", "pending")
        if status == "done":
            echo(f"campaign: part {index}/{len(parts)} {part.name}: done in an earlier call")
            continue
        if status == "failed" and not retry_failed:
            echo(f"campaign: part {index}/{len(parts)} {part.name}: failed in an earlier call ({record.get('error')}); "
                 "--retry-failed runs it again")
            continue
        blocked = [n for n in part.needs if state["parts"].get(n, {}).get("status") != "done"]
        if blocked:
            echo(f"campaign: part {index}/{len(parts)} {part.name}: waits for {', '.join(blocked)}")
            if any(state["parts"].get(n, {}).get("status") == "failed" for n in blocked):
                continue
            break
        left = ctx.remaining()
        planned = part.minutes(smoke) * 60
        minimum = settings["min_resumable_seconds"]
        if ran and not (left >= planned or (part.resumable and left >= minimum)):
            echo(f"campaign: stopped before part {index}/{len(parts)} {part.name} (planned {planned / 60:.1f} min, "
                 f"{max(left, 0) / 60:.1f} min left of --max-minutes {max_minutes:g}); run the same command again")
            refresh()
            return 1 if failed_now else 0
        ctx.part = part
        record.update(status="running", calls=record.get("calls", 0) + 1)
        record.setdefault("planned_minutes", part.minutes(smoke))
        call["parts_run"].append(part.name)
        echo(f"campaign: part {index}/{len(parts)} {part.name}: {part.title} (planned {planned / 60:.1f} min; "
             f"{max(left, 0) / 60:.1f} min left)")
        save_state(out, state)
        part_started = time.monotonic()
        try:
            summary = part.run(ctx)
        except DeadlineReached:
            record["wall_seconds"] = round(record.get("wall_seconds", 0.0) + time.monotonic() - part_started, 1)
            record["status"] = "interrupted"
            refresh()
            echo(f"campaign: deadline (--max-minutes {max_minutes:g}) reached in part {part.name}; its progress is "
                 "kept: run the same command again to continue")
            return 1 if failed_now else 0
        except (PartFailed, UsageError) as exc:
            record["wall_seconds"] = round(record.get("wall_seconds", 0.0) + time.monotonic() - part_started, 1)
            record.update(status="failed", error=str(exc))
            failed_now.append(part.name)
            refresh()
            echo(f"campaign: part {part.name} FAILED: {exc}")
            ran += 1
            continue
        record["wall_seconds"] = round(record.get("wall_seconds", 0.0) + time.monotonic() - part_started, 1)
        record.update(status="done", summary=summary, finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        record.pop("error", None)
        record.pop("redo_reason", None)
        ran += 1
        refresh()
        echo(f"campaign: part {part.name} done in {format_minutes(record['wall_seconds'])}"
             + (f": {summary['line']}" if summary.get("line") else ""))
    ctx.part = None
    refresh()
    statuses = {p.name: state["parts"].get(p.name, {}).get("status") for p in parts}
    failed = [n for n, s in statuses.items() if s == "failed"]
    total = sum(state["parts"].get(p.name, {}).get("wall_seconds", 0.0) for p in parts)
    if failed:
        echo(f"campaign: finished with {len(failed)} failed part(s): {', '.join(failed)} (see {out / 'README.md'}; "
             "after a fix, run again with --retry-failed)")
        return 1
    if all(s == "done" for s in statuses.values()):
        echo(f"campaign: done (parts' wall time {format_minutes(total)}; {out / 'README.md'})")
        return 0
    return 0


def iter_parts_status(ctx: Context, parts: Sequence[Part]) -> Iterator[tuple[Part, dict[str, Any]]]:
    for part in parts:
        yield part, ctx.state["parts"].get(part.name, {})
