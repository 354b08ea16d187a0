"""The INT8 accuracy gate: INT8 and FP32 scored with ONNX Runtime on the same validation images.

Both models run through :class:`rn50.backends.onnxruntime.OrtBackend`, the class that serves an
``.onnx``, and the INT8 logits are judged against the FP32 ones by
:func:`rn50.compare.compare_logits` with the int8 bounds (the top-1 drop allowed is the gate's).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from rn50.batches import iter_split
from rn50.compare import bounds_for, compare_logits
from rn50.metrics import per_class, topk_correct
from rn50.preprocess import Preprocessing

MAX_TOP1_DROP: float = bounds_for("int8").max_top1_drop or 0.0  # points (the int8 table bounds it: 0.5)


def _logits(
    models: dict[str, str | os.PathLike[str]],
    files: Sequence[str],
    labels: Sequence[int],
    p: Preprocessing,
    batch_size: int = 64,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Each ONNX model's logits on the same batches (preprocessed once), and the labels."""
    from rn50.backends import load_backend

    backends = {k: load_backend(v, suffix=".onnx", prefer_gpu=True) for k, v in models.items()}
    outs: dict[str, list[np.ndarray]] = {k: [] for k in models}
    ys = []
    for x, y in iter_split(files, labels, p, batch_size):
        for k, b in backends.items():
            outs[k].append(b.run(x))
        ys.append(np.asarray(y))
    return {k: np.concatenate(v) for k, v in outs.items()}, np.concatenate(ys)


def score(
    models: dict[str, str | os.PathLike[str]],
    files: Sequence[str],
    labels: Sequence[int],
    p: Preprocessing,
    batch_size: int = 64,
    classes: Sequence[str] | None = None,
) -> dict[str, Any]:
    """top-1/top-5 of each ONNX model on the same batches (preprocessed once); for two models also
    their top-1 agreement and ``per_class`` (``rn50.metrics.per_class``: the second against the first)."""
    logits, y = _logits(models, files, labels, p, batch_size)
    n = len(y)
    res: dict[str, Any] = {}
    for k, lg in logits.items():
        c = topk_correct(lg, y, (1, 5))
        res[k] = {"top1": 100.0 * c[1] / n, "top5": 100.0 * c[5] / n, "images": n}
    if len(models) == 2:
        first, other = logits.values()
        res["top1_agreement"] = 100.0 * float((first.argmax(1) == other.argmax(1)).sum()) / n
        res["per_class"] = per_class(y, first, other, classes or [str(i) for i in range(first.shape[1])])
    return res


def gate(
    fp32: str | os.PathLike[str],
    int8: str | os.PathLike[str],
    files: Sequence[str],
    labels: Sequence[int],
    p: Preprocessing,
    max_drop: float = MAX_TOP1_DROP,
    classes: Sequence[str] | None = None,
) -> dict[str, Any]:
    """INT8 against FP32 on ``files``: passes when INT8 loses at most ``max_drop`` points of top-1
    and keeps the int8 agreement floor; ``lost_most`` is the class whose top-1 INT8 lowered most."""
    logits, y = _logits({"fp32": fp32, "int8": int8}, files, labels, p)
    c = compare_logits(
        logits["fp32"], logits["int8"], y, "int8", dataclasses.replace(bounds_for("int8"), max_top1_drop=max_drop)
    )
    n = c.images
    rows = per_class(y, logits["fp32"], logits["int8"], classes or [str(i) for i in range(logits["fp32"].shape[1])])
    lost_most = min((r for r in rows if r["images"]), key=lambda r: r["diff"])
    return {
        "fp32": {**c.reference, "images": n},
        "int8": {**c.candidate, "images": n},
        "top1_agreement": c.top1_agreement,
        "top1_drop": c.top1_drop,
        "max_top1_drop": max_drop,
        "min_top1_agreement": c.bounds.min_top1_agreement,
        "problem": c.problem,
        "passed": c.passed,
        "lost_most": lost_most,
    }


def gate_summary(g: dict[str, Any]) -> str:
    """One line for the terminal from :func:`gate`'s result: both top-1s, the drop against its
    bound, agreement, and the class INT8 hurt most (where one lost anything)."""
    return (
        f"gate: FP32 top-1 {g['fp32']['top1']:.2f}%, INT8 top-1 {g['int8']['top1']:.2f}% "
        f"(drop {g['top1_drop']:+.2f} points, allowed {g['max_top1_drop']}), agreement {g['top1_agreement']:.2f}%; "
        f"{lost_most_text(g)}"
    )


def lost_most_text(g: dict[str, Any]) -> str:
    """The class INT8 hurt most, in words, from :func:`gate`'s result."""
    lm = g["lost_most"]
    if lm["diff"] >= 0:
        return "no class lost top-1"
    return f"class that lost most: {lm['class']} ({lm['diff']:+.2f} points on its {lm['images']} images)"
