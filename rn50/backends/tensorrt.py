"""TensorRT backend (``.plan``): the TensorRT runtime API fed straight from DALI's GPU buffer.

``Runtime(logger).deserialize_cuda_engine(plan)`` -> ``create_execution_context()``; per batch
``set_input_shape``, ``set_tensor_address`` with the input tensor's ``data_ptr()`` (the torch
view of DALI's GPU output: no host copy) and a torch output tensor's, then
``execute_async_v3`` on a torch CUDA stream. Only the logits are copied to the host.

A plan is tied to its TensorRT version and GPU (unless built hardware/version compatible). When
``deserialize_cuda_engine`` returns None, the error names the plan, the TensorRT version and GPU
its manifest records, and the ones present here.

``tensorrt`` is imported when this module is (``rn50.backends`` imports it only to open a plan),
inside a guard, so it imports without TensorRT. Typed against the corrected stubs in ``typings/``
(``make typecheck``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

from rn50.errors import EngineError, first_line

try:  # typed by the corrected stubs in typings/ (make typecheck)
    import tensorrt as trt

    _MISSING = (
        "" if hasattr(trt, "Runtime") else ("the 'tensorrt' module has no Runtime: only type stubs are installed")
    )  # a namespace package
except ImportError as e:  # pragma: no cover - depends on the machine
    _MISSING = str(e)


def _import_trt() -> None:
    """EngineError unless the TensorRT runtime can be used here."""
    if _MISSING:
        raise EngineError(
            f"TensorRT is not installed ({_MISSING}); install tensorrt-cu13 from NVIDIA, "
            f"or serve the .onnx / .pt2 export instead"
        )


def version_tuple(v: str) -> tuple[int, int]:
    """(major, minor) of a TensorRT version string; EngineError when it is not one."""
    parts = (v.split(".") + ["0"])[:2]
    try:
        return int(parts[0]), int(parts[1])
    except ValueError:
        raise EngineError(f"cannot read the TensorRT version {v!r}") from None


SUPPORTED = ((10, 0), (12, 0))  # [first, end): the releases this project's TensorRT code is written for
# The newest release whose bindings source tests/export/trt_surface records: every TensorRT name the
# code reads is checked against it and each release before it. A later 11.x is used with a warning.
CHECKED_THROUGH = (11, 1)
VOLTA_LAST = (10, 4)  # TensorRT 10.0 deprecated Volta (sm_70) and 10.5 removed it (release notes)


def unsupported_release(trt_version: str) -> str | None:
    """Why this project cannot use TensorRT ``trt_version`` (outside :data:`SUPPORTED`), else None."""
    if SUPPORTED[0] <= version_tuple(trt_version) < SUPPORTED[1]:
        return None
    return f"TensorRT {trt_version} is not supported: this project uses TensorRT 10.0 to 11.x"


def unchecked_release(trt_version: str) -> str | None:
    """A warning when ``trt_version`` is supported but newer than :data:`CHECKED_THROUGH`, else None."""
    if unsupported_release(trt_version) or version_tuple(trt_version) <= CHECKED_THROUGH:
        return None
    last = ".".join(map(str, CHECKED_THROUGH))
    return (
        f"TensorRT {trt_version} is newer than {last}, the newest release whose Python bindings this "
        f"project's TensorRT calls are checked against: used anyway (serve.validate checks the engine)"
    )


def unsupported_gpu(trt_version: str, cc: tuple[int, int], gpu_name: str) -> str | None:
    """Why TensorRT ``trt_version`` cannot build or run on a GPU of compute capability ``cc``,
    else None. Checked before TensorRT is asked: on such a GPU the builder and runtime
    constructors only fail with "factory function returned nullptr"."""
    v = version_tuple(trt_version)
    sm = f"sm_{cc[0]}{cc[1]}"
    if cc < (7, 0):
        return (
            f"{gpu_name} ({sm}) is older than Volta (sm_70): no TensorRT this project supports (10.0 to 11.x) "
            "runs on it"
        )
    if cc < (7, 5) and v > VOLTA_LAST:
        return (
            f"{gpu_name} ({sm}) is a Volta GPU, which TensorRT {trt_version} no longer supports (removed in 10.5): "
            "use TensorRT 10.0 to 10.4 with CUDA 12 and a CUDA 12 PyTorch build (docs/tensorrt.md)"
        )
    return None


def _dims(d: trt.Dims) -> tuple[int, ...]:
    """A TensorRT shape as a tuple (Dims is indexable, and iterable only through that)."""
    return tuple(int(d[i]) for i in range(len(d)))


def _target_of(manifest: dict[str, Any]) -> tuple[str, str]:
    """(TensorRT version, GPU) the manifest says the plan was built with."""
    gpu = manifest.get("gpu") or {}
    cc = gpu.get("compute_capability")
    name = str(gpu.get("name", "unknown"))
    return str(manifest.get("tensorrt_version", "unknown")), f"{name} (sm_{str(cc).replace('.', '')})" if cc else name


def _current_gpu() -> str:
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU"
    major, minor = torch.cuda.get_device_capability(0)
    return f"{torch.cuda.get_device_name(0)} (sm_{major}{minor})"


class TrtBackend:
    name = "tensorrt"
    device = "cuda"

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        import torch

        _import_trt()
        if not torch.cuda.is_available():
            raise EngineError(
                f"{path}: a TensorRT plan needs a CUDA GPU and there is none here "
                f"(serve the .onnx or .pt2 export on this machine)"
            )
        self.path = path
        why = unsupported_release(str(trt.__version__))
        if why:
            raise EngineError(f"{path}: {why}")
        unchecked = unchecked_release(str(trt.__version__))
        if unchecked:  # the same line export prints before a build
            print(f"warning: {unchecked}", file=sys.stderr)
        cc = torch.cuda.get_device_capability(0)
        why = unsupported_gpu(str(trt.__version__), (int(cc[0]), int(cc[1])), torch.cuda.get_device_name(0))
        if why:
            raise EngineError(f"{path}: {why}")
        self.logger = trt.Logger(trt.Logger.ERROR)
        try:
            self.runtime = trt.Runtime(self.logger)
        except (RuntimeError, TypeError) as e:  # pybind's "factory function returned nullptr"
            raise EngineError(f"{path}: TensorRT {trt.__version__} could not start its runtime: {first_line(e)}") from e
        try:  # TensorRT reports a foreign plan by returning None, some corrupt ones by raising
            engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
            why = ""
        except (RuntimeError, TypeError) as e:
            engine, why = None, f" ({first_line(e)})"
        if engine is None:
            built_trt, built_gpu = _target_of(manifest)
            raise EngineError(
                f"{path}: TensorRT cannot load this plan{why}: it was built with TensorRT {built_trt} for "
                f"{built_gpu}, and this machine has TensorRT {trt.__version__} on {_current_gpu()}. "
                f"Plans only run on the TensorRT version (and, unless built hardware-compatible, the GPU) "
                f"they were built for: rebuild it here with `python -m export --precision ... --output X.plan`"
            )
        self.engine = engine
        context = engine.create_execution_context()
        if context is None:
            raise EngineError(f"{path}: TensorRT could not create an execution context (out of GPU memory?)")
        self.context = context
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        ins = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        # enqueueV3 needs an address (or an output allocator) for every output; this runner binds one
        if len(ins) != 1 or len(outs) != 1:
            raise EngineError(
                f"{path}: expected one input and one logits output, found inputs {ins} and outputs {outs}"
            )
        self.input_name, self.output_name = ins[0], outs[0]
        self._in_dtype = self._torch_dtype(engine.get_tensor_dtype(self.input_name))
        self._out_dtype = self._torch_dtype(engine.get_tensor_dtype(self.output_name))
        self.input_dtype = "float16" if self._in_dtype == torch.float16 else "float32"
        in_shape = _dims(engine.get_tensor_shape(self.input_name))
        # (C, H, W), -1 (dynamic) as None; load_engine compares it with the manifest's image size
        self.input_shape: tuple[int | None, ...] | None = (
            tuple(int(d) if d > 0 else None for d in in_shape[1:]) if len(in_shape) == 4 else None
        )
        if in_shape and in_shape[0] > 0:
            self.min_batch = self.max_batch = int(in_shape[0])
        else:
            profile = engine.get_tensor_profile_shape(self.input_name, 0)
            self.min_batch, self.max_batch = int(profile[0][0]), int(profile[2][0])
        self.max_batch_declared = True  # a plan always bounds its batch (fixed, or its profile's max)
        out_shape = _dims(engine.get_tensor_shape(self.output_name))
        self.num_classes: int | None = int(out_shape[-1]) if out_shape and out_shape[-1] > 0 else None
        self.provider = f"TensorRT {trt.__version__} on {_current_gpu()}"
        self.stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]

    def _torch_dtype(self, dt: trt.DataType) -> Any:
        import torch

        table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16}
        if dt not in table:
            raise EngineError(f"{self.path}: engine I/O type {dt} is not float32/float16")
        return table[dt]

    def run(self, batch: Any) -> np.ndarray:
        import torch

        x = torch.from_numpy(np.ascontiguousarray(batch)) if isinstance(batch, np.ndarray) else batch
        x = x.to(device="cuda", dtype=self._in_dtype).contiguous()
        n = int(x.shape[0])
        if n > self.max_batch:
            raise ValueError(f"batch of {n} exceeds the engine's maximum batch {self.max_batch}")
        if n < self.min_batch:
            # a short batch (the last one, or one that lost undecodable images) below the profile's
            # minimum (--batch-min, or a fixed-batch engine) is padded with zero images; rows are
            # independent at inference, and the padding's logits are dropped below
            x = torch.cat([x, x.new_zeros((self.min_batch - n, *x.shape[1:]))])
        if not self.context.set_input_shape(self.input_name, tuple(int(d) for d in x.shape)):
            raise EngineError(f"{self.path}: the engine rejects input shape {tuple(x.shape)}")
        out_shape = _dims(self.context.get_tensor_shape(self.output_name))
        y = torch.empty(out_shape, dtype=self._out_dtype, device=x.device)
        self.context.set_tensor_address(self.input_name, int(x.data_ptr()))
        self.context.set_tensor_address(self.output_name, int(y.data_ptr()))
        self.stream.wait_stream(torch.cuda.current_stream(x.device))
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise EngineError(f"{self.path}: TensorRT execution failed")
        x.record_stream(self.stream)
        with torch.cuda.stream(self.stream):  # the device-to-host copy waits for the engine
            out: np.ndarray = y[:n].float().cpu().numpy()
        return out
