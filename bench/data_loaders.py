"""DALI CPU against torchvision's DataLoader for the *training* pipeline, in one run.

Same files (real Fashion-MNIST JPEGs), same augmentation contract (rn50.preprocess: random
resized crop 8-100%, flip, normalise, at --image-size), same batch size and the same number of
worker threads/processes. Prints images/s for each and their ratio, with the machine.

    python -m bench.data_loaders [--data data/fashion-mnist] [--images 4096] [--image-size 224]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from .measure import machine
from .report import add_output_flag, publish


def rate(loader, n_batches: int, batch: int) -> float:
    it = iter(loader)
    next(it)  # warm-up: pipeline build, worker start
    t = time.perf_counter()
    done = 0
    for _ in range(n_batches):
        next(it)
        done += batch
    return done / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> int:
    from rn50.layout import balanced_subset, load_dataset
    from rn50.preprocess import Preprocessing
    from train.loaders import Shard, make_loader

    ap = argparse.ArgumentParser(
        prog="python -m bench.data_loaders", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--data",
        default="data/fashion-mnist",
        help="ImageNet-layout folder whose train/ split is read (default: %(default)s)",
    )
    ap.add_argument(
        "--images",
        type=int,
        default=4096,
        help="images timed per backend, after one warm-up batch (default: %(default)s)",
    )
    ap.add_argument("--image-size", type=int, default=224, help="training crop size in pixels (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=64, help="images per batch (default: %(default)s)")
    ap.add_argument(
        "--workers",
        type=int,
        default=max(1, (os.cpu_count() or 2)),
        help="DALI threads and DataLoader worker processes (default: the CPU count, %(default)s here)",
    )
    add_output_flag(ap, "data_loaders")
    a = ap.parse_args(argv)
    train, _ = load_dataset(a.data)
    files, labels = balanced_subset(train.files, train.labels, a.images + a.batch_size)
    p = Preprocessing.for_image_size(a.image_size)
    n_batches = a.images // a.batch_size
    rows = []
    for backend in ("dali-cpu", "pytorch"):
        loader = make_loader(
            backend,
            files,
            labels,
            p,
            batch_size=a.batch_size,
            train=True,
            device=torch.device("cpu"),
            shard=Shard(),
            seed=0,
            workers=a.workers,
        )
        rows.append((backend, rate(loader, n_batches, a.batch_size)))
    lines = [
        f"\nTraining input pipeline, {a.image_size} px, batch {a.batch_size}, {a.workers} workers/threads, "
        f"{n_batches * a.batch_size} Fashion-MNIST JPEGs\nmachine: {machine()}\n",
        "| backend | images/s | vs torchvision |\n| --- | ---: | ---: |",
    ]
    base = dict(rows)["pytorch"]
    labels = {"dali-cpu": "DALI CPU", "pytorch": "torchvision DataLoader"}
    lines += [f"| {labels[name]} | {r:,.0f} | {r / base:.2f}x |" for name, r in rows]
    publish(
        a.output,
        "data_loaders",
        "\n".join(lines),
        "Training input pipeline",
        {f"{a.image_size} px, batch {a.batch_size}, {a.workers} workers": {labels[n]: r for n, r in rows}},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
