"""PyTorch backend (``.pt``): the training checkpoint itself, eager, FP32; no export needed.

It is the reference engine: what ``serve.validate`` compares every other engine with, served
through the same DALI loop. Use it to check a checkpoint on new images before exporting, or as the
engine of last resort where no compiled one runs (no TensorRT, ONNX Runtime without its CUDA
provider, or a torch whose AOTInductor CUDA loader crashes: docs/benchmarks.md).
It is not the fast path: on a GPU it runs FP32 in channels_last, with cuDNN's TF32 convolutions
on Ampere and newer where PyTorch allows them (its default; ``serve.validate`` turns them off, and
``provider`` says which). The weights are loaded with ``weights_only=True``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from rn50.errors import CheckpointError, EngineError

from . import manifest_max_batch


class TorchBackend:
    name = "pytorch"
    input_dtype = "float32"
    # ResNet50 ends in adaptive pooling: it takes any image size, so the manifest's is the one
    input_shape: tuple[int | None, ...] | None = None

    def __init__(self, path: Path, manifest: dict[str, Any], prefer_gpu: bool = True):
        import torch

        from rn50.checkpoint import load_model

        self.device = "cuda" if prefer_gpu and torch.cuda.is_available() else "cpu"
        try:
            # on the CPU first: a last.pt also holds the optimizer state, which the GPU need not see
            model, ckpt_manifest = load_model(path, "cpu")
        except CheckpointError as e:
            raise EngineError(str(e)) from e
        self.model = model.to(self.device).to(memory_format=torch.channels_last)
        self.manifest: dict[str, Any] = ckpt_manifest  # the one embedded in the checkpoint
        # load_model has checked that the classifier's width is the embedded manifest's class count
        self.num_classes: int | None = len(ckpt_manifest["classes"])
        self.max_batch, self.max_batch_declared = manifest_max_batch(manifest)
        if self.device == "cuda":
            tf32 = torch.backends.cudnn.allow_tf32 and torch.cuda.get_device_capability()[0] >= 8
            self.provider = "cuda:0 (eager fp32" + (", TF32 convolutions)" if tf32 else ")")
        else:
            self.provider = f"cpu (eager fp32, {torch.get_num_threads()} threads)"

    def run(self, batch: Any) -> np.ndarray:
        import torch

        t = torch.from_numpy(np.ascontiguousarray(batch)) if isinstance(batch, np.ndarray) else batch
        t = t.to(device=self.device, dtype=torch.float32).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            y: np.ndarray = self.model(t).float().cpu().numpy()
        return y
