"""AOTInductor packages (``.pt2``): ``torch.export`` with a dynamic batch, compiled ahead of time.

The package is compiled for the device the model sits on: CUDA when a GPU is available, else the
CPU. The batch dimension is dynamic between 1 and ``max_batch``; the example input has batch 2
(a batch of 1 would let the exporter specialise the dimension to a constant).
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Callable

import numpy as np
import torch
from torch import nn


def compile_package(model: nn.Module, image_size: int, dest: str | os.PathLike[str], max_batch: int = 256,
                    device: str = "cpu") -> None:
    """torch.export -> aoti_compile_and_package into ``dest`` (a .pt2 path)."""
    from torch._inductor import aoti_compile_and_package

    model = model.eval().to(device)
    x = torch.randn(2, 3, image_size, image_size, device=device)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ep = torch.export.export(model, (x,), dynamic_shapes=({0: batch},), strict=False)
        aoti_compile_and_package(ep, package_path=os.fspath(dest))


def runner(path: str | os.PathLike[str], device: str = "cpu") -> Callable[[np.ndarray], np.ndarray]:
    """A numpy-in, numpy-out callable over the package (for the parity check)."""
    from torch._inductor import aoti_load_package

    compiled: Any = aoti_load_package(os.fspath(path))

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = compiled(torch.from_numpy(np.ascontiguousarray(x)).to(device))
        if isinstance(out, (list, tuple)):
            out = out[0]
        y: np.ndarray = out.float().cpu().numpy()
        return y

    return run
