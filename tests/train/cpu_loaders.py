"""The training loaders the tests build: one data split, on the CPU, one shard."""

from __future__ import annotations

from typing import Any

import torch

from rn50.preprocess import Preprocessing
from train.loaders import Shard, make_loader


def cpu_loader(backend: str, s: Any, *, train: bool, size: int, bs: int, seed: int, workers: int, **kw: Any) -> Any:
    """``make_loader`` for ``s`` (a ``rn50.layout`` split) at ``size`` px; ``kw``: its other keywords."""
    return make_loader(
        backend,
        s.files,
        s.labels,
        Preprocessing.for_image_size(size),
        batch_size=bs,
        train=train,
        device=torch.device("cpu"),
        shard=Shard(),
        seed=seed,
        workers=workers,
        **kw,
    )
