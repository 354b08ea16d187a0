"""Per-class top-1, confusion matrices and the pictures drawn from them (rn50.metrics, rn50.plots)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rn50.metrics import confusion_matrix, most_changed, per_class, topk_correct
from rn50.plots import confusion_matrices, throughput_bars
from tests.pngs import check_png


def _logits(seed: int, n: int = 600, classes: int = 7) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels that leave the last class empty, a reference that is right most of the time and a
    candidate that flips some of its answers; logits rounded to 1 decimal so that ties occur."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes - 1, n)
    ref = rng.normal(size=(n, classes)).round(1)
    ref[np.arange(n), labels] += rng.uniform(0, 3, n).round(1)
    cand = ref + rng.normal(scale=0.6, size=ref.shape).round(1)
    return labels, ref, cand


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_class_adds_up_to_overall(seed):
    labels, ref, cand = _logits(seed)
    names = [f"c{i}" for i in range(ref.shape[1])]
    rows = per_class(labels, ref, cand, names)
    assert [r["class"] for r in rows] == names
    assert sum(r["images"] for r in rows) == len(labels)
    # summed over the classes, the correct counts are topk_correct's overall top-1 of each side
    assert sum(r["reference_correct"] for r in rows) == topk_correct(ref, labels, (1,))[1]
    assert sum(r["correct"] for r in rows) == topk_correct(cand, labels, (1,))[1]
    # and the image-weighted per-class disagreement is the overall one
    differ = sum(r["disagreement"] * r["images"] / 100 for r in rows if r["images"])
    assert differ == pytest.approx(int((ref.argmax(1) != cand.argmax(1)).sum()))
    for r in rows:
        if r["images"]:
            assert r["top1"] == pytest.approx(100 * r["correct"] / r["images"])
            assert r["diff"] == pytest.approx(r["top1"] - r["reference_top1"])
    empty = rows[-1]
    assert empty["images"] == 0 and empty["top1"] is None and empty["diff"] is None
    # the confusion matrix says the same: rows are the classes' images, the diagonal their correct ones
    cm = confusion_matrix(labels, cand.argmax(1), len(names))
    assert cm.sum() == len(labels) and list(cm.sum(1)) == [r["images"] for r in rows]
    assert list(np.diag(cm)) == [r["correct"] for r in rows]
    assert list(cm.sum(0)) == list(np.bincount(cand.argmax(1), minlength=len(names)))


def test_most_changed_orders_by_disagreement_then_loss():
    labels, ref, cand = _logits(3)
    rows = per_class(labels, ref, cand, [str(i) for i in range(ref.shape[1])])
    top = most_changed(rows, 3)
    assert len(top) == 3 and all(r["disagreement"] > 0 for r in top)
    keys = [(-r["disagreement"], r["diff"]) for r in top]
    assert keys == sorted(keys)
    rest = [r for r in rows if r not in top and r["images"]]
    assert all(r["disagreement"] <= top[-1]["disagreement"] for r in rest)
    # identical logits: nothing disagrees, nothing is listed
    assert most_changed(per_class(labels, ref, ref, [str(i) for i in range(ref.shape[1])])) == []


@pytest.mark.parametrize("n_classes", [10, 100])
def test_confusion_png(tmp_path: Path, n_classes: int):
    labels, ref, cand = _logits(4, n=20 * n_classes, classes=n_classes)
    cm_ref = confusion_matrix(labels, ref.argmax(1), n_classes)
    cm = confusion_matrix(labels, cand.argmax(1), n_classes)
    out = tmp_path / "cm.png"
    confusion_matrices(cm, cm_ref, [f"class {i}" for i in range(n_classes)], out)
    w, h = check_png(out)
    assert w > h  # two square panels side by side
    assert list(tmp_path.iterdir()) == [out]  # no temporary file left beside it


def test_throughput_png(tmp_path: Path):
    out = tmp_path / "bars.png"
    throughput_bars(
        "inference",
        {"batch 1": {"a": 120.0, "b": 650.0, "c": 1200.0}, "batch 32": {"a": 1300.0, "b": 1700.0, "c": 4000.0}},
        out,
    )
    w, h = check_png(out, min_size=(600, 150))
    assert w > 2 * h  # two panels side by side
