"""`compress register`: a run's step into a (temporary) BentoML model store."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")

from compress.cli import main
from compress.errors import UsageError
from compress.registry import choose_step, register, sanitize_name


def _store_model(home: Path, tag: str):
    from compress.registry import model_store

    return model_store(home).get(tag)


def _register_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    main(["register", *args])
    return capsys.readouterr().out.strip().splitlines()[-1]


def test_register_default_step_stores_onnx_and_metadata(tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "home"))
    tag = _register_cli([str(tiny_run)], capsys)
    name, _, version = tag.partition(":")
    assert name == sanitize_name(tiny_run.name) and version
    manifest = json.loads((tiny_run / "manifest.json").read_text())
    step = manifest["report"]["recommended_step"]
    entry = next(s for s in manifest["steps"] if s["step"] == step)

    model = _store_model(tmp_path / "home", tag)
    meta = model.info.metadata
    assert meta["classes"] == manifest["dataset"]["classes"] == ["cat", "dog", "owl"]
    assert meta["preprocessing"]["input_size"] == manifest["preprocessing"]["input_size"]
    assert meta["preprocessing"]["mean"] == manifest["preprocessing"]["mean"]
    assert meta["step"] == step and meta["accuracy"] == entry["accuracy"]
    assert meta["macs"] == entry["macs"] and meta["params"] == entry["params"]
    assert meta["latency"]["ort_cpu_b1_p50_ms"] > 0
    assert meta["files"] == {"fp32": "model.onnx"}
    assert model.info.labels["step"] == str(step)
    stored = Path(model.path_of("model.onnx"))
    assert stored.read_bytes() == (tiny_run / entry["onnx"]).read_bytes()


def test_register_step_and_name_and_fp16(tiny_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "My Run (v2)"
    shutil.copytree(tiny_run, run)
    manifest = json.loads((run / "manifest.json").read_text())
    step0 = manifest["steps"][0]
    fp16 = Path(step0["onnx"]).with_name("model_fp16.onnx")
    shutil.copyfile(run / step0["onnx"], run / fp16)  # stands in for an fp16 export
    step0["onnx_fp16"] = fp16.as_posix()
    (run / "manifest.json").write_text(json.dumps(manifest))

    tag = register(run, step=0, name="cats-v2", bentoml_home=tmp_path / "home")
    assert tag.startswith("cats-v2:")
    model = _store_model(tmp_path / "home", tag)
    assert model.info.metadata["step"] == 0
    assert model.info.metadata["files"] == {"fp32": "model.onnx", "fp16": "model_fp16.onnx"}
    assert Path(model.path_of("model_fp16.onnx")).is_file()
    # default name: the run directory's name, made a valid tag
    assert register(run, step=1, bentoml_home=tmp_path / "home").startswith("my-run-v2:")


@pytest.mark.parametrize("args, message", [
    (["{missing}"], "no such run directory"),
    (["{run}", "--name", "Bad Name!"], "not a valid model name"),
    (["{run}", "--step", "9"], "no such step"),
    (["{plain}"], "not a run directory"),
])
def test_register_errors_are_one_line_exit_2(tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "home"))
    (tmp_path / "plain").mkdir()
    paths = {"missing": tmp_path / "nope", "run": tiny_run, "plain": tmp_path / "plain"}
    with pytest.raises(SystemExit) as exit_info:
        main(["register", *[a.format(**paths) for a in args]])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err


def test_register_refuses_a_step_without_onnx(tiny_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["steps"][1]["onnx"] = None
    (run / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UsageError, match="not exported"):
        register(run, step=1, bentoml_home=tmp_path / "home")
    (run / manifest["steps"][0]["onnx"]).unlink()
    with pytest.raises(UsageError, match="missing"):
        register(run, step=0, bentoml_home=tmp_path / "home")


def _steps(*rows: tuple[int, int, float, bool]) -> list[dict]:
    return [{"step": s, "macs": m, "accuracy": a, "onnx": f"steps/{s}.onnx" if exported else None}
            for s, m, a, exported in rows]


def test_choose_step() -> None:
    steps = _steps((0, 100, 0.90, True), (1, 60, 0.895, True), (2, 30, 0.885, True), (3, 10, 0.70, True))
    assert choose_step({"steps": steps}) == 1  # step 2 is 1.5 points below step 0
    assert choose_step({"steps": steps, "report": {"recommended_step": 3}}) == 3
    assert choose_step({"steps": _steps((0, 100, 0.9, True), (1, 50, 0.9, False))}) == 0
    with pytest.raises(UsageError):
        choose_step({"steps": _steps((0, 100, 0.9, False))})


@pytest.mark.parametrize("text, expected", [
    ("run", "run"), ("My Run (v2)", "my-run-v2"), ("__x__", "x"), ("...", "model"), ("a" * 80, "a" * 63),
    ("cifar10.resnet18", "cifar10.resnet18"),
])
def test_sanitize_name(text: str, expected: str) -> None:
    assert sanitize_name(text) == expected
