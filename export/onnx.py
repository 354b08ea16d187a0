"""PyTorch -> ONNX (FP32 and FP16), checked with onnx.checker.

We use the TorchScript-based exporter (``dynamo=False``): torch's default dynamo exporter has
open ResNet50 reports (wrong Conv bias shape, batch fixed at 1, 0% accuracy; pytorch#166797,
#157621, #169178). It is deprecated but works, and the parity check in :mod:`export.parity`
decides either way. We export the original eager module, never a ``torch.compile``d one, and
the input is always NCHW (ONNX does not record memory formats).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn

OPSET = 17
INPUT, OUTPUT = "input", "logits"


def export_fp32(model: nn.Module, image_size: int, dest: str | os.PathLike[str]) -> None:
    import onnx

    model = model.eval().to(memory_format=torch.contiguous_format)
    x = torch.randn(2, 3, image_size, image_size)
    with warnings.catch_warnings():
        # dynamo=False is deprecated in torch 2.9+ (DeprecationWarning) but is the exporter that
        # gets ResNets right today (see the module docstring); silence that and tracer notes.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (x,),
            os.fspath(dest),
            dynamo=False,
            opset_version=OPSET,
            input_names=[INPUT],
            output_names=[OUTPUT],
            dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
        )
    onnx.checker.check_model(os.fspath(dest), full_check=True)


def convert_fp16(src: str | os.PathLike[str], dest: str | os.PathLike[str]) -> None:
    """FP16 weights and activations inside, FP32 input/output (keep_io_types): the precision
    TensorRT's strongly typed networks read from the model."""
    import onnx
    from onnxconverter_common import float16

    m = onnx.load(os.fspath(src))
    with warnings.catch_warnings():
        # one "float32 number ... will be truncated" per tiny weight: values below fp16's range are
        # clamped to +-1e-7 by design (weights that small do not change the logits)
        warnings.simplefilter("ignore", UserWarning)
        m16 = float16.convert_float_to_float16(m, keep_io_types=True)
    onnx.save(m16, os.fspath(dest))
    onnx.checker.check_model(os.fspath(dest))


def io_names(path: str | os.PathLike[str]) -> tuple[str, str]:
    import onnx

    m = onnx.load(os.fspath(Path(path)), load_external_data=False)
    return m.graph.input[0].name, m.graph.output[0].name


METADATA_PREFIX = "rn50."  # metadata_props keys: rn50.classes, rn50.preprocessing, rn50.precision


def stamp_metadata(
    path: str | os.PathLike[str], classes: list[str], preprocessing: dict[str, object], precision: str
) -> None:
    """Write into the model's ``metadata_props`` what reading its output needs: the class names
    (JSON list, output order), the preprocessing contract (JSON) and the precision. The manifest
    beside the file says all this and more; these travel with the file itself where it goes
    alone (a model registry, a Triton repository, ONNX Runtime's ``custom_metadata_map``)."""
    import json

    import onnx

    m = onnx.load(os.fspath(path))
    props = {
        "classes": json.dumps(list(classes)),
        "preprocessing": json.dumps(preprocessing, sort_keys=True),
        "precision": precision,
    }
    kept = [p for p in m.metadata_props if not p.key.startswith(METADATA_PREFIX)]
    del m.metadata_props[:]
    m.metadata_props.extend(kept)
    for k, v in props.items():
        m.metadata_props.add(key=METADATA_PREFIX + k, value=v)
    onnx.save(m, os.fspath(path))
