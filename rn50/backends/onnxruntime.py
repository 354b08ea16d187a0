"""ONNX Runtime backend (``.onnx``): CUDA provider when a GPU is present, else CPU.

On the CUDA provider a torch CUDA batch (DALI's GPU output) is bound with IOBinding by its
data pointer, so the input never visits the host; only the logits come back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from rn50 import ort as _ort
from rn50.errors import EngineError, first_line

from . import manifest_max_batch

_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16"}


class OrtBackend:
    name = "onnxruntime"

    def __init__(self, path: Path, manifest: dict[str, Any], prefer_gpu: bool = True):
        try:
            self.sess = _ort.session(path, prefer_gpu=prefer_gpu)
        except Exception as e:  # ORT raises its own Fail/InvalidGraph/... types
            raise EngineError(f"{path}: ONNX Runtime cannot load it: {first_line(e)}") from e
        self.provider = _ort.provider_of(self.sess)
        self.device = "cuda" if self.provider == "CUDAExecutionProvider" else "cpu"
        inputs, outputs = self.sess.get_inputs(), self.sess.get_outputs()
        if len(inputs) != 1 or len(outputs) < 1:
            raise EngineError(
                f"{path}: expected one image input and a logits output, found "
                f"{len(inputs)} inputs and {len(outputs)} outputs"
            )
        self.input, self.output = inputs[0], outputs[0]
        if self.input.type not in _DTYPES:
            raise EngineError(f"{path}: input '{self.input.name}' is {self.input.type}, expected float or float16")
        self.input_dtype = _DTYPES[self.input.type]
        ishape = self.input.shape  # None when the model records no shape
        if ishape is not None and len(ishape) != 4:
            raise EngineError(
                f"{path}: input '{self.input.name}' has shape {ishape}, expected "
                f"4 dimensions (batch, channels, height, width)"
            )
        # (C, H, W): fixed in this project's exports (only the batch is dynamic); a symbolic
        # dimension (a name or None) is None here. load_engine compares it with the manifest.
        self.input_shape: tuple[int | None, ...] | None = (
            None if ishape is None else tuple(d if isinstance(d, int) and d > 0 else None for d in ishape[1:])
        )
        b = self.input.shape[0] if self.input.shape else None
        if isinstance(b, int) and b > 0:
            self.max_batch, self.max_batch_declared = b, True
        else:
            self.max_batch, self.max_batch_declared = manifest_max_batch(manifest)
        shape = self.output.shape
        self.num_classes = shape[1] if len(shape) == 2 and isinstance(shape[1], int) else None
        self._np_dtype = np.float16 if self.input_dtype == "float16" else np.float32

    def run(self, batch: Any) -> np.ndarray:
        if not isinstance(batch, np.ndarray):  # a torch tensor
            if self.device == "cuda" and batch.is_cuda:
                return self._run_cuda(batch)
            batch = batch.detach().cpu().numpy()
        x = np.ascontiguousarray(batch, dtype=self._np_dtype)
        (y,) = self.sess.run([self.output.name], {self.input.name: x})
        return np.asarray(y, dtype=np.float32)

    def _run_cuda(self, t: Any) -> np.ndarray:
        import torch

        t = t.to(torch.float16 if self.input_dtype == "float16" else torch.float32).contiguous()
        io = self.sess.io_binding()
        io.bind_input(self.input.name, "cuda", t.device.index or 0, self._np_dtype, list(t.shape), t.data_ptr())
        io.bind_output(self.output.name, "cpu")
        torch.cuda.current_stream(t.device).synchronize()
        self.sess.run_with_iobinding(io)
        return np.asarray(io.copy_outputs_to_cpu()[0], dtype=np.float32)
