"""Peak memory of decoding one batch of large images, in one DALI call against in runs.

Each serving path (``serve.infer``, ``serve.triton``) bounds an image by ``--max-pixels``; a
batch of such images is decoded in runs of at most ``serve.pipeline.DECODE_PIXEL_BUDGET``
source pixels. This measures the peak resident memory of a fresh process that preprocesses
``--count`` JPEGs of ``--side`` x ``--side`` pixels through ``serve.pipeline.preprocess_encoded``,
once without the budget (one call for the whole batch) and once with it, each in its own child
process, side by side in one run::

    python -m bench.decode_memory --count 16 --side 9500
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from bench.report import parse_checked


def _child(jpeg: str, count: int, budget: int) -> None:
    import numpy as np

    from rn50.batches import Preprocessor
    from rn50.preprocess import Preprocessing
    from serve.pipeline import preprocess_encoded

    with open(jpeg, "rb") as f:
        data = np.frombuffer(f.read(), dtype=np.uint8)
    items = [(i, f"img{i}", data) for i in range(count)]
    pre = Preprocessor(Preprocessing.for_image_size(224), count)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    x, kept, errors = preprocess_encoded(pre, items, budget=budget)
    seconds = time.perf_counter() - t0
    assert x is not None and len(kept) == count and not errors
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"peak_rss_gib": peak / 2**20, "before_gib": base / 2**20, "seconds": seconds}))


def _write_jpeg(side: int) -> str:
    """A smooth side x side JPEG (a small file, as the request limit is on bytes), in a temporary
    file: made here so that the children's peak is their decoding, not the making of the image."""
    import numpy as np
    from PIL import Image

    ramp = np.linspace(0, 255, side).astype(np.uint8)
    rgb = np.empty((side, side, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = ramp[None, :], ramp[:, None], ramp[::-1][None, :]
    with tempfile.NamedTemporaryFile(suffix=".jpg", delete=False) as f:
        Image.fromarray(rgb).save(f, "JPEG", quality=85)
    return f.name


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.decode_memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=16, help="images in the batch (default: %(default)s)")
    ap.add_argument("--side", type=int, default=9500, help="width and height of each image (default: %(default)s)")
    ap.add_argument("--child", help=argparse.SUPPRESS)  # JPEG path and budget, for the child runs
    a = parse_checked(ap, argv)
    if a.child:
        jpeg, budget = a.child.rsplit(":", 1)
        _child(jpeg, a.count, int(budget))
        return 0
    from bench.measure import machine
    from serve.pipeline import DECODE_PIXEL_BUDGET

    pixels = a.side * a.side
    print(f"# {a.count} JPEGs of {a.side}x{a.side} ({pixels / 1e6:.0f} MP each) to 224 px; {machine()}")
    jpeg = _write_jpeg(a.side)
    try:
        for mode, budget in (("one call", a.count * pixels), (f"runs of {DECODE_PIXEL_BUDGET / 1e6:.0f} MP", None)):
            cmd = [sys.executable, "-m", "bench.decode_memory", "--count", str(a.count), "--side", str(a.side)]
            r = subprocess.run(
                [*cmd, "--child", f"{jpeg}:{budget or DECODE_PIXEL_BUDGET}"], capture_output=True, text=True
            )
            if r.returncode != 0:
                print(f"{mode}: failed ({r.returncode}): {r.stderr.strip().splitlines()[-1:]}")
                continue
            got = json.loads(r.stdout.strip().splitlines()[-1])
            print(
                f"{mode:16s} peak RSS {got['peak_rss_gib']:.2f} GiB (before decoding {got['before_gib']:.2f} GiB), "
                f"{got['seconds']:.1f} s"
            )
    finally:
        os.unlink(jpeg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
