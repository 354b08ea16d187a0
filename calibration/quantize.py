"""Q/DQ INT8 quantization of an FP32 ONNX model with ONNX Runtime's ``quantize_static``.

* Calibration set: ``size`` images (default 512) drawn deterministically and class-balanced
  from the *training* split (never the validation images the gate scores), through
  :func:`rn50.batches.iter_split`, i.e. exactly the validation preprocessing the engine will
  see at serving time. 512 follows TensorRT's guidance of about 500 images for ImageNet-size
  classifiers; on 10 classes that is 51 or 52 per class, and the calibrators' histograms are
  stable well before that.
* Weights: int8, symmetric, per output channel (axis 0). Activations: per tensor.
* Flavours: ``s8s8`` (int8 activations, symmetric, zero point 0): what TensorRT's explicit
  quantization wants, used for ``.plan``; ``u8s8`` (uint8 activations): what ONNX Runtime's
  x86 CPU kernels are fast with (1.8-2.6x FP32 against 0.4-0.9x for s8s8 in bench/inference.py,
  docs/benchmarks.md), used for an int8 ``.onnx``.
* Methods: ``percentile`` (default: the 99.999th percentile of |activation| from a 2048-bin
  histogram), ``entropy`` (KL-divergence thresholds over 2048 bins, TensorRT's classic
  calibrator), ``minmax``. The default is measured: on the CPU profile's model (Fashion-MNIST,
  32 px) percentile kept 99.45 % (u8s8) / 99.15 % (s8s8) top-1 agreement with FP32 and lost at
  most 0.2 point, against 96.45 / 96.55 % and 0.75 / 0.45 point for entropy and 99.0 / 98.65 %
  and 0.65 / 0.15 point for minmax (docs/tensorrt.md).
* Cache: the result is keyed by the FP32 model's sha256, the calibration images' names and
  sha256, the preprocessing, method, size and flavour, and stored under ``<output folder>/.calib-cache/``; an unchanged request
  reuses it without recalibrating.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from rn50.atomic import atomic_path
from rn50.batches import iter_split

from .dataset import DEFAULT_SIZE, calibration_set  # noqa: F401
from rn50.manifest import sha256_file
from rn50.preprocess import Preprocessing

METHODS = ("entropy", "minmax", "percentile")
FLAVOURS = ("s8s8", "u8s8")
DEFAULT_METHOD = "percentile"


class _Reader:
    """onnxruntime CalibrationDataReader over the calibration files."""

    def __init__(self, files: list[str], p: Preprocessing, input_name: str, batch_size: int = 32):
        from tqdm import tqdm

        self._it = iter_split(files, [0] * len(files), p, batch_size)
        self._bar = tqdm(total=len(files), desc="calibrating", unit="img", file=sys.stderr, mininterval=1.0)
        self.input_name = input_name

    def get_next(self) -> dict[str, np.ndarray] | None:
        try:
            x, _ = next(self._it)
        except StopIteration:
            self._bar.close()
            return None
        except BaseException:
            self._bar.close()  # ends the bar's line, so the caller's error message starts its own
            raise
        self._bar.update(len(x))
        return {self.input_name: x}

    def rewind(self) -> None:  # pragma: no cover - not used by quantize_static
        raise NotImplementedError


class _Once:
    """A CalibrationDataReader that yields one batch."""

    def __init__(self, batch: dict[str, np.ndarray]):
        self._batch: dict[str, np.ndarray] | None = batch

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch, self._batch = self._batch, None
        return batch


# Calibrator settings, passed to ORT's calibrators directly. quantize_static cannot pass the
# histogram sizes, and its Entropy default (128 bins searched for a 128-bin window) has exactly one
# candidate threshold, the full range: it returns the min-max ranges bit for bit (checked on
# onnxruntime 1.31.1). 2048 bins searched for the best 128-bin window is TensorRT's entropy
# calibration.
CALIBRATOR_OPTIONS: dict[str, dict[str, Any]] = {
    "entropy": {"num_bins": 2048, "num_quantized_bins": 128},
    "minmax": {"moving_average": False},
    # percentile keeps ORT's symmetric |activation| histogram; the others follow the flavour
    "percentile": {"num_bins": 2048, "percentile": 99.999, "symmetric": True},
}


def _compute_ranges(model: Path, out: Path, reader: Any, method: str, flavour: str) -> Any:
    """Collect activation ranges with ORT's calibrator for ``method``; saves them to ``out`` (the
    calibration cache ``quantize_static`` reads) and returns the ``CalibrationMethod``."""
    import tempfile

    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    calib = {"entropy": CalibrationMethod.Entropy, "minmax": CalibrationMethod.MinMax,
             "percentile": CalibrationMethod.Percentile}[method]
    options = {"symmetric": flavour == "s8s8", **CALIBRATOR_OPTIONS[method]}
    with tempfile.TemporaryDirectory(prefix="rn50-calib-") as tmp:
        calibrator = create_calibrator(
            model, sorted(set(QLinearOpsRegistry) | set(QDQRegistry)),
            augmented_model_path=os.path.join(tmp, "augmented.onnx"), calibrate_method=calib,
            extra_options=options)
        # one batch per collect_data call: ORT then keeps a running min/max or histogram instead
        # of every intermediate output of every batch (about 45 MB per 224 px image for
        # ResNet50, so 23 GB for 512 images), and a short last batch works (its histogram
        # collector cannot stack batches of unequal size)
        while (batch := reader.get_next()) is not None:
            with contextlib.redirect_stdout(io.StringIO()):  # a "Collecting ..." line per call
                calibrator.collect_data(_Once(batch))
        save_tensors_data(calibrator.compute_data(), out)
    return calib


def cache_key(fp32: str | os.PathLike[str], files: Sequence[str], method: str, size: int, flavour: str,
              p: Preprocessing | None = None) -> str:
    """What a calibration depends on: the model's bytes, each image's bytes (a data set converted
    again in place under the same names is new data), the preprocessing, method, size, flavour."""
    h = hashlib.sha256()
    h.update(sha256_file(fp32).encode())
    for f in files:
        h.update(os.fspath(f).encode() + b"\0" + sha256_file(f).encode())
    h.update(json.dumps([method, size, flavour, CALIBRATOR_OPTIONS[method],
                         p.to_dict() if p is not None else None]).encode())
    return h.hexdigest()[:32]


def calibrate(fp32: str | os.PathLike[str], dest: str | os.PathLike[str], files: Sequence[str], p: Preprocessing,
              method: str = DEFAULT_METHOD, flavour: str = "s8s8", cache_dir: str | os.PathLike[str] | None = None
              ) -> dict[str, Any]:
    """Write the Q/DQ model to ``dest``; returns what was done (for the manifest)."""
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r} (choose from {', '.join(METHODS)})")
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown int8 flavour {flavour!r} (choose from {', '.join(FLAVOURS)})")
    dest = Path(dest)
    key = cache_key(fp32, files, method, len(files), flavour, p)
    cache = Path(cache_dir) if cache_dir else dest.parent / ".calib-cache"
    cached = cache / f"{key}.onnx"
    info = {"method": method, "flavour": flavour, "calibration_images": len(files), "cache_key": key,
            "format": "QDQ", "weights": "int8 symmetric per-channel",
            "activations": ("int8 symmetric" if flavour == "s8s8" else "uint8") + " per-tensor"}
    if cached.is_file():
        shutil.copyfile(cached, dest)
        return {**info, "cache_hit": True}
    import onnx

    input_name = onnx.load(os.fspath(fp32), load_external_data=False).graph.input[0].name
    created = not cache.exists()
    cache.mkdir(parents=True, exist_ok=True)
    try:
        _quantize(fp32, cache, key, cached, files, p, input_name, method, flavour)
    except BaseException:
        if created and not any(cache.iterdir()):  # a failed first calibration leaves no empty cache folder
            cache.rmdir()
        raise
    (cache / f"{key}.pre.onnx").unlink(missing_ok=True)
    (cache / f"{key}.ranges.json").unlink(missing_ok=True)
    shutil.copyfile(cached, dest)
    return {**info, "cache_hit": False}


def _quantize(fp32: str | os.PathLike[str], cache: Path, key: str, cached: Path, files: Sequence[str],
              p: Preprocessing, input_name: str, method: str, flavour: str) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with atomic_path(cache / f"{key}.pre.onnx") as pre, atomic_path(cache / f"{key}.ranges.json") as ranges, \
            atomic_path(cached) as out:
        quant_pre_process(os.fspath(fp32), os.fspath(pre), skip_symbolic_shape=True)
        with contextlib.redirect_stdout(sys.stderr):  # ORT prints its calibration notes to stdout
            calib = _compute_ranges(pre, ranges, _Reader(list(files), p, input_name), method, flavour)
            quantize_static(
                os.fspath(pre), os.fspath(out), None,
                quant_format=QuantFormat.QDQ, per_channel=True, weight_type=QuantType.QInt8,
                activation_type=QuantType.QInt8 if flavour == "s8s8" else QuantType.QUInt8,
                calibrate_method=calib, calibration_cache_path=os.fspath(ranges),
                extra_options={"ActivationSymmetric": flavour == "s8s8", "WeightSymmetric": True})
