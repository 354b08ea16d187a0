"""The INT8 accuracy gate: INT8 and FP32 scored with ONNX Runtime on the same validation images."""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from rn50.batches import iter_split
from rn50.metrics import per_class, topk_correct
from rn50.ort import session
from rn50.preprocess import Preprocessing

MAX_TOP1_DROP = 0.5  # points


def score(models: dict[str, str | os.PathLike[str]], files: Sequence[str], labels: Sequence[int],
          p: Preprocessing, batch_size: int = 64, classes: Sequence[str] | None = None) -> dict[str, Any]:
    """top-1/top-5 of each ONNX model on the same batches (preprocessed once); for two models also
    their top-1 agreement and ``per_class`` (``rn50.metrics.per_class``: the second against the first)."""
    sessions = {k: session(v, prefer_gpu=True) for k, v in models.items()}
    counts = {k: {1: 0, 5: 0} for k in models}
    agree, n = 0, 0
    kept: dict[str, list[np.ndarray]] = {k: [] for k in models}
    ys = []
    for x, y in iter_split(files, labels, p, batch_size):
        outs = {k: s.run(None, {s.get_inputs()[0].name: x})[0] for k, s in sessions.items()}
        for k, lg in outs.items():
            for kk, v in topk_correct(lg, y, (1, 5)).items():
                counts[k][kk] += v
            kept[k].append(lg)
        ys.append(y)
        first, *rest = outs.values()
        for other in rest:
            agree += int((np.argmax(first, 1) == np.argmax(other, 1)).sum())
        n += len(y)
    res: dict[str, Any] = {k: {"top1": 100.0 * c[1] / n, "top5": 100.0 * c[5] / n, "images": n} for k, c in counts.items()}
    if len(models) == 2:
        res["top1_agreement"] = 100.0 * agree / n
        first_l, second_l = (np.concatenate(v) for v in kept.values())
        res["per_class"] = per_class(np.concatenate(ys), first_l, second_l,
                                     classes or [str(i) for i in range(first_l.shape[1])])
    return res


def gate(fp32: str | os.PathLike[str], int8: str | os.PathLike[str], files: Sequence[str], labels: Sequence[int],
         p: Preprocessing, max_drop: float = MAX_TOP1_DROP,
         classes: Sequence[str] | None = None) -> dict[str, Any]:
    r = score({"fp32": fp32, "int8": int8}, files, labels, p, classes=classes)
    drop = r["fp32"]["top1"] - r["int8"]["top1"]
    lost_most = min((c for c in r["per_class"] if c["images"]), key=lambda c: c["diff"])
    return {"fp32": r["fp32"], "int8": r["int8"], "top1_agreement": r["top1_agreement"], "top1_drop": drop,
            "max_top1_drop": max_drop, "passed": drop <= max_drop, "lost_most": lost_most}
