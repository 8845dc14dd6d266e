"""Commands that need no model start without the heavy libraries (issue 22).

Each command runs in a fresh interpreter, as a user starts it; the interpreter itself reports
which modules were imported when it exited, so a top-level ``import torch`` added back
anywhere on a command's start-up path fails here."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from compress.data_index import stratified_split
from compress.errors import UsageError

from conftest import make_image_folder

HEAVY = ("torch", "torchvision", "torch_pruning", "onnx", "onnxruntime", "matplotlib", "bentoml", "openvino",
         "sklearn", "scipy")

# Runs a console entry point like its script does, then prints the top-level packages loaded.
PROBE = """
import atexit, json, sys
atexit.register(lambda: print("\\nMODULES=" + json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})), file=sys.stderr))
from {module}.cli import main
sys.argv = [{prog!r}] + {args!r}
main()
"""


def loaded_modules(prog: str, args: list[str]) -> tuple[int, str, set[str]]:
    code = PROBE.format(module=prog, prog=prog, args=args)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    line = next(x for x in reversed(done.stderr.splitlines()) if x.startswith("MODULES="))
    return done.returncode, done.stdout, set(json.loads(line[len("MODULES="):]))


def _commands(prog: str) -> list[str]:
    module = __import__(f"{prog}.cli", fromlist=["app"])
    return sorted(c.name or c.callback.__name__.replace("_", "-") for c in module.app.registered_commands)


@pytest.mark.parametrize("prog", ["compress", "bench"])
def test_every_help_starts_without_heavy_libraries(prog: str) -> None:
    commands = _commands(prog)
    assert len(commands) >= 6, commands  # the listing itself works (a renamed command shows up here)
    for args in [["--help"]] + [[name, "--help"] for name in commands]:
        code, out, modules = loaded_modules(prog, args)
        assert code == 0 and "Usage:" in out, (args, out)
        assert not modules & set(HEAVY), f"`{prog} {' '.join(args)}` imported {sorted(modules & set(HEAVY))}"


@pytest.mark.parametrize("layout", ["split", "train+val"])
def test_compress_data_scans_a_folder_without_heavy_libraries(tmp_path: Path, layout: str) -> None:
    if layout == "split":
        root = make_image_folder(tmp_path / "d", per_class=8, fmt="jpg")
    else:
        root = tmp_path / "d"
        make_image_folder(root / "train", per_class=6)
        make_image_folder(root / "val", per_class=3, seed=1)
    code, out, modules = loaded_modules("compress", ["data", str(root), "--json"])
    assert code == 0, out
    info = json.loads(out)
    assert info["layout"] == layout and info["train"] + info["val"] == (24 if layout == "split" else 27)
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))
    assert {"PIL", "numpy"} <= modules  # the scan did run


@pytest.mark.parametrize("seed", range(6))
def test_stratified_split_is_scikit_learns(seed: int) -> None:
    """Runs made before this module keep their validation images on resume: the split is
    scikit-learn's ``train_test_split(stratify=...)``, index for index, without importing it."""
    from sklearn.model_selection import train_test_split

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, rng.integers(2, 12), rng.integers(30, 400)).tolist()
    labels += sorted(set(labels)) * 2  # every class at least twice
    compared = 0
    for fraction in (0.05, 0.1, 0.2, 0.25, 1 / 3, 0.5):
        try:
            train, val = train_test_split(np.arange(len(labels)), test_size=fraction, random_state=seed,
                                          stratify=np.asarray(labels))
        except ValueError:  # too few images for the classes: ours refuses too, as a usage error
            with pytest.raises(UsageError, match="cannot split"):
                stratified_split(labels, fraction, seed)
            continue
        assert stratified_split(labels, fraction, seed) == (sorted(train.tolist()), sorted(val.tolist()))
        compared += 1
    assert compared >= 4
