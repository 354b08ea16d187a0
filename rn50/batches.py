"""Evaluation-time batches: encoded files in, preprocessed NCHW tensors out, through DALI.

This is the one path by which every non-training stage turns images into network inputs:
export parity, INT8 calibration and its accuracy gate, ``serve.infer`` and ``serve.validate``.
It runs :func:`rn50.preprocess.dali_val` on the CPU (``device="cpu"``) or decodes with nvJPEG
and preprocesses on the GPU (``device="gpu"``), fed by ``external_source`` so that each batch
holds exactly the files the caller chose (the last one may be short).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import numpy as np

from .errors import DataError, first_line
from .layout import read_checked
from .preprocess import Preprocessing, dali_decode, dali_val


class Preprocessor:
    """A DALI pipeline applying the validation contract to batches of encoded images.

    ``device="cpu"`` runs everything on the CPU (no GPU needed); ``device="gpu"`` decodes with
    nvJPEG (``mixed``) and resizes/normalises on the GPU, returning a ``torch.Tensor`` on the GPU
    (zero-copy from DALI's buffer, valid until the next call) that an engine can read directly.
    """

    def __init__(
        self,
        p: Preprocessing,
        batch_size: int,
        device: str = "cpu",
        num_threads: int | None = None,
        device_id: int = 0,
        fp16: bool = False,
    ):
        from nvidia.dali import fn, pipeline_def, types

        if device not in ("cpu", "gpu"):
            raise ValueError(f"device must be cpu or gpu, got {device!r}")
        self.p, self.batch_size, self.device = p, batch_size, device
        threads = num_threads or max(1, min(8, os.cpu_count() or 1))

        @pipeline_def(
            batch_size=batch_size,
            num_threads=threads,
            device_id=device_id if device == "gpu" else None,
            prefetch_queue_depth=1,
            exec_dynamic=True,
        )
        def pipe():
            enc = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            imgs = dali_decode(enc, device="mixed" if device == "gpu" else "cpu")
            return dali_val(imgs, p, dtype=types.FLOAT16 if fp16 else types.FLOAT)

        self._make = pipe
        self._pipe = pipe()
        self._pipe.build()

    def rebuild(self) -> None:
        """Throw the DALI pipeline away and build a fresh one.

        Called after a failed batch (an undecodable image raises out of ``run()``): DALI's CPU
        pipelines keep working after such an error, but a GPU (``mixed``) pipeline's state after a
        decoder error is not documented, so callers that go on after an error rebuild to be safe.
        """
        self._pipe = self._make()
        self._pipe.build()

    def __call__(self, encoded: Sequence[np.ndarray], copy: bool = False):
        """Preprocess up to ``batch_size`` encoded images; raises on any undecodable one.

        On the GPU the result aliases DALI's output buffer, which the next call overwrites;
        ``copy=True`` returns a device-to-device copy instead (still no host copy), for callers
        that run this one batch ahead of the consumer (``serve.pipeline``). The copy is complete
        when this returns.
        """
        if not 0 < len(encoded) <= self.batch_size:
            raise ValueError(f"batch of {len(encoded)} images (1..{self.batch_size} allowed)")
        self._pipe.feed_input("encoded", list(encoded))
        (out,) = self._pipe.run()
        if self.device == "gpu":
            import torch

            x = torch.from_dlpack(out.as_tensor())
            if copy:
                x = x.clone()
                torch.cuda.current_stream(x.device).synchronize()
            return x
        return np.array(out.as_tensor())


def iter_split(
    files: Sequence[str],
    labels: Sequence[int],
    p: Preprocessing,
    batch_size: int = 64,
    device: str = "cpu",
    limit: int | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(x float32 NCHW numpy, y int64)`` over a labelled file list, in order."""
    n = len(files) if limit is None else min(limit, len(files))
    pre = Preprocessor(p, batch_size, device)
    for i in range(0, n, batch_size):
        chunk = files[i : i + batch_size][: n - i]
        encoded = read_checked(chunk, p)
        try:
            x = pre(encoded)
        except RuntimeError as e:  # DALI names the operator, not the file: PIL names the culprit(s)
            raise DataError("undecodable image(s): " + _culprits(chunk, e)) from None
        if device == "gpu":
            x = x.float().cpu().numpy()
        yield x, np.asarray(labels[i : i + len(chunk)], dtype=np.int64)


def _culprits(files: Sequence[str], e: BaseException) -> str:
    from .preprocess import undecodable

    bad = undecodable(files)
    if bad:
        return "; ".join(bad[:5])
    first = first_line(e)
    return f"DALI failed on one of {', '.join(files[:3])}{' ...' if len(files) > 3 else ''} ({first[:200]})"
