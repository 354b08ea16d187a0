"""Stage three: DALI-fed inference and validation against PyTorch.

* ``python -m serve.infer``    - classify image files/folders with an engine, one JSON line per image
* ``python -m serve.validate`` - engine vs the PyTorch checkpoint on a labelled split, pass/fail
* :mod:`serve.pipeline`        - the batch loop: reading, header sniffing, DALI one batch ahead,
  per-image error isolation
* :mod:`rn50.backends`        - ``.plan`` (TensorRT), ``.onnx`` (ONNX Runtime), ``.pt2`` (AOTInductor)

See docs/serving.md.
"""
