"""Parity between an exported artifact and the PyTorch checkpoint it came from.

Both see the same tensors: real validation images through the shared DALI preprocessing
(:func:`rn50.batches.iter_split`). We report the max absolute logit difference, top-1
agreement, and each side's top-1/top-5 on those images.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from rn50.batches import balanced_subset, iter_split
from rn50.metrics import topk_correct
from rn50.preprocess import Preprocessing

# Bounds an artifact must meet to be written: (max |logit difference| relative to the logit
# scale max(1, max|logit|), min top-1 agreement with PyTorch in %).
# * fp32 / pt2: same arithmetic up to reassociation: 1e-3 of the logit scale, 99.5% agreement.
# * fp16: a 10-bit mantissa through 50 layers: 2e-2 of the logit scale, 99%.
# * int8: logits move by several percent; agreement must stay >= 90% here, and the real check
#   is the accuracy gate (calibration.gate: at most 0.5 point of top-1 lost against FP32).
BOUNDS = {"fp32": (1e-3, 99.5), "pt2": (1e-3, 99.5), "fp16": (2e-2, 99.0), "int8": (float("inf"), 90.0)}


def subset(files: Sequence[str], labels: Sequence[int], n: int, seed: int = 0) -> tuple[list[str], list[int]]:
    """``n`` images (or all, if fewer), class-balanced and deterministic (rn50.batches.balanced_subset)."""
    k = max(1, len(set(labels)))
    f, y = balanced_subset(files, labels, per_class=-(-n // k), seed=seed)
    return f[:n], y[:n]


def compare(model: nn.Module, run: Callable[[np.ndarray], np.ndarray], files: Sequence[str], labels: Sequence[int],
            p: Preprocessing, batch_size: int = 64) -> dict[str, float]:
    model = model.eval()
    n = agree = 0
    max_diff = 0.0
    scale = 0.0
    ref_c = {1: 0, 5: 0}
    got_c = {1: 0, 5: 0}
    with torch.no_grad():
        for x, y in iter_split(files, labels, p, batch_size):
            ref = model(torch.from_numpy(x)).numpy()
            got = np.asarray(run(x), dtype=np.float32)
            max_diff = max(max_diff, float(np.abs(ref - got).max()))
            scale = max(scale, float(np.abs(ref).max()))
            agree += int((ref.argmax(1) == got.argmax(1)).sum())
            for c, lg in ((ref_c, ref), (got_c, got)):
                for k, v in topk_correct(lg, y, (1, 5)).items():
                    c[k] += v
            n += len(y)

    def pct(v: float) -> float:
        return 100.0 * v / max(n, 1)

    return {"images": n, "max_abs_logit_diff": max_diff, "rel_logit_diff": max_diff / max(1.0, scale),
            "max_abs_logit": scale, "top1_agreement": pct(agree),
            "torch_top1": pct(ref_c[1]), "torch_top5": pct(ref_c[5]), "top1": pct(got_c[1]), "top5": pct(got_c[5])}


def check(result: dict[str, float], kind: str) -> str | None:
    """None if ``result`` meets ``kind``'s bounds, else what failed."""
    max_diff, min_agree = BOUNDS[kind]
    rel = result["max_abs_logit_diff"] / max(1.0, result["max_abs_logit"])
    if rel > max_diff:
        return (f"max |logit difference| {result['max_abs_logit_diff']:.3g} is {rel:.3g} of the logit scale "
                f"{max(1.0, result['max_abs_logit']):.3g}, above the {max_diff:g} allowed for {kind}")
    if result["top1_agreement"] < min_agree:
        return f"top-1 agreement {result['top1_agreement']:.2f}% is below {min_agree}%"
    return None
