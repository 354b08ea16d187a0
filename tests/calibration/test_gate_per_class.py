"""The INT8 gate names the class that lost most, from per-class numbers that add up to its overall ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from calibration.gate import gate_summary, score
from rn50.layout import load_dataset
from rn50.manifest import preprocessing_of, read_manifest


def test_gate_names_the_class_that_lost_most(
    engine_int8_onnx: Path, engine_fp32_onnx: Path, fmnist_small: Path
) -> None:
    m = read_manifest(engine_int8_onnx)
    lost = m["int8"]["gate"]["lost_most"]
    assert lost["class"] in m["classes"]
    # re-measured on the same 500 validation images the gate scored
    _, val = load_dataset(fmnist_small)
    r = score(
        {"fp32": engine_fp32_onnx, "int8": engine_int8_onnx},
        val.files,
        val.labels,
        preprocessing_of(m),
        classes=m["classes"],
    )
    rows = r["per_class"]
    n = r["fp32"]["images"]
    assert sum(x["images"] for x in rows) == n == m["int8"]["gate"]["int8"]["images"]
    assert 100 * sum(x["reference_correct"] for x in rows) / n == pytest.approx(r["fp32"]["top1"])
    assert 100 * sum(x["correct"] for x in rows) / n == pytest.approx(r["int8"]["top1"])
    worst = min(rows, key=lambda x: x["diff"])
    assert lost["class"] == worst["class"] and lost["diff"] == pytest.approx(worst["diff"])
    assert lost["diff"] == min(x["diff"] for x in rows)


def test_gate_summary_names_the_class_that_lost_most(engine_int8_onnx: Path) -> None:
    """The line export prints reads the gate's own result: the class, its loss and its images."""
    g = read_manifest(engine_int8_onnx)["int8"]["gate"]
    lost = g["lost_most"]
    assert lost["class"] in read_manifest(engine_int8_onnx)["classes"] and lost["images"] > 0
    line = gate_summary(g)
    assert f"INT8 top-1 {g['int8']['top1']:.2f}%" in line and f"drop {g['top1_drop']:+.2f} points" in line
    # the small model's INT8 may or may not lower a class: both wordings, from its real class
    hurt = gate_summary({**g, "lost_most": {**lost, "diff": -2.0}})
    assert hurt.endswith(f"class that lost most: {lost['class']} (-2.00 points on its {lost['images']} images)")
    assert gate_summary({**g, "lost_most": {**lost, "diff": 0.0}}).endswith("no class lost top-1")
