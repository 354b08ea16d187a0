"""DALI CPU against torchvision's DataLoader for the *training* pipeline, in one run.

Same files (real Fashion-MNIST JPEGs), same augmentation contract (rn50.preprocess: random
resized crop 8-100%, flip, normalise, at --image-size), same batch size and the same number of
worker threads/processes. Prints images/s for each and their ratio, with the machine.

    python -m bench.data_loaders [--data data/fashion-mnist] [--images 4096] [--image-size 224]

With --epochs N it compares instead whole epochs of the DALI CPU training loader with each next
epoch's pipeline built ahead (train.loaders, the default) against the same loader building each
epoch's pipeline when the epoch starts: wall time per epoch, the host's wait for each epoch's
first batch and for all of them (train.loop.LoaderWaits), and the seconds in Pipeline.build.
The two loaders take turns epoch by epoch in one process, so both see the same machine load.
--step-ms stands in for a training step on a GPU: the consumer sleeps that long per batch,
leaving the CPU to DALI, as a host waiting on its GPU does.

    python -m bench.data_loaders --epochs 3 --images 0 --image-size 224 --step-ms 30
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from .measure import machine
from .report import add_output_flag, parse_checked, publish


def rate(loader, n_batches: int, batch: int) -> float:
    it = iter(loader)
    next(it)  # warm-up: pipeline build, worker start
    t = time.perf_counter()
    done = 0
    for _ in range(n_batches):
        next(it)
        done += batch
    return done / (time.perf_counter() - t)


def epochs_ahead_or_not(a, files, labels, p) -> dict[str, list[dict]]:
    """Per-epoch records of two DALI CPU training loaders, one building ahead and one not."""
    from train.loaders import Shard, make_loader
    from train.loop import LoaderWaits

    common = dict(batch_size=a.batch_size, device=torch.device("cpu"), shard=Shard(), seed=0, workers=a.workers)
    loaders = {
        ahead: make_loader("dali-cpu", files, labels, p, train=True, epochs=a.epochs, build_ahead=ahead, **common)
        for ahead in (False, True)
    }
    recs: dict[bool, list[dict]] = {False: [], True: []}
    # DALI's one-time start in this process (libraries, thread pools) goes into neither loader's epoch 1
    warm = make_loader("dali-cpu", files, labels, p, train=False, **common)
    next(iter(warm))
    del warm
    try:
        for epoch in range(a.epochs):
            # turns alternate which loader goes first, so neither always follows the other
            for ahead in (False, True) if epoch % 2 == 0 else (True, False):
                loader = loaders[ahead]
                loader.set_epoch(epoch)
                waits = LoaderWaits(loader)
                t, steps = time.perf_counter(), 0
                for _ in waits:
                    steps += 1
                    if a.step_ms:
                        time.sleep(a.step_ms / 1000)
                wall = time.perf_counter() - t
                recs[ahead].append({"wall_s": wall, "img_per_s": steps * a.batch_size / wall, **waits.record(epoch)})
    finally:
        for loader in loaders.values():
            loader.close()
    return {"built when its epoch starts": recs[False], "built ahead during the epoch before": recs[True]}


def _mean(xs: list[float]) -> float:
    return sum(xs) / max(1, len(xs))


def report_epochs(a, recs: dict[str, list[dict]], n_images: int) -> None:
    later = slice(1, None) if a.epochs > 1 else slice(0, None)
    span = f"epochs 2-{a.epochs}" if a.epochs > 2 else ("epoch 2" if a.epochs == 2 else "epoch 1")
    base = _mean([r["wall_s"] for r in recs["built when its epoch starts"][later]])
    lines = [
        f"\nDALI CPU training loader: each epoch's pipeline built when the epoch starts, or built ahead during the "
        f"epoch before; {a.epochs} epochs of {n_images} Fashion-MNIST JPEGs, {a.image_size} px, batch "
        f"{a.batch_size}, {a.workers} DALI threads, consumer sleeping {a.step_ms:g} ms a batch; the two loaders "
        f"take turns epoch by epoch\nmachine: {machine()}\n",
        f"| pipeline | built ahead, {span} | epoch 1 s | {span} s (mean) | first-batch wait, {span} (ms) "
        f"| data wait per epoch, {span} (s) | Pipeline.build, {span} (ms) | {span} wall vs built at epoch start |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    panels: dict[str, dict[str, float]] = {f"images/s, {span}": {}}
    for name, rs in recs.items():
        rest = rs[later]
        wall = _mean([r["wall_s"] for r in rest])
        ahead = f"{sum(r['built_ahead'] for r in rest)}/{len(rest)}"
        first_ms, build_ms = (1000 * _mean([r[k] for r in rest]) for k in ("first_s", "build_s"))
        lines.append(
            f"| {name} | {ahead} | {rs[0]['wall_s']:.2f} | {wall:.2f} | {first_ms:.1f} | "
            f"{_mean([r['wait_s'] for r in rest]):.2f} | {build_ms:.1f} | {wall / base:.3f}x |"
        )
        panels[f"images/s, {span}"][name] = _mean([r["img_per_s"] for r in rest])
    lines.append(
        "\nPer epoch (wall s / first-batch wait ms): "
        + "; ".join(
            f"{name}: " + ", ".join(f"{r['wall_s']:.2f}/{1000 * r['first_s']:.0f}" for r in rs)
            for name, rs in recs.items()
        )
    )
    publish(a.output, "data_loaders_ahead", "\n".join(lines), "DALI CPU epochs, pipeline built ahead or not", panels)


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
        help="images timed per backend, after one warm-up batch; with --epochs, images per epoch "
        "(0: all training images) (default: %(default)s)",
    )
    ap.add_argument(
        "--epochs",
        type=int,
        default=0,
        help="compare N whole epochs of the DALI CPU training loader with and without each next "
        "epoch's pipeline built ahead, instead of the backends (default: off)",
    )
    ap.add_argument(
        "--step-ms",
        type=float,
        default=0.0,
        help="with --epochs: milliseconds the consumer sleeps per batch, standing in for a GPU "
        "training step (default: %(default)s)",
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
    a = parse_checked(ap, argv, may_be_zero=("--images", "--epochs", "--step-ms", "--workers"))
    train, _ = load_dataset(a.data)
    p = Preprocessing.for_image_size(a.image_size)
    if a.epochs:
        files, labels = balanced_subset(train.files, train.labels, a.images or None)
        report_epochs(a, epochs_ahead_or_not(a, files, labels, p), len(files) // a.batch_size * a.batch_size)
        return 0
    files, labels = balanced_subset(train.files, train.labels, a.images + a.batch_size)
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
