"""Scores of logits against labels (top-k, per class, confusion) and the latency percentiles the
benchmarks and serve.infer report; shared by training validation, the INT8 gate and serve.validate."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def topk_correct(logits: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1, 5)) -> dict[int, int]:
    """Number of samples whose label is among the ``k`` highest logits, for each ``k``."""
    logits = np.asarray(logits)
    labels = np.asarray(labels).reshape(-1)
    if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"logits {logits.shape} and labels {labels.shape} do not match")
    kmax = min(max(ks), logits.shape[1])
    # argsort descending; stable so ties resolve the same way in every backend
    top = np.argsort(-logits, axis=1, kind="stable")[:, :kmax]
    hits = top == labels[:, None]
    return {k: int(hits[:, : min(k, kmax)].any(axis=1).sum()) for k in ks}


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    n = max(int(np.asarray(labels).size), 1)
    return {k: 100.0 * c / n for k, c in topk_correct(logits, labels, ks).items()}


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts of (true class, predicted class): row ``i`` holds where class ``i``'s images went."""
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    preds = np.asarray(preds, dtype=np.int64).reshape(-1)
    if labels.shape != preds.shape:
        raise ValueError(f"labels {labels.shape} and predictions {preds.shape} do not match")
    return np.bincount(labels * num_classes + preds, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


def per_class(
    labels: np.ndarray, ref_logits: np.ndarray, logits: np.ndarray, classes: Sequence[str]
) -> list[dict[str, Any]]:
    """Per class: its images, the top-1 (%) of a reference and of a candidate on them (``diff`` =
    candidate - reference, in points) and ``disagreement``, the share (%) of them on which the
    two pick different classes. Top-1 is the argmax (ties to the lower index, as ``topk_correct``),
    so ``correct`` summed over the classes is the overall top-1 count of each side. A class
    without images has None for its percentages."""
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    ref_pred, pred = np.asarray(ref_logits).argmax(1), np.asarray(logits).argmax(1)
    n = len(classes)
    images = np.bincount(labels, minlength=n)
    ref_ok = np.bincount(labels[ref_pred == labels], minlength=n)
    ok = np.bincount(labels[pred == labels], minlength=n)
    differ = np.bincount(labels[ref_pred != pred], minlength=n)

    def pct(c: int, i: int) -> float | None:  # None: the class has no images here
        return 100.0 * c / images[i] if images[i] else None

    return [
        {
            "class": str(name),
            "images": int(images[i]),
            "reference_correct": int(ref_ok[i]),
            "correct": int(ok[i]),
            "reference_top1": pct(ref_ok[i], i),
            "top1": pct(ok[i], i),
            "diff": pct(ok[i] - ref_ok[i], i),
            "disagreement": pct(differ[i], i),
        }
        for i, name in enumerate(classes)
    ]


def most_changed(rows: Sequence[dict[str, Any]], k: int = 5) -> list[dict[str, Any]]:
    """The ``k`` rows of :func:`per_class` where the two sides disagree most (then: lost most),
    leaving out classes with no disagreement."""
    rows = [r for r in rows if r["images"] and r["disagreement"] > 0]
    return sorted(rows, key=lambda r: (-r["disagreement"], r["diff"]))[:k]


def percentiles(values: Sequence[float], qs: Sequence[float] = (50, 95, 99)) -> dict[str, float]:
    """``{"p50": ..., ...}`` of ``values`` (NaN for each when there are none)."""
    if not values:
        return {f"p{int(q)}": float("nan") for q in qs}
    a = np.asarray(values, dtype=np.float64)
    return {f"p{int(q)}": float(np.percentile(a, q)) for q in qs}
