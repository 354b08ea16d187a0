"""Parity between an exported artifact and the PyTorch checkpoint it came from.

Both see the same tensors: real validation images through the shared DALI preprocessing
(:func:`rn50.batches.iter_split`). The artifact runs through the ``rn50.backends`` class that
serves it, and the logits are judged by :func:`rn50.compare.compare_logits` with the bounds for
the artifact's precision (:func:`rn50.compare.parity_bounds`: the logit and agreement bounds of
:data:`rn50.compare.BOUNDS`; accuracy is the INT8 gate's and ``serve.validate``'s to judge).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from rn50.batches import iter_split
from rn50.compare import LogitComparison, compare_logits, parity_bounds
from rn50.preprocess import Preprocessing


def compare(
    model: nn.Module,
    run: Callable[[np.ndarray], np.ndarray],
    files: Sequence[str],
    labels: Sequence[int],
    p: Preprocessing,
    precision: str,
    batch_size: int = 64,
) -> LogitComparison:
    """``run`` (an artifact's backend) against ``model`` on ``files``, judged for ``precision``."""
    model = model.eval()
    refs, gots, ys = [], [], []
    with torch.no_grad():
        for x, y in iter_split(files, labels, p, batch_size):
            refs.append(model(torch.from_numpy(x)).numpy())
            gots.append(np.asarray(run(x), dtype=np.float32))
            ys.append(np.asarray(y))
    return compare_logits(
        np.concatenate(refs), np.concatenate(gots), np.concatenate(ys), precision, parity_bounds(precision)
    )
