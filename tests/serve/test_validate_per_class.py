"""serve.validate's per-class report: numbers that add up to the overall ones, confusion matrices, picture."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from tests.pngs import check_png
from tests.serve_cli import run_validate


def test_per_class_report(capsys, tmp_path, engine_int8_onnx, trained_run, fmnist_small):
    prefix = tmp_path / "rep"
    rc = run_validate(
        engine_int8_onnx, trained_run / "best.pt", fmnist_small / "val", "--report", str(prefix), "--quiet"
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    r = json.loads(Path(f"{prefix}.json").read_text())
    rows, n = r["per_class"], r["images"]
    classes = json.loads(Path(f"{engine_int8_onnx}.manifest.json").read_text())["classes"]
    assert [x["class"] for x in rows] == classes
    # the per-class numbers add up to the overall ones
    assert sum(x["images"] for x in rows) == n == 500
    assert 100 * sum(x["correct"] for x in rows) / n == pytest.approx(r["engine_acc"]["top1"])
    assert 100 * sum(x["reference_correct"] for x in rows) / n == pytest.approx(r["pytorch"]["top1"])
    assert sum(x["disagreement"] * x["images"] for x in rows) / n == pytest.approx(100 - r["top1_agreement"])
    # so do the confusion matrices (rows: true class; columns: predicted)
    eng, ref = (np.asarray(r["confusion_matrix"][k]) for k in ("engine", "pytorch"))
    assert eng.shape == ref.shape == (len(classes),) * 2
    assert list(eng.sum(1)) == list(ref.sum(1)) == [x["images"] for x in rows]
    assert list(np.diag(eng)) == [x["correct"] for x in rows]
    assert list(np.diag(ref)) == [x["reference_correct"] for x in rows]
    # the classes named as disagreeing most are the ones with the highest disagreement
    worst = r["most_disagreement"]
    assert worst, "int8 flips some images of the small model"
    by = {x["class"]: x for x in rows}
    assert min(by[c]["disagreement"] for c in worst) >= max(
        (x["disagreement"] for x in rows if x["class"] not in worst), default=0
    )
    # the Markdown (written and printed) shows each class's figures and embeds the picture by a relative path
    md = Path(f"{prefix}.md").read_text()
    assert md.rstrip("\n") in out
    for x in rows:
        assert (
            f"| {x['class']} | {x['images']} | {x['reference_top1']:.2f} | {x['top1']:.2f} | "
            f"{x['diff']:+.2f} | {x['disagreement']:.2f} |"
        ) in md
    pics = re.findall(r"!\[[^]]*\]\(([^)]+)\)", md)
    assert pics == ["rep.confusion.png"] and Path(r["confusion_png"]) == tmp_path / pics[0]
    w, h = check_png(tmp_path / pics[0])
    assert w > h


def test_class_names_with_pipes_keep_the_table_whole(tmp_path):
    """Class names are folder names: a '|' (or a backslash before one) must not split a cell."""
    from serve.validate import per_class_markdown, per_class_report

    classes = ["a|b", "plain", "ends\\", "x\\|y"]
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 5)
    ref, eng = rng.normal(size=(20, 4)), rng.normal(size=(20, 4))
    md = per_class_markdown(per_class_report(ref, eng, labels, classes, tmp_path / "cm.png"))
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith(("| class ", "| --- "))]
    assert len(rows) == 4
    for line, name in zip(rows, classes):
        # GitHub's table syntax: a cell ends at a '|' not escaped by a backslash
        cells = re.split(r"(?<!\\)\|", line.strip().strip("|"))
        assert len(cells) == 6, line
        assert re.sub(r"\\(.)", r"\1", cells[0].strip()) == name, line
