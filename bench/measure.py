"""What every benchmark shares: the description of the machine it ran on and one timing loop."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from typing import Any


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` says."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def machine() -> str:
    """``<CPU>, <n> logical cores (<vector extensions>), <GPU or "no GPU">``: what a figure ran on."""
    try:
        with open("/proc/cpuinfo") as f:
            txt = f.read()
    except OSError:
        txt = ""
    flags = ", ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "amx_int8") if f" {f}" in txt) or "no AVX2"
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu_name()}, {os.cpu_count()} logical cores ({flags}), {gpu}"


def time_calls(
    fn: Callable[[], Any],
    *,
    seconds: float,
    min_calls: int = 3,
    warmup: int = 1,
    sync: Callable[[], None] | None = None,
) -> list[float]:
    """Seconds of each call of ``fn`` after ``warmup`` untimed calls: calls go on until ``seconds``
    have passed and at least ``min_calls`` were made. ``sync`` (e.g. ``torch.cuda.synchronize``)
    runs after the warm-up and after each call, inside its time, for asynchronous work."""
    for _ in range(warmup):
        fn()
    if sync is not None:
        sync()
    times: list[float] = []
    t_end = time.perf_counter() + seconds
    while len(times) < min_calls or time.perf_counter() < t_end:
        t = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        times.append(time.perf_counter() - t)
    return times
