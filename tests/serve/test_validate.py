"""serve.validate: engine vs PyTorch on a labelled split, pass/fail, reports."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from serve import validate
from tests.serve_cli import image_size_refusal, run_validate
from tests.stderr import error_line


def _row(out: str, label: str) -> tuple[float, float]:
    """(top-1, top-5) of the printed Markdown table's row ``label``."""
    rows = re.findall(rf"^\| {re.escape(label)} \| ([-+0-9.]+) \| ([-+0-9.]+) \|$", out, re.M)
    assert len(rows) == 1, f"no single '{label}' row in:\n{out}"
    return float(rows[0][0]), float(rows[0][1])


@pytest.mark.parametrize("engine_fixture", ["engine_fp32_onnx", "engine_int8_onnx", "engine_pt2", "engine_checkpoint"])
def test_validate_passes(request, capsys, tmp_path, engine_fixture, trained_run, fmnist_small):
    """The whole val split (500 images): the same images the export's INT8 gate measured
    (ONNX Runtime fp32 vs int8), so what the gate promised must hold against PyTorch here.
    The .pt2 (AOTInductor, fp32) is held to the fp32 bounds."""
    engine = request.getfixturevalue(engine_fixture)
    prefix = tmp_path / "rep"
    rc = run_validate(engine, trained_run / "best.pt", fmnist_small / "val", "--report", str(prefix), "--quiet")
    cap = capsys.readouterr()
    out = cap.out
    r = json.loads(Path(f"{prefix}.json").read_text())
    assert rc == 0, out
    assert r["passed"] and r["images"] == 500 and r["failed_images"] == []
    # exported from this checkpoint (its manifest says so); a .pt engine records no source file
    assert "warning:" not in cap.err and "exported from" not in out
    if engine.suffix == ".pt":
        assert r["source_check"] is None
    else:
        assert r["source_check"]["matches"] is True
    assert r["backend"].startswith({".onnx": "onnxruntime", ".pt2": "aoti", ".pt": "pytorch"}[engine.suffix])
    md = Path(f"{prefix}.md").read_text()
    assert md.rstrip("\n") in out  # the report printed is the one written
    # the printed table shows the JSON report's figures (to its 2 decimals), row by row
    rows = {"PyTorch (eager fp32)": "pytorch", "engine": "engine_acc", "difference (engine - PyTorch)": "diff"}
    for label, k in rows.items():
        want = (pytest.approx(r[k]["top1"], abs=0.0051), pytest.approx(r[k]["top5"], abs=0.0051))
        assert _row(out, label) == want, label
    assert r["diff"]["top1"] == pytest.approx(r["engine_acc"]["top1"] - r["pytorch"]["top1"])
    assert f"top-1 agreement {r['top1_agreement']:.2f} %" in out and "**PASS**" in out
    # PyTorch's figures are the trained checkpoint's (>= 70 % on these images in tests/train; 60
    # leaves room for the evaluation's differences), not an empty or untrained model's
    assert r["pytorch"]["top1"] >= 60
    for k in ("pytorch", "engine_acc", "diff"):
        assert set(r[k]) == {"top1", "top5"}
    assert r["top1_agreement"] >= (99 if r["precision"] == "fp32" else 90)
    if r["precision"] == "fp32":
        assert r["max_abs_logit_diff"] < 1e-3
        assert abs(r["diff"]["top1"]) <= 0.05


@pytest.mark.parametrize("engine_fixture", ["engine_fp32_onnx", "engine_pt2"])
def test_validate_image_size_mismatch(
    request, capsys, tmp_path, copy_engine, set_image_size, engine_fixture, trained_run, fmnist_small
):
    """A manifest whose image_size is not the engine's: exit 2 before any image is run, no report."""
    engine = request.getfixturevalue(engine_fixture)
    eng = copy_engine(engine, lambda m: set_image_size(m, 64))
    prefix = tmp_path / "rep"
    rc = run_validate(eng, trained_run / "best.pt", fmnist_small / "val", "--report", str(prefix), "--quiet")
    cap = capsys.readouterr()
    assert rc == 2, cap.err
    assert error_line(cap.err).startswith(image_size_refusal(eng, 64)), cap.err
    assert cap.out == "" and list(tmp_path.glob("rep*")) == []


def _logits(pred: list[int], n_classes: int = 4) -> np.ndarray:
    out = np.zeros((len(pred), n_classes), np.float32)
    out[np.arange(len(pred)), pred] = 5.0
    return out


def test_compare_bounds_are_one_sided_on_accuracy():
    """Losing more than the bound fails; gaining does not; low agreement fails whatever the accuracy."""
    labels = np.array([0] * 100)
    ref = _logits([0] * 98 + [1] * 2)  # PyTorch: 98 % top-1
    lose = _logits([0] * 97 + [1] * 3)  # engine loses 1 point, 99 % agreement
    gain = _logits([0] * 99 + [1])  # engine gains 1 point, 99 % agreement
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
    """An engine exported from a different (untrained) model with the same classes: exit 1, and
    one warning up front that the engine's manifest names another checkpoint as its source (a
    user may mean it, comparing with a retrained model, so it is not an error), also in the report."""
    import torch

    from rn50.checkpoint import load_checkpoint, save_checkpoint
    from rn50.manifest import read_manifest, sha256_file
    from rn50.model import build_model

    obj = load_checkpoint(trained_run / "best.pt")
    torch.manual_seed(123)
    other = build_model(len(obj["manifest"]["classes"]))
    with torch.no_grad():
        for prm in other.parameters():
            if prm.ndim == 1:
                prm.add_(torch.randn_like(prm) * 0.2)
    other_ckpt = save_checkpoint(tmp_path / "other.pt", other.state_dict(), obj["manifest"])
    rc = run_validate(
        engine_fp32_onnx, other_ckpt, fmnist_small / "val", "--limit", "100", "--report", str(tmp_path / "r"), "--quiet"
    )
    cap = capsys.readouterr()
    out = cap.out
    assert rc == 1, out
    r = json.loads((tmp_path / "r.json").read_text())
    assert "FAIL" in out and r["passed"] is False
    src = read_manifest(engine_fp32_onnx)["source"]
    warnings = [ln for ln in cap.err.splitlines() if ln.startswith("warning: ")]
    assert len(warnings) == 1, cap.err
    for needle in (str(engine_fp32_onnx), str(other_ckpt), src["path"], src["sha256"][:12]):
        assert needle in warnings[0], (needle, warnings[0])
    assert r["source_check"] == {
        "engine_source": {"path": src["path"], "sha256": src["sha256"]},
        "checkpoint_sha256": sha256_file(other_ckpt),
        "matches": False,
        "same_weights": False,
    }
    md = (tmp_path / "r.md").read_text()
    assert f"exported from `{src['path']}`" in md and md.rstrip("\n") in out


def test_validate_takes_another_file_of_the_same_weights(capsys, tmp_path, engine_fp32_onnx, trained_run, fmnist_small):
    """A checkpoint file other than the engine's source but with its weights (a last.pt beside the
    best.pt of the same epoch: the training state makes the files differ) is the same model: no
    warning, ``matches`` with ``same_weights``."""
    from rn50.checkpoint import load_checkpoint, save_checkpoint
    from rn50.manifest import sha256_file

    obj = load_checkpoint(trained_run / "best.pt")
    last = save_checkpoint(tmp_path / "last.pt", obj["model"], obj["manifest"], step=123, history=[{"epoch": 0}])
    assert sha256_file(last) != sha256_file(trained_run / "best.pt")
    rc = run_validate(
        engine_fp32_onnx, last, fmnist_small / "val", "--limit", "20", "--report", str(tmp_path / "r"), "--quiet"
    )
    cap = capsys.readouterr()
    assert rc == 0 and "warning:" not in cap.err and "exported from" not in cap.out, cap.err
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["source_check"]["matches"] is True and r["source_check"]["same_weights"] is True


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


def test_validate_malformed_manifest(capsys, tmp_path, copy_engine, engine_checkpoint, trained_run, fmnist_small):
    """A preprocessing block DALI cannot run (a mean of two entries): exit 2 with one error line
    naming the manifest and the field, before any image; no report."""
    eng = copy_engine(engine_checkpoint, lambda m: m["preprocessing"].update(mean=[123.7, 116.3]))
    rc = run_validate(eng, trained_run / "best.pt", fmnist_small / "val", "--report", str(tmp_path / "r"), "--quiet")
    cap = capsys.readouterr()
    assert rc == 2, cap.err
    line = error_line(cap.err)
    assert line.startswith(f"error: {eng}.manifest.json: ") and "mean" in line, line
    assert cap.out == "" and list(tmp_path.glob("r.*")) == []


def test_validate_fails_when_too_many_images_are_undecodable(
    capsys, tmp_path, engine_fp32_onnx, trained_run, fmnist_small
):
    """Undecodable images are left out of both sides' scores; beyond --max-failed (default 1 %) of
    the split they fail the validation, since the scores no longer describe the split named."""
    from tests.jpegs import bogus_huffman

    val = tmp_path / "val"
    broken = []
    for d in sorted((fmnist_small / "val").iterdir()):
        (val / d.name).mkdir(parents=True)
        for f in sorted(d.iterdir())[:10]:
            shutil.copy(f, val / d.name / f.name)
    for d in sorted(val.iterdir())[:2]:  # 2 of 100 images: 2 %
        f = sorted(d.iterdir())[0]
        f.write_bytes(bogus_huffman(f.read_bytes()))
        broken.append(str(f))

    def validate_with(*extra: str) -> tuple[int, dict, str]:
        rc = run_validate(
            engine_fp32_onnx, trained_run / "best.pt", val, "--report", str(tmp_path / "r"), "--quiet", *extra
        )
        return rc, json.loads((tmp_path / "r.json").read_text()), capsys.readouterr().out

    rc, r, out = validate_with()
    assert rc == 1 and r["passed"] is False, out
    assert sorted(f["path"] for f in r["failed_images"]) == broken
    assert r["images"] == 98 and r["failed_share"] == pytest.approx(0.02) and r["max_failed"] == 0.01
    assert "2 of 100 images (2 %) could not be decoded, more than --max-failed 0.01" in out and "**FAIL**" in out
    # the engine itself agrees with PyTorch on the rest: with room for 2 %, the same split passes
    rc, r, out = validate_with("--max-failed", "0.02")
    assert rc == 0 and r["passed"] is True and r["images"] == 98, out
    assert validate.main(["--engine", str(engine_fp32_onnx), "--checkpoint", "x", str(val), "--max-failed", "1.5"]) == 2
    assert "--max-failed 1.5: must be at least 0 and at most 1" in capsys.readouterr().err
