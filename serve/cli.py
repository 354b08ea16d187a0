"""What the serve commands (``serve.infer``, ``serve.validate``, ``serve.triton``) share around
their work: the device choice, DALI's thread count and the check of output paths before any work."""

from __future__ import annotations

import os

from rn50.errors import DataError


def pick_device(requested: str) -> str:
    """``auto`` -> ``gpu`` when CUDA is usable, else ``cpu``; ``gpu`` without CUDA is an error."""
    import torch

    have = torch.cuda.is_available()
    if requested == "auto":
        return "gpu" if have else "cpu"
    if requested == "gpu" and not have:
        raise DataError("--device gpu: no CUDA GPU is available here (use --device auto or cpu)")
    return requested


def env_threads() -> int | None:
    """DALI's CPU threads from ``RN50_DALI_THREADS``, else None (DALI's default)."""
    v = os.environ.get("RN50_DALI_THREADS")
    return int(v) if v else None


def check_outputs(**paths: str | None) -> str | None:
    """The first ``--flag PATH: reason`` among the output paths that cannot be written, else None."""
    from rn50.atomic import unwritable_reason

    for flag, path in paths.items():
        why = unwritable_reason(path) if path else None
        if why:
            return f"--{flag.replace('_', '-')} {path}: {why}"
    return None
