"""The INT8 gate names the class that lost most, from per-class numbers that add up to its overall ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from calibration.gate import score
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
