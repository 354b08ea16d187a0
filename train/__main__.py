"""python -m train: ResNet50 v1.5 with NVIDIA's recipe (SGD 0.875, lr 0.256/256, cosine,
warmup, WD 1/32768 off BatchNorm, label smoothing 0.1, MixUp with the 250-epoch preset),
AMP, channels_last, torch.compile, DALI, and torchrun/DDP.

Profiles (--profile auto picks gpu with CUDA, cpu without):
  gpu  the full recipe: 224 px, 90-epoch preset, batch 256 per GPU, AMP fp16 + dynamic loss
       scaling, channels_last, torch.compile, dali-gpu.
  cpu  a short run that finishes in under 15 minutes on 2 cores and still exercises the whole
       recipe: 32 px, 2 epochs over all training images, batch 64 (lr 0.064 by the linear
       rule), 0.1-epoch warmup, random-resized-crop area 50-100%, bf16 AMP where the CPU has
       native bf16 (else fp32), no compile, dali-cpu. See docs/training.md.
Any flag you pass overrides the profile.

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

CHECK_IMAGES_AUTO_MAX = 200_000

PROFILES: dict[str, dict[str, Any]] = {
    "gpu": dict(image_size=224, preset=90, batch_size=256, amp=True, amp_dtype="fp16", compile=True,
                memory_format="channels_last", data_backend="dali-gpu", limit_train=None),
    # amp "native-bf16": bf16 autocast only where the CPU computes bf16 natively (AVX512-BF16 or
    # AMX: 1.27x the fp32 step rate measured on a 2-core EPYC); elsewhere emulated bf16 is slower
    # than fp32, so it stays off
    "cpu": dict(image_size=32, epochs=2, batch_size=64, amp="native-bf16", amp_dtype="bf16", compile=False,
                memory_format="channels_last", data_backend="dali-cpu", limit_train=None,
                min_crop_scale=0.5, warmup_epochs=0.1),
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a("--data", type=Path, help="ImageNet-layout folder with train/<class>/ and val/<class>/ (default: data/fashion-mnist)")
    a("--data-backend", choices=["dali-gpu", "dali-cpu", "pytorch", "synthetic"], help="default: dali-gpu with CUDA, dali-cpu without; asking for dali-gpu without CUDA is an error")
    a("--profile", choices=["auto", "gpu", "cpu"], default="auto", help="defaults for the flags below (see above)")
    a("--preset", type=int, choices=[50, 90, 250], help="recipe preset: epochs (and MixUp 0.2 for 250)")
    a("--epochs", type=int, help="number of epochs (default: from the preset or profile)")
    a("--batch-size", type=int, help="images per process per step (global batch = this x processes)")
    a("--lr", type=float, default=0.256, help="learning rate per 256 images of global batch (default: %(default)s)")
    a("--momentum", type=float, default=0.875)
    a("--weight-decay", type=float, default=1 / 32768, help="on conv/fc weights only (default: 1/32768)")
    a("--label-smoothing", type=float, default=0.1)
    a("--mixup", type=float, help="MixUp alpha (default: 0.2 with --preset 250, else off)")
    a("--warmup-epochs", type=float,
      help="linear warmup length in epochs (default: the preset's, 2 or 5 for preset 250, when the global batch "
           "is >= 512; else the profile's: " + ", ".join(f"{PROFILES[k].get('warmup_epochs', 0):g} for {k}"
                                                        for k in ("cpu", "gpu")) + ")")
    a("--image-size", type=int, help="training/validation crop size in pixels")
    a("--min-crop-scale", type=float, help="smallest area fraction of the random resized crop (recipe: 0.08)")
    a("--amp", action=argparse.BooleanOptionalAction, help="automatic mixed precision (default: on with CUDA; on CPU, bf16 where the CPU has it natively)")
    a("--amp-dtype", choices=["fp16", "bf16"], help="fp16 uses dynamic loss scaling (default: fp16 on GPU)")
    a("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the model (default: on with CUDA)")
    a("--memory-format", choices=["channels_last", "contiguous"])
    a("--workers", type=int, help="data threads/workers per process")
    a("--check-images", choices=["auto", "on", "off"], default="auto",
      help="header-check every image before training: auto = only when the selected files are at most "
           f"{CHECK_IMAGES_AUTO_MAX:,} (not for ImageNet's 1.2M); without it an undecodable file is still "
           "named, when DALI fails on its batch (default: %(default)s)")
    a("--seed", type=int, default=0)
    a("--limit-train", type=int, help="train on a class-balanced subset of N images")
    a("--limit-val", type=int, help="validate on a class-balanced subset of N images")
    a("--synthetic-steps", type=int, default=100, help="steps per epoch with --data-backend synthetic")
    a("--num-classes", type=int, default=1000, help="classes for --data-backend synthetic without --data")
    a("--output", type=Path, default=Path("runs/default"), help="run folder (default: %(default)s)")
    a("--resume", nargs="?", const="", metavar="CKPT", help="continue from CKPT (default: OUTPUT/last.pt) exactly")
    a("--stop-after", type=int, metavar="N", help="exit after N epochs of the schedule (for time-limited jobs; continue with --resume)")
    a("--evaluate", metavar="CKPT", help="score CKPT on the validation split and exit (autocast, memory format and batch size as in its training run, so it reproduces the accuracy in its manifest; --no-amp scores it in fp32)")
    a("--dry-run", action="store_true", help="print the resolved configuration as JSON and exit")
    a("--cpu", action="store_true", help="ignore CUDA even if present")
    return ap


def resolve(args: argparse.Namespace, world: int, cuda: bool) -> dict[str, Any]:
    """Fill every unset flag from the profile and the recipe; returns the run configuration."""
    from .recipe import PRESETS, default_warmup, effective_lr, resolve_amp

    profile = args.profile if args.profile != "auto" else ("gpu" if cuda else "cpu")
    prof = PROFILES[profile]
    preset = args.preset or prof.get("preset") or 90
    p_epochs, p_warm, p_mix = PRESETS[preset]

    def pick(name: str, fallback: Any = None) -> Any:
        v = getattr(args, name)
        return v if v is not None else prof.get(name, fallback)

    batch = pick("batch_size")
    epochs = args.epochs or (p_epochs if args.preset else prof.get("epochs", p_epochs))
    global_batch = batch * world
    cfg = {
        "profile": profile,
        "data": str(args.data or Path("data/fashion-mnist")),
        "data_backend": _data_backend(args.data_backend, prof["data_backend"], cuda),
        "preset": preset,
        "epochs": int(epochs),
        "batch_size": int(batch),
        "world_size": world,
        "global_batch_size": global_batch,
        "lr_per_256": args.lr,
        "lr": effective_lr(args.lr, global_batch),
        "lr_schedule": "cosine",
        # --warmup-epochs, else the recipe's rule (preset warmup at a global batch >= 512), else
        # the profile's (the cpu profile's short warmup for its small batch), else none
        "warmup_epochs": float(args.warmup_epochs if args.warmup_epochs is not None
                               else default_warmup(p_warm, global_batch) or prof.get("warmup_epochs", 0)),
        "momentum": args.momentum,
        "nesterov": False,
        "weight_decay": args.weight_decay,
        "weight_decay_on": "conv and fc weights (not BatchNorm gamma/beta, not the fc bias)",
        "label_smoothing": args.label_smoothing,
        "mixup": float(args.mixup if args.mixup is not None else p_mix),
        "image_size": int(pick("image_size")),
        "min_crop_scale": float(pick("min_crop_scale", 0.08)),
        "amp": resolve_amp(pick("amp"), pick("amp_dtype"), cuda),
        "amp_dtype": pick("amp_dtype"),
        "tf32": cuda,
        "compile": bool(pick("compile")),
        "memory_format": pick("memory_format"),
        "workers": int(args.workers if args.workers is not None else _default_workers()),
        "seed": args.seed,
        "limit_train": pick("limit_train"),
        "limit_val": args.limit_val,
        "check_images": args.check_images,
        "synthetic_steps": args.synthetic_steps,
        "output": str(args.output),
    }
    return cfg


def _data_backend(asked: str | None, profile_default: str, cuda: bool) -> str:
    """The profile's dali-gpu falls back to dali-cpu without CUDA (``--profile gpu`` on a CPU
    machine); dali-gpu asked for with --data-backend is honoured or refused, never replaced."""
    if asked is None:
        return "dali-cpu" if profile_default == "dali-gpu" and not cuda else profile_default
    if asked == "dali-gpu" and not cuda:
        from rn50.errors import DataError

        raise DataError("--data-backend dali-gpu: CUDA is not available here (or --cpu was given); "
                        "use --data-backend dali-cpu on this machine")
    return asked


def _default_workers() -> int:
    from .loaders import default_workers

    return default_workers()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from rn50.errors import PipelineError

    try:
        return _run(args)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the last completed epoch's checkpoint is intact", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    import torch

    cuda = torch.cuda.is_available() and not args.cpu
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.dry_run:
        print(json.dumps(resolve(args, world, cuda), indent=2))
        return 0
    from . import distributed
    from .loop import Trainer

    d = distributed.init(cpu=args.cpu)
    try:
        if args.evaluate:
            return Trainer.evaluate_checkpoint(args, d)
        cfg = resolve(args, d.world, d.device.type == "cuda")
        if args.resume is not None:
            cfg, state = Trainer.load_resume(args, cfg)
        else:
            state = None
        trainer = Trainer(cfg, d, state)
        trainer.fit(stop_after=args.stop_after)
        return 0
    finally:
        distributed.shutdown(d)


if __name__ == "__main__":
    sys.exit(main())
