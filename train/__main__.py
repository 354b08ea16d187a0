"""python -m train: ResNet50 v1.5 with NVIDIA's recipe (SGD 0.875, lr 0.256/256, cosine,
warmup, WD 1/32768 off BatchNorm, label smoothing 0.1, MixUp with the 250-epoch preset),
AMP, channels_last, torch.compile, DALI, and torchrun/DDP.

Profiles (--profile auto picks gpu with CUDA, cpu without):
  gpu  the full recipe: 224 px, 90-epoch preset, batch 256 per GPU, AMP fp16 + dynamic loss
       scaling, channels_last, torch.compile, dali-gpu.
  gpu-small  the gpu profile for small source images (Fashion-MNIST, CIFAR): 112 px crops,
       60 epochs, random-resized-crop area 30-100%; sized for about ten minutes on one H100.
  cpu  a short run that finishes in under 15 minutes on 2 cores and still exercises the whole
       recipe: 32 px, 2 epochs over all training images, batch 64 (lr 0.064 by the linear
       rule), 0.1-epoch warmup, random-resized-crop area 50-100%, bf16 AMP where the CPU has
       native bf16 (else fp32), no compile, dali-cpu. See docs/training.md.
Any flag you pass overrides the profile.

Fine-tuning: --init-from PATH starts from a weights file on disk (torchvision or timm resnet50,
NVIDIA DeepLearningExamples/NGC ResNet50 v1.5, or this project's best.pt/last.pt; see
docs/training.md for where each comes from). It selects the finetune preset unless --preset is
given: lr 0.0256 per 256 images (a tenth of the recipe's), a 10-epoch cosine schedule (the cpu
profile keeps its 2 epochs), warmup over the first tenth. The classifier is replaced when the
data has another class count; --freeze-backbone trains only it, --backbone-lr-scale slows the
rest. A file that is not ResNet50 v1.5 stops the run before training (exit 2).

Exit codes: 0 done, 2 bad input or configuration (the message names the file and the cause),
1 any other failure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from .config import (
    CHECK_IMAGES_AUTO_MAX,
    DEFAULT_MAX_BAD_IMAGES,
    MIN_CROP_SCALE,
    PROFILES,
    SYNTHETIC_CLASSES,
    check_flags,
    resolve,
)
from .recipe import (
    FINETUNE_EPOCHS,
    FINETUNE_LR_PER_256,
    FINETUNE_WARMUP_FRACTION,
    PRESETS,
    WARMUP_MIN_GLOBAL_BATCH,
)


def _by_profile(name: str, fallback: object = None) -> str:
    """The profile default of setting ``name`` (``fallback`` where a profile has none) as the help
    states it, read from PROFILES so that the help follows the code: --profile auto takes gpu with
    CUDA and cpu without."""
    gpu, small, cpu = (PROFILES[p].get(name, fallback) for p in ("gpu", "gpu-small", "cpu"))
    if gpu == small == cpu:
        return f"{gpu}, in every profile"
    on_gpu = f"{gpu} on GPU" + (f" ({small} with gpu-small)" if small != gpu else "")
    return f"the profile's: {on_gpu}, {cpu} on CPU"


def _warmup_default() -> str:
    """What resolve() does when --warmup-epochs is not given, in the order it decides."""
    by_warmup: dict[int, list[str]] = {}
    for preset, (_, warmup, _) in PRESETS.items():
        by_warmup.setdefault(warmup, []).append(str(preset))
    presets = ", ".join(f"{w:g} for {' and '.join(ps)}" for w, ps in by_warmup.items())
    by_profile: dict[str, list[str]] = {}
    for k, prof in PROFILES.items():
        by_profile.setdefault(f"{prof['warmup_epochs']:g}" if prof.get("warmup_epochs") else "none", []).append(k)
    profiles = ", ".join(f"{w} for {' and '.join(ks)}" for w, ks in by_profile.items())
    return (
        f"with the finetune preset, {FINETUNE_WARMUP_FRACTION:g} x the epochs; otherwise, at a global batch "
        f"of {WARMUP_MIN_GLOBAL_BATCH} or more, the preset's ({presets}); below that, the profile's ({profiles})"
    )


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    a = ap.add_argument
    a(
        "--data",
        type=Path,
        help="ImageNet-layout folder with train/<class>/ and val/<class>/ (default: data/fashion-mnist; none for "
        "--data-backend synthetic)",
    )
    a(
        "--data-backend",
        choices=["dali-gpu", "dali-cpu", "pytorch", "synthetic"],
        help="default: dali-gpu with CUDA, dali-cpu without; asking for dali-gpu without CUDA is an error",
    )
    a("--profile", choices=["auto", *PROFILES], default="auto", help="defaults for the flags below (see above)")
    a(
        "--preset",
        choices=["50", "90", "250", "finetune"],
        help="recipe preset: epochs (and MixUp 0.2 for 250); finetune: lr 0.0256 per 256, "
        f"{FINETUNE_EPOCHS} epochs, warmup over the first {FINETUNE_WARMUP_FRACTION:g} of them "
        "(default: finetune with --init-from, else 90 on the gpu profile)",
    )
    a("--epochs", type=int, help="number of epochs, at least 1 (default: from the preset or profile)")
    a(
        "--batch-size",
        type=int,
        help=f"images per process per step (global batch = this x processes; default: {_by_profile('batch_size')})",
    )
    a(
        "--lr",
        type=float,
        help="learning rate per 256 images of global batch (default: 0.256; "
        f"{FINETUNE_LR_PER_256:g} with the finetune preset)",
    )
    a("--momentum", type=float, default=0.875, help="SGD momentum (default: %(default)s, no Nesterov)")
    a("--weight-decay", type=float, default=1 / 32768, help="on conv/fc weights only (default: 1/32768)")
    a("--label-smoothing", type=float, default=0.1, help="label smoothing of the loss (default: %(default)s)")
    a("--mixup", type=float, help="MixUp alpha (default: 0.2 with --preset 250, else off)")
    a("--warmup-epochs", type=float, help=f"linear warmup length in epochs (default: {_warmup_default()})")
    a(
        "--image-size",
        type=int,
        help=f"training/validation crop size in pixels (default: {_by_profile('image_size')})",
    )
    a(
        "--min-crop-scale",
        type=float,
        help="smallest area fraction of the random resized crop, above 0 and at most 1 "
        f"(default: {_by_profile('min_crop_scale', MIN_CROP_SCALE)}; the recipe's is {MIN_CROP_SCALE:g})",
    )
    a(
        "--amp",
        action=argparse.BooleanOptionalAction,
        help="automatic mixed precision (default: on with CUDA; on CPU, bf16 where the CPU has it natively)",
    )
    a(
        "--amp-dtype",
        choices=["fp16", "bf16"],
        help="autocast dtype; fp16 uses dynamic loss scaling; a CPU autocasts to bf16 only, so fp16 there "
        f"trains in fp32 (default: {_by_profile('amp_dtype')})",
    )
    a("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the model (default: on with CUDA)")
    a(
        "--memory-format",
        choices=["channels_last", "contiguous"],
        help="layout of the model's weights and input batches: channels_last (NHWC) or contiguous (NCHW) "
        f"(default: {_by_profile('memory_format')})",
    )
    a(
        "--workers",
        type=int,
        help="DALI threads, or DataLoader worker processes with --data-backend pytorch, per process; 0: "
        "one DALI thread, or loading in the training process (default: the CPU count - 1, from 1 to 8; "
        "2 with --evaluate)",
    )
    a(
        "--check-images",
        choices=["auto", "on", "off"],
        default="auto",
        help="header-check every image before training: auto = only when the selected files are at most "
        f"{CHECK_IMAGES_AUTO_MAX:,} (not for ImageNet's 1.2M); without it an undecodable file is still "
        "named, when DALI fails on its batch (default: %(default)s)",
    )
    a(
        "--max-bad-images",
        type=int,
        default=DEFAULT_MAX_BAD_IMAGES,
        metavar="N",
        help="images that cannot be read or decoded which the run leaves out, at most N per process (each "
        "rank counts what it meets; the header check's findings count on every rank): one the "
        "header check finds before training is dropped from the run; one a loader fails on mid-epoch is, in "
        "training, replaced by the next good file of its epoch (the epoch keeps its steps) and, in validation, "
        "no longer scored; each is named in a 'warning:' line and listed in the run's manifest.json "
        "(bad_images). One more stops the run naming them, exit 2; 0 stops it at the first (default: %(default)s)",
    )
    a("--seed", type=int, default=0, help="seeds weights, data order and augmentation (default: %(default)s)")
    a("--limit-train", type=int, help="train on a class-balanced subset of N images (default: all of them)")
    a("--limit-val", type=int, help="validate on a class-balanced subset of N images (default: all of them)")
    a(
        "--synthetic-steps",
        type=int,
        default=100,
        help="steps per epoch with --data-backend synthetic (default: %(default)s)",
    )
    a(
        "--num-classes",
        type=int,
        help="classes for --data-backend synthetic without --data (default: "
        f"{SYNTHETIC_CLASSES:,}); with a data folder its class folders are the classes",
    )
    a(
        "--init-from",
        type=Path,
        metavar="PATH",
        help="start from the weights in PATH, read from disk (a torchvision/timm resnet50 state dict, "
        ".pth/.bin/.safetensors; a DeepLearningExamples/NGC checkpoint; a best.pt/last.pt): everything "
        "but the classifier must fit ResNet50 v1.5, the classifier is kept when its class count is the "
        "data's and newly initialised otherwise; the manifest records the file and its sha256",
    )
    a(
        "--freeze-backbone",
        action="store_true",
        help="with --init-from: train the classifier only (the rest keeps its loaded weights and BatchNorm statistics)",
    )
    a(
        "--backbone-lr-scale",
        type=float,
        metavar="X",
        help="with --init-from: the backbone's learning rate is X times the classifier's (default: 1; e.g. 0.1 "
        "keeps the loaded features closer to where they were)",
    )
    a("--output", type=Path, default=Path("runs/default"), help="run folder (default: %(default)s)")
    a("--resume", nargs="?", const="", metavar="CKPT", help="continue from CKPT (default: OUTPUT/last.pt) exactly")
    a(
        "--overwrite",
        action="store_true",
        help="start a new run in an --output folder that holds an earlier run's checkpoints, whose files "
        "(checkpoints, logs, curves, TensorBoard) are removed as this run starts; without it such a folder "
        "is refused, so that a command run twice never replaces a trained model by accident",
    )
    a(
        "--stop-after",
        type=int,
        metavar="N",
        help="exit after N epochs of this job, counted from where it starts (for time-limited jobs: "
        "the same command with --resume goes on by N more each time)",
    )
    a(
        "--evaluate",
        metavar="CKPT",
        help="score CKPT on the validation split and exit (validation subset, autocast, memory format and batch "
        "size as in its training run, so it reproduces the accuracy in its manifest; --limit-val, --seed, "
        "--no-amp and the others, when given, override them)",
    )
    a("--dry-run", action="store_true", help="print the resolved configuration as JSON and exit")
    a("--cpu", action="store_true", help="ignore CUDA even if present")
    return ap


def given_flags(argv: list[str] | None) -> set[str]:
    """The destinations of the flags written on the command line (not those left at a default):
    what --resume and --evaluate must honour or refuse, since the run they continue or score has
    settings of its own."""
    ap = build_parser()
    for action in ap._actions:  # argparse has no public "was this given": parse again without defaults
        action.default = argparse.SUPPRESS
    return set(vars(ap.parse_known_args(argv)[0]))


_RUN: dict[str, Path] = {}  # the run folder of this process's run, for the interruption message


def what_is_kept() -> str:
    """What an interrupted run leaves: the checkpoint of its last completed epoch, if one exists."""
    if "output" not in _RUN:
        return "nothing was written"
    from .run_folder import kept_checkpoint

    last = kept_checkpoint(_RUN["output"])
    if last:
        return f"the last completed epoch's checkpoint ({last}) is intact (continue with --resume)"
    return "no epoch of this run was completed, so it wrote no checkpoint"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.given = given_flags(argv)
    if not (args.evaluate or args.dry_run):  # those write nothing in the run folder
        _RUN["output"] = Path(args.output)
    from rn50.errors import PipelineError

    try:
        check_flags(args)
        return _run(args)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def refuse_run(args: argparse.Namespace, cfg: Any) -> None:
    """ConfigError for a run that would not start for its flags and run folder: --resume with
    --init-from or --overwrite, or a new run into a folder holding an earlier one without
    --overwrite. Asked by the run and by --dry-run alike."""
    from .config import ConfigError
    from .run_folder import earlier_checkpoints

    if args.resume is not None and (args.init_from is not None or args.overwrite):
        other = "--init-from starts a new one from a weights file" if args.init_from else "--overwrite starts a new one"
        raise ConfigError(f"--resume continues a run from its own checkpoint, {other}: give one of them")
    earlier = earlier_checkpoints(Path(cfg.output)) if args.resume is None else []
    if earlier and not args.overwrite:
        raise ConfigError(
            f"{cfg.output} holds an earlier run ({', '.join(earlier)}): continue it with --resume, "
            "replace it with --overwrite, or choose another --output"
        )


def _run(args: argparse.Namespace) -> int:
    import torch

    cuda = torch.cuda.is_available() and not args.cpu
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.dry_run:
        cfg = resolve(args, world, cuda)
        refuse_run(args, cfg)
        if args.init_from is not None:  # the real run reads it before any training: so does a dry run
            from .pretrained import read_weights

            read_weights(args.init_from)
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    from . import distributed
    from .loop import Trainer

    d = distributed.init(cpu=args.cpu)
    try:
        if args.evaluate:
            return Trainer.evaluate_checkpoint(args, d)
        cfg = resolve(args, d.world, d.device.type == "cuda")
        refuse_run(args, cfg)
        state = None
        if args.resume is not None:
            cfg, state = Trainer.load_resume(args, cfg)
        trainer = Trainer(cfg, d, state)
        trainer.fit(stop_after=args.stop_after)
        return 0
    finally:
        distributed.shutdown(d)


if __name__ == "__main__":
    from rn50.interrupt import run_command

    sys.exit(run_command(main, what_is_kept))
