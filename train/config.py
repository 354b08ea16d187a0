"""The run configuration: one frozen dataclass that the trainer, ``--resume``, ``--evaluate`` and
``--dry-run`` share, built from the command line by :func:`resolve`.

A setting exists once, as a field of :class:`RunConfig`: a flag that is parsed but not copied
into it, or a field that nothing reads, shows up as a type error (``RunConfig(...)`` rejects an
unknown keyword, ``cfg.name`` an unknown attribute) instead of a setting that silently does
nothing. Checkpoints store it as a plain dict (``manifest["train_config"]``, JSON-readable);
:meth:`RunConfig.from_dict` reads those back, including ones written before a field existed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rn50.errors import CheckpointError, DataError, PipelineError
from rn50.flags import AT_LEAST_1, Range, flag_problem
from rn50.preprocess import MIN_IMAGE_SIZE

from .recipe import BASE_LR, FINETUNE_EPOCHS, FINETUNE_LR_PER_256, FINETUNE_WARMUP_FRACTION, PRESETS

# header-check every image before training only up to this many files: seconds for Fashion-MNIST's
# 70,000, but a re-read of the whole data set before every run for ImageNet's 1.28M
CHECK_IMAGES_AUTO_MAX = 200_000

DEFAULT_DATA = "data/fashion-mnist"
DEFAULT_MAX_BAD_IMAGES = 100  # bad images a run may leave out (--max-bad-images)
MIN_CROP_SCALE = 0.08  # the recipe's random-resized-crop area floor, where a profile sets none
SYNTHETIC_CLASSES = 1000  # ImageNet's, for throughput runs of the full-size classifier

_GPU: dict[str, Any] = dict(
    image_size=224,
    preset=90,
    batch_size=256,
    amp=True,
    amp_dtype="fp16",
    compile=True,
    memory_format="channels_last",
    data_backend="dali-gpu",
    limit_train=None,
)

PROFILES: dict[str, dict[str, Any]] = {
    "gpu": _GPU,
    # The gpu profile for small source images (Fashion-MNIST's 28 px, CIFAR's 32 px): 224 px crops
    # of a 28 px image spend most of their compute on interpolated pixels, so 112 px crops (ResNet50
    # still ends on a 4x4 map) give about four times the epochs per minute, and a 30 % crop floor
    # keeps enough of the source for its classes (the recipe's 8 % keeps about 8x8 source pixels).
    # The recipe's optimizer, lr rule, cosine schedule, label smoothing and AMP are unchanged; the
    # epoch count is sized for about ten minutes on one H100 (docs/training.md, Profiles).
    "gpu-small": dict(_GPU, image_size=112, epochs=60, min_crop_scale=0.3),
    # amp "native-bf16": bf16 autocast only where the CPU computes bf16 natively (AVX512-BF16 or
    # AMX: 1.27x the fp32 step rate measured on a 2-core EPYC); elsewhere emulated bf16 is slower
    # than fp32, so it stays off
    "cpu": dict(
        image_size=32,
        epochs=2,
        batch_size=64,
        amp="native-bf16",
        amp_dtype="bf16",
        compile=False,
        memory_format="channels_last",
        data_backend="dali-cpu",
        limit_train=None,
        min_crop_scale=0.5,
        warmup_epochs=0.1,
    ),
}


class ConfigError(PipelineError):
    """Flags that contradict each other or cannot apply to this run."""


# Every numeric flag of python -m train, by its option string: checked when given (a default is in
# range), before any work, so that a value the code downstream would divide by, loop over or hand
# to DALI fails as one error line naming the flag rather than as a traceback mid-run or, worse, a
# run that silently trains something else (an lr of 0, a NaN checkpoint accuracy from 0 validation
# images). Values that are legal but surprising (0 workers, no momentum, a whole-image crop, more
# warmup than epochs) stay legal (rn50/flags.py).
FLAG_RANGES: dict[str, Range] = {
    "--epochs": AT_LEAST_1,
    "--batch-size": Range(lo=2, why="batch normalisation trains on batch statistics, which one image lacks"),
    "--lr": Range(lo=0, lo_open=True),
    "--momentum": Range(lo=0, hi=1, hi_open=True),
    "--weight-decay": Range(lo=0),
    "--label-smoothing": Range(lo=0, hi=1, hi_open=True, why="at 1 every target is uniform"),
    "--mixup": Range(lo=0, why="0: off"),
    "--warmup-epochs": Range(lo=0),
    "--image-size": Range(lo=MIN_IMAGE_SIZE, message=f"too small (ResNet50 needs at least {MIN_IMAGE_SIZE} px)"),
    "--min-crop-scale": Range(lo=0, hi=1, lo_open=True, why="a fraction of the image's area"),
    "--workers": Range(lo=0),
    "--seed": Range(lo=0, hi=2**32 - 1, why="NumPy's seed range"),
    "--limit-train": AT_LEAST_1,
    "--limit-val": AT_LEAST_1,
    "--synthetic-steps": AT_LEAST_1,
    "--num-classes": Range(lo=2, why="a classifier tells at least two classes apart"),
    "--backbone-lr-scale": Range(lo=0),
    "--stop-after": AT_LEAST_1,
    "--max-bad-images": Range(lo=0, why="0: the first bad image stops the run"),
}


def check_flags(args: argparse.Namespace) -> None:
    """ConfigError ``--flag VALUE: must be ...`` for the first numeric flag outside its range, or
    for an ``--output`` run folder that cannot be one (a file, a device, under a file, not
    writable), before any data is read. ``--evaluate`` writes nothing there and is not held to it."""
    why = flag_problem(args, FLAG_RANGES)
    if why:
        raise ConfigError(why)
    if not getattr(args, "evaluate", False):
        from rn50.atomic import unwritable_reason

        # the run folder's first file: its own path then has to be a folder, or one that can be made
        why = unwritable_reason(Path(args.output) / "manifest.json")
        if why:
            raise ConfigError(f"--output {args.output}: {why} (the run folder, where checkpoints are written)")


@dataclass(frozen=True)
class RunConfig:
    profile: str
    data: str | None  # None: synthetic data without a folder
    data_backend: str
    preset: int | str  # 50, 90, 250 or "finetune"
    epochs: int
    batch_size: int
    world_size: int
    global_batch_size: int
    lr_per_256: float
    lr: float
    warmup_epochs: float
    momentum: float
    weight_decay: float
    label_smoothing: float
    mixup: float
    image_size: int
    min_crop_scale: float
    amp: bool
    amp_dtype: str
    tf32: bool
    compile: bool
    memory_format: str
    workers: int
    seed: int
    limit_train: int | None
    limit_val: int | None
    check_images: str
    synthetic_steps: int
    output: str
    num_classes: int | None = None  # synthetic data without a folder only; else the folder's classes
    init_from: str | None = None  # a weights file the run starts from (train/pretrained.py)
    freeze_backbone: bool = False
    backbone_lr_scale: float = 1.0
    # bad images the run may leave out (train.loaders.BadImages); 0: none. A run saved before the
    # setting existed resumes with the default, as the setting may change on --resume anyway
    max_bad_images: int = DEFAULT_MAX_BAD_IMAGES
    # what the recipe fixes, recorded so a manifest reads on its own; not settable
    lr_schedule: str = field(default="cosine", init=False)
    nesterov: bool = field(default=False, init=False)
    weight_decay_on: str = field(default="conv and fc weights (not BatchNorm gamma/beta, not the fc bias)", init=False)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def synthetic_without_data(self) -> bool:
        return self.data_backend == "synthetic" and (self.data is None or not Path(self.data).is_dir())

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str) -> RunConfig:
        """Read a saved ``train_config``. Fields added since it was written take the value the run
        had in effect (``num_classes``: 1,000 for synthetic runs, which was then fixed; no weights
        file, nothing frozen); a key this version does not know is an error, since resuming
        without a setting that was in effect would silently change the run."""
        if not isinstance(d, dict):
            raise CheckpointError(f"{where}: train_config is a {type(d).__name__}, not a dict")
        fixed = {f.name for f in dataclasses.fields(cls) if not f.init}
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(k for k in d if k not in known and k not in fixed)
        if unknown:
            raise CheckpointError(
                f"{where}: train_config has setting(s) this version does not know: "
                f"{', '.join(unknown)} (written by a newer version?)"
            )
        kw = {k: v for k, v in d.items() if k in known}
        if "num_classes" not in kw and kw.get("data_backend") == "synthetic":
            kw["num_classes"] = SYNTHETIC_CLASSES
        try:
            return cls(**kw)
        except TypeError as e:
            raise CheckpointError(f"{where}: incomplete train_config: {e}") from None


def resolve(args: argparse.Namespace, world: int, cuda: bool) -> RunConfig:
    """Fill every unset flag from the profile and the recipe; returns the run configuration."""
    from .recipe import default_warmup, effective_lr, resolve_amp

    profile = args.profile if args.profile != "auto" else ("gpu" if cuda else "cpu")
    prof = PROFILES[profile]
    asked = _preset(args.preset)
    if args.num_classes is not None and (args.data is not None or args.data_backend != "synthetic"):
        raise ConfigError(
            "--num-classes applies to --data-backend synthetic without --data; with a data folder "
            "the classes are its class folders"
        )
    # a resumed run has its own settings for these (compared by resumed_config, not asked again)
    if args.init_from is None and args.resume is None and (args.freeze_backbone or args.backbone_lr_scale is not None):
        raise ConfigError("--freeze-backbone and --backbone-lr-scale apply to loaded weights: add --init-from PATH")
    if args.freeze_backbone and args.backbone_lr_scale is not None:
        raise ConfigError("--freeze-backbone trains the classifier only: --backbone-lr-scale has nothing to scale")
    # loaded weights default to the fine-tune preset: the recipe's lr would move them far in the first steps
    preset = asked or ("finetune" if args.init_from else prof.get("preset") or 90)
    if preset == "finetune":
        p_epochs, p_mix = FINETUNE_EPOCHS, 0.0
    else:
        p_epochs, _, p_mix = PRESETS[int(preset)]

    def pick(name: str, fallback: Any = None) -> Any:
        v = getattr(args, name)
        return v if v is not None else prof.get(name, fallback)

    batch = int(pick("batch_size"))
    # not given: the preset's when one is asked for; else the profile's, but for loaded weights
    # (the finetune preset) only when it is shorter (the cpu profile's 2 epochs; a GPU profile's
    # from-scratch length is not a fine-tuning schedule)
    if args.epochs is not None:
        epochs = int(args.epochs)
    elif asked:
        epochs = int(p_epochs)
    elif preset == "finetune":
        epochs = int(min(p_epochs, prof.get("epochs", p_epochs)))
    else:
        epochs = int(prof.get("epochs", p_epochs))
    global_batch = batch * world
    lr_per_256 = args.lr if args.lr is not None else (FINETUNE_LR_PER_256 if preset == "finetune" else BASE_LR)
    backend = _data_backend(args.data_backend, prof["data_backend"], cuda)
    if args.warmup_epochs is not None:
        warmup = float(args.warmup_epochs)
    elif preset == "finetune":
        warmup = FINETUNE_WARMUP_FRACTION * epochs
    else:
        # the recipe's rule (preset warmup at a global batch >= 512), else the profile's (the cpu
        # profile's short warmup for its small batch), else none
        warmup = float(default_warmup(PRESETS[int(preset)][1], global_batch) or prof.get("warmup_epochs", 0))
    return RunConfig(
        profile=profile,
        # absolute: the checkpoint's manifest records it, and export reads it from any folder
        data=os.path.abspath(args.data if args.data is not None else DEFAULT_DATA)
        if args.data is not None or backend != "synthetic"
        else None,
        data_backend=backend,
        preset=preset,
        epochs=epochs,
        batch_size=batch,
        world_size=world,
        global_batch_size=global_batch,
        lr_per_256=lr_per_256,
        lr=effective_lr(lr_per_256, global_batch),
        warmup_epochs=warmup,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        label_smoothing=args.label_smoothing,
        mixup=float(args.mixup if args.mixup is not None else p_mix),
        image_size=int(pick("image_size")),
        min_crop_scale=float(pick("min_crop_scale", MIN_CROP_SCALE)),
        amp=resolve_amp(pick("amp"), pick("amp_dtype"), cuda),
        amp_dtype=pick("amp_dtype"),
        tf32=cuda,
        compile=bool(pick("compile")),
        memory_format=pick("memory_format"),
        workers=int(args.workers if args.workers is not None else _default_workers()),
        seed=args.seed,
        limit_train=pick("limit_train"),
        limit_val=args.limit_val,
        check_images=args.check_images,
        synthetic_steps=args.synthetic_steps,
        output=str(args.output),
        num_classes=(args.num_classes or SYNTHETIC_CLASSES) if backend == "synthetic" and args.data is None else None,
        init_from=str(args.init_from) if args.init_from is not None else None,
        freeze_backbone=bool(args.freeze_backbone),
        backbone_lr_scale=float(args.backbone_lr_scale if args.backbone_lr_scale is not None else 1.0),
        max_bad_images=int(args.max_bad_images),
    )


# What --resume may change: how the run is executed, not what it computes (the data backend,
# threads, compile, the image check, autocast, memory format; a GPU run can go on on a CPU), and
# how many bad images it may leave out.
# The flags that need no field are the command's own. Every other flag given with --resume must
# equal the run's setting: a resumed run keeps its recipe, or it would no longer be the run its
# checkpoint and manifest describe.
RESUME_MAY_CHANGE = ("data_backend", "workers", "compile", "check_images", "amp", "memory_format", "max_bad_images")
_COMMAND_ONLY = {"output", "data", "epochs", "resume", "stop_after", "cpu", "dry_run", "evaluate", "init_from"}
_FIELD_OF_FLAG = {"lr": "lr_per_256"}  # --lr is per 256 images


def resumed_config(
    saved: RunConfig, cfg: RunConfig, given: set[str], where: str | os.PathLike[str], amp: object = None
) -> RunConfig:
    """The configuration a resumed run goes on with: ``saved`` (the checkpoint's), with the output
    folder, the data folder, the epoch count and the settings of :data:`RESUME_MAY_CHANGE` that were
    ``given`` on the command line taken from ``cfg`` (the command line's, resolved). ConfigError
    for any other flag given with another value than the run's, for another process count and for
    a switch to or from synthetic data. ``amp``: the --amp flag's value as given, resolved here with
    the run's autocast dtype."""
    from .recipe import resolve_amp

    cuda = cfg.tf32  # on exactly where CUDA is (resolve)
    differ = []
    for dest in sorted(given - _COMMAND_ONLY - set(RESUME_MAY_CHANGE)):
        name = _FIELD_OF_FLAG.get(dest, dest)
        if name in RunConfig.__dataclass_fields__ and getattr(cfg, name) != getattr(saved, name):
            differ.append(f"--{dest.replace('_', '-')} {getattr(cfg, name)} (the run has {getattr(saved, name)})")
    if differ:
        may = ", ".join("--" + f.replace("_", "-") for f in RESUME_MAY_CHANGE)
        raise ConfigError(
            f"{where}: a resumed run keeps the settings it was started with, and these differ: "
            + "; ".join(differ)
            + f". Only the output, data folder, epochs and {may} may change; to train with other settings, "
            "start a new run (--init-from this checkpoint starts from its weights)"
        )
    if cfg.world_size != saved.world_size:
        raise ConfigError(
            f"{where}: the run trains on {saved.world_size} process(es) (global batch {saved.global_batch_size}) "
            f"and this is {cfg.world_size}: resume it with as many (torchrun --nproc_per_node), so that its "
            "batches and learning rate stay the run's"
        )
    changes: dict[str, Any] = {f: getattr(cfg, f) for f in RESUME_MAY_CHANGE if f in given}
    backend = changes.get("data_backend", saved.data_backend)
    if backend != saved.data_backend and "synthetic" in (backend, saved.data_backend):
        raise ConfigError(
            f"{where}: --data-backend {changes['data_backend']}: the run trains on "
            f"{'synthetic data' if saved.data_backend == 'synthetic' else 'the images of ' + str(saved.data)}; "
            "a resumed run keeps its data (the backend may change among dali-gpu, dali-cpu and pytorch)"
        )
    if "amp" in given:
        changes["amp"] = resolve_amp(amp, saved.amp_dtype, cuda)  # with the run's dtype, not a profile's
    if "data_backend" not in changes and saved.data_backend == "dali-gpu" and not cuda:
        changes["data_backend"] = "dali-cpu"  # as a profile's dali-gpu does without CUDA
    if "amp" not in changes:
        changes["amp"] = resolve_amp(saved.amp, saved.amp_dtype, cuda)  # a CPU has no fp16 autocast
    return dataclasses.replace(
        saved,
        output=cfg.output,
        # the data may have moved since
        data=cfg.data if "data" in given else saved.data,  # cfg's: absolute
        epochs=cfg.epochs if "epochs" in given else saved.epochs,
        tf32=cuda,
        **changes,
    )


def _preset(asked: str | None) -> int | str | None:
    if asked is None or asked == "finetune":
        return asked
    return int(asked)


def _data_backend(asked: str | None, profile_default: str, cuda: bool) -> str:
    """The profile's dali-gpu falls back to dali-cpu without CUDA (``--profile gpu`` on a CPU
    machine); dali-gpu asked for with --data-backend is honoured or refused, never replaced."""
    if asked is None:
        return "dali-cpu" if profile_default == "dali-gpu" and not cuda else profile_default
    if asked == "dali-gpu" and not cuda:
        raise DataError(
            "--data-backend dali-gpu: CUDA is not available here (or --cpu was given); "
            "use --data-backend dali-cpu on this machine"
        )
    return asked


def _default_workers() -> int:
    from .loaders import default_workers

    return default_workers()


def should_check_images(mode: str, n_files: int) -> bool:
    """Header pre-scan: ``on``/``off``, or ``auto`` = only for data sets small enough that it is
    cheap (seconds). For ImageNet-sized sets the loaders name an undecodable file when DALI fails
    on its batch instead (see ``train.loaders.DaliLoader``)."""
    return mode == "on" or (mode == "auto" and n_files <= CHECK_IMAGES_AUTO_MAX)
