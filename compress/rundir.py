"""The run directory: atomic file writes, the manifest, and safe checkpoint I/O (torch imported
only there, so commands that need no model can use the rest).

Every file a run produces goes through :func:`atomic_write_bytes` (temp file in the same
folder, fsync, rename) so that a run killed at any moment leaves either the old file or the
new one, never half of one. ``manifest.json`` is the only contract between stages."""
from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from .errors import UsageError

MANIFEST = "manifest.json"


def _file_mode() -> int:
    """0666 minus the umask, as ``open()`` would give (``mkstemp`` makes files 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


FILE_MODE = _file_mode()
FORMAT_VERSION = 1


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def atomic_write_with(path: Path, writer: Callable[[Path], None]) -> None:
    """Let ``writer`` produce a file at a temporary path (for libraries that want a file name,
    e.g. ``torch.onnx.export`` or ``matplotlib``), then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix or ".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer(Path(tmp))
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def save_torch(path: Path, obj: Any) -> None:
    """``torch.save`` through an in-memory buffer and an atomic rename."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_torch_safely(path: Path, *, trust_pickle: bool = False) -> Any:
    """Load a torch file with ``weights_only=True`` (tensors and plain containers only), so a
    checkpoint from somewhere else cannot run code; ``trust_pickle`` is the explicit opt-in."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as exc:  # pickle.UnpicklingError, RuntimeError from a torn/foreign file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = "" if trust_pickle else " (if you trust this file and it holds a pickled model, pass --trust-pickle)"
        raise UsageError(f"cannot load checkpoint {path}: {first}{hint}") from None


def read_manifest(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path} is not valid JSON ({exc.msg}); move it away or use --force") from None


def require_manifest(run_dir: Path) -> dict[str, Any]:
    manifest = read_manifest(run_dir)
    if manifest is None:
        raise UsageError(f"{run_dir} is not a run directory (no {MANIFEST}); run `compress run` first")
    return manifest


def write_manifest(run_dir: Path, manifest: dict[str, Any]) -> None:
    manifest.setdefault("format", FORMAT_VERSION)
    atomic_write_json(Path(run_dir) / MANIFEST, manifest)


def relative(run_dir: Path, path: Path) -> str:
    return Path(path).resolve().relative_to(Path(run_dir).resolve()).as_posix()
