"""AOTInductor backend (``.pt2``, from ``torch._inductor.aoti_compile_and_package``).

The package is compiled for one device type (recorded in its metadata as ``AOTI_DEVICE_KEY``):
a CPU package takes float32 numpy/CPU tensors, a CUDA package takes the DALI GPU tensor as is.
A CUDA package on a machine without a GPU is an EngineError, not a crash.

The package is compiled for one image size (only the batch is dynamic) and runs whatever it is
given as if it had that size: a larger image gives wrong logits, a smaller one reads out of
bounds. Its own input checks cannot be switched on instead (``AOTI_RUNTIME_CHECK_INPUTS=1``): they
also enforce the batch range the compiler inferred, e.g. 2..15 for a package that runs 1..256
correctly. The size is read from the generated source the package carries (the same checks, as
C++), becomes ``input_shape`` for :func:`rn50.backends.load_engine` to compare with the manifest,
and the probe that finds the class count runs at that size, never at a size the package does not
take.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from rn50.errors import EngineError, first_line

from . import manifest_max_batch

# In the generated wrapper source: `static void check_input_0(...) { ... if (32 != arg320_1_size[2]) {`
_CHECK_INPUT_0 = re.compile(r"static void check_input_0\(.*?\n\}", re.S)
_STATIC_DIM = re.compile(r"if \((\d+) != \w+_size\[(\d+)\]\)")


def package_input_shape(path: Path) -> tuple[int | None, ...] | None:
    """``(C, H, W)`` of the package's image input (a dynamic dimension None), from the input checks
    in the wrapper source it carries; None when the source or the checks are not there."""
    try:
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith(".wrapper.cpp") and "/aotinductor/model/" in n]
            if len(names) != 1:
                return None
            src = z.read(names[0]).decode("utf-8", "replace")
    except (OSError, zipfile.BadZipFile):
        return None
    body = _CHECK_INPUT_0.search(src)
    if body is None:
        return None
    dims = {int(d): int(v) for v, d in _STATIC_DIM.findall(body.group(0))}
    if not dims or max(dims) != 3:
        return None
    return tuple(dims.get(i) for i in (1, 2, 3))


def quiet_cuda_home_notice() -> None:
    """Without a CUDA runtime, torch.utils.cpp_extension logs a warning as it is imported ("No CUDA
    runtime is found, using CUDA_HOME=..."), which a CPU package never needs: kept to errors."""
    import logging

    import torch

    if not torch.cuda.is_available():
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


class AotiBackend:
    name = "aoti"

    def __init__(self, path: Path, manifest: dict[str, Any], prefer_gpu: bool = True):
        import torch

        quiet_cuda_home_notice()
        from torch._inductor import aoti_load_package

        try:
            meta = torch._C._aoti.AOTIModelPackageLoader.load_metadata_from_package(  # type: ignore[attr-defined]
                str(path), "model"
            )
            dev = str(meta.get("AOTI_DEVICE_KEY", "cpu"))
        except Exception as e:
            raise EngineError(f"{path}: not a readable AOTInductor package: {first_line(e)}") from e
        self.device = "cuda" if dev.startswith("cuda") else "cpu"
        if self.device == "cuda" and not torch.cuda.is_available():
            raise EngineError(
                f"{path}: this AOTInductor package was compiled for CUDA and there is no GPU here "
                f"(export a CPU package on this machine)"
            )
        try:
            self.model = aoti_load_package(str(path))
        except Exception as e:
            raise EngineError(f"{path}: AOTInductor cannot load it: {first_line(e)}") from e
        self.provider = "cuda:0" if self.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
        self.input_dtype = "float16" if manifest.get("precision") == "fp16" else "float32"
        self.max_batch, self.max_batch_declared = manifest_max_batch(manifest)
        self.input_shape = package_input_shape(path)
        # The output width is only known by running it: a one-image probe at the package's own
        # input size, or the manifest's where the package does not say.
        size = int(manifest.get("preprocessing", {}).get("image_size") or manifest.get("image_size") or 0)
        probe = [3, size, size]
        for i, d in enumerate(self.input_shape or ()):
            probe[i] = d if d is not None else probe[i]
        self.num_classes: int | None = None
        if probe[1] and probe[2]:
            try:
                y = self.run(np.zeros((1, *probe), np.float32))
            except Exception as e:
                raise EngineError(
                    f"{path}: AOTInductor package fails on a {'x'.join(map(str, probe))} input: {first_line(e)}"
                ) from e
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
