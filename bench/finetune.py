"""Fine-tuning against training from scratch, on Fashion-MNIST: ``python -m bench.finetune``.

1. Train the CPU profile (32 px, dali-cpu; batch 32 and a 0.3-epoch warmup for so few images)
   on five classes (t-shirt/top, trouser, pullover, dress, coat): ``--pretrain-per-class`` images
   each, ``--pretrain-epochs`` epochs.
2. On the other five (sandal, shirt, sneaker, bag, ankle boot), ``--target-per-class`` images
   each, run the same schedule twice: from that checkpoint (``--init-from``, the finetune preset)
   and from random weights (``--preset finetune``: the same lr, warmup, epochs, images and steps).
   A third run from scratch with the recipe's own learning rate (``--preset 90``) shows that
   scratch does not lose only because the fine-tune rate is low for it.

Each is validated on ``--val-per-class`` test images of its own classes; the report gives the
images each stage trained on (counted as the trainer selects them), the last epoch's top-1 of
every run, the wall time and the machine. The converted images live in a temporary folder
(``--work`` keeps them and the runs; a rerun with the same ``--work`` reuses the images and
replaces the runs).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.report import parse_checked
from rn50.fashion_mnist import CLASSES, DEFAULT_SOURCE, convert
from rn50.layout import balanced_subset, load_dataset

PRETRAIN_CLASSES, TARGET_CLASSES = CLASSES[:5], CLASSES[5:]


def subset_root(full: Path, classes: list[str], out: Path) -> Path:
    """An ImageNet-layout folder holding only ``classes`` of ``full`` (symlinked class folders).
    Built anew each time: it holds nothing but these links, and an earlier build's may point at
    other classes or at a converted folder since replaced."""
    if out.is_symlink() or out.is_file():
        out.unlink()
    elif out.exists():
        shutil.rmtree(out)  # unlinks the class-folder links, never what they point at
    for split in ("train", "val"):
        (out / split).mkdir(parents=True)
        for c in classes:
            (out / split / c).symlink_to((full / split / c).resolve(), target_is_directory=True)
    return out


def train_images(data: Path, limit: int | None) -> int:
    """How many images ``python -m train --data DATA --limit-train LIMIT`` trains on: the same
    selection the trainer makes, which can be fewer than the limit asks for."""
    train, _ = load_dataset(data)
    return len(balanced_subset(train.files, train.labels, limit)[0])


def run_train(args: list[str]) -> dict[str, Any]:
    """``python -m train`` in this process; returns the run's last epoch and wall time."""
    import train

    out = Path(args[args.index("--output") + 1])
    t0 = time.time()
    rc = train.main([*args, "--overwrite"])  # a rerun in the same --work folder replaces its runs
    if rc != 0:
        raise SystemExit(f"error: python -m train {' '.join(args)} exited {rc}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    cfg = json.loads((out / "manifest.json").read_text())["train_config"]
    return {
        "top1": rows[-1]["val_top1"],
        "top5": rows[-1]["val_top5"],
        "val_images": rows[-1]["val_images"],
        "epochs": len(rows),
        "wall_s": round(time.time() - t0, 1),
        "lr": cfg["lr"],
        "warmup_epochs": cfg["warmup_epochs"],
        "preset": cfg["preset"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.finetune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--source", type=Path, default=DEFAULT_SOURCE, help="Fashion-MNIST idx files (default: %(default)s)"
    )
    ap.add_argument(
        "--pretrain-per-class",
        type=int,
        default=400,
        help="training images per pretraining class (default: %(default)s)",
    )
    ap.add_argument(
        "--pretrain-epochs", type=int, default=3, help="epochs of the pretraining run (default: %(default)s)"
    )
    ap.add_argument(
        "--target-per-class", type=int, default=100, help="training images per target class (default: %(default)s)"
    )
    ap.add_argument(
        "--epochs", type=int, default=3, help="epochs of each target run (fine-tune and scratch) (default: %(default)s)"
    )
    ap.add_argument("--val-per-class", type=int, default=100, help="validation images per class (default: %(default)s)")
    ap.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="batch of every run (default: %(default)s: the CPU profile's 64 leaves too few steps on these few images)",
    )
    ap.add_argument(
        "--warmup-epochs",
        type=float,
        default=0.3,
        help="warmup of the pretraining and the scratch-with-recipe-lr runs (default: %(default)s: "
        "the CPU profile's 0.1 epoch is a handful of steps on so few images)",
    )
    ap.add_argument("--workers", type=int, default=1, help="data threads per run (default: %(default)s)")
    ap.add_argument(
        "--work",
        type=Path,
        help="keep the data and runs here; a rerun reuses the images and replaces the runs "
        "(default: a temporary folder)",
    )
    ap.add_argument("--json", type=Path, help="also write the results here")
    a = parse_checked(ap, argv, may_be_zero=("--workers", "--warmup-epochs"))

    from bench.measure import machine

    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as tmp:
        work = a.work or Path(tmp)
        # one conversion holds enough of every class for both stages; each stage then trains on a
        # class-balanced --limit-train of its classes (the pretraining on all of them when the
        # conversion holds no more than it asks for)
        per_class = max(a.pretrain_per_class, a.target_per_class)
        full = convert(work / "fm", a.source, per_class_train=per_class, per_class_val=a.val_per_class, progress=False)
        pre_data = subset_root(full, PRETRAIN_CLASSES, work / "pretrain-classes")
        tgt_data = subset_root(full, TARGET_CLASSES, work / "target-classes")
        pre_limit = 5 * a.pretrain_per_class if per_class > a.pretrain_per_class else None
        tgt_limit = 5 * a.target_per_class
        common = ["--profile", "cpu", "--workers", str(a.workers), "--batch-size", str(a.batch_size)]
        t0 = time.time()
        pre = run_train(
            [
                "--data",
                str(pre_data),
                "--output",
                str(work / "pretrain"),
                *common,
                "--epochs",
                str(a.pretrain_epochs),
                "--warmup-epochs",
                str(a.warmup_epochs),
                *(["--limit-train", str(pre_limit)] if pre_limit is not None else []),
            ]
        )
        target = [
            *common,
            "--data",
            str(tgt_data),
            "--limit-train",
            str(tgt_limit),
            "--epochs",
            str(a.epochs),
        ]
        ft = run_train([*target, "--output", str(work / "finetune"), "--init-from", str(work / "pretrain" / "best.pt")])
        scratch = run_train([*target, "--output", str(work / "scratch"), "--preset", "finetune"])
        scratch_recipe = run_train(
            [
                *target,
                "--output",
                str(work / "scratch-recipe"),
                "--preset",
                "90",
                "--warmup-epochs",
                str(a.warmup_epochs),
            ]
        )
        res = {
            "machine": machine(),
            "date": dt.date.today().isoformat(),
            "wall_s": round(time.time() - t0, 1),
            "pretrain": {"classes": PRETRAIN_CLASSES, "images": train_images(pre_data, pre_limit), **pre},
            "target": {"classes": TARGET_CLASSES, "images": train_images(tgt_data, tgt_limit)},
            "finetune": ft,
            "scratch_same_schedule": scratch,
            "scratch_recipe_lr": scratch_recipe,
            "margin_points": round(ft["top1"] - scratch["top1"], 2),
        }
    print(json.dumps(res, indent=2))
    print(
        f"\n{res['machine']}, {res['date']}: pretrain {res['pretrain']['images']} images x "
        f"{a.pretrain_epochs} epochs -> {pre['top1']:.2f} % on its 5 classes; target "
        f"{res['target']['images']} images x {a.epochs} epochs\n"
        f"| run | lr | val top-1 |\n| --- | ---: | ---: |\n"
        f"| fine-tune from the 5-class checkpoint | {ft['lr']:.4g} | {ft['top1']:.2f} % |\n"
        f"| scratch, same schedule | {scratch['lr']:.4g} | {scratch['top1']:.2f} % |\n"
        f"| scratch, recipe lr | {scratch_recipe['lr']:.4g} | {scratch_recipe['top1']:.2f} % |",
        file=sys.stderr,
    )
    if a.json:
        from rn50.atomic import write_json

        write_json(a.json, res)
    return 0


if __name__ == "__main__":
    from rn50.interrupt import run_command

    # the runs call train.main in this process: its checkpoints are kept as python -m train keeps them
    sys.exit(run_command(main, "each finished run's checkpoint is kept; no results table was written"))
