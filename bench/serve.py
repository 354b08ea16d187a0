"""Serving throughput on this machine: ``python -m bench.serve [--engine X.onnx]``.

Prints one table:

* end to end (read files, DALI decode + preprocess one batch ahead, engine) vs model only (the
  engine on an already-preprocessed batch), same backend and batch size;
* DALI CPU preprocessing (``rn50.batches.Preprocessor``) vs the PIL/torchvision reference
  (``load_rgb`` + ``torchvision_val``) on the real Fashion-MNIST JPEGs (28x28) and on real
  photographs (scikit-image, 300-640 px), single process.

Without --engine it uses artifacts/rn50.fp32.onnx when present. Under 3 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from serve.cli import add_batch_size

from .measure import cpu_name, time_calls
from .report import add_output_flag, parse_checked, publish


def timed(fn, min_seconds: float = 3.0, min_iters: int = 2) -> float:
    """Seconds per call (after one warm-up call)."""
    times = time_calls(fn, seconds=min_seconds, min_calls=min_iters, warmup=1)
    return sum(times) / len(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--engine",
        default="artifacts/rn50.fp32.onnx",
        help="engine to time, with its manifest beside it (default: %(default)s)",
    )
    ap.add_argument("--data", default="data/fashion-mnist/val", help="folder of images (default: %(default)s)")
    ap.add_argument("--images", type=int, default=512, help="images for the end-to-end run (default: %(default)s)")
    add_batch_size(ap, 32, "images per batch, clipped to the engine's maximum (default: %(default)s)")
    add_output_flag(ap, "serve")
    args = parse_checked(ap, argv)

    import numpy as np

    from rn50.backends import load_engine
    from rn50.batches import Preprocessor
    from rn50.errors import PipelineError
    from rn50.layout import iter_inputs, read_encoded
    from rn50.manifest import preprocessing_of
    from rn50.preprocess import load_rgb, torchvision_val
    from serve.pipeline import BatchStream

    try:
        backend, man = load_engine(args.engine)
    except PipelineError as e:
        print(f"error: {e} (export one with `python -m export ... --output {args.engine}`)", file=sys.stderr)
        return 2
    p = preprocessing_of(man)
    files = [str(x) for x in iter_inputs([args.data])]
    if not files:
        print(f"error: no images in {args.data}", file=sys.stderr)
        return 2
    rng = np.random.default_rng(0)
    files = [files[i] for i in rng.permutation(len(files))[: args.images]]
    bs = min(args.batch_size, backend.max_batch)
    rows: list[tuple[str, float, str]] = []

    # end to end
    def e2e() -> None:
        for b in BatchStream(files, p, bs):
            backend.run(b.x)

    e2e_s = timed(e2e, min_seconds=0, min_iters=1)
    e2e_ips = len(files) / e2e_s
    # model only
    x = Preprocessor(p, bs)([read_encoded(f) for f in files[:bs]])
    model_ips = bs / timed(lambda: backend.run(x), min_seconds=5)
    rows += [
        (f"end to end, {backend.name} ({backend.provider}), batch {bs}, {p.image_size} px", e2e_ips, ""),
        ("model only, same backend and batch", model_ips, f"e2e = {e2e_ips / model_ips:.2f} x model-only"),
    ]

    # DALI CPU vs PIL/torchvision, on Fashion-MNIST and on photographs
    with tempfile.TemporaryDirectory() as tmp:
        from PIL import Image
        from skimage import data as skd

        photos = []
        for name in ("astronaut", "coffee", "chelsea", "rocket", "camera"):
            f = Path(tmp) / f"{name}.jpg"
            Image.fromarray(getattr(skd, name)()).save(f, quality=90)
            photos.append(str(f))
        sets = [("Fashion-MNIST JPEG 28x28", files[:bs]), ("photos JPEG 300-640 px", (photos * 8)[:bs])]
        tv = torchvision_val(p)
        pre = Preprocessor(p, bs)
        for label, fs in sets:
            dali_ips = len(fs) / timed(lambda fs=fs: pre([read_encoded(f) for f in fs]))
            pil_ips = len(fs) / timed(lambda fs=fs: [tv(load_rgb(f)) for f in fs])
            rows += [
                (f"DALI CPU preprocessing, {label}", dali_ips, ""),
                (f"PIL + torchvision preprocessing, {label}", pil_ips, f"DALI = {dali_ips / pil_ips:.2f} x PIL"),
            ]

    threads = os.environ.get("RN50_DALI_THREADS") or f"{max(1, min(8, os.cpu_count() or 1))}"
    lines = [
        f"\nmachine: {cpu_name()}, {os.cpu_count()} logical cores; engine {args.engine} "
        f"({man.get('precision')}); DALI threads {threads}; {len(files)} images end to end\n",
        "| measurement | images/s | ratio |",
        "| --- | ---: | --- |",
    ]
    lines += [f"| {name} | {ips:,.1f} | {ratio} |" for name, ips, ratio in rows]
    serving, prep = rows[:2], rows[2:]
    publish(
        args.output,
        "serve",
        "\n".join(lines),
        f"Serving on CPU: {backend.name}, batch {bs}, {p.image_size} px",
        {
            "serving: end to end vs model only": {n.split(",")[0]: v for n, v, _ in serving},
            "preprocessing, single process": {n.replace(" preprocessing", ""): v for n, v, _ in prep},
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
