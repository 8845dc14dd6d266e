"""bench campaign (issue 21: the GPU evidence in one time-boxed call): the CPU smoke end to end
through the CLI on a CIFAR-like image folder (real subprocesses: pytest, compress, bench, a real
`bentoml serve`); the driver on constructed parts (a budget cuts a part off and the next one
runs, the bundle is rewritten after every part, a part left nothing to work on is skipped); the
plan of --dry-run; the CUDA checks; bad input (one line on stderr, exit code 2)."""
from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

import bench.campaign as campaign
from bench.campaign import Context, Part, PartSkipped, budgets, new_state, run_campaign
from bench.campaign_parts import GPU, parts, pytest_progress, pytest_result, saturation
from bench.campaign_report import write_evidence
from conftest import cuda_available, make_image_folder, run_bench_cli as run_cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cifar_like(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/<class>/*.jpg and test/<class>/*.jpg, as the CIFAR-10 folder is laid out."""
    root = tmp_path_factory.mktemp("cifar-like")
    make_image_folder(root / "train", per_class=8, size=24, fmt="jpg")
    make_image_folder(root / "test", per_class=4, size=24, seed=1, fmt="jpg")
    return root


def _bundle_names(bundle: Path) -> set[str]:
    with tarfile.open(bundle) as archive:
        return set(archive.getnames())


@pytest.mark.slow
def test_smoke_runs_every_part_in_one_call_and_leaves_the_evidence(cifar_like: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out, work, bundle = tmp_path / "results", tmp_path / "work", tmp_path / "OUT" / "evidence.tar.gz"
    args = ["campaign", "--smoke", "--data", str(cifar_like), "--out", str(out), "--work", str(work),
            "--bundle", str(bundle)]
    started = time.monotonic()
    code, first, err = run_cli(args, capsys)
    seconds = time.monotonic() - started
    assert code == 0, first + err
    assert first.strip().splitlines()[-1].startswith("campaign: done in"), first
    assert seconds < sum(SMOKE_BUDGETS.values()) + 30  # the budgets bound the call
    doc = json.loads((out / "evidence.json").read_text())
    statuses = {name: p["status"] for name, p in doc["parts"].items()}
    assert list(statuses) == [p.name for p in parts()]
    # on a busy shared machine a part may reach its budget: then it is cut off with what it got, never lost
    assert set(statuses.values()) <= {"done", "cut-off"}, statuses
    assert all(not p["line"].startswith("missing") for p in doc["parts"].values()), doc["parts"]
    # a: the machine and the GPU tests (all skipped here: no CUDA), ORT really asked for its providers
    machine = doc["parts"]["machine"]["summary"]
    assert machine["ort"]["session_providers"] == ["CPUExecutionProvider"] and not machine["ort"]["cuda_provider_loaded"]
    assert "skipped" in machine["tests"]["result"] and machine["tests"]["outcomes"].get("skipped", 0) >= 1
    # c: accuracy per step, wall time and images/s per epoch
    train = doc["parts"]["train"]["summary"]
    assert [s["step"] for s in train["steps"]][:1] == [0]
    assert train["epochs"] and all(e["seconds"] > 0 and e["images_per_s"] > 0 for e in train["epochs"])
    if statuses["train"] == "done":
        assert [s["step"] for s in train["steps"]] == [0, 1] and train["steps"][1]["macs_ratio"] < 0.9
        # b: speed-ups against step 0 in the same run; CUDA graphs skipped here, with the reason
        table = doc["parts"]["bench"]["summary"]["table"]
        assert {(t["backend"], t["step"]) for t in table} >= {("ort-cpu", 0), ("ort-cpu", 1)}
        assert all(t["speedup_by_batch"] for t in table)
        skipped = {s["backend"]: s["reason"] for s in doc["parts"]["bench"]["summary"]["skipped"]}
        assert "no CUDA device" in skipped["torch-cuda-graphs"]
        # d: a real bentoml serve at every connection count, against the same model in-process
        if statuses["service"] == "done":
            service = doc["parts"]["service"]["summary"]
            assert [lv["concurrency"] for lv in service["levels"]] == [1, 8]
            assert all(lv["errors"] == 0 and lv["p99_ms"] >= lv["p50_ms"] > 0 for lv in service["levels"])
            assert service["in_process"]["1"] > 0
            assert service["gpu_utilisation"] == {"skipped": "nvidia-smi not found: GPU utilisation not sampled"}
    # the exact commands, runnable with PYTHONPATH only
    assert "python -m compress run --data" in (out / "train" / "README.md").read_text()
    # the bundle and the evidence beside it: the whole results folder, small, no models or images
    names = _bundle_names(bundle)
    assert {"results/README.md", "results/evidence.json", "results/train/README.md"} <= names
    assert (bundle.parent / "evidence.md").read_text() == (out / "README.md").read_text()
    assert json.loads((bundle.parent / "evidence.json").read_text())["parts"].keys() == doc["parts"].keys()
    assert not [n for n in names if n.endswith((".onnx", ".pt", ".jpg"))] and list(work.rglob("*.onnx"))

    code, again, _ = run_cli(args, capsys)  # called again: nothing left to run
    assert code == 0 and "$ " not in again and all(f"{s} in an earlier call" in again for s in set(statuses.values()))


SMOKE_BUDGETS = {p.name: p.smoke_budget for p in parts()}


# --- the driver on constructed parts ---------------------------------------------------------------

def _sleeper(seconds: float) -> list[str]:
    return [sys.executable, "-c", f"import time; print('started', flush=True); time.sleep({seconds})"]


def _settings() -> dict:
    return {"profile": "smoke", "grace_seconds": 1}


def test_a_part_is_cut_off_at_its_budget_with_its_partial_result_and_the_next_part_still_runs(
        tmp_path: Path) -> None:
    """The bundle is rewritten after every part: the third part finds the first two in it."""
    bundle = tmp_path / "OUT" / "evidence.tar.gz"
    seen: dict[str, set[str]] = {}

    def quick(ctx: Context) -> dict:
        ctx.run("echo", [sys.executable, "-c", "print('hello')"])
        return {"line": "quick finished"}

    def slow(ctx: Context) -> dict:
        ctx.run("sleep", _sleeper(60))
        raise AssertionError("not reached: the budget stops the command")

    def looks(ctx: Context) -> dict:
        seen["bundle"] = _bundle_names(bundle)
        seen["evidence"] = set(json.loads((bundle.parent / "evidence.json").read_text())["parts"])
        return {"line": "looked"}

    listing = [Part("quick", "a", "quick", 10, 10, run=quick),
               Part("slow", "b", "slow", 3, 3, run=slow, partial=lambda ctx: {"line": "got this far"}),
               Part("looks", "c", "reads the bundle", 10, 10, run=looks, needs=("slow",))]
    started = time.monotonic()
    code = run_campaign(listing, out=tmp_path / "results", work=tmp_path / "work", data="generated", smoke=True,
                        max_minutes=1, settings=_settings(),
                        write_evidence=lambda ctx, parts: write_evidence(ctx, parts, bundle), echo=lambda line: None)
    assert code == 0 and time.monotonic() - started < 20
    doc = json.loads((tmp_path / "results" / "evidence.json").read_text())
    assert {n: p["status"] for n, p in doc["parts"].items()} == {"quick": "done", "slow": "cut-off", "looks": "done"}
    assert doc["parts"]["slow"]["line"] == "got this far" and 2.5 <= doc["parts"]["slow"]["wall_seconds"] < 10
    assert doc["parts"]["slow"]["budget_seconds"] == 3
    assert "started" in (tmp_path / "results" / "logs" / "slow" / "sleep.log").read_text()
    assert {"results/logs/quick/echo.log", "results/logs/slow/sleep.log"} <= seen["bundle"]
    assert seen["evidence"] == {"quick", "slow", "looks"}
    readme = (bundle.parent / "evidence.md").read_text()
    assert "| slow | b | cut-off |" in readme and "got this far" in readme and "| looks | c | done |" in readme


def test_a_part_with_nothing_to_work_on_is_skipped_a_failure_fails_and_the_rest_still_runs(tmp_path: Path) -> None:
    def nothing(ctx: Context) -> dict:
        raise PartSkipped("the training part left no exported step")

    def broken(ctx: Context) -> dict:
        ctx.run("false", [sys.executable, "-c", "import sys; print('bad input'); sys.exit(3)"])
        return {}

    listing = [Part("broken", "a", "fails", 5, 5, run=broken),
               Part("needs-broken", "b", "needs it", 5, 5, run=lambda ctx: {"line": "ran"}, needs=("broken",)),
               Part("nothing", "c", "nothing to do", 5, 5, run=nothing),
               Part("last", "e", "still runs", 5, 5, run=lambda ctx: {"line": "ran"})]
    code = run_campaign(listing, out=tmp_path / "results", work=tmp_path / "work", data="generated", smoke=True,
                        max_minutes=1, settings=_settings(), write_evidence=write_evidence, echo=lambda line: None)
    assert code == 1
    parts_doc = json.loads((tmp_path / "results" / "evidence.json").read_text())["parts"]
    assert {n: p["status"] for n, p in parts_doc.items()} == {"broken": "failed", "needs-broken": "skipped",
                                                              "nothing": "skipped", "last": "done"}
    assert "exit code 3" in parts_doc["broken"]["error"] and "bad input" in parts_doc["broken"]["error"]
    assert parts_doc["needs-broken"]["line"] == "missing: skipped (needs broken, which did not finish)"
    assert "left no exported step" in parts_doc["nothing"]["line"]


def test_budgets_are_scaled_down_alike_to_fit_max_minutes() -> None:
    listing = [Part("x", "a", "x", 100, 10, run=lambda ctx: {}), Part("y", "b", "y", 300, 30, run=lambda ctx: {})]
    assert budgets(listing, False, 7, 20) == {"x": 100, "y": 300}
    assert budgets(listing, False, 2, 20) == pytest.approx({"x": 25, "y": 75})
    assert budgets(listing, True, 7, 20) == {"x": 10, "y": 30}


def test_the_gpu_plan_fits_the_device_lease() -> None:
    """Issue 21: the evidence call is at most 6.5 of the 13 minutes of device time."""
    gpu_total = sum(p.budget for p in parts())
    assert gpu_total + campaign.reserve_seconds(GPU, 6.5) <= 6.5 * 60
    assert [p.item for p in parts()] == ["a", "c", "b", "d", "e"]


def test_dry_run_prints_every_part_with_its_budget(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    archive = tmp_path / "cifar10-jpg.tar.xz"
    archive.write_bytes(b"")  # --dry-run reads nothing
    code, out, err = run_cli(["campaign", "--dry-run", "--data", str(archive), "--out", str(tmp_path / "o")], capsys)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].startswith("campaign plan (gpu), --max-minutes 6.5 (390 s")
    for index, part in enumerate(parts(), 1):
        assert any(line.startswith(f"  {index}. {part.name} [issue item {part.item}] budget {part.budget:.0f} s: ")
                   for line in lines), out
    assert "--cuda-graphs" in out and "--arch resnet56" in out and "--concurrency 1,8,64" in out
    assert any(line.startswith("  total 365 s of parts + 25 s reserve = 390 s") for line in lines), out
    if not cuda_available():
        assert lines[-1] == "  this machine: no CUDA device: run on a GPU machine, or --smoke"
    assert not (tmp_path / "o").exists()
    code, out, _ = run_cli(["campaign", "--dry-run", "--smoke", "--max-minutes", "0.5", "--out", str(tmp_path / "o")],
                           capsys)
    assert code == 0 and "scaled to fit --max-minutes" in out and "--arch resnet20" in out


def test_ort_without_its_cuda_provider_still_runs_and_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A GPU whose ONNX Runtime has no CUDA provider: the campaign runs (torch's figures, the
    training, the service on ORT's CPU provider) and the evidence names what is missing."""
    seen: dict = {}

    def records(ctx: Context) -> dict:
        seen["provider"] = ctx.settings.get("serve_provider_override")
        return {"line": "ran"}

    monkeypatch.setattr(campaign, "cuda_status", lambda: (None, "onnxruntime has no CUDAExecutionProvider"))
    monkeypatch.setattr("bench.campaign_parts.parts", lambda: [Part("only", "a", "records", 5, 5, run=records)])
    make_image_folder(tmp_path / "d" / "train", per_class=1, size=8)
    make_image_folder(tmp_path / "d" / "test", per_class=1, size=8)
    code, out, err = run_cli(["campaign", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "o"), "--work",
                              str(tmp_path / "w")], capsys)
    assert code == 0, err
    assert seen["provider"] == "cpu"
    assert "campaign: ONNX Runtime's CUDA provider is MISSING (onnxruntime has no CUDAExecutionProvider)" in out
    assert "CUDA provider is MISSING" in (tmp_path / "o" / "README.md").read_text()


@pytest.mark.skipif(cuda_available(), reason="with CUDA the full campaign runs")
def test_the_full_campaign_refuses_without_cuda_through_the_module_entry_point(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "d" / "train", per_class=1, size=8)
    make_image_folder(tmp_path / "d" / "test", per_class=1, size=8)
    result = subprocess.run([sys.executable, "-m", "bench", "campaign", "--data", str(tmp_path / "d"), "--out",
                             str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == "bench: error: no CUDA device: run on a GPU machine, or --smoke"
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, message", [
    (["campaign", "--out", "{tmp}/o"], "--data is required"),
    (["campaign", "--smoke", "--data", "{tmp}/missing", "--out", "{tmp}/o"], "no such file or folder"),
    (["campaign", "--smoke", "--data", "{tmp}/flat", "--out", "{tmp}/o"], "expected train/<class>/*"),
    (["campaign", "--smoke", "--data", "{tmp}/notes.txt", "--out", "{tmp}/o"], "expected an image folder"),
    (["campaign", "--smoke", "--out", "{tmp}/notes.txt"], "exists and is not a folder"),
    (["campaign", "--smoke", "--out", "{tmp}/flat"], "holds no campaign.json"),
    (["campaign", "--smoke", "--out", "{tmp}/o", "--max-minutes", "0"], "--max-minutes must be > 0"),
    (["campaign", "--smoke", "--out", "{tmp}/o", "--work", "{tmp}/o/work"], "--work must not be inside --out"),
    (["campaign", "--smoke", "--out", "{tmp}/o", "--bundle", "{tmp}/e.zip"], "expected a .tar.gz file name"),
    (["campaign", "--smoke", "--out", "{tmp}/o", "--bundle", "{tmp}/o/e.tar.gz"], "--bundle must not be inside --out"),
])
def test_bad_input_gives_one_line_and_exit_code_2(args: list[str], message: str, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("not an archive")
    make_image_folder(tmp_path / "flat", per_class=1, size=8)
    code, out, err = run_cli([a.format(tmp=tmp_path) for a in args], capsys)
    assert code == 2, out + err
    assert len(err.strip().splitlines()) == 1 and err.startswith("bench: error: ") and message in err, err


def test_a_campaign_folder_is_continued_only_with_the_same_data(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "campaign.json").write_text(json.dumps(new_state(True, "generated", tmp_path / "w")))
    make_image_folder(tmp_path / "d" / "train", per_class=1, size=8)
    make_image_folder(tmp_path / "d" / "test", per_class=1, size=8)
    code, _, err = run_cli(["campaign", "--smoke", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "was started with --data generated" in err, err


# --- bookkeeping on constructed cases ------------------------------------------------------------

def _row(backend: str, batch: int, images_per_s: float, step: int = 0, precision: str = "fp32",
         speedup: float = 1.0) -> dict:
    return {"backend": backend, "batch": batch, "step": step, "precision": precision, "speedup": speedup,
            "latency": {"throughput": images_per_s}}


def test_saturation_is_the_smallest_batch_within_90_percent_of_the_best() -> None:
    doc = {"results": [_row("ort-cuda", b, t) for b, t in ((1, 1000), (64, 50000), (256, 91000), (1024, 100000),
                                                           (4096, 98000))]}
    found = saturation(doc, "ort-cuda")
    assert found["saturating_batch"] == 256 and found["peak_batch"] == 1024 and found["peak_images_per_s"] == 100000
    assert saturation(doc, "torch-cuda") is None


def test_pytest_result_and_progress_are_read_from_the_log(tmp_path: Path) -> None:
    log = tmp_path / "pytest.log"
    log.write_text("....s\n=========== short test summary info ===========\nSKIPPED [1] x\n"
                   "=========== 207 passed, 5 skipped in 406.21s (0:06:46) ===========\n")
    assert pytest_result(log) == "207 passed, 5 skipped in 406.21s (0:06:46)"
    log.write_text("4 skipped in 2.13s\n")
    assert pytest_result(log) == "4 skipped in 2.13s"
    log.write_text("ImportError\n")
    assert pytest_result(log).startswith("no pytest result line")
    # cut off: no closing line, the -v lines so far
    log.write_text("tests/test_gpu.py::test_a PASSED [ 10%]\ntests/test_gpu.py::test_b FAILED [ 20%]\n"
                   "tests/test_serve.py::test_c[cuda] PASSED [ 30%]\ntests/test_serve.py::test_d ")
    assert pytest_progress(log) == {"passed": 2, "failed": 1}


def test_the_archive_is_unpacked_once_into_the_work_folder(tmp_path: Path) -> None:
    """The GPU profile's data step: cifar10-jpg.tar.xz (one top folder holding train/ and test/)
    unpacked into the work folder, with the command recorded; a second call reuses it."""
    from bench.campaign_parts import data_dir

    make_image_folder(tmp_path / "src" / "cifar10" / "train", per_class=2, size=8, fmt="jpg")
    make_image_folder(tmp_path / "src" / "cifar10" / "test", per_class=1, size=8, fmt="jpg")
    archive = tmp_path / "cifar10-jpg.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(tmp_path / "src" / "cifar10", arcname="cifar10")
    state = new_state(False, str(archive), tmp_path / "work")
    ctx = Context(out=tmp_path / "results", work=tmp_path / "work", smoke=False, settings=_settings(),
                  deadline=time.monotonic() + 60, state=state, echo=lambda line: None)
    ctx.part = Part("train", "c", "train", 10, 10, run=lambda c: {})
    folder = data_dir(ctx)
    assert folder == (tmp_path / "work" / "data" / "cifar10").resolve()
    assert len(list((folder / "train").rglob("*.jpg"))) == len(list((tmp_path / "src" / "cifar10" / "train").rglob("*.jpg")))
    assert (folder / "test").is_dir() and not (tmp_path / "work" / "data" / "cifar10.partial").exists()
    assert any(c.startswith("tar -xf") for c in ctx.part_state["commands"])
    state.pop("data_dir")
    assert data_dir(ctx) == folder  # already there: not unpacked again


def test_the_service_leaves_cuda_when_the_machine_part_saw_ort_fall_back() -> None:
    """ORT lists its CUDA provider but a session fell back to the CPU (cuDNN missing, say): the
    service part serves on the CPU provider instead of failing on SERVE_PROVIDER=cuda."""
    from bench.campaign_parts import serve_provider

    assert serve_provider("cuda", None, {"cuda_provider_loaded": False}) == "cpu"
    assert serve_provider("cuda", None, {"cuda_provider_loaded": True}) == "cuda"
    assert serve_provider("cuda", None, {}) == "cuda"  # the machine part got no probe: as the profile says
    assert serve_provider("cuda", "cpu", {"cuda_provider_loaded": True}) == "cpu"
