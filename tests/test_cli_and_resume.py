"""The `compress` CLI: a full run on tiny data, its manifest and report, error paths without
tracebacks, config files, and resuming after `kill -9`."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from compress.cli import main
from compress.config import RunConfig, resolve_config
from compress.errors import UsageError

from conftest import TINY_OPTIONS, make_image_folder

CLI = [sys.executable, "-m", "compress.cli"]


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def test_full_run_writes_the_contract(tiny_run: Path) -> None:
    manifest = json.loads((tiny_run / "manifest.json").read_text())
    dataset = manifest["dataset"]
    assert dataset["classes"] == ["cat", "dog", "owl"]
    assert dataset["train"] + dataset["val"] == 48 and dataset["skipped_files"] == []
    assert manifest["config"]["arch"] == "resnet20" and manifest["config"]["prune_steps"] == 1
    assert {"torch", "torchvision", "torch-pruning", "onnx", "onnxruntime-gpu"} <= set(manifest["versions"])
    steps = manifest["steps"]
    assert [s["step"] for s in steps] == [0, 1]
    for step in steps:
        assert isinstance(step["macs"], int) and isinstance(step["params"], int)
        assert 0.0 <= step["accuracy"] <= 1.0
        assert (tiny_run / step["checkpoint"]).is_file() and (tiny_run / step["onnx"]).is_file()
        assert not Path(step["onnx"]).is_absolute()
        assert step["parity"]["max_abs_diff"] <= 1e-4 and step["parity"]["top1_agreement"] == 1.0
    assert steps[1]["macs"] <= 0.6 * steps[0]["macs"]
    assert steps[1]["params"] < steps[0]["params"]
    report = (tiny_run / "report.md").read_text()
    assert "| ort-cpu | 1 | 1 | fp32 |" in report and "speed-up vs step 0 fp32" in report
    for step in steps:  # every run measures its fp32 variant through ONNX Runtime on the whole validation split
        fp32 = step["variants"]["fp32"]
        assert fp32["onnx"] == step["onnx"] and 0.0 <= fp32["accuracy"] <= 1.0 and fp32["top1_agreement"] == 1.0
    with Image.open(tiny_run / "pareto.png") as image:
        assert image.format == "PNG" and image.size[0] > 300
    assert manifest["report"]["recommended_step"] in (0, 1)
    assert not (tiny_run / "steps" / "step_01" / "train_state.pt").exists()


def test_rerun_of_a_finished_run_keeps_everything(tiny_run: Path, tiny_data: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in tiny_run.glob("steps/*/*")}
    result = run_cli("run", "--data", str(tiny_data), "--out", str(tiny_run), *TINY_OPTIONS)
    assert result.returncode == 0, result.stderr
    assert {p: p.stat().st_mtime_ns for p in tiny_run.glob("steps/*/*")} == before
    assert "already finished" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["run", "--data", "/no/such/folder", "--out", "{tmp}/r"], "no such folder"),
    (["run", "--arch", "resnet7", "--out", "{tmp}/r"], "unknown --arch resnet7"),
    (["run", "--target-macs", "1.5", "--out", "{tmp}/r"], "--target-macs must be in (0, 1]"),
    (["run", "--epochs", "many"], "Invalid value for '--epochs'"),
    (["run", "--no-such-flag"], "No such option"),
    (["run", "--model", "{tmp}/missing.pt", "--out", "{tmp}/r"], "--model {tmp}/missing.pt: no such file"),
    (["run", "--config", "{tmp}/missing.yaml"], "no such file"),
    (["prune", "{tmp}"], "not a run directory"),
    (["run", "--balance", "magic", "--out", "{tmp}/r"], "--balance must be one of"),
])
def test_bad_usage_is_one_line_and_exit_code_2(tmp_path: Path, args: list[str], message: str,
                                               capsys: pytest.CaptureFixture) -> None:
    args = [a.format(tmp=tmp_path) for a in args]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert message.format(tmp=tmp_path) in err


def test_bad_data_through_a_real_process(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", per_class=3)
    for file in (root / "owl").iterdir():
        file.unlink()
    result = run_cli("run", "--data", str(root), "--out", str(tmp_path / "r"))
    assert result.returncode == 2
    assert result.stderr.strip() == "compress: error: class 'owl' has 0 readable image(s) in " \
        f"{root}; at least 2 needed"
    assert "Traceback" not in result.stdout + result.stderr


def test_config_file_with_cli_overrides(tmp_path: Path) -> None:
    config_file = tmp_path / "c.yaml"
    config_file.write_text("arch: resnet20\nepochs: 7\nretrain-epochs: 2\ntarget_macs: 0.5\n")
    config = resolve_config({"epochs": 3, "arch": None}, config_file)
    assert (config.arch, config.epochs, config.retrain_epochs, config.target_macs) == ("resnet20", 3, 2, 0.5)
    assert config.lr == RunConfig().lr
    config_file.write_text("arch: resnet20\nlearning_speed: 9\n")
    with pytest.raises(UsageError, match="unknown option.*learning_speed"):
        resolve_config({}, config_file)
    config_file.write_text("epochs: [1, 2]\n")
    with pytest.raises(UsageError, match="not a valid int"):
        resolve_config({}, config_file)


def test_same_run_dir_with_other_options_needs_force(tiny_run: Path, tiny_data: Path, tmp_path: Path) -> None:
    options = [o if o != "0.6" else "0.5" for o in TINY_OPTIONS]
    result = run_cli("run", "--data", str(tiny_data), "--out", str(tiny_run), *options)
    assert result.returncode == 2
    assert "was made with other options: target_macs (0.6 -> 0.5)" in result.stderr
    assert "--force" in result.stderr
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "keep.txt").write_text("mine")
    result = run_cli("run", "--data", str(tiny_data), "--out", str(tmp_path / "junk"), *TINY_OPTIONS)
    assert result.returncode == 2 and "not a run directory" in result.stderr
    assert (tmp_path / "junk" / "keep.txt").read_text() == "mine"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _kill_when(process: subprocess.Popen, condition, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"run ended before the kill point: {process.stderr.read()}"
        assert time.monotonic() < deadline, "kill point not reached in time"
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()


@pytest.mark.slow
def test_kill_9_at_two_points_then_resume_finishes_the_same_steps(tmp_path: Path, tiny_data: Path) -> None:
    out = tmp_path / "run"
    args = ["run", "--data", str(tiny_data), "--out", str(out), *TINY_OPTIONS]
    args[args.index("--epochs") + 1] = "3"
    args[args.index("--prune-steps") + 1] = "2"

    def manifest() -> dict:
        return json.loads((out / "manifest.json").read_text())

    # 1: killed during fine-tuning, right after the first epoch's state was written
    process = subprocess.Popen([*CLI, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _kill_when(process, lambda: (out / "steps" / "step_00" / "train_state.pt").exists())
    assert manifest()["steps"] == []  # nothing finished, and the manifest is whole JSON

    # 2: resumed, then killed once step 0 is finished (while step 1 is being made)
    process = subprocess.Popen([*CLI, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _kill_when(process, lambda: (out / "manifest.json").exists() and any(
        s["step"] == 0 and s.get("onnx") for s in manifest()["steps"]))
    step0 = next(s for s in manifest()["steps"] if s["step"] == 0)
    step0_hash = _sha(out / step0["checkpoint"])

    # 3: resumed to the end
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    final = manifest()
    assert [s["step"] for s in final["steps"]] == [0, 1, 2]
    assert all(s["onnx"] and s["parity"] for s in final["steps"])
    assert _sha(out / final["steps"][0]["checkpoint"]) == step0_hash, "a finished step was redone"
    epochs = [h["epoch"] for h in final["stages"]["finetune"]["history"]]
    assert epochs == [0, 1, 2], "fine-tuning resumed after its last finished epoch"
    assert final["steps"][2]["macs"] <= 0.6 * final["steps"][0]["macs"]
    assert (out / "report.md").exists() and (out / "pareto.png").exists()
    assert not list(out.rglob("*.tmp")) and not list(out.rglob(".*.tmp"))


def test_stages_one_by_one(tmp_path: Path, tiny_data: Path) -> None:
    """`compress finetune`, then `prune`, `export` and `report` on RUN_DIR alone."""
    out = tmp_path / "staged"
    main(["finetune", "--data", str(tiny_data), "--out", str(out), *TINY_OPTIONS])
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["step"] for s in manifest["steps"]] == [0] and manifest["steps"][0]["onnx"] is None
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(out)])
    assert exit_info.value.code == 2
    main(["prune", str(out)])
    main(["export", str(out)])
    main(["report", str(out)])
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["step"] for s in manifest["steps"]] == [0, 1]
    assert all(s["onnx"] and s["parity"]["max_abs_diff"] <= 1e-4 for s in manifest["steps"])
    assert manifest["report"]["recommended_step"] in (0, 1) and (out / "report.md").exists()
