"""Sensitivity analysis and layer caps, block-internal pruning, distillation, fp16 export and
pruning steered by a measured speed-up."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from compress.cli import main
from compress.models import build_model
from compress.pruning import (PruneSettings, block_inner_convs, conv_out_widths, count_macs_params, prune_to_macs,
                              step_targets)

from conftest import TINY_OPTIONS


def test_sensitivity_writes_curves_and_caps(tiny_run: Path) -> None:
    main(["sensitivity", str(tiny_run), "--ratios", "0.25,0.5,0.75", "--tolerance", "0.5"])
    folder = tiny_run / "sensitivity"
    rows = (folder / "sensitivity.csv").read_text().splitlines()
    result = json.loads((folder / "sensitivity.json").read_text())
    assert rows[0] == "layer,ratio,accuracy,drop"
    assert len(rows) - 1 == 3 * len(result["groups"]) and len(result["groups"]) >= 5
    caps = yaml.safe_load((folder / "layer_caps.yaml").read_text())
    assert set(caps) == set(result["groups"]) and all(c in (0.0, 0.25, 0.5, 0.75) for c in caps.values())
    with Image.open(folder / "sensitivity.png") as image:
        assert image.format == "PNG"


def test_layer_caps_keep_sensitive_layers_whole() -> None:
    model = build_model("resnet20", 3).eval()
    caps = {"conv1": 0.0, "layer2.0.downsample.0": 0.0}
    settings = PruneSettings(target_macs=0.7, steps=1, layer_caps=caps)
    base, _ = count_macs_params(model, 32)
    before = conv_out_widths(model)
    pruned, _ = prune_to_macs(model, step_targets(base, settings)[0], settings, before, 32)
    after = conv_out_widths(pruned)
    assert after["conv1"] == before["conv1"] and after["layer2.0.downsample.0"] == before["layer2.0.downsample.0"]
    assert count_macs_params(pruned, 32)[0] <= 0.7 * base


def test_block_scope_prunes_only_inner_convs() -> None:
    model = build_model("resnet18", 4).eval()
    settings = PruneSettings(target_macs=0.6, steps=1, scope="block")
    base, _ = count_macs_params(model, 32)
    before = conv_out_widths(model)
    pruned, _ = prune_to_macs(model, step_targets(base, settings)[0], settings, before, 32)
    after = conv_out_widths(pruned)
    inner = {name for name, m in model.named_modules() if m in set(block_inner_convs(model))}
    changed = {name for name in before if before[name] != after[name]}
    assert changed and changed <= inner
    assert count_macs_params(pruned, 32)[0] <= 0.6 * base


def test_run_with_block_scope_distillation_fp16_and_target_speedup(tmp_path: Path, tiny_data: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Steering by speed-up stops at the first step that reaches it (the measurement is
    replaced by fixed figures here: timing is not what this test is about)."""
    import compress.latency

    figures = {1: 1.2, 2: 1.6, 3: 3.0}
    calls: list[int] = []

    def fake_measure(run_dir, manifest, step, *, backend, batch, **_):
        calls.append(step)
        return {"backend": backend, "device": "CPUExecutionProvider", "batch": batch, "speedup": figures[step],
                "speedup_band": [figures[step], figures[step]], "step0_p50_ms": 1.0, "p50_ms": 1 / figures[step]}

    monkeypatch.setattr(compress.latency, "measure_step_speedup", fake_measure)
    out = tmp_path / "run"
    options = list(TINY_OPTIONS)
    options[options.index("--prune-steps") + 1] = "3"
    options[options.index("--target-macs") + 1] = "0.3"
    main(["run", "--data", str(tiny_data), "--out", str(out), *options, "--scope", "block", "--distill-weight", "0.5",
          "--export-fp16", "--target-speedup", "1.5", "--latency-batch", "4"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert calls == [1, 2]
    assert [s["step"] for s in manifest["steps"]] == [0, 1, 2]
    assert manifest["stages"]["target_speedup"]["reached_at_step"] == 2
    for step in manifest["steps"]:
        fp16 = step["variants"]["fp16"]
        assert (out / fp16["onnx"]).is_file() and fp16["bytes"] == (out / fp16["onnx"]).stat().st_size
        assert fp16["top1_agreement"] >= 0.9 and fp16["accuracy"] is not None
        assert step["variants"]["fp32"]["onnx"] == step["onnx"] and step["variants"]["fp32"]["top1_agreement"] == 1.0
    report = (out / "report.md").read_text()
    assert "| 2 | fp16 |" in report and "| ort-cpu | 4 | 2 | fp16 |" in report


def test_layer_caps_must_name_real_layers_and_stay_fixed(tiny_run: Path) -> None:
    from compress.errors import UsageError
    from compress.pipeline import _check_layer_caps, open_run

    run = open_run(tiny_run, None)
    widths = run.step_entry(0)["widths"]
    with pytest.raises(UsageError, match="does not have: layer9.conv1"):
        _check_layer_caps(run, {"layer9.conv1": 0.5}, widths)
    run.manifest["stages"]["layer_caps"] = {"conv1": 0.0}
    with pytest.raises(UsageError, match="changed since pruning started"):
        _check_layer_caps(run, {"conv1": 0.5}, widths)


def test_sensitivity_rejects_a_negative_tolerance(tiny_run: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["sensitivity", str(tiny_run), "--tolerance", "-0.1"])
    assert exit_info.value.code == 2 and "--tolerance must be in [0, 1)" in capsys.readouterr().err
