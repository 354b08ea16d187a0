"""Real, preprocessed validation images as inputs for ``polygraphy run``.

polygraphy compares runtimes on one model (``--trt --onnxrt``), but by default it feeds random
tensors, which says little about a classifier. This file is a polygraphy data-loader script
that feeds class-balanced validation images through the shared preprocessing contract instead,
read from the manifest beside the model, so the comparison sees what serving sees::

    RN50_MODEL=artifacts/rn50.fp16.onnx polygraphy run artifacts/rn50.fp16.onnx \\
        --trt --strongly-typed --onnxrt --atol 0.05 --rtol 0.05 \\
        --trt-min-shapes input:[1,3,224,224] --trt-opt-shapes input:[32,3,224,224] \\
        --trt-max-shapes input:[256,3,224,224] \\
        --data-loader-script export/polygraphy_inputs.py

Environment: ``RN50_MODEL`` (required: the .onnx or .plan whose ``.manifest.json`` names the
preprocessing and the data), ``RN50_DATA`` (data root; default: the manifest's), ``RN50_BATCHES``
(default 4) and ``RN50_BATCH_SIZE`` (default 32).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # polygraphy runs this file by path


def load_data() -> Iterator[dict[str, Any]]:
    from rn50.batches import iter_split
    from rn50.errors import PipelineError
    from rn50.layout import balanced_subset, scan_split
    from rn50.manifest import preprocessing_of, read_manifest

    model = os.environ.get("RN50_MODEL")
    if not model:
        raise PipelineError("set RN50_MODEL to the model polygraphy runs (its manifest names the data)")
    man = read_manifest(model)
    data = os.environ.get("RN50_DATA") or man.get("data")
    if not data:
        raise PipelineError(f"{model}: its manifest names no data folder; set RN50_DATA")
    batches = int(os.environ.get("RN50_BATCHES", "4"))
    batch_size = int(os.environ.get("RN50_BATCH_SIZE", "32"))
    val = scan_split(Path(data) / "val", classes=list(man["classes"]))
    files, labels = balanced_subset(val.files, val.labels, batches * batch_size)
    name = man.get("input_name", "input")
    for x, _ in iter_split(files, labels, preprocessing_of(man), batch_size=batch_size):
        yield {name: x}
