"""The DALI-fed batch loop shared by ``serve.infer`` and ``serve.validate``.

A background thread runs one batch ahead of the engine: it reads files, sniffs each header,
runs the DALI preprocessing (:class:`rn50.batches.Preprocessor`, the project's single
preprocessing path) and puts the result in a bounded queue (``prefetch`` batches, default 2), so
decoding batch ``i+1`` overlaps inference of batch ``i``. On the GPU, DALI decodes with nvJPEG
(``mixed``) and the batch stays on the GPU (a device-to-device copy of DALI's buffer, which the
next ``run()`` would overwrite) until the engine reads it.

Bad inputs never stop the job. Each one becomes an ``(index, path, cause)`` entry of its batch:

1. reading: missing / unreadable / dangling symlink / directory / empty file (``read_encoded``);
2. header sniff with PIL's lazy ``Image.open`` (:func:`rn50.layout.check_header`): not an image,
   a format DALI does not decode (GIF, ...), more than ``max_pixels`` pixels (default 100
   megapixels, a decompression-bomb guard: DALI would otherwise try to allocate the full image),
   or so thin that resizing its shorter side would exceed ``max_pixels``, a JPEG or PNG cut
   short (its end marker missing); TIFF, JPEG 2000, WebP and PNM files are decoded by PIL in full
   here, since DALI returns pixels from corrupt ones;
3. DALI: if a batch fails (corrupt data the header check did not reveal), the pipeline is
   rebuilt and the batch is retried image by image to find the culprits; the others are kept.
   A culprit's cause comes from decoding it once more with PIL (:func:`decode_cause`), as
   DALI's exception does not say what is wrong with the data.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rn50.batches import Preprocessor
from rn50.errors import DataError, dali_message
from rn50.layout import MAX_PIXELS, check_header, read_encoded
from rn50.preprocess import Preprocessing


@dataclass
class Prepared:
    """One batch: the good images (``index``, ``path``, ``x``) and the failures of its span."""

    indices: list[int]
    paths: list[str]
    x: Any  # float NCHW numpy (cpu) or torch CUDA tensor (gpu); None when no image survived
    errors: list[tuple[int, str, str]] = field(default_factory=list)
    seconds: float = 0.0  # time spent reading + preprocessing this batch (in the background)


def decode_cause(path: str, data: np.ndarray, e: BaseException) -> str:
    """Why DALI could not decode ``data`` (read from ``path``), for the ``error`` of its line.

    DALI's exception only says "Failed to decode sample #0" (libjpeg's own message goes to
    stderr), so the image is decoded once more with PIL (:func:`rn50.preprocess.load_rgb`), which
    names the problem ("image file is truncated (54 bytes not processed)", "broken data stream
    when reading image file"). Only failed images get here, and their size has passed the header
    check, so this is cheap.
    """
    import warnings

    from rn50.errors import DataError
    from rn50.preprocess import load_rgb

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load_rgb(path, data.tobytes())
    except DataError as de:
        return str(de).removeprefix(f"{path}: ")
    return f"cannot decode image: DALI's {_format_name(data)} decoder rejects it, PIL decodes it ({dali_message(e)})"


def _format_name(data: np.ndarray) -> str:
    import io

    from PIL import Image

    from rn50.layout import DALI_FORMATS

    try:
        with Image.open(io.BytesIO(data.tobytes())) as im:
            return DALI_FORMATS.get(im.format or "", im.format or "image")
    except Exception:
        return "image"


def sniff(path: str, data: np.ndarray, max_pixels: int = MAX_PIXELS, resize_shorter: int | None = None) -> str | None:
    """None if ``data`` is an image DALI can decode at an acceptable size (source and resized), else
    the cause (:func:`rn50.layout.check_header`)."""
    return check_header(data.tobytes(), max_pixels, resize_shorter)


# DALI decodes a whole batch at once, and its memory pools keep what the largest batch took. Each
# image is bounded (max_pixels), but a batch of them is not: so a batch is decoded in runs of at
# most this many source pixels (an image larger than that alone); batches of ordinary photos (256 x
# 0.2 MP for ImageNet) are one run. bench.decode_memory measures the peak both ways (docs/serving.md).
DECODE_PIXEL_BUDGET = 2 * MAX_PIXELS


def _source_pixels(data: np.ndarray) -> int:
    """The pixel count in an image's header (already checked by :func:`sniff`); 0 if unreadable."""
    import io
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data.tobytes())) as im:
                w, h = im.size
    except Exception:
        return 0
    return int(w) * int(h)


def decode_runs(
    items: list[tuple[int, str, np.ndarray]], budget: int = DECODE_PIXEL_BUDGET
) -> list[list[tuple[int, str, np.ndarray]]]:
    """``items`` cut, in order, into runs of at most ``budget`` source pixels each (an image over
    it alone): what one DALI call decodes."""
    runs: list[list[tuple[int, str, np.ndarray]]] = []
    total = budget + 1
    for item in items:
        n = _source_pixels(item[2])
        if total + n > budget:
            runs.append([])
            total = 0
        runs[-1].append(item)
        total += n
    return runs


def preprocess_encoded(
    pre: Preprocessor,
    items: list[tuple[int, str, np.ndarray]],
    copy: bool = False,
    budget: int = DECODE_PIXEL_BUDGET,
) -> tuple[Any, list[tuple[int, str, np.ndarray]], list[tuple[int, str, str]]]:
    """Run ``pre`` on already read and sniffed ``(index, name, data)`` items, isolating bad ones.

    Returns ``(x, kept, errors)``: the batch of the images DALI decoded (None when none did), the
    items it holds (in order) and an ``(index, name, cause)`` for each image DALI rejected. When
    a run fails, the pipeline is rebuilt and its images are retried one by one, so one corrupt
    image costs only its own slot (see the module docstring, step 3). The images are decoded in
    runs of at most ``budget`` source pixels (:data:`DECODE_PIXEL_BUDGET`, :func:`decode_runs`).
    """
    runs = decode_runs(items, budget)
    if len(runs) <= 1:
        return _preprocess_run(pre, items, copy)
    xs, kept, errors = [], [], []
    for run in runs:
        # a GPU result that is not copied is DALI's buffer, which the next run overwrites
        x, k, e = _preprocess_run(pre, run, copy=copy or pre.device == "gpu")
        if x is not None:
            xs.append(x)
        kept += k
        errors += e
    if not xs:
        return None, kept, errors
    if pre.device == "gpu":
        import torch

        return torch.cat(xs), kept, errors
    return np.concatenate(xs), kept, errors


def _preprocess_run(
    pre: Preprocessor, items: list[tuple[int, str, np.ndarray]], copy: bool
) -> tuple[Any, list[tuple[int, str, np.ndarray]], list[tuple[int, str, str]]]:
    """:func:`preprocess_encoded` for one run of images."""
    if not items:
        return None, [], []
    try:
        return pre([d for _, _, d in items], copy=copy), list(items), []
    except Exception:
        pre.rebuild()  # pipeline state after an error: start from a fresh one
    kept: list[tuple[int, str, np.ndarray]] = []
    errors: list[tuple[int, str, str]] = []
    outs = []
    for i, name, d in items:
        try:
            # on the GPU an uncopied result is DALI's buffer, which the next call overwrites: the
            # one-by-one results are kept until the concatenation, so each is copied there
            outs.append(pre([d], copy=copy or pre.device == "gpu"))
            kept.append((i, name, d))
        except Exception as e:
            errors.append((i, name, decode_cause(name, d, e)))
            pre.rebuild()
    if not outs:
        return None, kept, errors
    if pre.device == "gpu":
        import torch

        return torch.cat(outs), kept, errors
    return np.concatenate(outs), kept, errors


class BatchStream:
    """Iterate :class:`Prepared` batches over ``paths``, preprocessing ahead in a thread."""

    def __init__(
        self,
        paths: Sequence[str],
        p: Preprocessing,
        batch_size: int,
        device: str = "cpu",
        prefetch: int = 2,
        max_pixels: int = MAX_PIXELS,
        num_threads: int | None = None,
        fp16: bool = False,
    ):
        self.paths = [str(x) for x in paths]
        self.resize_shorter = p.resize_size
        self.batch_size, self.device, self.max_pixels = batch_size, device, max_pixels
        self.pre = Preprocessor(p, batch_size, device, num_threads=num_threads, fp16=fp16)
        self._q: queue.Queue[Prepared | BaseException | None] = queue.Queue(maxsize=max(1, prefetch))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- producer ---------------------------------------------------------------------------
    def _prepare(self, span: list[tuple[int, str]]) -> Prepared:
        t0 = time.perf_counter()
        good: list[tuple[int, str, np.ndarray]] = []
        errors: list[tuple[int, str, str]] = []
        for i, path in span:
            try:
                data = read_encoded(path)
            except DataError as e:
                errors.append((i, path, str(e).removeprefix(f"{path}: ")))
                continue
            cause = sniff(path, data, self.max_pixels, self.resize_shorter)
            if cause:
                errors.append((i, path, cause))
            else:
                good.append((i, path, data))
        x, good, failed = preprocess_encoded(self.pre, good, copy=self.device == "gpu")
        errors.extend(failed)
        errors.sort()
        return Prepared([i for i, _, _ in good], [pth for _, pth, _ in good], x, errors, time.perf_counter() - t0)

    def _spans(self) -> Iterator[list[tuple[int, str]]]:
        items = list(enumerate(self.paths))
        for s in range(0, len(items), self.batch_size):
            yield items[s : s + self.batch_size]

    def _producer(self) -> None:
        try:
            for span in self._spans():
                if self._stop.is_set():
                    return
                item = self._prepare(span)
                while not self._stop.is_set():
                    try:
                        self._q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # surface unexpected failures in the consumer
            self._q.put(e)
            return
        self._q.put(None)

    # -- consumer ---------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Prepared]:
        self._thread = threading.Thread(target=self._producer, name="serve-preprocess", daemon=True)
        self._thread.start()
        try:
            while True:
                item = self._q.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self._stop.set()
            self._thread.join(timeout=10)
