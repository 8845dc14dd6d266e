"""Bring your own trained ResNet: every way users save one (made here from real torchvision
and timm models) read as step 0 without training, the architecture read from the weights,
refusals with one line, and every step coming back as a plain-PyTorch ``model.pt2``."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from compress.architecture import build_from_state, load_model_file
from compress.cli import main
from compress.data_index import Preprocessing
from compress.errors import UsageError
from compress.export import read_metadata
from compress.models import save_checkpoint
from compress.runtime.sessions import OrtModel, SessionSettings

from conftest import make_split_folder

timm = pytest.importorskip("timm")

FAST = ["--prune-steps", "0", "--device", "cpu", "--timing-seconds", "0.1", "--latency-batch", "4",
        "--batch-size", "16"]
INPUTS = torch.Generator().manual_seed(0)
X = torch.randn(4, 3, 32, 32, generator=INPUTS)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three classes of real 32 px JPEGs, train/ and val/."""
    root = tmp_path_factory.mktemp("byo-data")
    make_split_folder(root, train=4, val=4, size=32)
    for path in list(root.rglob("*.png")):  # as JPEG files, the way users' folders mostly are
        from PIL import Image

        with Image.open(path) as image:
            image.convert("RGB").save(path.with_suffix(".jpg"), quality=90)
        path.unlink()
    return root


def _randomised(model: nn.Module, seed: int = 1) -> nn.Module:
    """Non-trivial BatchNorm statistics, so a wrongly loaded buffer shows in the logits."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    return _randomised(torchvision.models.resnet18(num_classes=3))


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


def _logits_equal(imported: nn.Module, original: nn.Module, atol: float = 1e-5) -> None:
    with torch.no_grad():
        assert torch.allclose(imported.eval()(X), original.eval()(X), atol=atol)


# --- every format of the issue, read and rebuilt ------------------------------------------------

def _formats(model: nn.Module, folder: Path) -> dict[str, tuple[Path, str, str | None, str | None]]:
    """The same weights saved the ways users save them: path, format, key, stripped prefix."""
    from safetensors.torch import save_file

    state = model.state_dict()
    files: dict[str, tuple[Path, str, str | None, str | None]] = {}

    def save(name: str, obj: object, fmt: str = "torch", key: str | None = None, prefix: str | None = None) -> None:
        path = folder / name
        torch.save(obj, path)
        files[name] = (path, fmt, key, prefix)

    save("plain.pth", state)
    save("plain.bin", state)
    args = argparse.Namespace(model="resnet18", lr=0.5, epochs=90, data_path="/data/imagenet")
    save("references.pth", {"model": state, "model_ema": state, "optimizer": {"state": {}, "param_groups": [{"lr": 0.5}]},
                            "lr_scheduler": {"last_epoch": 89, "_last_lr": [0.0]}, "epoch": 89, "args": args},
         key="model")
    save("lightning.ckpt", {"epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.4.0",
                            "state_dict": {f"net.{k}": v for k, v in state.items()}, "optimizer_states": [],
                            "hyper_parameters": {"lr": 0.1}}, key="state_dict", prefix="net.")
    save("ddp.pt", {f"module.{k}": v for k, v in state.items()}, prefix="module.")
    save("compiled.pt", {f"_orig_mod.{k}": v for k, v in state.items()}, prefix="_orig_mod.")
    save("ema-only.pth.tar", {"state_dict_ema": state, "epoch": 1}, key="state_dict_ema")
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors")
    files["model.safetensors"] = (folder / "model.safetensors", "safetensors", None, None)
    torch.jit.save(torch.jit.script(model), folder / "scripted.pt")
    files["scripted.pt"] = (folder / "scripted.pt", "torchscript", None, None)
    torch.jit.save(torch.jit.trace(model, X[:1]), folder / "traced.pt")
    files["traced.pt"] = (folder / "traced.pt", "torchscript", None, None)
    return files


def test_every_format_reads_back_the_same_model(tmp_path: Path, resnet18: nn.Module) -> None:
    for name, (path, fmt, key, prefix) in _formats(resnet18, tmp_path).items():
        imported = load_model_file(path)
        assert (imported.checkpoint.format, imported.checkpoint.key, imported.checkpoint.prefix) == (fmt, key, prefix), name
        assert imported.arch == "resnet18" and imported.stem == "imagenet" and imported.num_classes == 3
        _logits_equal(imported.model, resnet18)


def test_torchscript_is_read_without_running_its_code(tmp_path: Path, resnet18: nn.Module, monkeypatch) -> None:
    torch.jit.save(torch.jit.script(resnet18), tmp_path / "scripted.pt")

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.jit.load must not be called")

    monkeypatch.setattr(torch.jit, "load", refuse)
    _logits_equal(load_model_file(tmp_path / "scripted.pt").model, resnet18)


def test_checkpoint_key_chooses_the_ema_weights(tmp_path: Path, resnet18: nn.Module) -> None:
    ema = _randomised(torchvision.models.resnet18(num_classes=3), seed=7)
    torch.save({"model": resnet18.state_dict(), "model_ema": ema.state_dict(), "epoch": 3}, tmp_path / "both.pth")
    default = load_model_file(tmp_path / "both.pth")
    assert default.checkpoint.key == "model" and default.checkpoint.also == ["model_ema"]
    chosen = load_model_file(tmp_path / "both.pth", key="model_ema")
    _logits_equal(chosen.model, ema)
    with pytest.raises(UsageError, match="--checkpoint-key optimizer: no state dict"):
        load_model_file(tmp_path / "both.pth", key="optimizer")
    from compress.models import build_model  # --weights FILE --checkpoint-key reads the same entry

    _logits_equal(build_model("resnet18", 3, weights=str(tmp_path / "both.pth"), checkpoint_key="model_ema"), ema)


@pytest.mark.parametrize("name, arch, stem", [("resnet18", "resnet18", "imagenet"), ("resnet50", "resnet50", "imagenet"),
                                              ("resnet34", "resnet34", "imagenet")])
def test_timm_resnets_are_read_as_torchvision_ones(name: str, arch: str, stem: str) -> None:
    model = _randomised(timm.create_model(name, num_classes=4, pretrained=False))
    rebuilt, found = build_from_state(model.state_dict(), "timm")
    assert (found.arch, found.stem, found.num_classes) == (arch, stem, 4)
    assert found.block == ("Bottleneck" if name == "resnet50" else "BasicBlock")
    _logits_equal(rebuilt, model, atol=1e-4)


def test_cifar_stem_and_cifar_family_are_recognised() -> None:
    cifar_stem = torchvision.models.resnet18(num_classes=10)
    cifar_stem.conv1, cifar_stem.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    rebuilt, found = build_from_state(_randomised(cifar_stem).state_dict(), "f")
    assert (found.arch, found.stem) == ("resnet18", "cifar")
    _logits_equal(rebuilt, cifar_stem)
    from compress.models import CifarResNet

    resnet56 = _randomised(CifarResNet(56, 10))
    rebuilt, found = build_from_state(resnet56.state_dict(), "f")
    assert (found.arch, found.blocks) == ("resnet56", (9, 9, 9))
    _logits_equal(rebuilt, resnet56)


@pytest.mark.parametrize("make, says", [
    (lambda: timm.create_model("resnet26d", num_classes=3), "deep stem"),
    (lambda: timm.create_model("seresnet18", num_classes=3), "squeeze-and-excitation"),
    (lambda: torchvision.models.resnext50_32x4d(num_classes=3), "grouped convolutions"),
    (lambda: torchvision.models.squeezenet1_0(num_classes=3), "VGG-style"),
    (lambda: torchvision.models.mobilenet_v3_small(num_classes=3), "VGG-style"),
])
def test_other_networks_are_refused_naming_what_did_not_fit(make, says: str) -> None:
    with pytest.raises(UsageError, match=says) as caught:
        build_from_state(make().state_dict(), "--model f.pt")
    assert "\n" not in str(caught.value)


def test_extra_head_layers_are_refused() -> None:
    model = torchvision.models.resnet18()
    model.fc = nn.Sequential(nn.Linear(512, 128), nn.ReLU(), nn.Linear(128, 3))
    with pytest.raises(UsageError, match="extra head layers"):
        build_from_state(model.state_dict(), "f")


# --- through the command line --------------------------------------------------------------------

def test_references_checkpoint_as_step_0_onnx_and_pt2(tmp_path: Path, data: Path, resnet18: nn.Module,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """A torchvision-references checkpoint run as given: step 0 not trained, its ONNX file
    reproducing the original logits, --mean/--std in the manifest and the ONNX metadata, and
    model.pt2 loading in a Python that never imports this package."""
    path, *_ = _formats(resnet18, tmp_path)["references.pth"]
    out = tmp_path / "run"
    code, err = _run(capsys, "run", "--data", str(data), "--out", str(out), "--model", str(path),
                     "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25", *FAST)
    assert code == 0, err
    assert "imported" in err and "key 'model' (also in the file: model_ema" in err and "not trained" in err
    manifest = json.loads((out / "manifest.json").read_text())
    record = manifest["stages"]["import"]
    assert (record["format"], record["key"], record["architecture"]["arch"]) == ("torch", "model", "resnet18")
    assert record["accuracy"] == manifest["steps"][0]["accuracy"] and record["read_seconds"] > 0
    assert manifest["preprocessing"]["mean"] == [0.5] * 3 and manifest["preprocessing"]["std"] == [0.25] * 3
    step0 = manifest["steps"][0]
    onnx_path = out / step0["onnx"]
    assert read_metadata(onnx_path)["preprocessing"]["std"] == [0.25] * 3
    from serve.inputs import Preprocessing as ServedPreprocessing  # what `compress register` hands the service

    assert ServedPreprocessing.from_dict(manifest["preprocessing"]).std == (0.25, 0.25, 0.25)
    from compress.latency import load_run_data  # how bench models, ensembles and baselines reopen the data

    assert load_run_data(manifest).preprocessing == Preprocessing.from_dict(manifest["preprocessing"])
    session = OrtModel(onnx_path, SessionSettings("cpu", threads=1))
    with torch.no_grad():
        assert np.abs(session.predict(X.numpy()) - resnet18(X).numpy()).max() <= 1e-4
    assert step0["pt2_parity"]["max_abs_diff"] <= 1e-4
    np.save(tmp_path / "x.npy", X.numpy())
    script = ("import sys, numpy, torch; m = torch.export.load(sys.argv[1]).module(); "
              "y = m(torch.from_numpy(numpy.load(sys.argv[2]))).detach().numpy(); numpy.save(sys.argv[3], y); "
              "assert not any(n == 'compress' or n.startswith('compress.') for n in sys.modules)")
    subprocess.run([sys.executable, "-c", script, str(out / step0["pt2"]), str(tmp_path / "x.npy"),
                    str(tmp_path / "y.npy")], check=True, cwd=tmp_path, timeout=120)
    with torch.no_grad():
        assert np.abs(np.load(tmp_path / "y.npy") - resnet18(X).numpy()).max() <= 1e-4


def test_resnet_pruned_elsewhere_is_imported_and_pruned_further(tmp_path: Path, data: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """A CIFAR resnet20 pruned with Torch-Pruning outside this tool, saved as a Lightning-style
    checkpoint: read at its narrower widths, then one more pruning step and model.pt2 of it."""
    import torch_pruning as tp

    from compress.models import CifarResNet

    model = _randomised(CifarResNet(20, 3))
    pruner = tp.pruner.MetaPruner(model, torch.randn(1, 3, 32, 32), importance=tp.importance.MagnitudeImportance(p=1),
                                  pruning_ratio=0.5, ignored_layers=[model.fc])
    pruner.step()
    model.eval()
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "epoch": 9},
               tmp_path / "pruned.ckpt")
    imported = load_model_file(tmp_path / "pruned.ckpt")
    assert imported.arch == "resnet20" and imported.architecture.narrower > 0
    _logits_equal(imported.model, model)
    out = tmp_path / "run"
    code, err = _run(capsys, "run", "--data", str(data), "--out", str(out), "--model", str(tmp_path / "pruned.ckpt"),
                     *FAST, "--prune-steps", "1", "--target-macs", "0.6", "--retrain-epochs", "1",
                     "--round-to", "1")
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert "layers narrower than standard" in manifest["stages"]["import"]["architecture"]["description"]
    step0, step1 = manifest["steps"]
    assert step1["macs"] < step0["macs"] and all(s["pt2_parity"]["max_abs_diff"] <= 1e-3 for s in (step0, step1))
    assert (out / step1["pt2"]).is_file()


def test_class_order_from_a_file(tmp_path: Path, data: Path, resnet18: nn.Module,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A model whose outputs are in another order gives the same step-0 predictions once
    --classes names that order."""
    permuted = torchvision.models.resnet18(num_classes=3)
    permuted.load_state_dict(resnet18.state_dict())
    order = [2, 0, 1]  # output i of the permuted model is class order[i] of the sorted names
    with torch.no_grad():
        permuted.fc.weight.copy_(resnet18.fc.weight[order])
        permuted.fc.bias.copy_(resnet18.fc.bias[order])
    torch.save(resnet18.state_dict(), tmp_path / "sorted.pt")
    torch.save(permuted.state_dict(), tmp_path / "permuted.pt")
    names = sorted(p.name for p in (data / "train").iterdir())
    (tmp_path / "classes.txt").write_text("\n".join(names[i] for i in order) + "\n")
    accuracies = []
    for model, extra in (("sorted.pt", []), ("permuted.pt", ["--classes", str(tmp_path / "classes.txt")])):
        out = tmp_path / f"run-{model}"
        code, err = _run(capsys, "finetune", "--data", str(data), "--out", str(out), "--model", str(tmp_path / model),
                         *extra, "--device", "cpu")
        assert code == 0, err
        manifest = json.loads((out / "manifest.json").read_text())
        accuracies.append(manifest["stages"]["import"]["accuracy"])
        if extra:
            assert manifest["dataset"]["classes"] == [names[i] for i in order]
        record = manifest["stages"]["import"]
        near_chance = record["accuracy"] < record["chance"] + 0.1 * (1 - record["chance"])
        assert ("warning" in record) == near_chance and ("near chance" in err) == near_chance
    assert accuracies[0] == accuracies[1]


def _bad_files(tmp_path: Path, resnet18: nn.Module) -> dict[str, tuple[Path, str]]:
    torch.save(resnet18.state_dict(), tmp_path / "good.pt")
    blob = (tmp_path / "good.pt").read_bytes()
    files = {"empty": (tmp_path / "empty.pt", "the file is empty"),
             "truncated": (tmp_path / "truncated.pt", "not a readable model file"),
             "not a ResNet": (tmp_path / "squeezenet.pt", "not a ResNet this tool can rebuild"),
             "other class count": (tmp_path / "ten.pt", "its head has 10 classes, the data has 3"),
             "pickle": (tmp_path / "pickled.pt", "pass --trust-pickle")}
    files["empty"][0].write_bytes(b"")
    files["truncated"][0].write_bytes(blob[: len(blob) // 2])
    torch.save(torchvision.models.squeezenet1_0(num_classes=3).state_dict(), files["not a ResNet"][0])
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), files["other class count"][0])
    torch.save(resnet18, files["pickle"][0])
    return files


def test_bad_files_exit_2_with_one_line_and_leave_no_run(tmp_path: Path, data: Path, resnet18: nn.Module,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    for name, (path, says) in _bad_files(tmp_path, resnet18).items():
        out = tmp_path / f"run-{path.stem}"
        code, err = _run(capsys, "run", "--data", str(data), "--out", str(out), "--model", str(path), *FAST)
        assert code == 2 and says in err, (name, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, (name, err)
        assert not out.exists(), name
    code, err = _run(capsys, "run", "--data", str(data), "--out", str(tmp_path / "arch"), "--model",
                     str(tmp_path / "good.pt"), "--arch", "resnet50", *FAST)
    assert code == 2 and "--arch resnet50: " in err and "holds a resnet18 (BasicBlock 2-2-2-2" in err
    # --weights FILE --epochs 0 would replace the head by an untrained one: refused the same way
    code, err = _run(capsys, "run", "--data", str(data), "--out", str(tmp_path / "w"), "--weights",
                     str(tmp_path / "ten.pt"), "--epochs", "0", *FAST)
    assert code == 2 and "would be replaced by an untrained one" in err and not (tmp_path / "w").exists()


def test_class_count_refusal_prints_nothing_before_it(tmp_path: Path, data: Path) -> None:
    """In a non-TTY run the refusal is the only line: it comes before the data scan's progress."""
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp_path / "ten.pt")
    result = subprocess.run([sys.executable, "-m", "compress.cli", "run", "--data", str(data), "--out",
                             str(tmp_path / "run"), "--model", str(tmp_path / "ten.pt"), *FAST],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"compress: error: --model {tmp_path / 'ten.pt'}: its head has 10 classes, the data has 3; to train a new "
        f"head on these classes, use --weights {tmp_path / 'ten.pt'} --arch resnet18 instead"]
    assert not (tmp_path / "run").exists()


def test_own_checkpoints_still_import(tmp_path: Path, resnet18: nn.Module) -> None:
    save_checkpoint(tmp_path / "model.pt", resnet18, arch="resnet18", stem="imagenet", classes=["a", "b", "c"])
    imported = load_model_file(tmp_path / "model.pt")
    assert imported.checkpoint.format == "compress" and imported.classes == ["a", "b", "c"]
    _logits_equal(imported.model, resnet18)
    torch.save(resnet18, tmp_path / "pickled.pt")
    trusted = load_model_file(tmp_path / "pickled.pt", trust_pickle=True)
    assert trusted.checkpoint.format == "pickled-module"
    _logits_equal(trusted.model, resnet18)


def test_lightning_hyperparameters_are_read_as_a_plain_dict(tmp_path: Path, resnet18: nn.Module, monkeypatch) -> None:
    """Lightning pickles ``hyper_parameters`` as its ``AttributeDict``: allowed by name (read as
    a dict) without Lightning installed, and without allowing anything else."""
    import types

    module = types.ModuleType("lightning.fabric.utilities.data")

    class AttributeDict(dict):
        pass

    AttributeDict.__module__, AttributeDict.__qualname__ = module.__name__, "AttributeDict"
    module.AttributeDict = AttributeDict
    for name in ("lightning", "lightning.fabric", "lightning.fabric.utilities", "lightning.fabric.utilities.data"):
        monkeypatch.setitem(sys.modules, name, module if name.endswith(".data") else types.ModuleType(name))
    torch.save({"state_dict": {f"model.{k}": v for k, v in resnet18.state_dict().items()},
                "hyper_parameters": AttributeDict(lr=0.1, arch="resnet18")}, tmp_path / "lightning.ckpt")
    for name in ("lightning", "lightning.fabric", "lightning.fabric.utilities", "lightning.fabric.utilities.data"):
        monkeypatch.delitem(sys.modules, name)
    imported = load_model_file(tmp_path / "lightning.ckpt")
    assert (imported.checkpoint.key, imported.checkpoint.prefix) == ("state_dict", "model.")
    _logits_equal(imported.model, resnet18)


def test_weights_option_reads_every_format_too(tmp_path: Path, resnet18: nn.Module) -> None:
    """``--weights FILE`` goes through the same reader: a TorchScript file into --arch resnet18
    with a new 5-class head (the head is replaced, the backbone kept)."""
    from compress.models import build_model, load_weights_file

    torch.jit.save(torch.jit.script(resnet18), tmp_path / "scripted.pt")
    model = build_model("resnet18", 5)
    assert load_weights_file(model, tmp_path / "scripted.pt", trust_pickle=False) is True
    assert torch.equal(model.layer4[1].conv2.weight, resnet18.layer4[1].conv2.weight)
    assert model.fc.out_features == 5


def test_resume_of_a_model_run_that_recorded_its_arch():
    """A --model run from before the architecture was read from the file recorded ``arch``;
    the same command now (no --arch) resumes it instead of calling the options different."""
    from compress.config import config_differences

    old = {"model": "/models/user.pth", "arch": "resnet18"}
    assert config_differences(old, {"model": "/models/user.pth", "arch": None}) == []
    assert config_differences(old, {"model": "/models/other.pth", "arch": None}) == ["arch", "model"]
