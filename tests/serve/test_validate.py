"""serve.validate: engine vs PyTorch on a labelled split, pass/fail, reports."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from serve import validate


@pytest.mark.parametrize("engine_fixture", ["engine_fp32_onnx", "engine_int8_onnx"])
def test_validate_passes(request, capsys, tmp_path, engine_fixture, trained_run, fmnist_small):
    """The whole val split (500 images): the same images the export's INT8 gate measured
    (ONNX Runtime fp32 vs int8), so what the gate promised must hold against PyTorch here."""
    engine = request.getfixturevalue(engine_fixture)
    prefix = tmp_path / "rep"
    rc = validate.main(["--engine", str(engine), "--checkpoint", str(trained_run / "best.pt"),
                        str(fmnist_small / "val"), "--report", str(prefix), "--quiet"])
    out = capsys.readouterr().out
    r = json.loads(Path(f"{prefix}.json").read_text())
    assert rc == 0, out
    assert r["passed"] and r["images"] == 500
    assert Path(f"{prefix}.md").read_text() in out + "\n" or "| PyTorch (eager fp32) |" in out
    for k in ("pytorch", "engine_acc", "diff"):
        assert set(r[k]) == {"top1", "top5"}
    assert r["top1_agreement"] >= (99 if r["precision"] == "fp32" else 90)
    if r["precision"] == "fp32":
        assert r["max_abs_logit_diff"] < 1e-3
        assert abs(r["diff"]["top1"]) <= 0.05


def _logits(pred: list[int], n_classes: int = 4) -> np.ndarray:
    out = np.zeros((len(pred), n_classes), np.float32)
    out[np.arange(len(pred)), pred] = 5.0
    return out


def test_compare_bounds_are_one_sided_on_accuracy():
    """Losing more than the bound fails; gaining does not; low agreement fails whatever the accuracy."""
    labels = np.array([0] * 100)
    ref = _logits([0] * 98 + [1] * 2)                       # PyTorch: 98 % top-1
    lose = _logits([0] * 97 + [1] * 3)                      # engine loses 1 point, 99 % agreement
    gain = _logits([0] * 99 + [1])                          # engine gains 1 point, 99 % agreement
    r = validate.compare(ref, lose, labels, "int8")
    assert r["passed"] is False and r["diff"]["top1"] == pytest.approx(-1.0)
    r = validate.compare(ref, gain, labels, "int8")
    assert r["passed"] is True and r["diff"]["top1"] == pytest.approx(1.0)
    # same accuracy, but the engine's right answers are other images: agreement 80 % < 90 %
    ref90, other90 = _logits([0] * 90 + [1] * 10), _logits([1] * 10 + [0] * 90)
    r = validate.compare(ref90, other90, labels, "int8")
    assert r["diff"]["top1"] == 0 and r["top1_agreement"] == 80 and r["passed"] is False
    # fp32's bound is tighter: 1 point lost of 100 images fails there too, 0 lost passes
    assert validate.compare(ref, lose, labels, "fp32")["passed"] is False
    assert validate.compare(ref, ref, labels, "fp32")["passed"] is True


def test_validate_fails_for_another_model(capsys, tmp_path, engine_fp32_onnx, trained_run, fmnist_small):
    """An engine exported from a different (untrained) model with the same classes: exit 1."""
    import torch

    from rn50.checkpoint import load_checkpoint, save_checkpoint
    from rn50.model import build_model

    obj = load_checkpoint(trained_run / "best.pt")
    torch.manual_seed(123)
    other = build_model(len(obj["manifest"]["classes"]))
    with torch.no_grad():
        for prm in other.parameters():
            if prm.ndim == 1:
                prm.add_(torch.randn_like(prm) * 0.2)
    other_ckpt = save_checkpoint(tmp_path / "other.pt", other.state_dict(), obj["manifest"])
    rc = validate.main(["--engine", str(engine_fp32_onnx), "--checkpoint", str(other_ckpt),
                        str(fmnist_small / "val"), "--limit", "100", "--report", str(tmp_path / "r"), "--quiet"])
    out = capsys.readouterr().out
    assert rc == 1, out
    assert "FAIL" in out and json.loads((tmp_path / "r.json").read_text())["passed"] is False


def test_validate_usage_errors(capsys, tmp_path, engine_fp32_onnx, trained_run, fmnist_small):
    ck = str(trained_run / "best.pt")
    val = str(fmnist_small / "val")
    assert validate.main(["--engine", str(tmp_path / "no.onnx"), "--checkpoint", ck, val]) == 2
    assert "engine not found" in capsys.readouterr().err
    assert validate.main(["--engine", str(engine_fp32_onnx), "--checkpoint", str(tmp_path / "no.pt"), val]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert validate.main(["--engine", str(engine_fp32_onnx), "--checkpoint", ck, str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    # classes differ between engine and checkpoint
    eng = tmp_path / "e.onnx"
    shutil.copy(engine_fp32_onnx, eng)
    m = json.loads(Path(str(engine_fp32_onnx) + ".manifest.json").read_text())
    m["classes"] = [c.upper() for c in m["classes"]]
    Path(str(eng) + ".manifest.json").write_text(json.dumps(m))
    assert validate.main(["--engine", str(eng), "--checkpoint", ck, val]) == 2
    assert "differ from the checkpoint" in capsys.readouterr().err
