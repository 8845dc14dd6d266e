"""`compress run` under torchrun on the CPU (gloo, 2 processes): the ranks' shards, a tiny run
killed with `kill -9` of one rank and resumed with the multi-node form of the command, the
pruned structure against a single-process run, and a usage error that stops every rank."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from compress.cli import main

from conftest import TINY_OPTIONS

pytestmark = pytest.mark.skipif(not Path("/proc/self/environ").exists() or not torch.distributed.is_available(),
                                reason="needs torch.distributed and Linux /proc")

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
CLI = ["-m", "compress.cli"]
# uniform scope: every layer keeps the same fraction, so the structure does not depend on the
# trained weights (which differ between 1 and 2 processes) and can be compared; the
# class-balanced sampler, to train with its distributed twin
OPTIONS = [*TINY_OPTIONS, "--scope", "uniform", "--balance", "sampler"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "COMPRESS_DIST_TIMEOUT": "90"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _standalone(*args: str) -> list[str]:
    """One node, two processes, a rendezvous on a free port torchrun picks."""
    return [*TORCHRUN, "--standalone", "--nproc_per_node", "2", *args]


def _worker_pids(agent: int) -> dict[int, int]:
    """RANK -> pid of the worker processes torchrun (``agent``) started."""
    ranks: dict[int, int] = {}
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            if int(re.search(r"PPid:\s+(\d+)", status.read_text()).group(1)) != agent:  # type: ignore[union-attr]
                continue
            for item in (status.parent / "environ").read_bytes().split(b"\0"):
                if item.startswith(b"RANK="):
                    ranks[int(item[5:])] = int(status.parent.name)
        except (OSError, AttributeError, ValueError):
            continue
    return ranks


def test_two_ranks_see_disjoint_shards(tmp_path: Path, tiny_data: Path) -> None:
    out = tmp_path / "shards.json"
    worker = Path(__file__).with_name("ddp_shards_worker.py")
    result = subprocess.run(_standalone(str(worker), str(tiny_data), str(out)), env=_env(), capture_output=True,
                            text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(out.read_text())
    rank0, rank1 = seen["ranks"]
    assert (rank0["rank"], rank1["rank"], rank0["world_size"], rank0["backend"]) == (0, 1, 2, "gloo")
    train = seen["train"]  # 38 images: 19 per rank, no padding needed
    assert train % 2 == 0
    for key in ("train_none", "train_sampler"):
        assert rank0[f"{key}_batches"] == rank1[f"{key}_batches"]  # DDP needs the same step count
    for epoch in (0, 1):
        a, b = rank0["train_none"][epoch], rank1["train_none"][epoch]
        assert len(a) == len(b) == train // 2 and not set(a) & set(b) and set(a) | set(b) == set(range(train))
    assert rank0["train_none"][0] != rank0["train_none"][1], "set_epoch reshuffles"
    # class-balanced draws: one shared sequence per epoch, shared out (with replacement, so
    # disjoint positions rather than disjoint images)
    a, b = rank0["train_sampler"][0], rank1["train_sampler"][0]
    assert len(a) == len(b) == train // 2 and a != b
    # evaluation: disjoint, every image exactly once, accuracy counted over all of them
    val = seen["val_labels"]
    assert sorted(rank0["val"] + rank1["val"]) == list(range(len(val))) and not set(rank0["val"]) & set(rank1["val"])
    expected = val.count(0) / len(val)
    assert rank0["accuracy"] == rank1["accuracy"] == rank0["device_accuracy"] == pytest.approx(expected)
    # --data-on-device loaders shard the same way
    a, b = rank0["device_train"], rank1["device_train"]
    assert not set(a) & set(b) and set(a) | set(b) == set(range(train))
    assert rank0["device_train_batches"] == rank1["device_train_batches"]
    assert sorted(rank0["device_val"] + rank1["device_val"]) == list(range(len(val)))


def test_shards_of_an_odd_count() -> None:
    """Training shards are padded to equal lengths (DDP steps in lockstep), evaluation shards are not."""
    from compress.distributed import ShardSampler, shard

    order = torch.tensor([4, 0, 3, 1, 2])
    train = [shard(order, rank, 2, pad=True).tolist() for rank in (0, 1)]
    assert train == [[4, 3, 2], [0, 1, 4]]
    val = [shard(order, rank, 2, pad=False).tolist() for rank in (0, 1)]
    assert val == [[4, 3, 2], [0, 1]]
    assert [list(ShardSampler(5, rank, 3)) for rank in range(3)] == [[0, 3], [1, 4], [2]]
    assert len(shard(torch.arange(2), 2, 3, pad=True)) == 1  # fewer items than ranks


@pytest.mark.slow
def test_torchrun_run_survives_kill_9_of_a_rank_and_matches_single_process(tmp_path: Path, tiny_data: Path) -> None:
    out = tmp_path / "ddp"
    args = ["run", "--data", str(tiny_data), "--out", str(out), *OPTIONS]
    state = out / "steps" / "step_00" / "train_state.pt"

    # 1: one node, two processes; rank 1 killed once fine-tuning wrote its first epoch's state
    err1 = (tmp_path / "err1.txt").open("w")
    agent = subprocess.Popen(_standalone(*CLI, *args), env=_env(), stdout=subprocess.DEVNULL, stderr=err1)
    deadline = time.monotonic() + 150
    while not state.exists():
        assert agent.poll() is None, (tmp_path / "err1.txt").read_text()[-3000:]
        assert time.monotonic() < deadline, "fine-tuning wrote no state in time"
        time.sleep(0.05)
    workers = _worker_pids(agent.pid)
    assert sorted(workers) == [0, 1]
    os.kill(workers[1], signal.SIGKILL)
    assert agent.wait(timeout=90) != 0  # torchrun stops the other rank and fails
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["steps"] == []
    saved = torch.load(state, weights_only=True)
    done_before = saved["history"]

    # 2: the same command in its multi-node form (2 nodes x 1 process on this machine) resumes
    # it, now with the images held as tensors (an execution-only option: a resume may change it)
    port = _free_port()
    nodes = [subprocess.Popen([*TORCHRUN, "--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node", "1",
                               "--master_addr", "127.0.0.1", "--master_port", str(port), *CLI, *args,
                               "--data-on-device", "on"],
                              env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    errors = [node.communicate(timeout=240)[1] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], errors[0][-3000:] + errors[1][-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    finetune = manifest["stages"]["finetune"]
    assert [h["epoch"] for h in finetune["history"]] == [0, 1] and finetune["data_on_device"]
    assert finetune["history"][:len(done_before)] == done_before, "finished epochs were kept, not redone"
    assert manifest["world_size"] == 2 and manifest["backend"] == "gloo"
    for stage in (finetune, manifest["steps"][1]["retrain"]):
        assert (stage["world_size"], stage["backend"], stage["batch_size_per_rank"], stage["global_batch_size"]) \
            == (2, "gloo", 16, 32)
    assert [s["step"] for s in manifest["steps"]] == [0, 1]
    assert all(s["onnx"] and s["parity"]["top1_agreement"] == 1.0 for s in manifest["steps"])
    assert (out / "report.md").exists() and not state.exists()
    # rank 0 alone reports (and writes); rank 1 on "node 1" says nothing
    assert errors[0].count("step 1: ONNX exported") == 1 and "ONNX exported" not in errors[1]

    # 3: a single-process run with the same options prunes to the same structure
    single = tmp_path / "single"
    main(["finetune", "--data", str(tiny_data), "--out", str(single), *OPTIONS])
    main(["prune", str(single)])
    reference = json.loads((single / "manifest.json").read_text())
    assert reference["world_size"] == 1 and reference["stages"]["finetune"]["global_batch_size"] == 16

    def structure(m: dict) -> list:
        return [(s["step"], s["macs"], s["params"], s["widths"]) for s in m["steps"]]

    assert structure(manifest) == structure(reference)


def test_usage_error_on_rank_0_stops_every_rank(tmp_path: Path) -> None:
    started = time.monotonic()
    result = subprocess.run(_standalone(*CLI, "run", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "r"),
                                        *OPTIONS), env=_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    line = f"compress: error: --data {tmp_path / 'missing'}: no such folder"
    assert result.stderr.count(line) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr.split(line)[0]
    assert time.monotonic() - started < 60  # the other rank did not wait for a timeout
