"""The IO-bound runner of the runtime layer (compress/runtime/binding.py) and the batcher's
model threads, on real ONNX Runtime sessions of a small convolutional model built with onnx's
helpers (no torch needed). The CUDA side runs in test_gpu.py."""
from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compress.runtime.binding import BoundRunner, bucket_sizes
from compress.runtime.sessions import SessionSettings, create_session


def conv_classifier(path: Path, *, classes: int = 5, size: int = 8, seed: int = 0) -> Path:
    """Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm, batch dimension named ``batch``."""
    rng = np.random.default_rng(seed)
    weights = {"w": rng.normal(size=(6, 3, 3, 3)).astype(np.float32), "b": rng.normal(size=6).astype(np.float32),
               "fc_w": rng.normal(size=(classes, 6)).astype(np.float32), "fc_b": rng.normal(size=classes).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["input", "w", "b"], ["conv"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["conv"], ["relu"]),
             helper.make_node("GlobalAveragePool", ["relu"], ["pool"]),
             helper.make_node("Flatten", ["pool"], ["flat"]),
             helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, size, size])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
                              [numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)  # what ORT reads
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def test_bucket_sizes_and_padding() -> None:
    assert bucket_sizes(1) == [1] and bucket_sizes(8) == [1, 2, 4, 8] and bucket_sizes(6) == [1, 2, 4, 6]
    with pytest.raises(ValueError):
        bucket_sizes(0)


def test_buckets_and_exact_give_the_plain_session_logits_for_every_batch_size(tmp_path: Path) -> None:
    session, provider = create_session(conv_classifier(tmp_path / "m.onnx"), SessionSettings("cpu"))
    assert provider == "cpu"
    buckets = BoundRunner(session, device="cpu", max_batch_size=6, shapes="buckets")
    exact = BoundRunner(session, device="cpu", max_batch_size=6, shapes="exact")
    assert buckets.warm_up_sizes() == [1, 2, 4, 6] and exact.warm_up_sizes() == [1, 2, 3, 4, 5, 6]
    assert [buckets.padded_size(n) for n in range(1, 7)] == [1, 2, 4, 4, 6, 6]
    rng = np.random.default_rng(1)
    for rows in (3, 1, 6, 5, 2, 3):  # a bucket is reused after a larger batch filled it
        batch = rng.normal(size=(rows, 3 * 8 * 8)).astype(np.float32)  # packed rows, as the service has them
        expected = session.run(None, {"input": batch.reshape(rows, 3, 8, 8)})[0]
        for runner in (buckets, exact):
            out = runner.run(batch)
            assert out.shape == (rows, 5) and out.dtype == np.float32
            np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    first = buckets.run(batch)
    buckets.run(rng.normal(size=(4, 3, 8, 8)).astype(np.float32))
    np.testing.assert_allclose(first, expected, rtol=1e-5, atol=1e-5)  # answers are copies, not views of a buffer
    with pytest.raises(ValueError, match="over the largest batch size"):
        buckets.run(np.zeros((7, 3, 8, 8), dtype=np.float32))
    with pytest.raises(ValueError, match="batch shapes"):
        BoundRunner(session, device="cpu", max_batch_size=4, shapes="padded")


def test_adaptive_batcher_runs_up_to_slots_calls_at_once_each_on_its_own_slot() -> None:
    from serve.batching import AdaptiveBatcher

    started = threading.Barrier(2, timeout=5)  # both model threads must be inside predict at once
    slots_used: list[int] = []

    def predict(rows: np.ndarray, slot: int) -> np.ndarray:
        slots_used.append(slot)
        if len(slots_used) <= 2:
            started.wait()
        return rows * 2

    batcher = AdaptiveBatcher(predict, max_batch_size=1, slots=2)

    async def scenario() -> list[np.ndarray]:
        return await asyncio.gather(*(batcher(np.array([[float(i)]])) for i in range(6)))

    results = asyncio.run(asyncio.wait_for(scenario(), 10))
    assert [r.item() for r in results] == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
    assert sorted(set(slots_used)) == [0, 1] and sorted(slots_used[:2]) == [0, 1]
    assert batcher.stats()["model_calls"] == 6
    with pytest.raises(ValueError, match="slots"):
        AdaptiveBatcher(predict, max_batch_size=1, slots=0)


def test_service_runtime_settings_parse_and_refuse_bad_values() -> None:
    from serve.runtime import RuntimeOptions
    from serve.settings import ConfigError, Settings

    settings = Settings.from_env({"SERVE_MODEL_THREADS": "2", "SERVE_SESSIONS": "per-thread", "SERVE_BATCH_SHAPES": "EXACT",
                                  "SERVE_CUDNN_ALGO_SEARCH": "exhaustive", "SERVE_CUDNN_MAX_WORKSPACE": "off"})
    options = RuntimeOptions.from_settings(settings)
    assert (options.model_threads, options.sessions, options.batch_shapes) == (2, "per-thread", "exact")
    assert options.cuda_options == {"cudnn_conv_algo_search": "EXHAUSTIVE", "cudnn_conv_use_max_workspace": "0"}
    default = RuntimeOptions.from_settings(Settings.from_env({}))
    assert default.shapes_on("cuda") == "buckets" and default.shapes_on("cpu") == "exact"
    assert default.cuda_options["cudnn_conv_algo_search"] == "HEURISTIC"
    for env in ({"SERVE_MODEL_THREADS": "0"}, {"SERVE_SESSIONS": "pooled"}, {"SERVE_BATCH_SHAPES": "padded"},
                {"SERVE_CUDNN_ALGO_SEARCH": "fast"}, {"SERVE_CUDNN_MAX_WORKSPACE": "maybe"}):
        with pytest.raises(ConfigError):
            Settings.from_env(env)


def test_bench_serve_options_measures_the_service_options_and_names_the_settings(tiny_run: Path, tmp_path: Path,
                                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from bench.cli import main as bench_main

    out = tmp_path / "options"
    bench_main(["serve-options", f"{tiny_run}:1", "--provider", "cpu", "--max-batch-size", "4", "--seconds", "0.05",
                "--rounds", "2", "--out", str(out)])
    doc = json.loads((out / "results.json").read_text())
    assert doc["provider"] == "cpu" and doc["cudnn"] is None
    assert set(doc["batch_shapes"]["images_per_s"]) == {"buckets", "exact"}
    assert doc["batch_shapes"]["warm_up"]["buckets"]["sizes"] == 3 and doc["batch_shapes"]["warm_up"]["exact"]["sizes"] == 4
    assert "4 threads, per-thread" in doc["model_threads"]["images_per_s"]
    assert all(v["images_per_s"] > 0 for v in doc["model_threads"]["images_per_s"].values())
    env = doc["recommended_env"]
    assert env["SERVE_BATCH_SHAPES"] in ("buckets", "exact") and env["SERVE_MODEL_THREADS"] in ("1", "2", "4")
    assert "SERVE_BATCH_SHAPES=" in capsys.readouterr().out
    assert "## Model threads" in (out / "report.md").read_text()


@pytest.mark.parametrize("args, message", [
    (["missing.onnx"], "model file not found"),
    (["{run}:9"], "no step 9"),
    (["{run}:1", "--precision", "int4"], "--precision must be one of"),
    (["{run}:1", "--rounds", "0"], "--rounds must be >= 1"),
])
def test_bench_serve_options_bad_input_is_one_line_exit_2(tiny_run: Path, args: list[str], message: str) -> None:
    import subprocess
    import sys

    command = [sys.executable, "-c", "from bench.cli import main; main()", "serve-options",
               *[a.format(run=tiny_run) for a in args]]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
