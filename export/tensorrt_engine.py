"""TensorRT engines (``.plan``) built from ONNX with the plain TensorRT Python API, 10.0 to 11.x.

Precision comes from the ONNX, not from builder flags: an FP16 ONNX (FP16 tensors inside) or a
Q/DQ ONNX (explicit INT8). That is the only way TensorRT 11 works (networks are always strongly
typed; ``BuilderFlag.FP16/INT8`` and the implicit-INT8 calibrators are gone) and the recommended
way on TensorRT 10 (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``). Every TensorRT this
project claims (10.0 .. 11.x) has strongly typed networks, so FP16/INT8 builder flags are never
set.

Features that only some releases have are looked up by name (:func:`build_options`), never
assumed: ``HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY`` exists from 10.9 on, and asking
for it on an older TensorRT is an :class:`EngineError` that says so. FP32 plans are built with
``BuilderFlag.TF32`` cleared (TensorRT turns TF32 on by default for FP32 layers on Ampere and
newer, which would not meet the FP32 parity bound); the manifest records the setting.
``tests/export/trt_surface/tensorrt_surface.json`` holds the names each release's bindings define (from
NVIDIA's ``python/src/infer/pyCore.cpp`` at each tag) with their values (``include/NvInfer.h``),
and a test runs :func:`build_options` against each. Releases after the newest recorded one
(:data:`rn50.backends.tensorrt.CHECKED_THROUGH`) build with a warning.

Polygraphy is not used to build: its ``CreateConfig(fp16=, int8=)`` sets exactly the flags TRT 11
removed and its ``Calibrator`` is the removed implicit-INT8 API (see docs/tensorrt.md). The plan is
run (parity) through :class:`rn50.backends.tensorrt.TrtBackend`, the runner serve uses.

``tensorrt`` is imported at module level inside a guard, so this module imports everywhere; mypy
reads the corrected stubs in ``typings/`` (``make typecheck``). The stubs installed without the
runtime make ``import tensorrt`` succeed as an empty namespace package, hence the ``Builder``
attribute check in :func:`missing`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rn50.atomic import write_bytes
from rn50.backends.tensorrt import unsupported_gpu, unsupported_release, version_tuple
from rn50.errors import EngineError, first_line

try:
    import tensorrt as trt

    _HAVE_TRT = hasattr(trt, "Builder")
except ImportError:  # pragma: no cover - depends on the machine
    _HAVE_TRT = False

INSTALL_HINT = (
    "install TensorRT from NVIDIA's index (`pip install --extra-index-url https://pypi.nvidia.com tensorrt-cu13` "
    "with driver r580+, or tensorrt-cu12 with driver r535+; TensorRT 11 needs a Turing (sm_75) or newer GPU, "
    "Volta needs TensorRT <= 10.4 with CUDA 12 and a CUDA 12 PyTorch build; see docs/tensorrt.md)"
)
HARDWARE_COMPAT = ("none", "same-cc", "ampere+")


def gpu() -> dict[str, Any] | None:
    """Name and compute capability of CUDA device 0, or None without a usable GPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(0)
    return {"name": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}", "sm": f"sm_{major}{minor}"}


def missing() -> str | None:
    """None when a TensorRT engine can be built here, else what is missing and how to get it."""
    if not _HAVE_TRT:
        return f"TensorRT is not installed (no usable `tensorrt` module): {INSTALL_HINT}"
    if gpu() is None:
        return (
            "no CUDA GPU is visible (TensorRT builds engines on the GPU they will run on): run on a machine "
            "with an NVIDIA GPU (Turing or newer; Volta with TensorRT 10.0 to 10.4) and driver r580+ (CUDA 13) "
            "or r535+ (CUDA 12)"
        )
    return None


def version() -> str:
    return str(trt.__version__) if _HAVE_TRT else "not installed"


# --hardware-compat -> (HardwareCompatibilityLevel member, first TensorRT that has it)
_HARDWARE_LEVELS = {
    "none": ("NONE", "10.0"),
    "ampere+": ("AMPERE_PLUS", "10.0"),
    "same-cc": ("SAME_COMPUTE_CAPABILITY", "10.9"),
}


@dataclass(frozen=True)
class BuildOptions:
    """What the builder is told, decided from the installed TensorRT's own names."""

    version: str
    network_flags: int  # create_network's flags: STRONGLY_TYPED on 10.x, 0 on 11+ (always strongly typed)
    hardware_compatibility_level: Any
    clear_flags: tuple[Any, ...]  # BuilderFlag members to clear (TF32 for fp32)
    tf32: bool  # whether FP32 layers may run in TF32
    workspace_pool: Any


def build_options(trt_mod: Any, precision: str, hardware_compat: str) -> BuildOptions:
    """The builder's version and feature dispatch for ``trt_mod`` (the ``tensorrt`` module, or a
    namespace with the same names); EngineError for a TensorRT or a feature this cannot build."""
    version = str(trt_mod.__version__)
    v = version_tuple(version)
    why = unsupported_release(version)
    if why:
        raise EngineError(f"{why} ({INSTALL_HINT})")
    if precision not in ("fp32", "fp16", "int8"):
        raise EngineError(f"unknown precision {precision!r} for a TensorRT plan (fp32, fp16 or int8)")
    if v >= (11, 0):
        # every network is strongly typed; the flag is deprecated and ignored (NvInfer.h), so not set
        network_flags = 0
    else:
        typed = getattr(trt_mod.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        if typed is None:
            raise EngineError(f"TensorRT {version} has no NetworkDefinitionCreationFlag.STRONGLY_TYPED")
        network_flags = 1 << int(typed)
    if hardware_compat not in _HARDWARE_LEVELS:
        raise EngineError(f"unknown hardware compatibility {hardware_compat!r} (choose {', '.join(HARDWARE_COMPAT)})")
    member, since = _HARDWARE_LEVELS[hardware_compat]
    level = getattr(trt_mod.HardwareCompatibilityLevel, member, None)
    if level is None:
        raise EngineError(
            f"--hardware-compat {hardware_compat} needs TensorRT {since} or newer "
            f"(HardwareCompatibilityLevel.{member}); this is TensorRT {version}"
        )
    tf32_flag = getattr(trt_mod.BuilderFlag, "TF32", None)
    clear: tuple[Any, ...] = ()
    tf32 = tf32_flag is not None
    if precision == "fp32":
        if tf32_flag is None:
            raise EngineError(f"TensorRT {version} has no BuilderFlag.TF32 to turn TF32 off for an fp32 plan")
        clear, tf32 = (tf32_flag,), False
    return BuildOptions(
        version=version,
        network_flags=network_flags,
        hardware_compatibility_level=level,
        clear_flags=clear,
        tf32=tf32,
        workspace_pool=trt_mod.MemoryPoolType.WORKSPACE,
    )


def build_engine(
    onnx_path: str | os.PathLike[str],
    plan_path: str | os.PathLike[str],
    *,
    precision: str,
    input_name: str,
    image_size: int,
    batch: tuple[int, int, int],
    workspace_mib: int = 4096,
    opt_level: int = 3,
    hardware_compat: str = "none",
    timing_cache: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Build ``plan_path`` (written atomically) from ``onnx_path``; returns facts for the manifest.

    TensorRT's own exceptions (RuntimeError/TypeError from the bindings) become EngineError."""
    why = missing()
    if why:
        raise EngineError(why)
    if not 1 <= batch[0] <= batch[1] <= batch[2]:
        raise EngineError(f"batch profile min/opt/max {batch} must satisfy 1 <= min <= opt <= max")
    if not 0 <= opt_level <= 5:
        raise EngineError(f"--opt-level {opt_level} is outside 0-5")
    opts = build_options(trt, precision, hardware_compat)
    g = gpu()
    assert g is not None
    major, minor = (int(v) for v in str(g["compute_capability"]).split("."))
    cc = (major, minor)
    why = unsupported_gpu(opts.version, cc, str(g["name"]))
    if why:
        raise EngineError(why)
    if hardware_compat == "ampere+" and cc < (8, 0):
        raise EngineError(
            f"--hardware-compat ampere+ needs an Ampere or newer GPU to build on; this is {g['name']} ({g['sm']})"
        )
    if hardware_compat == "same-cc" and cc < (7, 5):
        raise EngineError(
            f"--hardware-compat same-cc needs a Turing or newer GPU to build on; this is {g['name']} ({g['sm']})"
        )
    try:
        return _build(
            onnx_path,
            plan_path,
            opts,
            g,
            input_name=input_name,
            image_size=image_size,
            batch=batch,
            workspace_mib=workspace_mib,
            opt_level=opt_level,
            hardware_compat=hardware_compat,
            timing_cache=timing_cache,
        )
    except (RuntimeError, TypeError) as e:
        raise EngineError(f"{onnx_path}: TensorRT {opts.version} failed to build: {first_line(e)}") from e


def _build(
    onnx_path: str | os.PathLike[str],
    plan_path: str | os.PathLike[str],
    opts: BuildOptions,
    g: dict[str, Any],
    *,
    input_name: str,
    image_size: int,
    batch: tuple[int, int, int],
    workspace_mib: int,
    opt_level: int,
    hardware_compat: str,
    timing_cache: str | os.PathLike[str] | None,
) -> dict[str, Any]:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(opts.network_flags)
    parser = trt.OnnxParser(network, logger)
    data = Path(onnx_path).read_bytes()
    if not parser.parse(data, os.fspath(onnx_path)):
        errors = [str(parser.get_error(i).desc()) for i in range(parser.num_errors)]
        raise EngineError(f"{onnx_path}: TensorRT's ONNX parser failed: " + "; ".join(errors or ["(no details)"]))

    config = builder.create_builder_config()
    config.set_memory_pool_limit(opts.workspace_pool, int(workspace_mib) << 20)
    config.builder_optimization_level = int(opt_level)
    config.hardware_compatibility_level = opts.hardware_compatibility_level
    for flag in opts.clear_flags:
        config.clear_flag(flag)

    profile = builder.create_optimization_profile()
    shape = (3, image_size, image_size)
    profile.set_shape(
        input_name, trt.Dims([batch[0], *shape]), trt.Dims([batch[1], *shape]), trt.Dims([batch[2], *shape])
    )
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
    return {
        "tensorrt_version": opts.version,
        "gpu": g,
        "strongly_typed": True,
        "tf32": opts.tf32,
        "profile": {
            "input": input_name,
            "min": [batch[0], *shape],
            "opt": [batch[1], *shape],
            "max": [batch[2], *shape],
        },
        "hardware_compat": hardware_compat,
        "builder_optimization_level": opt_level,
        "workspace_mib": workspace_mib,
        "timing_cache": str(cache_path) if cache_path else None,
        "timing_cache_loaded": cache_loaded,
    }
