"""bench: models benchmarks on a real tiny run (real ONNX Runtime and PyTorch), percentiles on a
controlled timer, reports and PNGs, HTTP load against a real local server, compare, and the
command line's errors (one line on stderr, exit code 2). CPU only."""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import warnings
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from bench.cli import main
from bench.load import Payload, Upload, check_target, group_payloads, run_sweep
from bench.report import write_models_report
from compress.errors import UsageError
from conftest import cuda_available, run_bench_cli as run_cli
from compress.hints import unaligned_convs
from compress.latency import benchmark_run
from compress.runtime.timing import interleaved, paired_speedup_spread, speedup, summarize

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--batch-sizes", "1,4", "--warmup", "1", "--rounds", "3", "--min-seconds", "0", "--max-seconds", "1"]


# --- bench models on the tiny run ---------------------------------------------------------------

@pytest.fixture(scope="module")
def models_out(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench-models") / "out"
    main(["models", str(tiny_run), "--backends", "ort-cpu,ort-cuda,torch,torch-cuda", "--out", str(out), *FAST])
    return out


def test_models_results_json_structure(models_out: Path, tiny_run: Path) -> None:
    doc = json.loads((models_out / "results.json").read_text())
    assert doc["kind"] == "bench-models" and doc["run_dir"] == str(tiny_run)
    assert set(doc["machine"]) >= {"cpu", "usable_cores", "threads", "gpu", "versions", "load_average"}
    assert "onnxruntime-gpu" in doc["machine"]["versions"] or "onnxruntime" in doc["machine"]["versions"]
    assert [s["step"] for s in doc["steps"]] == [0, 1]
    assert doc["steps"][0]["macs_ratio"] == 1.0 and 0 < doc["steps"][1]["macs_ratio"] < 1
    assert all(s["hints"]["convs"] > 0 and s["hints"]["unaligned"] == [] for s in doc["steps"])  # round_to 8
    # without CUDA both CUDA paths are skipped with a reason, never measured on the CPU under their name;
    # with CUDA they run on it and say so
    skipped = {s["backend"]: s["reason"] for s in doc["skipped"]}
    cuda = cuda_available()
    assert set(skipped) == (set() if cuda else {"ort-cuda", "torch-cuda"}) and all("CUDA" in r for r in skipped.values())
    rows = doc["results"]
    backends = ("ort-cpu", "torch") + (("ort-cuda", "torch-cuda") if cuda else ())
    assert {(r["backend"], r["batch"], r["step"]) for r in rows} == {(b, n, s) for b in backends for n in (1, 4) for s in (0, 1)}
    devices = {"CPUExecutionProvider", "torch:cuda" if cuda else "torch:cpu"}
    assert {r["device"] for r in rows} == devices | ({"CUDAExecutionProvider"} if cuda else set())
    rows = [r for r in rows if r["backend"] in ("ort-cpu", "torch")]
    for row in rows:
        lat = row["latency"]
        assert set(lat) >= {"p50_ms", "p90_ms", "p95_ms", "p99_ms", "mean_ms", "throughput", "samples", "noisy"}
        assert 0 < lat["min_ms"] <= lat["p50_ms"] <= lat["p90_ms"] <= lat["p95_ms"] <= lat["p99_ms"]
        assert lat["throughput"] == pytest.approx(row["batch"] / lat["p50_ms"] * 1000)
        assert 0 <= row["accuracy"] <= 1 and row["precision"] == "fp32"
        assert row["speedup"] == pytest.approx(1.0) if row["step"] == 0 else row["speedup"] > 0
    # the same samples count for both steps of a group: they were timed interleaved
    for backend in ("ort-cpu", "torch"):
        counts = {r["latency"]["samples"] for r in rows if r["backend"] == backend and r["batch"] == 1}
        assert len(counts) == 1
    # ORT and PyTorch agree on accuracy (same weights, parity-checked export)
    acc = {(r["backend"], r["step"]): r["accuracy"] for r in rows}
    assert acc[("ort-cpu", 0)] == pytest.approx(acc[("torch", 0)], abs=0.05)


def test_models_report_and_pngs_are_written_and_valid(models_out: Path) -> None:
    report = (models_out / "report.md").read_text()
    for needle in ("## Summary", "## Steps", "## Latency: ort-cpu fp32", "## Latency: torch fp32", "## Hardware hints",
                   "## Machine", "p99 ms", "speed-up vs step 0 fp32") + (() if cuda_available() else
                                                                         ("ort-cuda all:", "no CUDA device")):
        assert needle in report, needle
    pngs = sorted(p.name for p in models_out.glob("*.png"))
    cuda_pngs = ["pareto_ort-cuda.png", "pareto_torch-cuda.png"] if cuda_available() else []
    assert pngs == sorted(["pareto_ort-cpu.png", "pareto_torch.png", "speedup_vs_macs.png", "throughput.png", *cuda_pngs])
    for name in pngs:
        assert f"]({name})" in report
        with Image.open(models_out / name) as image:
            image.verify()
        with Image.open(models_out / name) as image:
            assert image.format == "PNG" and image.size[0] > 300 and image.size[1] > 200


def test_models_measures_fp16_files_of_an_old_format_manifest(tiny_run: Path, tmp_path: Path) -> None:
    """A manifest written before precision variants (``onnx_fp16`` keys) still loads and is measured."""
    from onnxconverter_common import float16

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("bench"))
    manifest = json.loads((run / "manifest.json").read_text())
    for step in manifest["steps"]:
        fp16 = Path(step["onnx"]).with_name("model_fp16.onnx")
        with warnings.catch_warnings():  # onnxconverter-common warns about every tiny weight it rounds
            warnings.simplefilter("ignore")
            onnx.save(float16.convert_float_to_float16(onnx.load(str(run / step["onnx"])), keep_io_types=True),
                      str(run / fp16))
        step["onnx_fp16"] = fp16.as_posix()
    (run / "manifest.json").write_text(json.dumps(manifest))
    doc = benchmark_run(run, backends=("ort-cpu",), batch_sizes=(2,), warmup=1, rounds=2, max_seconds=1)
    by = {(r["precision"], r["step"]): r for r in doc["results"]}
    assert set(by) == {("fp32", 0), ("fp32", 1), ("fp16", 0), ("fp16", 1)}
    assert by[("fp16", 0)]["accuracy"] == pytest.approx(by[("fp32", 0)]["accuracy"], abs=0.1)
    files = write_models_report(doc, tmp_path / "out")
    assert "## Latency: ort-cpu fp16" in files["report"].read_text() and "pareto_ort-cpu" in files
    assert by[("fp16", 1)]["speedup"] == pytest.approx(by[("fp32", 0)]["latency"]["p50_ms"] / by[("fp16", 1)]["latency"]["p50_ms"])


def test_hints_list_convs_whose_channels_are_not_multiples_of_8(tmp_path: Path) -> None:
    def weight(name: str, dims: list[int]) -> onnx.TensorProto:
        return helper.make_tensor(name, TensorProto.FLOAT, dims, np.zeros(int(np.prod(dims)), np.float32))

    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "stem.weight"], ["a"], pads=[1, 1, 1, 1]),
         helper.make_node("Conv", ["a", "odd.weight"], ["b"], pads=[1, 1, 1, 1]),
         helper.make_node("Conv", ["b", "fine.weight"], ["logits"], pads=[1, 1, 1, 1])],
        "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 16, 8, 8])],
        [weight("stem.weight", [16, 3, 3, 3]), weight("odd.weight", [12, 16, 3, 3]), weight("fine.weight", [16, 12, 3, 3])])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph), str(path))
    hints = unaligned_convs(path)
    assert hints["convs"] == 3
    # stem: 3 image channels in are exempt; odd: 12 out; fine: 12 in
    assert hints["unaligned"] == [{"layer": "odd", "in": 16, "out": 12}, {"layer": "fine", "in": 12, "out": 16}]


# --- percentiles on a controlled timer ----------------------------------------------------------

class FakeClock:
    """A timer that only moves when a fake model 'runs'."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def runner(self, durations: list[float]) -> Any:
        values = iter(durations)

        def run() -> None:
            self.now += next(values)

        return run


def test_summarize_percentiles_on_known_values() -> None:
    stats = summarize([i / 1000 for i in range(1, 101)], batch=4)  # 1..100 ms
    assert stats.samples == 100 and stats.min_ms == pytest.approx(1.0)
    assert stats.p50_ms == pytest.approx(50.5) and stats.p90_ms == pytest.approx(90.1)
    assert stats.p95_ms == pytest.approx(95.05) and stats.p99_ms == pytest.approx(99.01)
    assert stats.mean_ms == pytest.approx(50.5)
    assert stats.throughput == pytest.approx(4 / 0.0505)
    assert stats.spread == pytest.approx((90.1 - 10.9) / 50.5) and stats.noisy


def test_interleaved_timing_on_a_fake_clock_gives_exact_percentiles_and_speedup() -> None:
    clock = FakeClock()
    warm = [0.5]  # one untimed warm-up call each, deliberately slow: it must not show up in the samples
    a_times = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    runners = {0: clock.runner(warm + a_times), 1: clock.runner(warm + [t / 2 for t in a_times])}
    timed = interleaved(runners, warmup=1, rounds=20, per_round=5, max_seconds=1e6, timer=clock)
    assert timed.rounds == 20 and timed.per_round == 5
    assert timed.samples[0] == pytest.approx(a_times) and timed.samples[1] == pytest.approx([t / 2 for t in a_times])
    base, other = summarize(timed.samples[0], 1), summarize(timed.samples[1], 1)
    assert base.p50_ms == pytest.approx(50.5) and base.p99_ms == pytest.approx(99.01)
    assert other.p95_ms == pytest.approx(95.05 / 2)
    assert speedup(base, other) == pytest.approx(2.0)
    assert paired_speedup_spread(timed.samples[0], timed.samples[1], timed.per_round) == pytest.approx((2.0, 2.0))


def test_interleaved_sizes_rounds_by_time_so_fast_models_are_not_timed_cold() -> None:
    clock = FakeClock()
    runners = {k: clock.runner([0.001] * 10_000) for k in (0, 1)}  # 1 ms per call
    timed = interleaved(runners, warmup=2, rounds=3, chunk_seconds=0.05, max_seconds=1e6, timer=clock)
    assert timed.per_round == 50 and len(timed.samples[0]) == 150


def test_interleaved_fits_slow_models_into_the_time_budget() -> None:
    clock = FakeClock()
    runners = {k: clock.runner([1.0] * 100) for k in (0, 1)}  # 1 s per call
    timed = interleaved(runners, warmup=3, rounds=20, per_round=5, max_seconds=10, timer=clock)
    assert timed.per_round == 1  # 20 rounds of 5 calls of 2 models would take 200 s
    assert len(timed.samples[0]) == len(timed.samples[1]) == timed.rounds >= 2
    assert timed.seconds <= 12


# --- bench serve against a real local HTTP server -----------------------------------------------

class _Handler(BaseHTTPRequestHandler):
    """POST /classify: answers by the uploaded file's name: bad* -> 400, err* -> 500,
    drop* -> closes the connection without an answer, anything else -> 200 JSON."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out as two writes: no 40 ms delayed-ACK stall between them

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path != "/classify" or b'name="image"' not in body:
            return self._answer(404 if self.path != "/classify" else 422, {"error": "no field image"})
        name = body.split(b'filename="', 1)[1].split(b'"', 1)[0].decode()
        if name.startswith("drop"):
            self.close_connection = True
            self.connection.close()
            return
        status = 400 if name.startswith("bad") else 500 if name.startswith("err") else 200
        self._answer(status, {"label": "cat", "class_index": 0, "confidence": 0.9, "top_k": [], "model": "fake:v1"}
                     if status == 200 else {"error": "nope"})

    def _answer(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@contextmanager
def serving(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """A threaded HTTP server on a free loopback port; yields its base URL."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with serving(_Handler) as url:
        yield url


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    for index, name in enumerate(("bad", "drop", "err", "ok")):
        Image.new("RGB", (8, 8), (index * 60, 10, 10)).save(folder / f"{name}.png")
    return folder


def test_serve_counts_errors_by_status_code_and_connection_errors(server: str, images: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "serve"
    code, stdout, _ = run_cli(["serve", server, "--images", str(images), "--concurrency", "1,4", "--requests", "40",
                               "--duration", "30", "--timeout", "5", "--out", str(out)], capsys)
    assert code == 0 and "report.md" in stdout
    doc = json.loads((out / "results.json").read_text())
    assert doc["kind"] == "bench-serve" and doc["url"] == f"{server}/classify" and doc["client_on_same_machine"]
    assert [level["concurrency"] for level in doc["levels"]] == [1, 4]
    for level in doc["levels"]:
        # the 4 images are sent in turn: exactly 10 requests each
        assert level["requests"] == 40 and level["stopped_by"] == "requests"
        assert level["by_status"] == {"200": 10, "400": 10, "500": 10}
        assert sum(level["connection_errors"].values()) == 10, level["connection_errors"]
        assert level["ok"] == 10 and level["errors"] == 30 and level["error_rate"] == pytest.approx(0.75)
        assert level["latency"]["samples"] == 10 and level["latency_all"]["samples"] == 40
        assert level["requests_per_s"] == pytest.approx(40 / level["elapsed_s"])
        assert level["models"] == ["fake:v1"]
    report = (out / "report.md").read_text()
    assert "| 1 | 40 | 10 | 75.0% |" in report and "400: 10" in report and "500: 10" in report
    with Image.open(out / "load.png") as image:
        assert image.format == "PNG"


def test_serve_stops_at_the_duration(server: str, images: Path) -> None:
    payloads = [Payload("ok.png", (images / "ok.png").read_bytes(), "image/png")]
    doc = run_sweep(f"{server}/classify", payloads, [2], requests=10**6, duration=0.5, warmup=0)
    level = doc["levels"][0]
    assert level["stopped_by"] == "duration" and 0 < level["requests"] < 10**6 and level["elapsed_s"] < 5
    assert level["by_status"] == {"200": level["requests"]}


def test_serve_latency_percentiles_on_a_fake_clock(images: Path) -> None:
    """A real server moves the client's fake clock by a known latency before each answer, so
    percentiles and rates are exact; the error answers mixed in must count in ``latency_all``
    only, not in the latency of successful answers."""
    clock = FakeClock()
    latencies = iter([i / 1000 for i in range(1, 201)])  # 1..200 ms, in the order the requests arrive
    seen: list[str] = []

    class ClockHandler(_Handler):
        def _answer(self, status: int, payload: dict[str, Any]) -> None:
            clock.now += next(latencies)
            seen.append(self.headers["Content-Type"])
            super()._answer(status, payload)

    payloads = [Payload(name, (images / name).read_bytes(), "image/png") for name in ("ok.png", "bad.png")]
    with serving(ClockHandler) as url:
        # one worker: requests alternate ok, bad, ok, ... and each one's latency is the next in the list
        doc = run_sweep(f"{url}/classify", payloads, [1], requests=200, duration=1e9, warmup=0, timer=clock,
                        preflight=False)
    level = doc["levels"][0]
    assert level["by_status"] == {"200": 100, "400": 100} and level["connection_errors"] == {}
    assert level["stopped_by"] == "requests" and level["models"] == ["fake:v1"]
    # the successful answers took 1, 3, 5, ..., 199 ms; all answers 1..200 ms
    assert level["latency"]["samples"] == 100 and level["latency_all"]["samples"] == 200
    assert level["latency"]["min_ms"] == pytest.approx(1.0) and level["latency"]["p50_ms"] == pytest.approx(100.0)
    assert level["latency"]["p99_ms"] == pytest.approx(197.02)
    assert level["latency_all"]["p50_ms"] == pytest.approx(100.5) and level["latency_all"]["p99_ms"] == pytest.approx(198.01)
    assert level["elapsed_s"] == pytest.approx(20.1) and level["requests_per_s"] == pytest.approx(200 / 20.1)
    assert level["ok_per_s"] == pytest.approx(100 / 20.1)
    # one multipart encoding per payload, reused: the boundary never changes between requests of an image
    assert len(seen) == 200 and len(set(seen)) == 2 and all(h.startswith("multipart/form-data; boundary=") for h in seen)
    assert doc["settings"]["client"].startswith("aiohttp ")


def test_serve_counts_timeouts_by_exception_name(images: Path) -> None:
    release = threading.Event()

    class SlowHandler(_Handler):
        def _answer(self, status: int, payload: dict[str, Any]) -> None:
            release.wait(10)  # answers only after the client's 0.1 s timeout has long passed
            try:
                super()._answer(status, payload)
            except OSError:  # the client has closed the connection
                pass

    payloads = [Payload("ok.png", (images / "ok.png").read_bytes(), "image/png")]
    with serving(SlowHandler) as url:
        try:
            doc = run_sweep(f"{url}/classify", payloads, [2], requests=4, duration=30, timeout=0.1, warmup=0,
                            preflight=False)
        finally:
            release.set()
    level = doc["levels"][0]
    assert level["requests"] == 4 and level["by_status"] == {} and level["connection_errors"] == {"TimeoutError": 4}
    assert level["ok"] == 0 and level["errors"] == 4 and level["latency"] is None
    assert 90 <= level["latency_all"]["min_ms"] and level["latency_all"]["p99_ms"] < 1000  # cut at the timeout


def test_check_target_accepts_loopback_only_unless_allowed() -> None:
    assert check_target("http://127.0.0.1:3000/", "/classify") == "http://127.0.0.1:3000/classify"
    assert check_target("http://localhost:3000", "classify") == "http://localhost:3000/classify"
    assert check_target("http://[::1]:3000", "/classify") == "http://[::1]:3000/classify"
    with pytest.raises(UsageError, match="--allow-remote"):
        check_target("http://10.1.2.3:3000", "/classify")
    assert check_target("http://10.1.2.3:3000", "/classify", allow_remote=True) == "http://10.1.2.3:3000/classify"


# --- bench compare ------------------------------------------------------------------------------

def test_compare_models_and_serve_results(models_out: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = json.loads((models_out / "results.json").read_text())
    b = copy.deepcopy(a)
    for row in b["results"]:
        row["latency"]["p50_ms"] *= 2
        row["latency"]["throughput"] /= 2
    (tmp_path / "b.json").write_text(json.dumps(b))
    code, out, _ = run_cli(["compare", str(models_out / "results.json"), str(tmp_path / "b.json"),
                            "--out", str(tmp_path / "cmp.md")], capsys)
    assert code == 0 and out == (tmp_path / "cmp.md").read_text()
    rows = [line for line in out.splitlines() if line.startswith("| ort-cpu | fp32 | 1 | 0 |")]
    assert len(rows) == 1 and rows[0].split(" | ")[6] == "2.00" and rows[0].split(" | ")[9] == "0.50"
    # two backends of one file
    code, out, _ = run_cli(["compare", str(models_out / "results.json"), str(models_out / "results.json"),
                            "--a-backend", "ort-cpu", "--b-backend", "torch"], capsys)
    assert code == 0 and "| compared | ort-cpu | torch |" in out and "| fp32 | 1 | 0 |" in out
    serve = {"kind": "bench-serve", "url": "u", "machine": {}, "levels": [
        {"concurrency": 1, "requests_per_s": 10.0, "error_rate": 0.0, "latency": {"p50_ms": 100.0, "p99_ms": 200.0}}]}
    serve_b = copy.deepcopy(serve)
    serve_b["levels"][0].update(requests_per_s=30.0, latency={"p50_ms": 50.0, "p99_ms": 100.0})
    (tmp_path / "sa.json").write_text(json.dumps(serve))
    (tmp_path / "sb.json").write_text(json.dumps(serve_b))
    code, out, _ = run_cli(["compare", str(tmp_path / "sa.json"), str(tmp_path / "sb.json")], capsys)
    assert code == 0 and "| 1 | 10.0 | 30.0 | 3.00 | 100.0 | 50.0 | 0.50 | 200.0 | 100.0 | 0.50 |" in out
    code, _, err = run_cli(["compare", str(tmp_path / "sa.json"), str(models_out / "results.json")], capsys)
    assert code == 2 and "cannot compare" in err


# --- bad arguments: one line on stderr, exit code 2 ---------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["models", "{run}", "--backends", "ort-cpu,tensorrt"], "unknown backend(s) tensorrt"),
    (["models", "{run}", "--batch-sizes", "1,x"], "'x' is not an integer"),
    (["models", "{run}", "--batch-sizes", "0"], "must be >= 1"),
    (["models", "{run}", "--threads", "0"], "--threads must be >= 1"),
    (["models", "{run}", "--steps", "9"], "no step(s) [9]"),
    (["models", "/nonexistent/run"], "run directory not found"),
    (["models", "{data}"], "not a run directory"),
    (["serve", "not-a-url", "--images", "{data}"], "bad URL"),
    (["serve", "http://127.0.0.1:notaport", "--images", "{data}"], "bad URL"),
    (["serve", "http://203.0.113.5:3000", "--images", "{data}"], "not this machine"),
    (["serve", "http://127.0.0.1:3000", "--images", "/nonexistent"], "no such file or folder"),
    (["serve", "http://127.0.0.1:3000", "--images", "{data}", "--concurrency", "0"], "must be >= 1"),
    (["serve", "http://127.0.0.1:1", "--images", "{data}"], "nothing answers"),
    (["compare", "/nonexistent/a.json", "/nonexistent/b.json"], "no such file"),
    (["models", "{run}", "--no-such-flag"], "No such option"),
])
def test_bad_arguments_give_one_line_and_exit_code_2(args: list[str], message: str, tiny_run: Path, tiny_data: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    args = [a.format(run=tiny_run, data=tiny_data) for a in args]
    code, _, err = run_cli(args, capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("bench: error: ") and message in err, err


@pytest.mark.skipif(cuda_available(), reason="with CUDA these backends are available")
def test_models_with_only_unavailable_backends_writes_the_report_and_exits_2(
        tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["models", str(tiny_run), "--backends", "ort-cuda,torch-cuda", "--out", str(tmp_path)], capsys)
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("bench: error: nothing measured, every backend was skipped")
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["results"] == [] and {s["backend"] for s in doc["skipped"]} == {"ort-cuda", "torch-cuda"}
    assert "ort-cuda all:" in (tmp_path / "report.md").read_text()


def test_console_script_reports_usage_errors_with_exit_code_2(tmp_path: Path) -> None:
    script = ROOT / ".venv" / "bin" / "bench"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "bench.cli"]
    for args, message in ((["models", str(tmp_path / "missing")], "run directory not found"),
                          (["serve", "http://192.0.2.1:3000", "--images", str(tmp_path)], "--allow-remote")):
        result = subprocess.run(command + args, check=False, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr
        assert "Traceback" not in result.stderr


def test_several_files_per_request_go_in_one_multipart_body_in_the_same_field() -> None:
    """``--files-per-request 32`` for ``/classify_batch``: each body carries that many files in
    the field, taken in turn and wrapping around so every request has exactly that many."""
    payloads = [Payload(f"{i}.png", bytes([i]) * 10, "image/png") for i in range(5)]
    groups = group_payloads(payloads, 3)
    assert [[p.name for p in g] for g in groups] == [["0.png", "1.png", "2.png"], ["3.png", "4.png", "0.png"]]
    assert len(group_payloads(payloads, 32)) == 1 and len(group_payloads(payloads, 32)[0]) == 32
    upload = Upload.of(groups[1], "images")
    assert upload.body.count(b'name="images"') == 3 and upload.headers["Content-Type"].startswith("multipart/form-data")
    assert b'filename="3.png"' in upload.body and b'filename="0.png"' in upload.body
    assert Upload.of(payloads[0], "image").body.count(b'name="image"') == 1


@pytest.mark.skipif(cuda_available(), reason="with CUDA the graphs are measured (tests/test_gpu.py)")
def test_models_cuda_graphs_are_skipped_with_the_reason_without_cuda(tiny_run: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(["models", str(tiny_run), "--backends", "ort-cpu", "--cuda-graphs", "--batch-sizes", "2",
                              "--no-accuracy", "--rounds", "2", "--warmup", "1", "--min-seconds", "0",
                              "--max-seconds", "0.3", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    doc = json.loads((tmp_path / "results.json").read_text())
    assert {r["backend"] for r in doc["results"]} == {"ort-cpu"}
    skipped = {s["backend"]: s["reason"] for s in doc["skipped"]}
    assert set(skipped) == {"torch-cuda", "torch-cuda-graphs"} and "no CUDA device" in skipped["torch-cuda-graphs"]


def test_serve_samples_gpu_utilisation_per_level_from_nvidia_smi(server: str, images: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A stand-in `nvidia-smi` on PATH prints what the real one prints with -lms (one CSV line per
    GPU per interval, sometimes [N/A]); every level gets the mean and peak of its own window."""
    tools = tmp_path / "bin"
    tools.mkdir()
    fake = tools / "nvidia-smi"
    fake.write_text("#!/bin/sh\ncase \"$*\" in *-lms=*) ;; *) exit 3;; esac\n"
                    "while true; do echo '0, 40, 1000'; echo '0, [N/A], 1000'; echo '0, 60, 1200'; sleep 0.05; done\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tools}:{os.environ['PATH']}")
    out = tmp_path / "serve"
    code, _, err = run_cli(["serve", server, "--images", str(images / "ok.png"), "--concurrency", "1,2",
                            "--requests", "400", "--duration", "0.6", "--out", str(out)], capsys)
    assert code == 0, err
    doc = json.loads((out / "results.json").read_text())
    assert doc["gpu_utilisation"]["samples"] > 0 and doc["gpu_utilisation"]["unparsed_lines"][0] == "0, [N/A], 1000"
    for level in doc["levels"]:
        gpu = level["gpu"]["gpus"]["0"]
        assert gpu["mean_util_pct"] == pytest.approx(50, abs=10) and gpu["max_util_pct"] == 60
        assert gpu["max_memory_mib"] == 1200
    assert re.search(r"GPU (4[0-9]|5[0-9]|60)% mean utilisation \|", (out / "report.md").read_text())


def test_serve_without_nvidia_smi_says_gpu_utilisation_was_not_sampled(server: str, images: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi there
    out = tmp_path / "serve"
    code, _, err = run_cli(["serve", server, "--images", str(images / "ok.png"), "--concurrency", "1", "--requests",
                            "5", "--out", str(out)], capsys)
    assert code == 0, err
    doc = json.loads((out / "results.json").read_text())
    assert doc["gpu_utilisation"] == {"skipped": "nvidia-smi not found: GPU utilisation not sampled"}
    assert "gpu" not in doc["levels"][0]
    assert "GPU utilisation: not sampled (nvidia-smi not found" in (out / "report.md").read_text()
