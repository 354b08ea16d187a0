"""The model behind ``serve.triton``: encoded images in, top-k classes out, one answer per row.

:class:`Classifier` is the function PyTriton calls with the requests of one dynamic batch. It
reuses the offline path piece by piece, so a request is preprocessed and scored exactly as
``serve.infer`` does it: the byte-size limit and the header sniff (``rn50.layout.check_header``)
run before anything is decoded, DALI applies the manifest's contract (``rn50.batches.Preprocessor``
through ``serve.pipeline.preprocess_encoded``, which isolates undecodable images), the engine
runs the surviving rows as one batch and :func:`rn50.backends.topk` ranks the classes.

Each row gets its own answer: ``topk`` (class indices), ``classes`` (names, top-1 first),
``probs`` (softmax probabilities) and ``error`` (empty, or the cause for a row that could not be
classified; its other outputs are then -1 / "" / 0). PyTriton 0.7 cannot fail one request of a
dynamic batch on its own (a raised exception fails every request of the batch, and its validator
refuses anything but output arrays), so a bad image is reported in its own row's ``error``
instead, and the other requests of the batch are answered normally.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

INPUT = "image"
OUTPUTS = ("topk", "classes", "probs", "error")
DEFAULT_MAX_REQUEST_BYTES = 20 * 1024 * 1024  # a 20 MB encoded image is far above any photo's JPEG


class Classifier:
    """Classify the encoded images of a batch of requests with one engine and one DALI pipeline.

    ``backend`` is an opened engine (``rn50.backends.load_engine``); ``max_batch`` rows at most
    reach the engine at once (Triton's dynamic batcher guarantees it). Calls are serialised by a
    lock: PyTriton may call one instance from several threads.
    """

    def __init__(
        self,
        backend: Any,
        manifest: dict[str, Any],
        max_batch: int,
        topk: int = 5,
        device: str = "cpu",
        max_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        max_pixels: int | None = None,
        num_threads: int | None = None,
    ):
        from rn50.batches import Preprocessor
        from rn50.layout import MAX_PIXELS
        from rn50.manifest import preprocessing_of

        self.backend, self.classes = backend, list(manifest["classes"])
        self.k = min(topk, len(self.classes))
        self.max_bytes, self.max_pixels = max_bytes, max_pixels or MAX_PIXELS
        self.device = device
        self.pre = Preprocessor(
            preprocessing_of(manifest),
            max_batch,
            device,
            num_threads=num_threads,
            fp16=backend.input_dtype == "float16",
        )
        self._lock = threading.Lock()

    def _check(self, data: bytes) -> str | None:
        """Why an encoded image is refused before decoding (size limit, header), or None."""
        from rn50.layout import check_header

        if len(data) > self.max_bytes:
            return (
                f"request too large: {len(data):,} bytes exceeds the limit of {self.max_bytes:,} bytes "
                f"(serve.triton --max-request-bytes)"
            )
        return check_header(data, self.max_pixels, self.pre.p.resize_size)  # thin images bounded as in serve.infer

    def classify(self, images: list[bytes]) -> list[dict[str, Any]]:
        """One record per image, in order: ``{"topk", "classes", "probs"}`` or ``{"error"}``."""
        from rn50.backends import topk
        from serve.pipeline import preprocess_encoded

        recs: list[dict[str, Any]] = [{} for _ in images]
        good = []
        for i, data in enumerate(images):
            cause = self._check(data)
            if cause:
                recs[i] = {"error": cause}
            else:
                good.append((i, f"row {i}", np.frombuffer(data, dtype=np.uint8)))
        with self._lock:
            x, kept, failed = preprocess_encoded(self.pre, good, copy=False)
            for i, _, cause in failed:
                recs[i] = {"error": cause}
            if x is not None:
                idx, probs = topk(self.backend.run(x), self.k)
                for row, (i, _, _) in enumerate(kept):
                    recs[i] = {
                        "topk": idx[row].tolist(),
                        "classes": [self.classes[c] for c in idx[row]],
                        "probs": probs[row].tolist(),
                    }
        return recs

    def __call__(self, requests: list[Any]) -> list[dict[str, np.ndarray]]:
        """PyTriton's entry point: a list of requests (``request[INPUT]``: ``[rows, 1]`` bytes) in,
        a list of output dicts (``[rows, k]`` topk/classes/probs, ``[rows, 1]`` error) out."""
        rows = [[bytes(v) for v in np.asarray(r[INPUT]).reshape(-1)] for r in requests]
        flat = self.classify([d for rs in rows for d in rs])
        out, at = [], 0
        for rs in rows:
            out.append(self.to_arrays(flat[at : at + len(rs)]))
            at += len(rs)
        return out

    def to_arrays(self, recs: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        n, k = len(recs), self.k
        idx = np.full((n, k), -1, dtype=np.int32)
        names = np.full((n, k), b"", dtype=object)
        probs = np.zeros((n, k), dtype=np.float32)
        error = np.full((n, 1), b"", dtype=object)
        for r, rec in enumerate(recs):
            if "error" in rec:
                error[r, 0] = rec["error"].encode("utf-8")
                continue
            idx[r] = rec["topk"]
            names[r] = [c.encode("utf-8") for c in rec["classes"]]
            probs[r] = rec["probs"]
        return {"topk": idx, "classes": names, "probs": probs, "error": error}
