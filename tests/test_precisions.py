"""Precision variants: real INT8 quantization of a tiny run's models, variants in the manifest,
old manifests, the accuracy-drop guard, the format choice, bad calibration input, and the
runtime layer's promises (torch-free, no import cycles)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from compress.errors import UsageError
from compress.manifest import RunManifest, StepRecord
from compress.quantize import Int8Settings, check_calibration, pick_format, stratified_indices, time_formats
from compress.runtime.precisions import parse_precisions
from compress.runtime.sessions import OrtModel

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def int8_run(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny run with int8 variants added by `compress quantize` (one format, to stay quick)."""
    from compress.cli import main

    run = tmp_path_factory.mktemp("int8") / "run"
    shutil.copytree(tiny_run, run)
    main(["quantize", str(run), "--calibration-images", "24", "--int8-format", "qdq-u8s8",
          "--max-accuracy-drop", "0.5"])  # exits (SystemExit) only on failure
    return run


def test_quantize_adds_a_real_int8_variant_to_every_step(int8_run: Path) -> None:
    manifest = json.loads((int8_run / "manifest.json").read_text())
    for step in manifest["steps"]:
        variants = step["variants"]
        assert list(variants) == ["fp32", "int8"]
        fp32, int8 = variants["fp32"], variants["int8"]
        assert fp32["onnx"] == step["onnx"] and fp32["top1_agreement"] == 1.0 and fp32["max_abs_diff"] == 0.0
        path = int8_run / int8["onnx"]
        assert path.name == "model_int8.onnx" and int8["bytes"] == path.stat().st_size
        ops = {node.op_type for node in onnx.load(str(path)).graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # really quantized (QDQ)
        assert int8["format"] == "qdq-u8s8" and int8["calibration"]["images"] == 24
        assert fp32["measured_on"] == int8["measured_on"] == "cpu"  # a CPU run: every accuracy through ORT CPU
        assert int8["calibration"]["method"] == "minmax"
        assert 0.0 <= int8["accuracy"] <= 1.0 and int8["top1_agreement"] >= 0.5 and int8["max_abs_diff"] > 0.0
        assert int8["accuracy_drop"] == pytest.approx(fp32["accuracy"] - int8["accuracy"])
        # the int8 file is smaller: weights stored as 8-bit
        assert int8["bytes"] < 0.6 * fp32["bytes"]
    # the metadata (classes, preprocessing) survives quantization: the service needs it
    meta = {p.key for p in onnx.load(str(int8_run / manifest["steps"][0]["variants"]["int8"]["onnx"])).metadata_props}
    assert {"classes", "preprocessing"} <= meta
    report = (int8_run / "report.md").read_text()
    assert "| 1 | int8 |" in report and "Precision variants" in report


def test_quantize_again_keeps_finished_variants_and_redoes_changed_settings(int8_run: Path, capsys) -> None:
    from compress.cli import main

    before = {s["step"]: s["variants"]["int8"] for s in json.loads((int8_run / "manifest.json").read_text())["steps"]}
    main(["quantize", str(int8_run), "--steps", "1", "--calibration-images", "24", "--int8-format", "qdq-u8s8",
          "--max-accuracy-drop", "0.5"])
    after = {s["step"]: s["variants"]["int8"] for s in json.loads((int8_run / "manifest.json").read_text())["steps"]}
    assert after == before  # nothing redone
    main(["quantize", str(int8_run), "--steps", "1", "--calibration-images", "12", "--int8-format", "qdq-u8s8",
          "--max-accuracy-drop", "0.5"])
    after = {s["step"]: s["variants"]["int8"] for s in json.loads((int8_run / "manifest.json").read_text())["steps"]}
    assert after[0] == before[0] and after[1]["calibration"]["images"] == 12
    assert before[1]["calibration"]["reduce_range"] == "first-conv"  # the default
    main(["quantize", str(int8_run), "--steps", "1", "--calibration-images", "12", "--int8-format", "qdq-u8s8",
          "--int8-reduce-range", "none", "--max-accuracy-drop", "0.5"])
    redone = {s["step"]: s["variants"]["int8"] for s in json.loads((int8_run / "manifest.json").read_text())["steps"]}
    assert redone[1]["calibration"]["reduce_range"] == "none" and redone[0] == before[0]


def _conv_weights(path: Path) -> list[np.ndarray]:
    """The int8 weights of each convolution of a quantized file, in graph order (QDQ: the
    initializer behind the DequantizeLinear feeding a Conv; QOperator: QLinearConv's input 3)."""
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    initializers = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    dequantized = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    weights = []
    for node in graph.node:
        if node.op_type == "Conv" and dequantized.get(node.input[1]) in initializers:
            weights.append(initializers[dequantized[node.input[1]]])
        elif node.op_type == "QLinearConv":
            weights.append(initializers[node.input[3]])
    return weights


@pytest.mark.parametrize("fmt", ["qdq-u8s8", "qoperator"])
def test_reduce_range_quantizes_only_the_first_convolution_to_7_bits(tiny_run: Path, tmp_path: Path, fmt: str) -> None:
    """Real quantization: with first-conv (the default) the image's convolution has 7-bit
    weights (|w| <= 64, no 16-bit saturation without VNNI), the others use the whole int8 range."""
    from compress.quantize import quantize_file

    fp32 = tiny_run / "steps" / "step_00" / "model.onnx"
    calibration = np.random.default_rng(0).normal(size=(16, 3, 16, 16)).astype(np.float32)
    ranges = {}
    for reduce_range in ("first-conv", "none", "all"):
        out = tmp_path / f"{reduce_range}.onnx"
        quantize_file(fp32, out, calibration, fmt=fmt, method="minmax", reduce_range=reduce_range)
        weights = _conv_weights(out)
        assert len(weights) > 3 and all(w.dtype == np.int8 for w in weights)
        ranges[reduce_range] = [int(np.abs(w.astype(np.int32)).max()) for w in weights]
    assert ranges["none"][0] == 127 and ranges["first-conv"][0] <= 64
    assert ranges["first-conv"][1:] == ranges["none"][1:] and max(ranges["none"][1:]) == 127
    assert max(ranges["all"]) <= 64
    with pytest.raises(UsageError, match="--int8-reduce-range"):
        Int8Settings(reduce_range="half").validate()


def test_every_variant_records_its_fastest_thread_count_and_bench_uses_it(int8_run: Path, tmp_path: Path) -> None:
    from compress.latency import benchmark_run

    manifest = json.loads((int8_run / "manifest.json").read_text())
    for step in manifest["steps"]:
        for variant in step["variants"].values():
            threads = variant["cpu_threads"]
            assert threads["intra_op_spinning"] is False and set(threads["by_batch"]) == {"1", "8"}
            for choice in threads["by_batch"].values():
                assert set(choice["p50_ms"]) == {"1", "0"} and all(ms > 0 for ms in choice["p50_ms"].values())
                assert choice["threads"] == min((1, 0), key=lambda t: choice["p50_ms"][str(t)])
    # bench models times each model with its recorded choice at that batch size, unless forced
    run = tmp_path / "run"
    shutil.copytree(int8_run, run)
    for step in manifest["steps"]:
        for precision, variant in step["variants"].items():
            variant["cpu_threads"]["by_batch"]["1"]["threads"] = 1 if precision == "int8" else 0
    (run / "manifest.json").write_text(json.dumps(manifest))
    quick = {"backends": ("ort-cpu",), "warmup": 1, "rounds": 2, "max_seconds": 1, "measure_accuracy": False}
    doc = benchmark_run(run, batch_sizes=(1, 2), **quick)
    used = {(r["step"], r["precision"], r["batch"]): r["intra_op_threads"] for r in doc["results"]}
    assert used[(1, "int8", 1)] == 1 and used[(1, "fp32", 1)] == "ort default"
    assert used[(0, "int8", 2)] == "ort default"  # no choice recorded for batch 2: ORT's default
    assert "recorded" in doc["settings"]["threads_rule"]
    forced = benchmark_run(run, batch_sizes=(1,), threads=2, **quick)
    assert {r["intra_op_threads"] for r in forced["results"]} == {2}


def test_bench_models_measures_every_variant_against_step0_fp32(int8_run: Path) -> None:
    from compress.latency import benchmark_run

    doc = benchmark_run(int8_run, backends=("ort-cpu", "ort-cuda"), batch_sizes=(1,), warmup=1, rounds=2, max_seconds=1)
    keys = {(r["step"], r["precision"]) for r in doc["results"] if r["backend"] == "ort-cpu"}
    assert keys == {(0, "fp32"), (0, "int8"), (1, "fp32"), (1, "int8")}
    base = next(r for r in doc["results"] if (r["step"], r["precision"]) == (0, "fp32"))
    assert base["speedup"] == 1.0
    for row in doc["results"]:
        assert row["speedup"] == pytest.approx(base["latency"]["p50_ms"] / row["latency"]["p50_ms"])
    reasons = " ".join(s["reason"] for s in doc["skipped"])
    assert any(s["backend"] == "ort-cuda" for s in doc["skipped"])
    if not any(r["backend"] == "ort-cuda" for r in doc["results"]):
        assert "CUDA" in reasons
    else:  # a GPU machine: int8 is said plainly not to run on the CUDA provider
        assert any(s["precision"] == "int8" and "int8 convolution" in s["reason"] for s in doc["skipped"])


def test_register_stores_every_variant_and_the_service_loads_int8(int8_run: Path, tmp_path: Path) -> None:
    from compress.registry import model_store, register
    from serve.runtime import Member, RuntimeOptions, card_from_model

    tag = register(int8_run, step=1, name="q", bentoml_home=tmp_path / "home")
    model = model_store(tmp_path / "home").get(tag)
    assert model.info.metadata["files"] == {"fp32": "model.onnx", "int8": "model_int8.onnx"}
    assert model.info.metadata["variants"]["int8"]["format"] == "qdq-u8s8"
    card = card_from_model(model)
    int8, fp32 = (Member.load(card, RuntimeOptions("cpu", precision=p)) for p in ("int8", "fp32"))
    assert (int8.precision, int8.provider) == ("int8", "cpu")
    batch = np.random.default_rng(0).normal(size=(4, 3, 16, 16)).astype(np.float32)
    assert int8.probabilities(batch).shape == fp32.probabilities(batch).shape == (4, 3)


def test_old_format_manifests_load_as_variants() -> None:
    """Manifests committed before variants existed (fp16 as ``onnx_fp16``) read as typed steps."""
    for path in sorted((REPO / "bench" / "results").rglob("manifest.json")):
        manifest = RunManifest.from_dict(json.loads(path.read_text()))
        assert manifest.steps and all(s.variants["fp32"].onnx == s.onnx for s in manifest.steps if s.onnx)
    legacy = {"step": 2, "macs": 10, "params": 5, "accuracy": 0.9, "checkpoint": "c.pt", "onnx": "steps/a.onnx",
              "onnx_bytes": 100, "parity": {"max_abs_diff": 1e-6}, "onnx_fp16": "steps/b.onnx",
              "fp16": {"top1_agreement": 0.99, "max_abs_diff": 0.01}}
    record = StepRecord.from_dict(legacy)
    assert list(record.variants) == ["fp32", "fp16"]
    assert record.variants["fp16"].onnx == "steps/b.onnx" and record.variants["fp16"].top1_agreement == 0.99
    assert record.variant_accuracy("fp16") == 0.9  # not measured then: the step's figure


def test_accuracy_drop_guard_and_auto_format_choice_with_a_fake_timer() -> None:
    clock = [0.0]
    cost = {"fp32": 4.0, "qdq-u8s8": 1.0, "qdq-s8s8": 9.0, "qoperator": 2.0}

    def runner(name: str):
        def run() -> None:
            clock[0] += cost[name] / 1000
        return run

    latency = time_formats({name: runner(name) for name in cost}, max_seconds=0.5, timer=lambda: clock[0])
    assert latency == pytest.approx(cost)
    candidates = {fmt: {"p50_ms": latency[fmt], "accuracy": acc}
                  for fmt, acc in (("qdq-u8s8", 0.90), ("qdq-s8s8", 0.95), ("qoperator", 0.945))}
    assert pick_format(candidates, 0.95, 0.01) == ("qoperator", True)  # u8s8 is fastest but loses 5 points
    assert pick_format(candidates, 0.95, 0.10) == ("qdq-u8s8", True)
    assert pick_format(candidates, 0.99, 0.01) == ("qdq-s8s8", False)  # none within: most accurate, flagged


def test_run_flags_a_variant_over_the_drop_and_never_recommends_it() -> None:
    from compress.render import recommend

    def row(step: int, precision: str, ms: float) -> dict:
        return {"step": step, "precision": precision, "backend": "ort-cpu", "batch": 1, "latency": {"p50_ms": ms}}

    doc = {"steps": [{"step": 0, "accuracy": 0.95, "variants": {"fp32": {"accuracy": 0.95}, "int8": {"accuracy": 0.80, "flagged": True}}},
                     {"step": 1, "accuracy": 0.945, "variants": {"fp32": {"accuracy": 0.945}, "int8": {"accuracy": 0.944}}}],
           "results": [row(0, "fp32", 4.0), row(0, "int8", 1.0), row(1, "fp32", 2.0), row(1, "int8", 1.5)]}
    assert recommend(doc, "ort-cpu", 1) == (1, "int8")
    doc["steps"][1]["variants"]["int8"]["flagged"] = True
    assert recommend(doc, "ort-cpu", 1) == (1, "fp32")


def test_bad_calibration_input_is_a_one_line_usage_error(tiny_run: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="at least 1 image"):
        Int8Settings(calibration_images=0).validate()
    with pytest.raises(UsageError, match="no calibration images"):
        check_calibration(np.zeros((0, 3, 16, 16), np.float32), ["batch", 3, 16, 16])
    with pytest.raises(UsageError, match="calibration images are 3x32x32 but the model takes 3x16x16"):
        check_calibration(np.zeros((4, 3, 32, 32), np.float32), ["batch", 3, 16, 16])
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    for args, message in ((["--calibration-images", "0"], "at least 1 image"),
                          (["--int8-format", "int4"], "--int8-format"),
                          (["--steps", "7"], "no step(s) [7]"),
                          (["--precisions", "int3"], "unknown precision")):
        result = subprocess.run([sys.executable, "-m", "compress.cli", "quantize", str(run), *args],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr


def test_variants_are_evaluated_where_they_deploy() -> None:
    from compress.variants import evaluation_provider

    assert evaluation_provider("fp32", "cpu") == evaluation_provider("fp16", "cpu") == "cpu"
    assert evaluation_provider("fp32", "cuda:0") == evaluation_provider("fp16", "cuda") == "auto"
    assert evaluation_provider("int8", "cuda:0") == evaluation_provider("int8:qdq-u8s8", "cuda") == "cpu"


def test_precision_lists_and_stratified_calibration() -> None:
    assert parse_precisions("int8, fp16") == ("fp32", "fp16", "int8")
    assert parse_precisions(None) == ("fp32",)
    with pytest.raises(ValueError, match="unknown precision"):
        parse_precisions("fp8")
    labels = [0] * 50 + [1] * 10 + [2] * 40
    chosen = stratified_indices(labels, 30, seed=0)
    assert len(chosen) == 30 and len(set(chosen)) == 30
    counts = np.bincount([labels[i] for i in chosen], minlength=3)
    assert counts.tolist() == [10, 10, 10]
    assert stratified_indices(labels, 30, seed=0) == chosen != stratified_indices(labels, 30, seed=1)


def test_runtime_layer_is_torch_free_and_packages_have_no_cycles() -> None:
    code = ("import sys, compress.runtime.sessions, compress.runtime.timing, compress.runtime.machine, compress.runtime.binding, "
            "compress.runtime.precisions, serve.runtime, serve.settings, serve.inputs, serve.batching; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)
    offenders = [str(p.relative_to(REPO)) for p in (REPO / "compress").rglob("*.py")
                 for line in p.read_text().splitlines() if re.match(r"\s*(from|import) bench\b", line)]
    offenders += [str(p.relative_to(REPO)) for p in (REPO / "serve").rglob("*.py")
                  for line in p.read_text().splitlines()
                  if line.strip().startswith(("from compress", "import compress"))
                  and not any(ok in line for ok in ("compress.runtime", "compress.imaging"))]
    assert offenders == []


def test_ort_model_runs_fp32_on_cpu_and_refuses_cuda_without_it(tiny_run: Path) -> None:
    from compress.runtime.sessions import ProviderUnavailable, SessionSettings, cuda_unavailable_reason

    path = tiny_run / "steps" / "step_00" / "model.onnx"
    model = OrtModel(path, SessionSettings("cpu", threads=1, spinning=False))
    images = np.random.default_rng(0).normal(size=(3, 3, 16, 16)).astype(np.float32)
    assert model.predict(images).shape == (3, 3) and model.device == "CPUExecutionProvider"
    model.timed_call(images)()
    if cuda_unavailable_reason() is not None:
        with pytest.raises(ProviderUnavailable):
            OrtModel(path, SessionSettings("cuda"))
