"""AOTInductor packages (``.pt2``): ``torch.export`` with a dynamic batch, compiled ahead of time.

The package is compiled for the device the model sits on: CUDA when a GPU is available, else the
CPU. The batch dimension is dynamic between 1 and ``max_batch``; the example input has batch 2
(a batch of 1 would let the exporter specialise the dimension to a constant).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import warnings

import torch
from torch import nn


def compile_package(
    model: nn.Module, image_size: int, dest: str | os.PathLike[str], max_batch: int = 256, device: str = "cpu"
) -> None:
    """torch.export -> aoti_compile_and_package into ``dest`` (a .pt2 path)."""
    from torch._inductor import aoti_compile_and_package

    model = model.eval().to(device)
    x = torch.randn(2, 3, image_size, image_size, device=device)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ep = torch.export.export(model, (x,), dynamic_shapes=({0: batch},), strict=False)
        aoti_compile_and_package(ep, package_path=os.fspath(dest))


# What check_loads runs in a child process: load the package, and run one image through it.
_LOAD_CHECK = """
import sys, torch
from torch._inductor import aoti_load_package
m = aoti_load_package(sys.argv[1])
s = int(sys.argv[3])
with torch.inference_mode():
    m(torch.zeros(1, 3, s, s, device=sys.argv[2]))
"""


def check_loads(path: str | os.PathLike[str], device: str, image_size: int, timeout: float = 900) -> None:
    """Load ``path`` and run one image through it in a child process; EngineError if that fails.

    AOTInductor's CUDA loader can crash its process instead of raising (SIGSEGV inside
    ``_load_aoti`` with some torch builds; docs/benchmarks.md): loading a new package in a child
    first turns that into an error that says so, and leaves the export free to clean up its scratch
    files, instead of killing it half way. The parity check then loads it in-process through
    :class:`rn50.backends.aoti.AotiBackend`, the class that serves it."""
    from rn50.errors import EngineError

    try:
        r = subprocess.run(
            [sys.executable, "-c", _LOAD_CHECK, os.fspath(path), device, str(image_size)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise EngineError(f"{path}: loading the AOTInductor package did not finish in {timeout:.0f} s") from None
    if r.returncode == 0:
        return
    if r.returncode < 0:
        try:
            sig = signal.Signals(-r.returncode).name
        except ValueError:
            sig = f"signal {-r.returncode}"
        raise EngineError(
            f"AOTInductor's loader crashed ({sig}) loading the {device} package it has just compiled, "
            f"so it cannot be served here; nothing was written. This torch build ({torch.__version__}) "
            f"does this on some machines (see docs/benchmarks.md): export ONNX instead, or a .pt2 "
            f"on a machine where the check passes"
        )
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    raise EngineError(
        f"{path}: AOTInductor cannot load the package it has just compiled: "
        f"{lines[-1] if lines else 'exit status ' + str(r.returncode)}"
    )
