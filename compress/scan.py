"""Scanning an image folder without decoding it: file list, labels, headers, skipped files.

Why: decoding every image once at open time costs an hour on ImageNet's 1.28 M files, and
was paid again by every command that opened a run. Here a first scan reads only each file's
header (size, mode, format; PIL parses it without decoding pixels) plus the last KiB of JPEG
and PNG files, where a complete file has its end marker: a file cut short (the common damage,
an interrupted copy or download) is then decoded to decide, so the scan skips what a full
decode would have skipped, at the price of a header read. Headers are read in parallel on
all cores, with a progress bar.

The result is a :class:`ScanRecord`, stored in the run directory (``data_scan.json.gz``).
Reopening lists the folders and stats the files (no image is opened) and compares every
file's path, size and modification time with the record: an unchanged folder is taken from
the record; new or changed files are read again, removed ones dropped. A file whose damage
the header cannot show is skipped when it fails to decode during training (see
``data.DecodeFailure``)."""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from PIL import Image
from rich.console import Console

from .imaging import DEFAULT_MAX_PIXELS, open_rgb
from .rundir import atomic_write_bytes

RECORD_FORMAT = 1
TAIL_BYTES = 1024
END_MARKERS = {"JPEG": b"\xff\xd9", "MPO": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82"}
"""Formats whose complete files end with a marker (JPEG's EOI, PNG's IEND chunk). Trailing
bytes after it are allowed (some cameras append data), hence a search of the last KiB."""
PARALLEL_FROM = 256  # fewer files than this are read in this process: a pool costs more than it saves
CHUNK = 128
console = Console(stderr=True)


@dataclass(frozen=True)
class FileInfo:
    """One candidate file: where it is and its ``os.stat`` identity (how a change is noticed)."""

    path: str  # relative to the data root, '/'-separated
    bytes: int
    mtime_ns: int


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def read_header(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int, str, str]:
    """(width, height, mode, format) of an image file from its header; raises for what is not
    a usable image (not an image, over ``max_pixels``, or cut short: decoded to decide)."""
    with Image.open(path) as image:
        width, height, mode, fmt = image.width, image.height, image.mode, image.format or "?"
        if width * height > max_pixels:
            raise ValueError(f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}")
        marker = END_MARKERS.get(fmt)
        if marker is not None:
            handle = image.fp
            size = handle.seek(0, os.SEEK_END)
            handle.seek(max(0, size - TAIL_BYTES))
            complete = marker in handle.read()
    if marker is not None and not complete:
        open_rgb(path, max_pixels=max_pixels)  # no end marker: only a decode can tell
    return width, height, mode, fmt


def _read_headers(paths: Sequence[str]) -> list[list[Any]]:
    """Worker: one ``[width, height, mode, format]`` or ``[reason]`` per path."""
    results: list[list[Any]] = []
    for path in paths:
        try:
            results.append(list(read_header(path)))
        except Exception as exc:  # any decoder/IO error means "not a usable image"
            results.append([_reason(exc)])
    return results


def _workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def read_headers(paths: Sequence[str], *, label: str = "scanning", workers: int | None = None) -> list[list[Any]]:
    """``_read_headers`` over all ``paths``, in parallel processes with a progress bar."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    workers = workers or _workers()
    if len(paths) < PARALLEL_FROM or workers < 2:
        return _read_headers(paths)
    chunks = [paths[i:i + CHUNK] for i in range(0, len(paths), CHUNK)]
    results: list[list[Any]] = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=console, transient=False) as progress, \
            ProcessPoolExecutor(max_workers=workers) as pool:
        task = progress.add_task(f"{label} (headers, {workers} processes)", total=len(paths))
        for chunk, result in zip(chunks, pool.map(_read_headers, chunks)):
            results.extend(result)
            progress.advance(task, len(chunk))
    return results


def list_files(root: Path, folders: Iterable[Path]) -> list[FileInfo]:
    """Every non-hidden file under ``folders`` (ImageFolder's walk: recursive, links followed,
    sorted), with its size and modification time. No file is opened."""
    files: list[FileInfo] = []
    root_text = os.path.join(str(root), "")
    for folder in folders:
        for directory, _, names in sorted(os.walk(folder, followlinks=True)):
            directory = os.path.join(directory, "")
            prefix = directory.removeprefix(root_text).replace(os.sep, "/")
            for name in sorted(names):
                if name.startswith("."):
                    continue
                try:
                    stat = os.stat(directory + name)
                except OSError:  # a dangling link or a file removed while listing
                    continue
                files.append(FileInfo(prefix + name, stat.st_size, stat.st_mtime_ns))
    return files


def fingerprint(files: Sequence[FileInfo]) -> str:
    """One hash of every file's path, size and modification time: equal means unchanged."""
    digest = hashlib.sha256()
    for info in files:
        digest.update(f"{info.path}\0{info.bytes}\0{info.mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


@dataclass
class ScanRecord:
    """What a scan found: per file either its header or why it was skipped."""

    root: str
    fingerprint: str = ""
    headers: dict[str, list[Any]] = field(default_factory=dict)  # path -> [bytes, mtime_ns, w, h, mode, format]
    skipped: dict[str, list[Any]] = field(default_factory=dict)  # path -> [bytes, mtime_ns, reason]
    stats: dict[str, Any] = field(default_factory=dict)  # how this record was made (files read, seconds, reused)

    def to_json(self) -> dict[str, Any]:
        return {"format": RECORD_FORMAT, "root": self.root, "fingerprint": self.fingerprint, "stats": self.stats,
                "headers": self.headers, "skipped": self.skipped}

    def save(self, path: Path) -> None:
        data = json.dumps(self.to_json(), separators=(",", ":")).encode()
        atomic_write_bytes(path, gzip.compress(data, compresslevel=3, mtime=0))

    @classmethod
    def load(cls, path: Path) -> "ScanRecord | None":
        """The record at ``path``, or None when there is none or it cannot be used (a torn or
        foreign file only costs a new scan)."""
        try:
            data = json.loads(gzip.decompress(Path(path).read_bytes()))
        except (OSError, EOFError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("format") != RECORD_FORMAT:
            return None
        return cls(data["root"], data["fingerprint"], data["headers"], data["skipped"], data.get("stats", {}))

    def skipped_list(self) -> list[dict[str, str]]:
        return [{"path": p, "reason": entry[2]} for p, entry in sorted(self.skipped.items())]

    def sizes(self) -> list[tuple[int, int]]:
        return [(entry[2], entry[3]) for entry in self.headers.values()]


def scan(root: Path, folders: Sequence[Path], previous: ScanRecord | None = None) -> ScanRecord:
    """Scan ``folders`` (under ``root``): list and stat every file, reuse what ``previous``
    knows about files unchanged since (same path, size, mtime), read the headers of the rest."""
    started = time.perf_counter()
    files = list_files(root, folders)
    current = fingerprint(files)
    if previous is not None and previous.fingerprint == current:
        previous.stats = {**previous.stats, "reused": True, "files": len(files), "headers_read": 0,
                          "seconds": round(time.perf_counter() - started, 3)}
        return previous
    known_headers = previous.headers if previous is not None else {}
    known_skipped = previous.skipped if previous is not None else {}
    record = ScanRecord(str(root), current)
    to_read: list[FileInfo] = []
    for info in files:
        old = known_headers.get(info.path) or known_skipped.get(info.path)
        if old is not None and old[0] == info.bytes and old[1] == info.mtime_ns:
            (record.headers if info.path in known_headers else record.skipped)[info.path] = old
        else:
            to_read.append(info)
    results = read_headers([os.path.join(root, info.path) for info in to_read],
                           label="scanning" if previous is None else "scanning changed files")
    for info, result in zip(to_read, results):
        if len(result) == 1:
            record.skipped[info.path] = [info.bytes, info.mtime_ns, result[0]]
        else:
            record.headers[info.path] = [info.bytes, info.mtime_ns, *result]
    known = set(known_headers) | set(known_skipped)
    record.stats = {"reused": False, "files": len(files), "headers_read": len(to_read),
                    "removed": len(known - {info.path for info in files}) if previous is not None else 0,
                    "seconds": round(time.perf_counter() - started, 3), "processes": _workers(),
                    "scanned": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    return record

