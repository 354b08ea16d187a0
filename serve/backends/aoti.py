"""AOTInductor backend (``.pt2``, from ``torch._inductor.aoti_compile_and_package``).

The package is compiled for one device type (recorded in its metadata as ``AOTI_DEVICE_KEY``):
a CPU package takes float32 numpy/CPU tensors, a CUDA package takes the DALI GPU tensor as is.
A CUDA package on a machine without a GPU is an EngineError, not a crash.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from rn50.errors import EngineError

from . import DEFAULT_MAX_BATCH


class AotiBackend:
    name = "aoti"

    def __init__(self, path: Path, manifest: dict[str, Any], prefer_gpu: bool = True):
        import torch
        from torch._inductor import aoti_load_package

        try:
            meta = torch._C._aoti.AOTIModelPackageLoader.load_metadata_from_package(  # type: ignore[attr-defined]
                str(path), "model")
            dev = str(meta.get("AOTI_DEVICE_KEY", "cpu"))
        except Exception as e:
            raise EngineError(f"{path}: not a readable AOTInductor package: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
        self.device = "cuda" if dev.startswith("cuda") else "cpu"
        if self.device == "cuda" and not torch.cuda.is_available():
            raise EngineError(f"{path}: this AOTInductor package was compiled for CUDA and there is no GPU here "
                              f"(export a CPU package on this machine)")
        try:
            self.model = aoti_load_package(str(path))
        except Exception as e:
            raise EngineError(f"{path}: AOTInductor cannot load it: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
        self.provider = "cuda:0" if self.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
        self.input_dtype = "float16" if manifest.get("precision") == "fp16" else "float32"
        self.max_batch = int(manifest.get("max_batch") or DEFAULT_MAX_BATCH)
        # The output width is only known by running it; one-image probe at the manifest's size.
        size = int(manifest.get("image_size") or manifest.get("preprocessing", {}).get("image_size") or 0)
        self.num_classes: int | None = None
        if size:
            try:
                y = self.run(np.zeros((1, 3, size, size), np.float32))
            except Exception as e:
                raise EngineError(f"{path}: AOTInductor package fails on a {size}x{size} input: "
                                  f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
            self.num_classes = int(y.shape[1])

    def run(self, batch: Any) -> np.ndarray:
        import torch

        t = torch.from_numpy(np.ascontiguousarray(batch)) if isinstance(batch, np.ndarray) else batch
        t = t.to(device=self.device, dtype=torch.float16 if self.input_dtype == "float16" else torch.float32)
        with torch.inference_mode():
            out = self.model(t)
        if isinstance(out, (list, tuple)):
            out = out[0]
        y: np.ndarray = out.float().cpu().numpy()
        return y
