"""PyTorch backend (``.pt``): the training checkpoint itself; no export needed.

By default it is the reference engine, eager FP32: what ``serve.validate`` compares every other
engine with, served through the same DALI loop. Use it to check a checkpoint on new images before
exporting, or as the engine of last resort where no compiled one runs (no TensorRT, ONNX Runtime
without its CUDA provider, or a torch whose AOTInductor CUDA loader crashes: docs/benchmarks.md).
On a GPU it runs in channels_last, with cuDNN's TF32 convolutions on Ampere and newer where
PyTorch allows them (its default; ``serve.validate`` turns them off, and ``provider`` says which).
The weights are loaded with ``weights_only=True``.

Two options make it a serving engine rather than a reference (``serve`` flags ``--pt-precision``
and ``--pt-compile``):

* ``precision="fp16"`` (CUDA only): the model and its input in half precision, judged by
  ``serve.validate`` against the FP32 reference with the fp16 bounds of :data:`rn50.compare.BOUNDS`.
  On the CPU half-precision convolutions are refused: PyTorch runs them, but about 5x slower
  than FP32 (ResNet50 at 224 px, batch 8, a 2-core AVX-512 EPYC), so fp16 there is never what
  one wants.
* ``compile=True``: ``torch.compile`` (Inductor), compiled and warmed up at load time, so a
  compiler failure is an EngineError before any image is decoded and the first batch is not
  charged with the compile. The batch shape is fixed to ``batch_size`` (see :meth:`run`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from rn50.errors import CheckpointError, EngineError, first_line

from . import manifest_max_batch

PRECISIONS = ("fp32", "fp16")


class TorchBackend:
    name = "pytorch"
    # ResNet50 ends in adaptive pooling: it takes any image size, so the manifest's is the one
    input_shape: tuple[int | None, ...] | None = None

    def __init__(
        self,
        path: Path,
        manifest: dict[str, Any],
        prefer_gpu: bool = True,
        precision: str = "fp32",
        compile: bool = False,
        batch_size: int | None = None,
    ):
        """``batch_size``: the batch the compiled model is fixed to (needed with ``compile``;
        clipped to ``max_batch``); every call runs it, whatever its own size."""
        import torch

        from rn50.checkpoint import load_model

        if precision not in PRECISIONS:
            raise EngineError(f"{path}: precision {precision!r} is not one of {', '.join(PRECISIONS)}")
        if compile and (batch_size is None or batch_size < 1):
            raise ValueError("compile=True needs the batch size to compile for (batch_size >= 1)")
        self.device = "cuda" if prefer_gpu and torch.cuda.is_available() else "cpu"
        if precision == "fp16" and self.device != "cuda":
            raise EngineError(
                f"{path}: fp16 needs a CUDA GPU, and this engine would run on the CPU (no CUDA GPU here, or "
                "the CPU was asked for), where half-precision convolutions are several times slower than fp32: "
                "use fp32 there"
            )
        try:
            # on the CPU first: a last.pt also holds the optimizer state, which the GPU need not see
            model, ckpt_manifest = load_model(path, "cpu")
        except CheckpointError as e:
            raise EngineError(str(e)) from e
        self.precision = precision
        self.dtype = torch.float16 if precision == "fp16" else torch.float32
        # DALI writes float16 batches for a float16 engine: no cast on the device, half the copy
        # where the batch is decoded on the CPU
        self.input_dtype = "float16" if precision == "fp16" else "float32"
        self.model = model.to(self.device, self.dtype).to(memory_format=torch.channels_last)
        self.manifest: dict[str, Any] = ckpt_manifest  # the one embedded in the checkpoint
        # load_model has checked that the classifier's width is the embedded manifest's class count
        self.num_classes: int | None = len(ckpt_manifest["classes"])
        self.max_batch, self.max_batch_declared = manifest_max_batch(manifest)
        self.batch: int | None = None  # the compiled batch; None when eager (any batch)
        self.compiled: Any = None
        self._input: Any = None  # the compiled model's one input tensor (see _compile)
        if compile:
            assert batch_size is not None
            self.batch = min(batch_size, self.max_batch)
            self._compile(path, manifest or ckpt_manifest)
        parts = [f"{'torch.compile' if compile else 'eager'} {precision}"]
        if self.device == "cuda":
            if compile:
                parts.append("CUDA graphs")
            if precision == "fp32" and torch.backends.cudnn.allow_tf32 and torch.cuda.get_device_capability()[0] >= 8:
                parts.append("TF32 convolutions")
        parts.append("channels_last")
        if self.batch is not None:
            parts.append(f"batch {self.batch}")
        if self.device == "cuda":
            self.provider = f"cuda:0 ({', '.join(parts)})"
        else:
            self.provider = f"cpu ({', '.join(parts)}, {torch.get_num_threads()} threads)"

    def _compile(self, path: Path, manifest: dict[str, Any]) -> None:
        import torch

        from rn50.manifest import preprocessing_of

        # On CUDA "reduce-overhead": Inductor's kernels replayed as one CUDA graph per call. A
        # ResNet50 forward is ~160 kernel launches; the graph removes their CPU cost (at batch 1
        # eager is launch-bound, 3.4 ms against 0.6 ms compiled: docs/benchmarks.md) and costs
        # nothing at batch 256, where bench.gpu_inference measured 24,244 images/s with it.
        # "max-autotune-no-cudagraphs" would benchmark Triton templates for every convolution and
        # GEMM at load, minutes of start-up for a serving process, and keep the launch overhead.
        # The CPU has no CUDA graphs: Inductor's default mode there.
        # dynamic=False: one static shape, which run() guarantees by padding, so the graph is
        # compiled and recorded once (a new batch size would recompile and re-record mid-run).
        mode = "reduce-overhead" if self.device == "cuda" else "default"
        self.compiled = torch.compile(self.model, mode=mode, dynamic=False)
        size = preprocessing_of(manifest).image_size
        assert self.batch is not None
        # Every call feeds this one buffer: the compiled graph's guards check the input's shape,
        # strides, dtype and whether it is an inference tensor, and a caller's tensor (DALI's, a
        # numpy view, a padded copy) could differ in any of them and force a recompile.
        self._input = torch.zeros(self.batch, 3, size, size, dtype=self.dtype, device=self.device).contiguous(
            memory_format=torch.channels_last
        )
        try:
            # CUDA graph trees run the first call as a warm-up, record on the second, replay from the third
            for _ in range(3 if self.device == "cuda" else 1):
                self._run_compiled(self._input, self.batch)
        except Exception as e:  # Inductor and its C++/Triton toolchains raise many types; all mean "cannot run"
            raise EngineError(f"{path}: torch.compile could not compile the model: {first_line(e)}") from e

    def _run_compiled(self, t: Any, n: int) -> np.ndarray:
        """Logits of the first ``n`` rows of ``t`` (``n`` <= the compiled batch) through the compiled model."""
        import torch

        assert self.batch is not None and n <= self.batch
        with torch.inference_mode():
            if t is not self._input:
                self._input[:n].copy_(t[:n])  # to the device and dtype, in channels_last
                if n < self.batch:
                    # A short batch (the last one, or one that lost undecodable images) is padded up to
                    # the compiled batch rather than compiled at its own shape: a second shape is
                    # another compile (tens of seconds) and another CUDA graph (its own memory pool) mid-run,
                    # for one batch. Rows are independent in eval mode (batch norm uses its running
                    # statistics), so the padding does not change the real rows; it is sliced off.
                    self._input[n:].zero_()
            if self.device == "cuda":
                # a new CUDA graph replay: the previous call's output buffer may be reused (it was copied out)
                torch.compiler.cudagraph_mark_step_begin()
            out: np.ndarray = self.compiled(self._input)[:n].float().cpu().numpy()
        return out

    def run(self, batch: Any) -> np.ndarray:
        import torch

        t = torch.from_numpy(np.ascontiguousarray(batch)) if isinstance(batch, np.ndarray) else batch
        if self.batch is not None and len(t):
            # in chunks of the compiled batch (a batch is rarely longer), a short one padded by _run_compiled
            b = self.batch
            return np.concatenate([self._run_compiled(t[i : i + b], len(t[i : i + b])) for i in range(0, len(t), b)])
        t = t.to(device=self.device, dtype=self.dtype).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            y: np.ndarray = self.model(t).float().cpu().numpy()
        return y
