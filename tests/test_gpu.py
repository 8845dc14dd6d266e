"""The CUDA paths, for real: skipped cleanly without CUDA, run with ``pytest -m gpu`` on a GPU
machine (the service on CUDA is in test_serve.py)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_OPTIONS

pytestmark = pytest.mark.gpu


def _cuda_options() -> list[str]:
    options = list(TINY_OPTIONS)
    options[options.index("--device") + 1] = "cuda"
    return options


def test_ort_cuda_with_io_binding_matches_cpu_logits_and_fp16_agrees(tiny_run: Path, tmp_path: Path) -> None:
    import torch  # noqa: F401  (onnxruntime-gpu finds the CUDA libraries once torch is loaded)

    from compress.export import export_fp16
    from compress.runtime.sessions import OrtModel, SessionSettings

    path = tiny_run / "steps" / "step_01" / "model.onnx"
    images = np.random.default_rng(0).normal(size=(16, 3, 16, 16)).astype(np.float32)
    cpu = OrtModel(path, SessionSettings("cpu")).predict(images)
    cuda = OrtModel(path, SessionSettings("cuda"))
    assert cuda.provider == "cuda" and cuda.device == "CUDAExecutionProvider"
    np.testing.assert_allclose(cuda.predict(images), cpu, atol=1e-3)
    cuda.timed_call(images)()  # the IO-bound call runs
    export_fp16(path, tmp_path / "model_fp16.onnx")
    half = OrtModel(tmp_path / "model_fp16.onnx", SessionSettings("cuda")).predict(images)
    assert (half.argmax(1) == cpu.argmax(1)).mean() >= 0.9


def test_service_io_binding_on_cuda_matches_cpu_for_buckets_and_exact(tiny_run: Path, tmp_path: Path) -> None:
    """The service's data path (compress/runtime/binding.py) on the CUDA provider: device buffers
    made once, a batch copied in, outputs bound; fp32 and an fp16 export (float16 input)."""
    import torch  # noqa: F401

    from compress.export import export_fp16
    from compress.runtime.binding import BoundRunner
    from compress.runtime.sessions import SessionSettings, create_session

    path = tiny_run / "steps" / "step_01" / "model.onnx"
    export_fp16(path, tmp_path / "model_fp16.onnx")
    rng = np.random.default_rng(0)
    cpu_session, _ = create_session(path, SessionSettings("cpu"))
    for model, tolerance in ((path, 1e-3), (tmp_path / "model_fp16.onnx", 5e-2)):
        session, provider = create_session(model, SessionSettings("cuda"))
        assert provider == "cuda"
        runners = [BoundRunner(session, device="cuda", max_batch_size=8, shapes=s) for s in ("buckets", "exact")]
        for rows in (1, 3, 8, 5):
            batch = rng.normal(size=(rows, 3, 16, 16)).astype(np.float32)
            expected = cpu_session.run(None, {cpu_session.get_inputs()[0].name: batch})[0]
            for runner in runners:
                np.testing.assert_allclose(runner.run(batch), expected, atol=tolerance, rtol=tolerance)


def test_amp_channels_last_device_data_finetuning_lowers_the_loss(tiny_data: Path, tmp_path: Path) -> None:
    from compress.cli import main

    out = tmp_path / "run"
    options = _cuda_options()
    options[options.index("--epochs") + 1] = "3"
    main(["finetune", "--data", str(tiny_data), "--out", str(out), *options, "--data-on-device", "on"])
    manifest = json.loads((out / "manifest.json").read_text())
    stage = manifest["stages"]["finetune"]
    assert stage["device"].startswith("cuda") and stage["data_on_device"] is True
    losses = [epoch["train_loss"] for epoch in stage["history"]]
    assert losses[-1] < losses[0]


def test_prune_retrain_export_and_target_speedup_on_cuda(tiny_data: Path, tmp_path: Path) -> None:
    from compress.cli import main

    out = tmp_path / "run"
    main(["run", "--data", str(tiny_data), "--out", str(out), *_cuda_options(), "--target-speedup", "1.01",
          "--latency-backend", "ort-cuda", "--latency-batch", "64"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["step"] for s in manifest["steps"]][0] == 0 and len(manifest["steps"]) >= 2
    measured = manifest["steps"][1]["speedup_measured"]
    assert measured["device"] == "CUDAExecutionProvider" and measured["backend"] == "ort-cuda"
    assert all(s["parity"]["max_abs_diff"] <= 1e-3 for s in manifest["steps"])


def test_bench_models_on_ort_cuda_and_torch_cuda_records_the_gpu(tiny_run: Path, tmp_path: Path) -> None:
    from compress.latency import benchmark_run

    doc = benchmark_run(tiny_run, backends=("ort-cuda", "torch-cuda"), batch_sizes=(1, 64), warmup=2, rounds=3,
                        max_seconds=2)
    devices = {(r["backend"], r["device"]) for r in doc["results"]}
    assert devices == {("ort-cuda", "CUDAExecutionProvider"), ("torch-cuda", "torch:cuda")}
    assert doc["machine"]["gpu"] and doc["machine"]["gpu"]["name"]


def test_bench_models_cuda_graphs_next_to_eager_fp32_and_fp16(tiny_run: Path, tmp_path: Path) -> None:
    """`bench models --cuda-graphs`: torch-cuda-graphs replays a captured graph per batch size;
    its accuracy is eager's, and fp16 (half, channels_last) is measured on both torch backends."""
    import shutil

    from compress.cli import main as compress_main
    from compress.latency import benchmark_run

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("bench"))
    compress_main(["quantize", str(run), "--precisions", "fp16"])  # raises SystemExit on failure
    doc = benchmark_run(run, backends=("torch-cuda", "torch-cuda-graphs"), batch_sizes=(1, 8), warmup=2, rounds=3,
                        max_seconds=1)
    rows = {(r["backend"], r["step"], r["precision"], r["batch"]): r for r in doc["results"]}
    for backend in ("torch-cuda", "torch-cuda-graphs"):
        for precision in ("fp32", "fp16"):
            assert (backend, 1, precision, 8) in rows, sorted(rows)
    assert rows[("torch-cuda-graphs", 0, "fp32", 8)]["device"] == "torch:cuda:graph"
    eager, graph = rows[("torch-cuda", 1, "fp32", 8)], rows[("torch-cuda-graphs", 1, "fp32", 8)]
    assert graph["accuracy"] == pytest.approx(eager["accuracy"], abs=0.02)
    assert graph["latency"]["throughput"] > 0
