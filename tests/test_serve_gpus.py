"""Issue 20, several GPUs: one worker per visible GPU, worker i on GPU i - 1 with its own sessions.

The mapping is tested as functions (how GPUs are counted, which worker gets which), then through
a real `bentoml serve` with two workers on this CPU machine: `CUDA_VISIBLE_DEVICES=0,1` makes
two GPUs visible, so the service starts two workers by default and each reports, in /metadata,
the GPU it serves (its CUDA session falls back to the CPU here, and /metadata says that too)."""
from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from test_serve import Server, Store, server_factory, store  # noqa: F401


def test_cuda_visible_devices_are_read_as_cuda_reads_them() -> None:
    from serve.devices import parse_visible_devices

    assert parse_visible_devices("0,1") == ["0", "1"]
    assert parse_visible_devices(" 2 , 3 ") == ["2", "3"]
    assert parse_visible_devices("GPU-8f2e1c3a-aaaa-bbbb,MIG-GPU-8f2e/1/0") == ["GPU-8f2e1c3a-aaaa-bbbb", "MIG-GPU-8f2e/1/0"]
    assert parse_visible_devices("1,-1,2") == ["1"]  # CUDA stops at the first invalid entry
    for hidden in ("", "-1", "none", "NoDevFiles"):
        assert parse_visible_devices(hidden) == []


def test_visible_gpus_from_the_environment_or_nvml() -> None:
    from serve.devices import Gpu, visible_gpus

    def nvml() -> list[tuple[str, str]]:
        return [("NVIDIA H100", "GPU-aaaa"), ("NVIDIA H200", "GPU-bbbb")]

    assert visible_gpus({}, nvml) == [Gpu(0, "0", "NVIDIA H100"), Gpu(1, "1", "NVIDIA H200")]
    # CUDA_VISIBLE_DEVICES reorders and selects; ORT's device_id is the place in that list
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "1,0"}, nvml) == [Gpu(0, "1", "NVIDIA H200"), Gpu(1, "0", "NVIDIA H100")]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "GPU-bbbb"}, nvml) == [Gpu(0, "GPU-bbbb", "NVIDIA H200")]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}, nvml) == []
    assert visible_gpus({}, list) == []  # no driver
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "0,1"}, list) == [Gpu(0, "0"), Gpu(1, "1")]


def test_nvml_without_a_driver_finds_no_gpu() -> None:
    from serve.devices import nvml_gpus

    from conftest import cuda_available

    if cuda_available():
        pytest.skip("this machine has a GPU")
    assert nvml_gpus() == []


def test_worker_i_serves_gpu_i_minus_1_round_robin() -> None:
    from serve.devices import Gpu, default_workers, gpu_for_worker, worker_devices

    two = [Gpu(0, "3"), Gpu(1, "5")]
    assert [gpu_for_worker(i, two) for i in (1, 2, 3, 4)] == [two[0], two[1], two[0], two[1]]
    assert gpu_for_worker(None, two) == two[0]  # outside a `bentoml serve` worker
    assert gpu_for_worker(1, []) is None
    with pytest.raises(ValueError):
        gpu_for_worker(0, two)  # BentoML counts workers from 1
    assert [default_workers(gpus) for gpus in ([], two[:1], two)] == [1, 1, 2]
    assert worker_devices(2, two) == [{"worker": 1, "gpu": {"index": 0, "id": "3", "name": None}},
                                      {"worker": 2, "gpu": {"index": 1, "id": "5", "name": None}}]
    assert worker_devices(1, []) == [{"worker": 1, "gpu": None}]


def test_serve_workers_setting() -> None:
    from serve.settings import AUTO, PER_GPU, ConfigError, Settings

    assert Settings.from_env({}).workers == PER_GPU
    assert [Settings.from_env({"SERVE_WORKERS": v}).workers for v in ("per-gpu", "PER-GPU", "auto", "3")] == [
        PER_GPU, PER_GPU, AUTO, 3]
    for bad in ("lots", "0", "-2"):
        with pytest.raises(ConfigError, match="SERVE_WORKERS"):
            Settings.from_env({"SERVE_WORKERS": bad})


def test_runtime_options_put_the_session_on_the_workers_gpu() -> None:
    from serve.runtime import RuntimeOptions

    options = RuntimeOptions().on_gpu(1)
    assert options.cuda_options["device_id"] == "1" and options.cuda_options["cudnn_conv_algo_search"] == "HEURISTIC"
    assert "device_id" not in RuntimeOptions().cuda_options


def _metadata_by_worker(server: Server, workers: int, timeout: float = 30) -> dict[int, dict[str, Any]]:
    """/metadata from every worker: each request on a new connection, which the kernel hands to
    any worker accepting on the shared socket; bounded in count and time."""
    seen: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    for _ in range(400):
        if len(seen) == workers or time.monotonic() > deadline:
            break
        answer = httpx.get(f"{server.url}/metadata", timeout=10, headers={"connection": "close"}).json()
        seen.setdefault(answer["worker"]["index"], answer)
    return seen


def test_two_visible_gpus_start_two_workers_each_on_its_gpu(store: Store, server_factory: Any) -> None:
    server = server_factory(SERVE_MODELS=store.step1, CUDA_VISIBLE_DEVICES="0,1").wait_ready()
    assert len(server.workers) == 2  # one per GPU, with SERVE_WORKERS unset
    seen = _metadata_by_worker(server, 2)
    assert sorted(seen) == [1, 2], f"only workers {sorted(seen)} answered"
    plan = [{"worker": 1, "gpu": {"index": 0, "id": "0", "name": None}},
            {"worker": 2, "gpu": {"index": 1, "id": "1", "name": None}}]
    for index, answer in seen.items():
        assert answer["worker"]["gpu"] == plan[index - 1]["gpu"]
        assert answer["workers"] == plan
        assert answer["providers"] == {store.step1: "cpu"}  # no GPU here: CUDA fell back, and says so
    assert seen[1]["worker"]["pid"] != seen[2]["worker"]["pid"]
    assert "worker 2: GPU 1" in server.output() and "worker 1: GPU 0" in server.output()


def test_cpu_provider_ignores_gpus(store: Store, server_factory: Any) -> None:
    server = server_factory(SERVE_MODELS=store.step1, CUDA_VISIBLE_DEVICES="0,1", SERVE_PROVIDER="cpu").wait_ready()
    assert len(server.workers) == 1
    answer = httpx.get(f"{server.url}/metadata", timeout=10).json()
    assert answer["worker"]["gpu"] is None and answer["workers"] == [{"worker": 1, "gpu": None}]


@pytest.mark.gpu
def test_a_session_on_the_last_visible_gpu_keeps_its_buffers_there(tiny_run: Any) -> None:
    """On a GPU machine: the worker's device_id reaches the CUDA session and its IO binding."""
    import json

    import numpy as np

    from compress.runtime.binding import BoundRunner
    from compress.runtime.sessions import SessionSettings, create_session
    from serve.devices import visible_gpus
    from serve.runtime import RuntimeOptions

    gpus = visible_gpus()
    last = gpus[-1].index
    onnx = tiny_run / json.loads((tiny_run / "manifest.json").read_text())["steps"][0]["onnx"]
    options = RuntimeOptions().on_gpu(last)
    session, provider = create_session(onnx, SessionSettings("cuda", cuda_options=options.cuda_options))
    runner = BoundRunner(session, device=provider, max_batch_size=4)
    assert provider == "cuda" and runner.device_id == last
    batch = np.random.default_rng(0).normal(size=(3, *runner.sample_shape)).astype(np.float32)
    cpu, _ = create_session(onnx, SessionSettings("cpu"))
    expected = cpu.run(["logits"], {"input": batch})[0]
    np.testing.assert_allclose(runner.run(batch), expected, atol=1e-3)
