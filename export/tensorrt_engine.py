"""TensorRT engines (``.plan``) built from ONNX with the plain TensorRT Python API.

Precision comes from the ONNX, not from builder flags: an FP16 ONNX (FP16 tensors inside) or a
Q/DQ ONNX (explicit INT8). That is the only way TensorRT 11 works (networks are always strongly
typed; ``BuilderFlag.FP16/INT8`` and the implicit-INT8 calibrators are gone) and the recommended
way on TensorRT 10 (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``). Only a TensorRT without
strongly typed networks (< 9.1) falls back to the FP16/INT8 builder flags (with Q/DQ nodes the
INT8 flag needs no calibrator).

Polygraphy is not used to build: its ``CreateConfig(fp16=, int8=)`` sets exactly the flags TRT 11
removed and its ``Calibrator`` is the removed implicit-INT8 API (see docs/tensorrt.md).

``tensorrt`` is imported at module level inside a guard, so this module imports everywhere; mypy
sees the ``tensorrt-stubs`` types (``mypy --strict export/tensorrt_engine.py``). The stubs
installed without the runtime make ``import tensorrt`` succeed as an empty namespace package,
hence the ``Builder`` attribute check in :func:`missing`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from rn50.atomic import write_bytes
from rn50.errors import EngineError

try:
    import tensorrt as trt

    _HAVE_TRT = hasattr(trt, "Builder")
except ImportError:  # pragma: no cover - depends on the machine
    _HAVE_TRT = False

INSTALL_HINT = (
    "install TensorRT from NVIDIA's index (`pip install --extra-index-url https://pypi.nvidia.com tensorrt-cu13` "
    "with driver r580+, or tensorrt-cu12 with driver r535+; TensorRT 11 needs a Turing (sm_75) or newer GPU, "
    "Volta needs TensorRT <= 10.4 with CUDA 12; see docs/tensorrt.md)")
HARDWARE_COMPAT = ("none", "same-cc", "ampere+")


def gpu() -> dict[str, Any] | None:
    """Name and compute capability of CUDA device 0, or None without a usable GPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(0)
    return {"name": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}",
            "sm": f"sm_{major}{minor}"}


def missing() -> str | None:
    """None when a TensorRT engine can be built here, else what is missing and how to get it."""
    if not _HAVE_TRT:
        return f"TensorRT is not installed (no usable `tensorrt` module): {INSTALL_HINT}"
    if gpu() is None:
        return ("no CUDA GPU is visible (TensorRT builds engines on the GPU they will run on): run on a machine "
                "with an NVIDIA GPU (Turing or newer) and driver r580+ (CUDA 13) or r535+ (CUDA 12)")
    return None


def version() -> str:
    return str(trt.__version__) if _HAVE_TRT else "not installed"


def _major() -> int:
    return int(version().split(".")[0])


def _strongly_typed_flag() -> int | None:
    """The create_network flag for strongly typed networks; 0 where they are the only kind (TRT 11+),
    None where this TensorRT has none (then precision falls back to builder flags)."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if flag is not None:
        return 1 << int(flag)
    return 0 if _major() >= 11 else None


def build_engine(onnx_path: str | os.PathLike[str], plan_path: str | os.PathLike[str], *, precision: str,
                 input_name: str, image_size: int, batch: tuple[int, int, int], workspace_mib: int = 4096,
                 opt_level: int = 3, hardware_compat: str = "none",
                 timing_cache: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Build ``plan_path`` (written atomically) from ``onnx_path``; returns facts for the manifest."""
    why = missing()
    if why:
        raise EngineError(why)
    if hardware_compat not in HARDWARE_COMPAT:
        raise EngineError(f"unknown hardware compatibility {hardware_compat!r} (choose {', '.join(HARDWARE_COMPAT)})")
    if not 1 <= batch[0] <= batch[1] <= batch[2]:
        raise EngineError(f"batch profile min/opt/max {batch} must satisfy 1 <= min <= opt <= max")
    if not 0 <= opt_level <= 5:
        raise EngineError(f"--opt-level {opt_level} is outside 0-5")
    g = gpu()
    assert g is not None
    cc = tuple(int(v) for v in str(g["compute_capability"]).split("."))
    if hardware_compat == "ampere+" and cc < (8, 0):
        raise EngineError(f"--hardware-compat ampere+ needs an Ampere or newer GPU to build on; this is {g['name']} ({g['sm']})")
    if hardware_compat == "same-cc" and cc < (7, 5):
        raise EngineError(f"--hardware-compat same-cc needs a Turing or newer GPU to build on; this is {g['name']} ({g['sm']})")

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    typed = _strongly_typed_flag()
    network = builder.create_network(typed if typed is not None else 0)
    parser = trt.OnnxParser(network, logger)
    data = Path(onnx_path).read_bytes()
    if not parser.parse(data, os.fspath(onnx_path)):
        errors = [str(parser.get_error(i).desc()) for i in range(parser.num_errors)]
        raise EngineError(f"{onnx_path}: TensorRT's ONNX parser failed: " + "; ".join(errors or ["(no details)"]))

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mib) << 20)
    config.builder_optimization_level = int(opt_level)
    config.hardware_compatibility_level = {
        "none": trt.HardwareCompatibilityLevel.NONE,
        "same-cc": trt.HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY,
        "ampere+": trt.HardwareCompatibilityLevel.AMPERE_PLUS,
    }[hardware_compat]
    if typed is None:  # old TensorRT without strongly typed networks: precision by flags
        if precision in ("fp16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)  # Q/DQ present: explicit quantization, no calibrator

    profile = builder.create_optimization_profile()
    shape = (3, image_size, image_size)
    profile.set_shape(input_name, trt.Dims((batch[0], *shape)), trt.Dims((batch[1], *shape)),
                      trt.Dims((batch[2], *shape)))
    config.add_optimization_profile(profile)

    cache_path = Path(timing_cache) if timing_cache else None
    cache_loaded = bool(cache_path and cache_path.is_file())
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path and cache_loaded else b"")
    if not config.set_timing_cache(cache, False):
        raise EngineError(f"{cache_path}: timing cache does not fit this TensorRT/GPU (delete it to rebuild it)")

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"{onnx_path}: TensorRT could not build an engine (see the TensorRT messages above)")
    write_bytes(plan_path, bytes(memoryview(serialized)))
    if cache_path is not None:
        write_bytes(cache_path, bytes(memoryview(config.get_timing_cache().serialize())))
    return {"tensorrt_version": version(), "gpu": g, "strongly_typed": typed is not None,
            "profile": {"input": input_name, "min": [batch[0], *shape], "opt": [batch[1], *shape],
                        "max": [batch[2], *shape]},
            "hardware_compat": hardware_compat, "builder_optimization_level": opt_level,
            "workspace_mib": workspace_mib, "timing_cache": str(cache_path) if cache_path else None,
            "timing_cache_loaded": cache_loaded}


def runner(plan_path: str | os.PathLike[str]) -> Callable[[np.ndarray], np.ndarray]:
    """A numpy-in, numpy-out callable over a plan (for the parity check), via torch CUDA tensors."""
    import torch

    why = missing()
    if why:
        raise EngineError(why)
    logger = trt.Logger(trt.Logger.ERROR)
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
    if engine is None:
        raise EngineError(f"{plan_path}: TensorRT {version()} cannot deserialize this plan")
    context = engine.create_execution_context()
    if context is None:
        raise EngineError(f"{plan_path}: could not create an execution context")
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inp = next(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
    out = next(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
    dtypes = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16}

    def run(x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(x)).to("cuda", dtypes.get(engine.get_tensor_dtype(inp), torch.float32))
        context.set_input_shape(inp, tuple(t.shape))
        shape = tuple(context.get_tensor_shape(out))
        y = torch.empty(shape, dtype=dtypes.get(engine.get_tensor_dtype(out), torch.float32), device="cuda")
        context.set_tensor_address(inp, t.data_ptr())
        context.set_tensor_address(out, y.data_ptr())
        stream = torch.cuda.current_stream()
        if not context.execute_async_v3(stream.cuda_stream):
            raise EngineError(f"{plan_path}: TensorRT execution failed")
        stream.synchronize()
        r: np.ndarray = y.float().cpu().numpy()
        return r

    return run
