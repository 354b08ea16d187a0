"""Top-k accuracy, shared by training validation, the INT8 gate and serve.validate."""

from __future__ import annotations

from typing import Sequence

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
