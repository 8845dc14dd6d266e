"""Models, real torch-pruning graph surgery, checkpoints and ONNX export with parity."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from compress import models
from compress.errors import UsageError
from compress.export import INPUT_NAME, OUTPUT_NAME, ParityError, export_onnx, parity_check, read_metadata
from compress.models import build_model, imagenet_weights_path, load_checkpoint, save_checkpoint
from compress.runtime.sessions import OrtModel
from compress.pruning import PruneSettings, conv_out_widths, count_macs_params, prune_to_macs, step_targets


def _pruned(arch: str = "resnet18", size: int = 32, target: float = 0.5, scope: str = "global",
            classes: int = 5) -> tuple[nn.Module, nn.Module, PruneSettings]:
    torch.manual_seed(0)
    model = build_model(arch, classes).eval()
    settings = PruneSettings(target_macs=target, steps=1, scope=scope)
    base, _ = count_macs_params(model, size)
    pruned, info = prune_to_macs(model, step_targets(base, settings)[-1], settings, conv_out_widths(model), size)
    return model, pruned, settings


@pytest.mark.parametrize("arch, scope", [("resnet18", "global"), ("resnet18", "uniform"), ("resnet20", "global"),
                                         ("resnet50", "global")])
def test_pruning_reaches_the_macs_target_and_keeps_the_model_whole(arch: str, scope: str) -> None:
    size = 32
    model, pruned, settings = _pruned(arch, size, 0.5, scope)
    base_macs, base_params = count_macs_params(model, size)
    macs, params = count_macs_params(pruned, size)
    assert macs <= 0.5 * base_macs
    assert macs >= 0.3 * base_macs, "bisection should prune no more than needed"
    assert params < base_params
    assert pruned(torch.randn(3, 3, size, size)).shape == (3, 5)
    assert pruned.fc.out_features == 5  # the classifier's outputs are never pruned
    before, after = conv_out_widths(model), conv_out_widths(pruned)
    for name, width in after.items():
        assert width >= before[name] * (1 - settings.max_layer_ratio) - 1e-9, name
        if before[name] % 8 == 0:
            assert width % 8 == 0, f"{name} has {width} channels, not a multiple of 8"


def test_step_targets_are_geometric_and_end_at_the_target() -> None:
    targets = step_targets(1000, PruneSettings(target_macs=0.4, steps=3))
    assert targets[-1] == 400
    assert targets[0] > targets[1] > targets[2]
    assert targets[0] / 1000 == pytest.approx(targets[1] / targets[0], rel=0.01)


def test_unreachable_target_is_a_clear_error() -> None:
    model = build_model("resnet20", 3).eval()
    settings = PruneSettings(target_macs=0.01, steps=1, max_layer_ratio=0.5)
    base, _ = count_macs_params(model, 32)
    with pytest.raises(UsageError, match="cannot prune"):
        prune_to_macs(model, int(base * 0.01), settings, conv_out_widths(model), 32)


def test_pruned_checkpoint_reloads_safely_without_pruning(tmp_path: Path) -> None:
    _, pruned, _ = _pruned("resnet18", 32, 0.5)
    path = tmp_path / "model.pt"
    save_checkpoint(path, pruned, arch="resnet18", stem="imagenet", classes=list("abcde"))
    loaded, meta = load_checkpoint(path)
    x = torch.randn(2, 3, 32, 32)
    assert meta["classes"] == list("abcde")
    assert torch.equal(pruned.eval()(x), loaded.eval()(x))
    assert conv_out_widths(loaded) == conv_out_widths(pruned)


def test_pickled_model_needs_explicit_opt_in(tmp_path: Path) -> None:
    path = tmp_path / "pickled.pt"
    torch.save(build_model("resnet20", 3), path)
    with pytest.raises(UsageError, match="--trust-pickle"):
        load_checkpoint(path)
    model, _ = load_checkpoint(path, trust_pickle=True)
    assert isinstance(model, nn.Module)


# --- ImageNet weights through torchvision's weights API, against a local HTTP server ----------

@pytest.fixture()
def weights_server(tmp_path: Path) -> Iterator[tuple[str, Path, dict[str, torch.Tensor]]]:
    """A local HTTP server with a real resnet18 state dict named as torch.hub expects
    (``resnet18-<first 8 hex digits of its SHA-256>.pth``), plus a copy under a wrong hash."""
    import functools
    import hashlib
    import http.server
    import threading

    folder = tmp_path / "served"
    folder.mkdir()
    state = build_model("resnet18", 1000).state_dict()
    raw = folder / "raw.pth"
    torch.save(state, raw)
    digest = hashlib.sha256(raw.read_bytes()).hexdigest()
    raw.rename(folder / f"resnet18-{digest[:8]}.pth")
    (folder / "resnet18-deadbeef.pth").write_bytes((folder / f"resnet18-{digest[:8]}.pth").read_bytes())
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/resnet18-{digest[:8]}.pth", folder, state
    finally:
        server.shutdown()
        server.server_close()


def _point_at(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, url: str) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setattr(models, "imagenet_weights_url", lambda arch: url)


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_imagenet_weights_are_downloaded_hash_checked_and_cached(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, weights_server: tuple[str, Path, dict]) -> None:
    url, folder, state = weights_server
    _point_at(monkeypatch, tmp_path, url)
    cached = imagenet_weights_path("resnet18")
    assert cached.parent == tmp_path / "torch-home" / "hub" / "checkpoints" and not cached.exists()
    model = build_model("resnet18", 4, weights="imagenet")
    assert torch.equal(model.conv1.weight, state["conv1.weight"]) and model.fc.out_features == 4
    assert cached.read_bytes() == (folder / cached.name).read_bytes()
    for served in folder.iterdir():
        served.unlink()  # from now on only the cache can answer
    again = build_model("resnet18", 4, weights="imagenet")
    assert torch.equal(again.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])


def test_imagenet_weights_with_a_wrong_hash_are_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, weights_server: tuple[str, Path, dict]) -> None:
    url, _, _ = weights_server
    _point_at(monkeypatch, tmp_path, url.rsplit("/", 1)[0] + "/resnet18-deadbeef.pth")
    with pytest.raises(UsageError, match="invalid hash value") as error:
        build_model("resnet18", 4, weights="imagenet")
    assert str(imagenet_weights_path("resnet18")) in str(error.value)
    assert not imagenet_weights_path("resnet18").exists()
    assert not any(imagenet_weights_path("resnet18").parent.iterdir())  # no partial file left behind


@pytest.mark.parametrize("server", ["refused", "silent"])
def test_imagenet_weights_offline_fail_fast_saying_where_the_file_goes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server: str) -> None:
    """Nothing listening (connection refused), or a server that accepts and never answers
    (the download's socket timeout ends it)."""
    import socket
    import time

    monkeypatch.setattr(models, "CONNECT_TIMEOUT_S", 0.5)
    listener = None
    if server == "refused":
        port = _closed_port()
    else:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)  # the kernel completes connections; nobody reads or answers
        port = listener.getsockname()[1]
    _point_at(monkeypatch, tmp_path, f"http://127.0.0.1:{port}/resnet18-f37072fd.pth")
    started = time.monotonic()
    try:
        with pytest.raises(UsageError) as error:
            build_model("resnet18", 4, weights="imagenet")
    finally:
        if listener is not None:
            listener.close()
    assert time.monotonic() - started < 10
    message = str(error.value)
    assert "\n" not in message and str(imagenet_weights_path("resnet18")) in message
    assert ("cannot be reached" if server == "refused" else "timed out") in message


def test_compress_run_with_imagenet_weights_offline_exits_2_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     tiny_data: Path, capsys: pytest.CaptureFixture) -> None:
    """The download is tried before the data is scanned or the run directory made."""
    import time

    from compress.cli import main

    monkeypatch.setattr(models, "CONNECT_TIMEOUT_S", 0.5)
    _point_at(monkeypatch, tmp_path, f"http://127.0.0.1:{_closed_port()}/resnet18-f37072fd.pth")
    started = time.monotonic()
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--data", str(tiny_data), "--out", str(tmp_path / "run"), "--arch", "resnet18",
              "--weights", "imagenet", "--device", "cpu"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and time.monotonic() - started < 30
    assert err.count("\n") == 1 and str(imagenet_weights_path("resnet18")) in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_auto_weights_use_imagenet_when_downloadable_else_scratch_with_a_warning(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, weights_server: tuple[str, Path, dict]) -> None:
    from compress.config import RunConfig
    from compress.pipeline import _resolved_weights

    url, _, _ = weights_server
    _point_at(monkeypatch, tmp_path, url)
    assert _resolved_weights(RunConfig(arch="resnet18"))[0] == "imagenet"
    assert imagenet_weights_path("resnet18").is_file()
    assert _resolved_weights(RunConfig(arch="resnet20"))[0] == "none"
    assert _resolved_weights(RunConfig(arch="resnet18", stem="cifar"))[0] == "none"
    assert _resolved_weights(RunConfig(arch="resnet18", weights="none")) == ("none", None)
    monkeypatch.setattr(models, "CONNECT_TIMEOUT_S", 0.5)
    _point_at(monkeypatch, tmp_path / "offline", f"http://127.0.0.1:{_closed_port()}/resnet18-f37072fd.pth")
    weights, note = _resolved_weights(RunConfig(arch="resnet18"))
    assert weights == "none" and "trained from scratch" in note and "cannot be reached" in note


def test_auto_weights_offline_are_recorded_in_the_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            tiny_data: Path, capsys: pytest.CaptureFixture) -> None:
    import json

    from compress.cli import main

    from conftest import TINY_OPTIONS

    monkeypatch.setattr(models, "CONNECT_TIMEOUT_S", 0.5)
    _point_at(monkeypatch, tmp_path, f"http://127.0.0.1:{_closed_port()}/resnet18-f37072fd.pth")
    options = [{"resnet20": "resnet18", "2": "1"}.get(o, o) for o in TINY_OPTIONS]  # resnet18, one epoch
    main(["finetune", "--data", str(tiny_data), "--out", str(tmp_path / "run"), "--workers", "0", *options])
    stage = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]["finetune"]
    assert stage["weights"] == "none" and "ImageNet weights unavailable" in stage["weights_note"]
    assert "warning: auto: ImageNet weights unavailable" in " ".join(capsys.readouterr().err.split())


def test_imagenet_weights_load_from_the_local_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file in $TORCH_HOME/hub/checkpoints is used with no network (here a stand-in file
    with torchvision's name and layout; the new head replaces the 1000-class one)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    source = build_model("resnet18", 1000)
    path = imagenet_weights_path("resnet18")
    path.parent.mkdir(parents=True)
    torch.save(source.state_dict(), path)
    model = build_model("resnet18", 4, weights="imagenet")
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert model.fc.out_features == 4


def test_weights_file_with_another_head_is_transfer_learned(tmp_path: Path) -> None:
    source = build_model("resnet20", 7)
    torch.save({"state_dict": source.state_dict()}, tmp_path / "w.pt")
    model = build_model("resnet20", 3, weights=str(tmp_path / "w.pt"))
    assert torch.equal(model.conv1.weight, source.conv1.weight) and model.fc.out_features == 3
    with pytest.raises(UsageError, match="wrong --arch"):
        build_model("resnet32", 3, weights=str(tmp_path / "w.pt"))


def test_onnx_export_parity_metadata_and_dynamic_batch(tmp_path: Path) -> None:
    _, pruned, _ = _pruned("resnet20", 32, 0.6, classes=3)
    path = tmp_path / "m.onnx"
    meta = {"classes": ["a", "b", "c"], "preprocessing": {"input_size": 32, "resize": 32}}
    export_onnx(pruned, path, input_size=32, metadata=meta, opset=18)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert proto.opset_import[0].version >= 17
    assert [i.name for i in proto.graph.input] == [INPUT_NAME] and [o.name for o in proto.graph.output] == [OUTPUT_NAME]
    assert read_metadata(path)["classes"] == ["a", "b", "c"]
    session = OrtModel(path)
    assert (session.input_name, session.output_name, session.provider) == (INPUT_NAME, OUTPUT_NAME, "cpu")
    for batch in (1, 7):
        out = session.predict(np.random.rand(batch, 3, 32, 32).astype(np.float32))
        assert out.shape == (batch, 3)
    batches = [torch.randn(8, 3, 32, 32) for _ in range(3)]
    result = parity_check(pruned, path, batches, tolerance=1e-4)
    assert result["max_abs_diff"] <= 1e-4 and result["top1_agreement"] == 1.0 and result["images"] == 24
    other = copy.deepcopy(pruned)
    with torch.no_grad():
        other.fc.bias += 1.0
    with pytest.raises(ParityError, match="parity failed"):
        parity_check(other, path, batches, tolerance=1e-3)
