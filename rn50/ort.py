"""One quiet way to open an ONNX Runtime session.

onnxruntime-gpu lists the CUDA and TensorRT providers even on a machine without a GPU, and
asking for them there prints a screenful of errors before it falls back to the CPU. We only ask
for CUDA when a CUDA driver with at least one device is present, keep ORT's own logger at
ERROR-and-above during session creation, and say in one line which provider was used.
"""

from __future__ import annotations

import ctypes
import functools
import os
from typing import Any


@functools.lru_cache(maxsize=1)
def cuda_device_count() -> int:
    """Number of CUDA devices the driver sees (0 without a driver), without importing torch."""
    for name in ("libcuda.so.1", "libcuda.so"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        if lib.cuInit(0) != 0:
            return 0
        n = ctypes.c_int(0)
        return n.value if lib.cuDeviceGetCount(ctypes.byref(n)) == 0 else 0
    return 0


def session(
    model: str | os.PathLike[str] | bytes, *, prefer_gpu: bool = True, threads: int | None = None, optimize: bool = True
) -> Any:
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    providers = ["CPUExecutionProvider"]
    if prefer_gpu and cuda_device_count() > 0 and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    src = model if isinstance(model, bytes) else os.fspath(model)
    return ort.InferenceSession(src, sess_options=so, providers=providers)


def provider_of(sess: Any) -> str:
    return sess.get_providers()[0]
