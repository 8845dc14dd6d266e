"""OpenVINO beside ONNX Runtime (issue 23), for real: the tiny run's own ONNX files (fp32, a QDQ
int8 step 0 and a QOperator int8 step 1, as `compress run --int8-format auto` can leave them) on
OpenVINO's CPU plugin in `bench models`, the closing report's "Against the alternatives", and a
real `bentoml serve` with SERVE_RUNTIME=openvino answering like ONNX Runtime."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from conftest import run_bench_cli
from test_serve import (Server, Store, _serve_until_exit, server_factory, store)  # noqa: F401
from test_serve import (test_bad_input_gets_4xx_json_and_the_service_keeps_answering,  # noqa: F401
                        test_classify_batch_matches_single_answers, test_every_format_and_mode_matches_direct_onnxruntime)

pytest.importorskip("openvino")


@pytest.fixture(scope="module")
def int8_run(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny run with int8 step 0 in QDQ format and int8 step 1 in QOperator format."""
    from compress.cli import main

    run = tmp_path_factory.mktemp("ov-run") / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("bench"))
    for step, fmt in ((0, "qdq-u8s8"), (1, "qoperator")):
        main(["quantize", str(run), "--steps", str(step), "--calibration-images", "24", "--int8-format", fmt,
              "--max-accuracy-drop", "0.5"])
    return run


def _manifest(run: Path) -> dict[str, Any]:
    return json.loads((run / "manifest.json").read_text())


def test_openvino_reads_our_fp32_and_qdq_files_and_refuses_qoperator(int8_run: Path) -> None:
    from compress.latency import validation_arrays
    from compress.runtime.openvino_models import OpenVinoModel, OpenVinoUnavailable
    from compress.runtime.sessions import OrtModel

    images, _ = validation_arrays(_manifest(int8_run))
    steps = int8_run / "steps"
    for name in ("step_00/model.onnx", "step_01/model.onnx"):
        ours = OrtModel(steps / name).predict(images)
        exact = OpenVinoModel(steps / name, inference_precision="f32")
        assert exact.describe()["inference_precision"] == "f32" and exact.describe()["num_streams"] == 1
        np.testing.assert_allclose(exact.predict(images), ours, atol=1e-4)  # the export's parity tolerance is 1e-3
        default = OpenVinoModel(steps / name, threads=1)  # OpenVINO's own precision choice (bf16 on AMX CPUs)
        assert default.describe()["intra_op_threads"] == 1
        assert (default.predict(images).argmax(1) == ours.argmax(1)).mean() >= 0.9
    qdq = OpenVinoModel(steps / "step_00/model_int8.onnx", inference_precision="f32")
    ort_int8 = OrtModel(steps / "step_00/model_int8.onnx").predict(images)
    assert (qdq.predict(images).argmax(1) == ort_int8.argmax(1)).mean() >= 0.9
    with pytest.raises(OpenVinoUnavailable, match="step_01/model_int8.onnx.*QOperator.*QLinearConv"):
        OpenVinoModel(steps / "step_01/model_int8.onnx")


def test_bench_models_measures_openvino_beside_onnxruntime(int8_run: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench"
    code, _, err = run_bench_cli(["models", str(int8_run), "--backends", "ort-cpu,openvino", "--batch-sizes", "1,4",
                                  "--min-seconds", "0", "--max-seconds", "1", "--rounds", "3", "--out", str(out)], capsys)
    assert code == 0, err
    doc = json.loads((out / "results.json").read_text())
    measured = {(r["backend"], r["step"], r["precision"], r["batch"]) for r in doc["results"]}
    for batch in (1, 4):
        assert {("openvino", 0, "fp32", batch), ("openvino", 1, "fp32", batch), ("openvino", 0, "int8", batch)} <= measured
        assert ("openvino", 1, "int8", batch) not in measured  # QOperator: skipped, not run under another name
    skipped = [s for s in doc["skipped"] if s["backend"] == "openvino"]
    assert len(skipped) == 1 and "step_01/model_int8.onnx" in skipped[0]["reason"] and "QOperator" in skipped[0]["reason"]
    by_key = {(r["backend"], r["step"], r["precision"], r["batch"]): r for r in doc["results"]}
    val = doc["settings"]["validation_images"]
    for step in (0, 1):
        ov, ort = by_key[("openvino", step, "fp32", 1)], by_key[("ort-cpu", step, "fp32", 1)]
        assert abs(ov["accuracy"] - ort["accuracy"]) <= 1 / val + 1e-9  # accuracy measured through OpenVINO
        assert ov["device"].startswith("OpenVINO CPU") and ov["intra_op_threads"] == ort["intra_op_threads"]
    report = (out / "report.md").read_text()
    assert "openvino int8: OpenVINO cannot read step_01/model_int8.onnx" in report


def test_speedup_on_the_openvino_backend(int8_run: Path) -> None:
    """What `compress run --target-speedup ... --latency-backend openvino` steers by."""
    from compress.config import RunConfig
    from compress.latency import measure_step_speedup

    RunConfig(latency_backend="openvino").validate()
    measured = measure_step_speedup(int8_run, _manifest(int8_run), 1, backend="openvino", min_seconds=0.1, max_seconds=1)
    assert measured["backend"] == "openvino" and measured["device"].startswith("OpenVINO CPU")
    assert measured["speedup"] > 0 and measured["p50_ms"] > 0


def test_report_puts_the_steps_against_the_alternatives(int8_run: Path, tmp_path: Path) -> None:
    from compress.cli import main
    from compress.render import recommend

    run = tmp_path / "run"
    shutil.copytree(int8_run, run)
    # step 1 int8 (QOperator, which OpenVINO cannot read) recommended: its QDQ twin runs on OpenVINO
    manifest = _manifest(run)
    main(["report", str(run)])
    doc = json.loads((run / "report.json").read_text())
    section = doc["alternatives"]
    assert section["available"] and section["batches"] == [1, 8]
    recommended = recommend(doc, "ort-cpu", 1)
    labels = {r["label"] for r in section["rows"]}
    assert "step 0 fp32 on ONNX Runtime" in labels and "step 0 int8 on OpenVINO" in labels  # step 0's own QDQ file
    assert any(label.startswith(f"step {recommended[0]} {recommended[1]} on OpenVINO") for label in labels)
    for batch in (1, 8):
        rows = [r for r in section["rows"] if r["batch"] == batch]
        assert len(rows) == len(labels) and rows[0]["role"] == "baseline" and rows[0]["speedup"] == 1.0
        for row in rows:
            assert 0 <= row["accuracy"] <= 1 and row["latency"]["p50_ms"] > 0
            threads = row["session"]["intra_op_threads"]  # OpenVINO reads back its count; ORT may say "ort default"
            assert (isinstance(threads, int) and threads >= 1) or (row["backend"] == "ort-cpu" and threads == "ort default")
        assert section["fastest"][str(batch)]["label"] in labels
    ov_rows = [r for r in section["rows"] if r["backend"] == "openvino"]
    assert {r["session"]["num_streams"] for r in ov_rows} == {1}
    text = (run / "report.md").read_text()
    assert "## Against the alternatives" in text and "Fastest within 1 point of step 0 fp32's accuracy" in text
    assert "spinning off" in text and "latency hint, 1 stream" in text
    if recommended == (1, "int8"):
        twin = run / "alternatives" / "step_01_int8_qdq-u8s8.onnx"
        import onnx

        ops = {node.op_type for node in onnx.load(str(twin)).graph.node}
        assert "QuantizeLinear" in ops and "QLinearConv" not in ops
        made = twin.stat().st_mtime_ns
        main(["report", str(run)])  # the twin is kept while the calibration settings are the same
        assert twin.stat().st_mtime_ns == made
    assert manifest["steps"][1]["variants"]["int8"]["format"] == "qoperator"


def test_report_without_openvino_says_so(int8_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from compress.cli import main

    run = tmp_path / "run"
    shutil.copytree(int8_run, run)
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` raises ImportError, as when not installed
    main(["report", str(run)])
    doc = json.loads((run / "report.json").read_text())
    assert doc["alternatives"]["available"] is False and "OpenVINO is not installed" in doc["alternatives"]["reason"]
    assert "Not measured: OpenVINO is not installed" in (run / "report.md").read_text()
    assert _manifest(run)["report"]["alternatives"]["available"] is False


def test_settings_refuse_openvino_with_cuda_or_when_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    from serve.settings import ConfigError, Settings

    assert Settings.from_env({"SERVE_MODELS": "a"}).runtime == "onnxruntime"
    assert Settings.from_env({"SERVE_MODELS": "a", "SERVE_RUNTIME": "OpenVINO"}).runtime == "openvino"
    with pytest.raises(ConfigError, match="SERVE_RUNTIME=openvino runs the models on the CPU"):
        Settings.from_env({"SERVE_MODELS": "a", "SERVE_RUNTIME": "openvino", "SERVE_PROVIDER": "cuda"})
    with pytest.raises(ConfigError, match="SERVE_RUNTIME"):
        Settings.from_env({"SERVE_MODELS": "a", "SERVE_RUNTIME": "tensorflow"})
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(ConfigError, match="SERVE_RUNTIME=openvino but OpenVINO is not installed"):
        Settings.from_env({"SERVE_MODELS": "a", "SERVE_RUNTIME": "openvino"})


def test_bentoml_serve_refuses_openvino_at_start_up_when_it_is_not_installed(store: Store, tmp_path: Path) -> None:
    shadow = tmp_path / "no-openvino" / "openvino"
    shadow.mkdir(parents=True)  # an `openvino` that fails to import, as an environment without it does
    (shadow / "__init__.py").write_text("raise ImportError(\"No module named 'openvino'\")\n")
    path = os.pathsep.join(filter(None, [str(shadow.parent), os.environ.get("PYTHONPATH")]))
    code, output = _serve_until_exit(store, tmp_path, SERVE_MODELS=store.step1, SERVE_RUNTIME="openvino",
                                     PYTHONPATH=path)
    assert code != 0 and "SERVE_RUNTIME=openvino but OpenVINO is not installed" in output


@pytest.fixture(scope="module")
def single(store: Store, server_factory: Any) -> Server:
    """The one-model server of tests/test_serve.py, on OpenVINO: the tests imported from there
    (every format and mode answered like a plain ONNX Runtime session within 1e-4, batches, every
    hostile input a 4xx JSON with the service answering after it) run against it."""
    return server_factory(SERVE_MODELS=store.step1, SERVE_RUNTIME="openvino").wait_ready()


def test_metadata_says_openvino(single: Server, store: Store) -> None:
    meta = httpx.get(f"{single.url}/metadata", timeout=30).json()
    assert meta["runtime"]["engine"] == "openvino" and meta["providers"] == {store.step1: "cpu"}
    compiled = meta["runtime"]["openvino"][store.step1]
    assert compiled["inference_precision"] == "f32" and compiled["num_streams"] == 1
    # OpenVINO's first call at a new batch size is slower: every size the batcher can make ran at start
    assert meta["runtime"]["warmed_batch_sizes"] == list(range(1, meta["limits"]["max_batch_size"] + 1))


def test_a_recommended_step_0_int8_is_one_row_with_both_roles(int8_run: Path) -> None:
    from compress.alternatives import candidates
    from compress.manifest import RunManifest
    from compress.quantize import Int8Settings

    steps = {s.step: s for s in RunManifest.from_dict(_manifest(int8_run)).steps}
    skipped: list[dict[str, str]] = []
    found = candidates(int8_run, steps, (0, "int8"), Int8Settings(), None, skipped)
    assert [(c.backend, c.step, c.precision) for c in found] == \
        [("ort-cpu", 0, "fp32"), ("openvino", 0, "int8"), ("ort-cpu", 0, "int8")]
    assert found[1].role == "no pruning, int8 on OpenVINO; recommended, OpenVINO" and not skipped
