"""Q/DQ INT8 quantization of an FP32 ONNX model with ONNX Runtime's ``quantize_static``.

* Calibration set: ``size`` images (default 512) drawn deterministically and class-balanced
  from the *training* split (never the validation images the gate scores), through
  :func:`rn50.batches.iter_split`, i.e. exactly the validation preprocessing the engine will
  see at serving time. 512 follows TensorRT's guidance of about 500 images for ImageNet-size
  classifiers; on 10 classes that is 51 or 52 per class, and the calibrators' histograms are
  stable well before that.
* Weights: int8, symmetric, per output channel (axis 0). Activations: per tensor.
* Flavours: ``s8s8``: the Q/DQ placement TensorRT's explicit quantization wants, used for
  ``.plan`` (:data:`TENSORRT_OPTIONS`: int8 only with zero points 0, float biases, no Q/DQ on any
  output, the logits included, and residual Adds quantized on their shortcut input only, as
  TensorRT fuses them; NVIDIA ModelOpt's ONNX INT8 quantizer makes the same choices). ``u8s8``
  (uint8 activations, ONNX Runtime's default placement): what ONNX Runtime's x86 CPU kernels are
  fast with (1.8-2.6x FP32 against 0.4-0.9x for s8s8 in bench/inference.py, docs/benchmarks.md),
  used for an int8 ``.onnx``.
* Methods: ``percentile`` (default: the 99.999th percentile of |activation| from a 2048-bin
  histogram), ``entropy`` (KL-divergence thresholds over 2048 bins, TensorRT's classic
  calibrator), ``minmax``. The default is measured: on the CPU profile's model (Fashion-MNIST,
  32 px) percentile kept 99.45 % (u8s8) / 99.15 % (s8s8) top-1 agreement with FP32 and lost at
  most 0.2 point, against 96.45 / 96.55 % and 0.75 / 0.45 point for entropy and 99.0 / 98.65 %
  and 0.65 / 0.15 point for minmax (docs/tensorrt.md).
* Cache: the result is keyed by the FP32 model's sha256, the calibration images' names and
  sha256, the preprocessing, method, size, flavour and the quantizer options
  (:func:`quantizer_options`), and stored under ``<output folder>/.calib-cache/``; an unchanged
  request reuses it without recalibrating.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rn50.atomic import atomic_path
from rn50.batches import iter_split
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


# quantize_static's options for each flavour (besides per_channel=True, QDQ format, int8 weights).
# s8s8 is for TensorRT's explicit quantization (docs/tensorrt.md, "INT8 for TensorRT"):
# * ActivationSymmetric/WeightSymmetric: TensorRT quantizes symmetrically, zero points 0 (TensorRT
#   developer guide, "Working with Quantized Types"; onnx-tensorrt docs/operators.md).
# * QuantizeBias False: TensorRT's dequantize takes INT8/FP8/INT4/FP4 only, an INT32 bias DQ does
#   not parse (onnx-tensorrt#850); TensorRT quantizes the bias itself inside the fused Conv/Gemm.
# * OpTypesToExcludeOutputQuantization every op: Q/DQ only in front of the layers that consume
#   int8, none on outputs (so none on the logits); TensorRT fuses a following Q into the producer.
# * op types Conv, Gemm (inputs: activation + per-channel weights) and Add (the residual input;
#   :func:`_keep_residual_adds_fusible` takes the Q/DQ off the main-branch input). MaxPool, Relu,
#   GlobalAveragePool and Flatten get none: TensorRT moves Q/DQ across them.
# * DedicatedQDQPair False: one Q/DQ pair per tensor, shared by its consumers.
# The placement rules of NVIDIA ModelOpt's ONNX INT8 path (modelopt/onnx/quantization/ort_utils.py
# configure_ort, graph_utils.py build_non_residual_input_map / remove_partial_input_qdq). Unlike
# ModelOpt, the weights are stored as int8 with a DequantizeLinear (ModelOpt keeps float weights
# with a Q/DQ pair; TensorRT folds either), and what stays unquantized stays fp32 (ModelOpt
# converts it to fp16 by default).
TENSORRT_OPTIONS: dict[str, Any] = {
    "op_types_to_quantize": ["Add", "Conv", "Gemm"],
    "extra_options": {
        "ActivationSymmetric": True,
        "WeightSymmetric": True,
        "QuantizeBias": False,
        "OpTypesToExcludeOutputQuantization": ["Add", "Conv", "Gemm"],
        "DedicatedQDQPair": False,
    },
    "residual_add": "shortcut input only",
}
# The rewrites made after quantize_static (_keep_residual_adds_fusible): part of the calibration
# cache key, so a change to them recalibrates instead of serving a model cached by the old rules.
# Raise it whenever what those rewrites produce changes.
POSTPROCESS_VERSION = 2  # 2: the main branch of a residual Add found through activation paths only
# u8s8 is for ONNX Runtime's CPU kernels: its own default placement (every op it can quantize,
# outputs included, INT32 biases), uint8 activations with free zero points.
ONNXRUNTIME_OPTIONS: dict[str, Any] = {
    "op_types_to_quantize": None,
    "extra_options": {"ActivationSymmetric": False, "WeightSymmetric": True},
    "residual_add": "onnxruntime default",
}


def quantizer_options(flavour: str) -> dict[str, Any]:
    """What ``quantize_static`` is told for ``flavour`` (also part of the calibration cache key)."""
    return TENSORRT_OPTIONS if flavour == "s8s8" else ONNXRUNTIME_OPTIONS


def _keep_residual_adds_fusible(model: Any) -> int:
    """Take the Q/DQ pair off the main-branch input of each residual Add; returns how many.

    TensorRT fuses a residual Add into the convolution that ends the main branch, and reads the
    shortcut (the block's input, or its downsample convolution) in int8: Q/DQ belongs on the
    shortcut input only. The main-branch input is the one on the longer path back to the two
    inputs' lowest common ancestor (ModelOpt's rule, build_non_residual_input_map).

    The paths are walked through activations only (tensors computed from the graph input): the
    common ancestor sought is where the data flow splits. A weight initializer, and the
    DequantizeLinear that reads it, can feed convolutions in several blocks (exporters and
    optimizers merge identical initializers, such as the all-zero conv3 weights of an untrained
    ``zero_init_residual`` model after BatchNorm folding); walked through, it would be a common
    ancestor of unrelated paths, nearer than the block's input, and pick the wrong input."""
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    inits = {i.name for i in g.initializer}
    activations = {i.name for i in g.input} - inits
    for n in g.node:  # ONNX requires nodes in topological order (onnx.checker enforces it)
        if any(i in activations for i in n.input):
            activations.update(n.output)

    def source(t: str) -> str:  # the float tensor behind a DQ(Q(x)) chain
        dq = producer.get(t)
        if dq is not None and dq.op_type == "DequantizeLinear":
            q = producer.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                return str(q.input[0])
        return t

    def depths(t: str) -> dict[str, int]:  # every ancestor activation and its distance in nodes
        out, frontier, d = {t: 0}, [t], 0
        while frontier:
            d += 1
            nxt = []
            for x in frontier:
                n = producer.get(x)
                for i in n.input if n is not None else ():
                    if i in activations and i not in out:
                        out[i] = d
                        nxt.append(i)
            frontier = nxt
        return out

    removed = 0
    for node in g.node:
        if node.op_type != "Add" or len(node.input) != 2:
            continue
        srcs = [source(t) for t in node.input]
        if any(s in inits for s in srcs) or srcs == list(node.input):
            continue
        d0, d1 = depths(srcs[0]), depths(srcs[1])
        common = set(d0) & set(d1)
        if not common:
            continue
        lca = min(common, key=lambda t: d0[t] + d1[t])
        main = 0 if d0[lca] > d1[lca] else 1
        p = producer.get(srcs[main])
        if node.input[main] != srcs[main] and p is not None and p.op_type in ("Conv", "Gemm"):
            node.input[main] = srcs[main]
            removed += 1
    # drop Q/DQ nodes nobody reads any more
    while True:
        used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        dead = [
            n
            for n in g.node
            if n.op_type in ("QuantizeLinear", "DequantizeLinear") and not any(o in used for o in n.output)
        ]
        if not dead:
            return removed
        for n in dead:
            g.node.remove(n)


def _compute_ranges(model: Path, out: Path, reader: Any, method: str, flavour: str) -> Any:
    """Collect activation ranges with ORT's calibrator for ``method``; saves them to ``out`` (the
    calibration cache ``quantize_static`` reads) and returns the ``CalibrationMethod``."""
    import tempfile

    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    calib = {
        "entropy": CalibrationMethod.Entropy,
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
    }[method]
    options = {"symmetric": flavour == "s8s8", **CALIBRATOR_OPTIONS[method]}
    with tempfile.TemporaryDirectory(prefix="rn50-calib-") as tmp:
        calibrator = create_calibrator(
            model,
            sorted(set(QLinearOpsRegistry) | set(QDQRegistry)),
            augmented_model_path=os.path.join(tmp, "augmented.onnx"),
            calibrate_method=calib,
            extra_options=options,
        )
        # one batch per collect_data call: ORT then keeps a running min/max or histogram instead
        # of every intermediate output of every batch (about 45 MB per 224 px image for
        # ResNet50, so 23 GB for 512 images), and a short last batch works (its histogram
        # collector cannot stack batches of unequal size)
        while (batch := reader.get_next()) is not None:
            with contextlib.redirect_stdout(io.StringIO()):  # a "Collecting ..." line per call
                calibrator.collect_data(_Once(batch))
        save_tensors_data(calibrator.compute_data(), out)
    return calib


def cache_key(
    fp32: str | os.PathLike[str],
    files: Sequence[str],
    method: str,
    size: int,
    flavour: str,
    p: Preprocessing | None = None,
) -> str:
    """What a calibration depends on: the model's bytes, each image's bytes (a data set converted
    again in place under the same names is new data), the preprocessing, method, size, flavour
    and the quantizer's options for that flavour, and the version of the rewrites after it."""
    h = hashlib.sha256()
    h.update(sha256_file(fp32).encode())
    for f in files:
        h.update(os.fspath(f).encode() + b"\0" + sha256_file(f).encode())
    h.update(
        json.dumps(
            [
                method,
                size,
                flavour,
                CALIBRATOR_OPTIONS[method],
                quantizer_options(flavour),
                POSTPROCESS_VERSION,
                p.to_dict() if p is not None else None,
            ],
            sort_keys=True,
        ).encode()
    )
    return h.hexdigest()[:32]


def calibrate(
    fp32: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    files: Sequence[str],
    p: Preprocessing,
    method: str = DEFAULT_METHOD,
    flavour: str = "s8s8",
    cache_dir: str | os.PathLike[str] | None = None,
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
    info = {
        "method": method,
        "flavour": flavour,
        "calibration_images": len(files),
        "cache_key": key,
        "format": "QDQ",
        "weights": "int8 symmetric per-channel",
        "activations": ("int8 symmetric" if flavour == "s8s8" else "uint8") + " per-tensor",
        "quantizer_options": quantizer_options(flavour),
    }
    import onnx

    if cached.is_file():
        # written whole (atomic_path), so a damaged entry was damaged afterwards, from outside: it
        # is dropped and calibrated again rather than failing every later export the same way
        try:
            onnx.load(os.fspath(cached), load_external_data=False)
        except Exception as e:
            print(
                f"calibration: cached model {cached} is unreadable ({type(e).__name__}): calibrating again",
                file=sys.stderr,
            )
            cached.unlink()
        else:
            shutil.copyfile(cached, dest)
            return {**info, "cache_hit": True}

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


def _quantize(
    fp32: str | os.PathLike[str],
    cache: Path,
    key: str,
    cached: Path,
    files: Sequence[str],
    p: Preprocessing,
    input_name: str,
    method: str,
    flavour: str,
) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with (
        atomic_path(cache / f"{key}.pre.onnx") as pre,
        atomic_path(cache / f"{key}.ranges.json") as ranges,
        atomic_path(cached) as out,
    ):
        quant_pre_process(os.fspath(fp32), os.fspath(pre), skip_symbolic_shape=True)
        with contextlib.redirect_stdout(sys.stderr):  # ORT prints its calibration notes to stdout
            calib = _compute_ranges(pre, ranges, _Reader(list(files), p, input_name), method, flavour)
            opts = quantizer_options(flavour)
            quantize_static(
                os.fspath(pre),
                os.fspath(out),
                None,
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                weight_type=QuantType.QInt8,
                activation_type=QuantType.QInt8 if flavour == "s8s8" else QuantType.QUInt8,
                calibrate_method=calib,
                calibration_cache_path=os.fspath(ranges),
                op_types_to_quantize=opts["op_types_to_quantize"],
                extra_options=dict(opts["extra_options"]),
            )
        if flavour == "s8s8":
            import onnx

            qm = onnx.load(os.fspath(out))
            _keep_residual_adds_fusible(qm)
            onnx.save(qm, os.fspath(out))
            onnx.checker.check_model(os.fspath(out))
