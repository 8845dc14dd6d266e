"""bench campaign: the CPU smoke end to end through the CLI on a generated image folder (real
subprocesses: compress, bench, a real `bentoml serve`), stopped by a tiny --max-minutes and
continued by the next call to `campaign: done`; the bookkeeping on constructed cases; and bad
input (one line on stderr, exit code 2)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.campaign import Context, Part, invalidate_lost_work, new_state
from bench.campaign_parts import choose_pruned_step, parts, pytest_result, saturation
from conftest import cuda_available, make_image_folder, run_bench_cli as run_cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cifar_like(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/<class>/*.jpg and test/<class>/*.jpg, as the CIFAR-10 folder is laid out."""
    root = tmp_path_factory.mktemp("cifar-like")
    make_image_folder(root / "train", per_class=8, size=24, fmt="jpg")
    make_image_folder(root / "test", per_class=4, size=24, seed=1, fmt="jpg")
    return root


@pytest.mark.slow
def test_smoke_stops_at_the_deadline_and_the_next_call_finishes(cifar_like: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    out, work = tmp_path / "results", tmp_path / "work"
    args = ["campaign", "--smoke", "--data", str(cifar_like), "--out", str(out), "--work", str(work)]
    # 9 s: the data part finishes, the baselines part starts and is stopped at the deadline
    code, first, err = run_cli([*args, "--max-minutes", "0.15"], capsys)
    assert code == 0, err
    assert "campaign: part 0-data done" in first
    assert "campaign: done" not in first
    assert "deadline (--max-minutes 0.15) reached in part 1-baselines" in first or "stopped before part" in first, first
    state = json.loads((out / "campaign.json").read_text())
    assert state["parts"]["0-data"]["status"] == "done"
    assert state["parts"]["1-baselines"]["status"] in ("interrupted", "pending")
    assert "missing: part 1-baselines" in (out / "README.md").read_text()

    code, second, err = run_cli([*args, "--max-minutes", "10"], capsys)
    assert code == 0, second + err
    assert "0-data: done in an earlier call" in second and "$ python -m compress data" not in second
    assert second.strip().splitlines()[-1].startswith("campaign: done")
    state = json.loads((out / "campaign.json").read_text())
    assert {name: p["status"] for name, p in state["parts"].items()} == {p.name: "done" for p in parts()}
    assert state["parts"]["0-data"]["calls"] == 1 and len(state["calls"]) == 2
    for part in parts():
        summary = json.loads((out / part.name / "summary.json").read_text())
        assert summary["part"] == part.name and (out / part.name / "README.md").is_file()
        assert state["parts"][part.name]["wall_seconds"] >= 0
    # the exact commands, runnable with PYTHONPATH only
    assert "python -m compress prune" in (out / "2-prune" / "README.md").read_text()
    # /classify_batch with several images per request, against a real bentoml serve
    batch = json.loads((out / "6-service" / "w1-batch" / "results.json").read_text())
    assert batch["settings"]["files_per_request"] == 4 and batch["url"].endswith("/classify_batch")
    assert all(level["ok"] > 0 and level["errors"] == 0 for level in batch["levels"])
    assert batch["levels"][0]["images_per_s"] == pytest.approx(4 * batch["levels"][0]["ok_per_s"])
    assert batch["baseline"]["batches"]["4"]["images_per_s"] > 0
    readme = (out / "README.md").read_text()
    assert "| campaign wall time (sum of parts) |" in readme and "so far" not in readme
    assert "missing: part" not in readme and "passed" in readme
    # big files stay in the work folder: the results folder can be committed
    assert not [p for p in out.rglob("*") if p.suffix in (".onnx", ".pt", ".jpg")]
    assert list(work.rglob("*.onnx"))

    code, third, _ = run_cli([*args, "--max-minutes", "1"], capsys)
    assert code == 0 and "$ " not in third and third.strip().splitlines()[-1].startswith("campaign: done")


@pytest.mark.parametrize("args, message", [
    (["campaign", "--out", "{tmp}/o"], "--data is required"),
    (["campaign", "--smoke", "--data", "{tmp}/missing", "--out", "{tmp}/o"], "no such file or folder"),
    (["campaign", "--smoke", "--data", "{tmp}/flat", "--out", "{tmp}/o"], "expected train/<class>/*"),
    (["campaign", "--smoke", "--data", "{tmp}/notes.txt", "--out", "{tmp}/o"], "expected an image folder"),
    (["campaign", "--smoke", "--out", "{tmp}/notes.txt"], "exists and is not a folder"),
    (["campaign", "--smoke", "--out", "{tmp}/flat"], "holds no campaign.json"),
    (["campaign", "--smoke", "--out", "{tmp}/o", "--max-minutes", "0"], "--max-minutes must be > 0"),
    (["campaign", "--smoke", "--out", "{tmp}/o", "--work", "{tmp}/o/work"], "--work must not be inside --out"),
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


@pytest.mark.skipif(cuda_available(), reason="with CUDA the full campaign runs")
def test_the_full_campaign_refuses_without_cuda_through_the_module_entry_point(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "d" / "train", per_class=1, size=8)
    make_image_folder(tmp_path / "d" / "test", per_class=1, size=8)
    result = subprocess.run([sys.executable, "-m", "bench", "campaign", "--data", str(tmp_path / "d"), "--out",
                             str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == "bench: error: no CUDA device: run on a GPU machine, or --smoke"
    assert not (tmp_path / "o").exists()


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


def _step(step: int, accuracy: float, macs: int, speedup: float | None) -> dict:
    return {"step": step, "accuracy": accuracy, "macs": macs,
            **({"speedup_measured": {"speedup": speedup, "backend": "ort-cuda", "batch": 256}} if speedup else {})}


def test_the_chosen_step_is_the_fastest_within_the_tolerance() -> None:
    manifest = {"steps": [_step(0, 0.940, 100, None), _step(1, 0.938, 60, 1.5), _step(2, 0.936, 40, 2.1),
                          _step(3, 0.920, 20, 2.9)]}
    chosen = choose_pruned_step(manifest, 0.005)
    assert chosen["step"] == 2 and chosen["within_tolerance"] and chosen["macs_ratio"] == pytest.approx(0.4)
    # none within: the most accurate pruned step, marked as outside
    chosen = choose_pruned_step({"steps": [_step(0, 0.94, 100, None), _step(1, 0.90, 60, 1.5),
                                           _step(2, 0.88, 40, 2.0)]}, 0.005)
    assert chosen["step"] == 1 and not chosen["within_tolerance"]


def test_parts_whose_work_files_are_gone_are_redone_when_a_pending_part_needs_them(tmp_path: Path) -> None:
    produced = tmp_path / "made-by-a.txt"
    listing = [Part("a", "makes a file", 1, 1, run=lambda ctx: {}, outputs=lambda ctx: [produced]),
               Part("b", "reads it", 1, 1, run=lambda ctx: {}, needs=("a",)),
               Part("c", "independent", 1, 1, run=lambda ctx: {})]
    state = new_state(True, "generated", tmp_path)
    state["parts"] = {"a": {"status": "done", "finished": ["x"]}, "b": {"status": "pending"}, "c": {"status": "done"}}
    ctx = Context(out=tmp_path, work=tmp_path, smoke=True, settings={}, deadline=0.0, state=state)
    assert invalidate_lost_work(listing, ctx) == ["a"]
    assert state["parts"]["a"]["status"] == "pending" and state["parts"]["a"]["finished"] == []
    produced.write_text("here")
    state["parts"]["a"]["status"] = "done"
    assert invalidate_lost_work(listing, ctx) == []


def test_pytest_result_line_is_read_from_the_log(tmp_path: Path) -> None:
    log = tmp_path / "pytest.log"
    log.write_text("....s\n=========== short test summary info ===========\nSKIPPED [1] x\n"
                   "=========== 207 passed, 5 skipped in 406.21s (0:06:46) ===========\n")
    assert pytest_result(log) == "207 passed, 5 skipped in 406.21s (0:06:46)"
    log.write_text("4 skipped in 2.13s\n")
    assert pytest_result(log) == "4 skipped in 2.13s"
    log.write_text("ImportError\n")
    assert pytest_result(log).startswith("no pytest result line")
