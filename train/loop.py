"""The training loop: epochs, validation, checkpoints, metrics, curves."""

from __future__ import annotations

import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rn50.atomic import remove_stale_temporaries, write_json, write_text
from rn50.checkpoint import load_checkpoint, load_model, save_checkpoint, state_dict_mismatch
from rn50.errors import CheckpointError, DataError, PipelineError
from rn50.layout import bad_files, bad_files_message, balanced_subset, load_dataset, scan_split, suffix_format
from rn50.manifest import new_manifest
from rn50.metrics import topk_correct
from rn50.model import build_model
from rn50.plots import training_curves
from rn50.preprocess import Preprocessing

from . import distributed
from .config import DEFAULT_DATA, RunConfig, resumed_config, should_check_images
from .loaders import BadImages, Shard, make_loader
from .pretrained import apply_weights, describe, freeze_backbone, hold_backbone_statistics, read_weights
from .recipe import AMP_DTYPES, WarmupCosine, make_optimizer, mixup, resolve_amp, soft_cross_entropy
from .run_folder import ATOMIC_FILES, holds_a_run, kept_checkpoint, remove_run_files
from .steplog import StepLogger


class TrainingError(PipelineError):
    """Training cannot go on (non-finite loss, ...)."""


def rng_state() -> dict[str, Any]:
    st = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate((3, tuple(st["python"]), None))
    np.random.set_state(("MT19937", st["numpy"].numpy().astype(np.uint32), 624, 0, 0.0))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


class LoaderWaits:
    """Iterates a loader for one epoch and times, on the host, how long the training loop waits
    for it: for the first batch (the data pipeline's start), for the end (its teardown) and in
    all. On a GPU the loop is at most about a step ahead of the device (the loss scaler reads its
    overflow flag every step), so host waiting is close to time the GPU spends without work."""

    def __init__(self, loader: Any):
        self.loader = loader
        self.first_s = self.end_s = self.wait_s = 0.0

    def __iter__(self):
        it = iter(self.loader)
        n = 0
        try:
            while True:
                t = time.perf_counter()
                try:
                    batch = next(it)
                except StopIteration:
                    self.end_s = time.perf_counter() - t
                    self.wait_s += self.end_s
                    return
                dt = time.perf_counter() - t
                self.wait_s += dt
                if n == 0:
                    self.first_s = dt
                n += 1
                yield batch
        finally:
            close = getattr(it, "close", None)
            if close is not None:  # a loop left early ends the loader's epoch now, not at the next GC
                close()

    def record(self, epoch: int) -> dict[str, Any]:
        rec: dict[str, Any] = {"first_s": self.first_s, "wait_s": self.wait_s, "end_s": self.end_s}
        # DALI's own figures for this epoch's pipeline: built ahead or not, seconds in Pipeline.build
        stats = [s for s in getattr(self.loader, "stats", []) if s["epoch"] == epoch]
        if stats:
            rec.update(built_ahead=stats[-1]["built_ahead"], build_s=stats[-1]["build_s"])
        return rec


def rate(v: float) -> str:
    """Images per second as the epoch line shows them: whole numbers, two digits below 10."""
    return f"{v:.0f}" if v >= 10 else f"{v:.2g}"


class Trainer:
    def __init__(self, cfg: RunConfig, d: distributed.Dist, resume: dict[str, Any] | None = None):
        self.cfg, self.d = cfg, d
        # "elapsed" in the history counts from here: image checks, loaders and model set-up included
        self._t0, self._elapsed_before = time.time(), 0.0
        self.out = Path(cfg.output)
        if d.main:  # what a killed write of a previous run left behind (rn50.atomic.atomic_path)
            remove_stale_temporaries(self.out, ATOMIC_FILES)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        if d.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True
        self.p = Preprocessing.for_image_size(cfg.image_size, train_scale=(cfg.min_crop_scale, 1.0))
        # a weights file is read and checked before the data, so one that does not fit costs no waiting
        init = read_weights(cfg.init_from) if cfg.init_from is not None and resume is None else None
        shard = Shard(d.rank, d.world)
        # the images the run leaves out (--max-bad-images); a resumed run starts from its record
        self.bad = BadImages(cfg.max_bad_images)
        if resume is not None:
            self.bad.restore(resume["manifest"].get("bad_images"))
        if cfg.synthetic_without_data:
            assert cfg.num_classes is not None
            self.classes = [f"class_{i}" for i in range(cfg.num_classes)]
            tr_files, tr_labels, va_files, va_labels = [], [], [], []
        else:
            assert cfg.data is not None
            train, val = load_dataset(cfg.data)
            self.classes = train.classes
            tr_files, tr_labels = balanced_subset(train.files, train.labels, cfg.limit_train, cfg.seed)
            va_files, va_labels = balanced_subset(val.files, val.labels, cfg.limit_val, cfg.seed)
            if cfg.check_images != "off":
                # headers, and the pixels of the formats DALI decodes silently when corrupt (see
                # rn50.layout.check_header); every rank checks, so every rank leaves out the same
                # files (and trains the same number of steps), or stops. A set too large for the
                # full check still gets it for its files that are not JPEG or PNG.
                everything = tr_files + va_files
                found = bad_files(
                    everything
                    if should_check_images(cfg.check_images, len(everything))
                    else [f for f in everything if suffix_format(f) not in ("JPEG", "PNG")],
                    progress=d.main,
                    resize_shorter=self.p.resize_size,
                )
                self.bad.add(found, bad_files_message, "header check", announce=d.main)
            # what the header check found (this run's or, resumed, the run's) is not in the run at all
            drop = {f for f, where in self.bad.where.items() if where == "header check"}
            tr_files, tr_labels = _without(tr_files, tr_labels, drop)
            va_files, va_labels = _without(va_files, va_labels, drop)
        common = dict(
            batch_size=cfg.batch_size,
            device=d.device,
            shard=shard,
            seed=cfg.seed,
            workers=cfg.workers,
            num_classes=len(self.classes),
            synthetic_steps=cfg.synthetic_steps,
            bad=self.bad,
        )
        # epochs: a DALI training loader builds each next epoch's pipeline while an epoch runs
        self.train_loader = make_loader(
            cfg.data_backend, tr_files, tr_labels, self.p, train=True, epochs=cfg.epochs, **common
        )
        self.val_loader = (
            make_loader(cfg.data_backend, va_files, va_labels, self.p, train=False, **common) if va_files else None
        )
        self.steps_per_epoch = len(self.train_loader)
        if self.steps_per_epoch == 0:
            raise DataError(f"{cfg.data}: not enough training images for one batch of {cfg.batch_size}")
        if self.val_loader is not None and should_check_images(cfg.check_images, len(va_files)):
            # one decoding pass over the validation images now, so that one the header check cannot
            # fault (a whole JPEG with corrupt data) is left out (or stops the run, past
            # --max-bad-images) before the first epoch, not after it
            for _ in self.val_loader:
                pass

        model = build_model(len(self.classes)).to(d.device)
        # what the run started from: a weights file (path, sha256, what was loaded), recorded in every manifest
        self.init_record: dict[str, Any] | None = None
        if init is not None:
            self.init_record = apply_weights(model, init, self.classes)
            if d.main:
                print(describe(self.init_record, len(self.classes)), file=sys.stderr)
        elif resume is not None:
            self.init_record = resume["manifest"].get("init_from")
        if cfg.freeze_backbone:
            freeze_backbone(model)
        self.channels_last = cfg.memory_format == "channels_last"
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model  # the plain module: what checkpoints and exports see
        self.opt = make_optimizer(model, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.backbone_lr_scale)
        self.sched = WarmupCosine(
            cfg.lr, cfg.epochs * self.steps_per_epoch, int(round(cfg.warmup_epochs * self.steps_per_epoch))
        )
        self.amp_dtype = AMP_DTYPES[cfg.amp_dtype]
        self.scaler = torch.amp.GradScaler(d.device.type, enabled=cfg.amp and self.amp_dtype == torch.float16)
        self.start_epoch, self.step, self.best_top1, self.history = 0, 0, -1.0, []
        self.accuracy: dict[str, Any] = {}  # the run manifest's: the last completed epoch's, with the best top-1
        if resume is not None:
            self._restore(resume)
            was = int((resume["manifest"].get("train_config") or {}).get("epochs", cfg.epochs))
            if was != cfg.epochs and d.main and self.start_epoch < cfg.epochs:
                # the cosine's length changes, so the learning rate jumps at the resumed step
                before = WarmupCosine(cfg.lr, was * self.steps_per_epoch, self.sched.warmup)(self.step)
                print(
                    f"the schedule is now {cfg.epochs} epochs (the run had {was}): the cosine learning "
                    f"rate at step {self.step} goes from {before:.4g} to {self.sched(self.step):.4g}",
                    file=sys.stderr,
                )
        net: nn.Module = model
        if d.world > 1:
            net = nn.parallel.DistributedDataParallel(
                model, device_ids=[d.device.index] if d.device.type == "cuda" else None
            )
        if cfg.compile:
            net = torch.compile(net)
        self.net = net
        self.tb = None
        self.steplog: StepLogger | None = None
        # a resume with no epoch left to train changes nothing in the run folder
        if d.main and not (resume is not None and self.start_epoch >= cfg.epochs):
            if resume is None:
                # a new run in an earlier run's folder (--overwrite, or one that never finished an
                # epoch) starts from an empty one: none of that run's files outlives this start, so a
                # run that fails later leaves its own files only, never a mix of two runs
                removed = remove_run_files(self.out) if holds_a_run(self.out) else []
                if removed:
                    print(f"{self.out}: removed the earlier run's {', '.join(removed)}", file=sys.stderr)
            self.out.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step: a resumed run hides what the interrupted one logged past its checkpoint
                purge = self.step + 1 if resume is not None else None
                self.tb = SummaryWriter(str(self.out / "tb"), purge_step=purge)
            except ImportError:  # pragma: no cover - tensorboard is a dependency
                self.tb = None
            self.steplog = StepLogger(
                self.out / "steps.jsonl",
                cfg.epochs * self.steps_per_epoch,
                self.steps_per_epoch,
                start_step=self.step,
                tb=self.tb,
            )
            write_json(self.out / "manifest.json", self._run_manifest())

    # ------------------------------------------------------------------ resume
    @staticmethod
    def load_resume(args, cfg: RunConfig) -> tuple[RunConfig, dict[str, Any]]:
        path = Path(args.resume) if args.resume else Path(cfg.output) / "last.pt"
        obj = load_checkpoint(path)
        if "optimizer" not in obj or "epoch" not in obj:
            raise CheckpointError(
                f"{path}: has no training state to resume from (a best.pt holds the weights only: resume from last.pt)"
            )
        lacks = [k for k in ("scaler", "step", "rng") if k not in obj]
        if lacks or "train_config" not in obj["manifest"]:
            raise CheckpointError(
                f"{path}: incomplete training state (lacks "
                f"{', '.join(lacks or ['the manifest train_config'])}): cannot resume from it"
            )
        saved = RunConfig.from_dict(obj["manifest"]["train_config"], f"{path} (embedded manifest)")
        given = set(getattr(args, "given", set()))
        if getattr(args, "profile", None) == "auto":
            given.discard("profile")  # auto names no profile: it picks one for the machine
        return resumed_config(saved, cfg, given, path, amp=args.amp), {**obj, "_path": str(path)}

    def _restore(self, obj: dict[str, Any]) -> None:
        path = obj.get("_path", "resume checkpoint")
        was = obj.get("manifest", {}).get("classes")
        if isinstance(was, list) and len(was) == len(self.classes) and was != self.classes:
            # the same count under other names: each output would go on under another class's name
            changed = [f"{a!r} -> {b!r}" for a, b in zip(was, self.classes) if a != b]
            raise CheckpointError(
                f"{path}: the run was trained on other classes than {self.cfg.data} holds "
                f"(output by output: {', '.join(changed[:5])}{' ...' if len(changed) > 5 else ''}); "
                "resume on the run's data, or start a new run (--init-from a checkpoint keeps its weights)"
            )
        fc = obj["model"].get("fc.weight")
        n = int(fc.shape[0]) if isinstance(fc, torch.Tensor) and fc.dim() == 2 else None
        if n is not None and n != len(self.classes):
            raise CheckpointError(f"{path}: resume checkpoint has {n} classes but the data has {len(self.classes)}")
        # shapes first: load_state_dict's own error is a multi-line traceback
        why = state_dict_mismatch(self.model.state_dict(), obj["model"])
        if why is not None:
            raise CheckpointError(
                f"{path}: its weights do not fit ResNet50 v1.5 with {len(self.classes)} classes: {why}"
            )
        self.model.load_state_dict(obj["model"])
        try:
            self.opt.load_state_dict(obj["optimizer"])
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: its optimizer state does not fit this model: {e}") from e
        for group in self.opt.param_groups:
            for prm in group["params"]:
                buf = self.opt.state.get(prm, {}).get("momentum_buffer")
                if buf is not None and buf.shape != prm.shape:
                    raise CheckpointError(
                        f"{path}: its optimizer state does not fit this model: a momentum "
                        f"buffer has shape {tuple(buf.shape)} for a parameter of shape "
                        f"{tuple(prm.shape)}"
                    )
        if obj["scaler"]:  # empty from a run without fp16 loss scaling (which a resume may add: --amp)
            self.scaler.load_state_dict(obj["scaler"])
        self.start_epoch, self.step = int(obj["epoch"]) + 1, int(obj["step"])
        self.best_top1 = float(obj.get("best_top1", -1.0))
        self.history = list(obj.get("history", []))
        if self.history and self.history[-1].get("epoch") == int(obj["epoch"]):
            # a run written when the records counted epochs from 0 (its last record is the checkpoint's own epoch)
            self.history = [{**r, "epoch": int(r["epoch"]) + 1} for r in self.history]
        acc = obj.get("manifest", {}).get("accuracy")
        if acc:  # kept in the run manifest until an epoch of this job replaces it
            self.accuracy = {"best_top1": self.best_top1, **acc}
        # a history without "elapsed" (training time only, no set-up): its epochs' own times are the best estimate
        self._elapsed_before = (
            float(self.history[-1].get("elapsed", sum(r.get("time", 0.0) for r in self.history)))
            if self.history
            else 0.0
        )
        set_rng_state(obj["rng"])

    # ------------------------------------------------------------------ loop
    def fit(self, stop_after: int | None = None) -> None:
        cfg, d = self.cfg, self.d
        if d.main:
            print(
                f"training {cfg.epochs} epochs x {self.steps_per_epoch} steps, global batch "
                f"{cfg.global_batch_size}, lr {cfg.lr:.4g}, {cfg.image_size} px, {cfg.data_backend}, "
                f"device {d.device}, amp {cfg.amp and cfg.amp_dtype}, compile {cfg.compile}",
                file=sys.stderr,
            )
        if self.start_epoch >= cfg.epochs and d.main:
            print(
                f"nothing to train: the run in {self.out} has done all {cfg.epochs} epochs of its schedule "
                "(--epochs N with --resume lengthens it)",
                file=sys.stderr,
            )
        # --stop-after counts the epochs of this job, so that the same command, repeated with
        # --resume (a chain of time-limited jobs), goes on by N epochs each time
        end = cfg.epochs if stop_after is None else min(cfg.epochs, self.start_epoch + stop_after)
        try:
            for epoch in range(self.start_epoch, end):
                self._fit_epoch(epoch)
        finally:
            # a data pipeline built ahead for an epoch that will not run (--stop-after, an error,
            # Ctrl-C) goes with the run, not with the interpreter
            for loader in (self.train_loader, self.val_loader):
                if loader is not None:
                    loader.close()
        if d.main and self.tb is not None:
            self.tb.close()

    def _fit_epoch(self, epoch: int) -> None:
        cfg, d = self.cfg, self.d
        t0 = time.time()
        loss, lr, n_img, waits = self.train_epoch(epoch)
        train_time = time.time() - t0
        top1, top5, n_val = self.evaluate() if self.val_loader is not None else (float("nan"),) * 2 + (0,)
        rec = {
            "epoch": epoch + 1,  # counted from 1, as the console, manifests, TensorBoard and steps.jsonl count
            "train_loss": loss,
            "lr": lr,
            "img_per_s": n_img * d.world / train_time,
            "val_top1": top1,
            "val_top5": top5,
            "val_images": n_val,
            "time": time.time() - t0,
            # wall seconds since the run started (set-up and compilation included; a resumed
            # run adds its own time to the elapsed time of the epochs it continues from)
            "elapsed": self._elapsed_before + time.time() - self._t0,
            "loader": waits,
        }
        self.history.append(rec)
        if d.main:
            self._save(epoch, top1, top5, n_val)
            print(
                f"epoch {epoch + 1}/{cfg.epochs}  loss {loss:.4f}  lr {lr:.4g}  {rate(rec['img_per_s'])} img/s  "
                f"val top-1 {top1:.2f}  top-5 {top5:.2f}  ({rec['time']:.0f} s; waited "
                f"{waits['wait_s']:.1f} s for data, {waits['first_s']:.1f} s of it for the first batch)"
                + (f"; {len(self.bad)} bad image(s) left out (manifest.json: bad_images)" if len(self.bad) else ""),
                file=sys.stderr,
            )

    def train_epoch(self, epoch: int) -> tuple[float, float, int, dict[str, Any]]:
        from tqdm import tqdm

        cfg, d = self.cfg, self.d
        self.net.train()
        if cfg.freeze_backbone:
            hold_backbone_statistics(self.model)
        self.train_loader.set_epoch(epoch)
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + epoch)
        total, count, lr = torch.zeros((), device=d.device), 0, 0.0
        waits = LoaderWaits(self.train_loader)
        bar = tqdm(
            waits,
            total=self.steps_per_epoch,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            disable=not d.main,
            file=sys.stderr,
            mininterval=2.0,
            unit="step",
        )
        if self.steplog is not None:
            self.steplog.begin_epoch()
        for i, (x, y) in enumerate(bar):
            lr = self.sched.apply(self.opt, self.step)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            x, target = mixup(x, y, len(self.classes), cfg.mixup, cfg.label_smoothing, gen)
            with torch.autocast(d.device.type, dtype=self.amp_dtype, enabled=cfg.amp):
                logits = self.net(x)
            loss = soft_cross_entropy(logits, target)
            self.opt.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
            total += loss.detach()
            count += 1
            self.step += 1
            if self.steplog is not None:
                self.steplog.step(self.step, loss, lr, int(x.shape[0]) * d.world)
            if d.device.type == "cpu" or i % 50 == 0:
                v = loss.item()
                if not math.isfinite(v):
                    last = kept_checkpoint(self.out)
                    raise TrainingError(
                        f"loss is {v} at epoch {epoch + 1}, step {i + 1}: training diverged "
                        "(lower --lr, or check the data); "
                        + (f"the last good checkpoint ({last}) is untouched" if last else "no checkpoint was written")
                    )
                bar.set_postfix(loss=f"{v:.3f}", lr=f"{lr:.3g}", refresh=False)
        mean = float(total) / max(count, 1)
        if not math.isfinite(mean):
            raise TrainingError(f"mean loss of epoch {epoch + 1} is {mean}: training diverged")
        loss_sum, n = distributed.all_sum([mean * count, count], d)
        return loss_sum / max(n, 1), lr, count * cfg.batch_size, waits.record(epoch)

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float, int]:
        # The plain module, not the compiled (or DDP) one: validation is a short forward-only pass,
        # and torch.compile would build two more graphs for it (eval mode, and the short last
        # batch), which costs more than it saves. Each rank scores its own shard either way.
        return run_eval(self.model, self.val_loader, self.d, self.cfg.amp, self.amp_dtype, self.channels_last)

    # ------------------------------------------------------------------ files
    def _source(self, epochs_done: int) -> dict[str, Any]:
        """What a checkpoint or run manifest came from: the data folder (None for synthetic data
        without one), the run folder and the number of epochs trained. Export's manifests record
        their source file (path and sha256) the same way, under "source"."""
        synthetic = self.cfg.synthetic_without_data
        return {
            "data": None if synthetic else str(self.cfg.data),
            "data_backend": self.cfg.data_backend,
            "run": str(self.out),
            "epoch": epochs_done,
        }

    def _init_extra(self) -> dict[str, Any]:
        return {} if self.init_record is None else {"init_from": self.init_record}

    def _run_manifest(self) -> dict[str, Any]:
        m = new_manifest(
            "run",
            classes=self.classes,
            preprocessing=self.p,
            precision="fp32",
            train_config=self.cfg.to_dict(),
            history=self.history,
            bad_images=self.bad.records(),
            **self._init_extra(),
        )
        m["source"] = self._source(self.history[-1]["epoch"] if self.history else 0)
        if self.accuracy:
            m["accuracy"] = self.accuracy
        return m

    def _save(self, epoch: int, top1: float, top5: float, n_val: int) -> None:
        acc = {
            "top1": top1,
            "top5": top5,
            "split": "val",
            "images": n_val,
            "epoch": epoch + 1,
            "autocast": self.cfg.amp_dtype if self.cfg.amp else None,
        }
        man = new_manifest(
            "checkpoint",
            classes=self.classes,
            preprocessing=self.p,
            precision="fp32",
            accuracy=acc,
            train_config=self.cfg.to_dict(),
            bad_images=self.bad.records(),
            **self._init_extra(),
        )
        man["source"] = self._source(epoch + 1)  # new_manifest's source= is for a file (with its sha256)
        state = dict(
            optimizer=self.opt.state_dict(),
            scaler=self.scaler.state_dict(),
            epoch=epoch,
            step=self.step,
            rng=rng_state(),
            best_top1=max(self.best_top1, top1),
            history=self.history,
        )
        save_checkpoint(self.out / "last.pt", self.model.state_dict(), man, **state)
        if top1 > self.best_top1 or not math.isfinite(top1):
            self.best_top1 = top1 if math.isfinite(top1) else self.best_top1
            save_checkpoint(self.out / "best.pt", self.model.state_dict(), man, epoch=epoch)
        write_text(self.out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.history))
        self.accuracy = {"best_top1": self.best_top1, **acc}
        write_json(self.out / "manifest.json", self._run_manifest())
        if self.tb is not None:
            r = self.history[-1]
            for k in ("train_loss", "lr", "img_per_s", "val_top1", "val_top5"):
                self.tb.add_scalar(k, r[k], epoch + 1)
            self.tb.flush()
        training_curves(self.steplog.records if self.steplog is not None else [], self.history, self.out / "curves.png")

    # ------------------------------------------------------------------ --evaluate
    @staticmethod
    def evaluate_checkpoint(args, d: distributed.Dist) -> int:
        model, man = load_model(args.evaluate, map_location=d.device)
        # its training run's configuration; absent from checkpoints written by other tools
        saved = (
            RunConfig.from_dict(man["train_config"], f"{args.evaluate} (embedded manifest)")
            if "train_config" in man
            else None
        )
        data = Path(args.data or (saved.data if saved is not None and saved.data else DEFAULT_DATA))
        try:
            val = scan_split(data / "val", classes=man["classes"])
        except DataError as e:
            if not (data / "val").is_dir():
                if args.data is None and saved is not None and saved.data:
                    raise DataError(
                        f"{data / 'val'}: the validation folder of the data recorded in {args.evaluate}'s manifest "
                        "is not there (moved, or trained on another machine): pass --data ROOT "
                        "(ImageNet layout with train/ and val/)"
                    ) from None
                raise
            raise CheckpointError(
                f"{args.evaluate}: its {len(man['classes'])} classes do not match the data: {e}"
            ) from None
        p = Preprocessing.from_dict(man["preprocessing"])
        # the run's validation subset (its --limit-val and --seed) unless given here: the manifest's
        # accuracy was measured on that subset
        given = getattr(args, "given", set())
        limit_val = args.limit_val if saved is None or "limit_val" in given else saved.limit_val
        seed = args.seed if saved is None or "seed" in given else saved.seed
        files, labels = balanced_subset(val.files, val.labels, limit_val, seed)
        backend = args.data_backend or ("dali-gpu" if d.device.type == "cuda" else "dali-cpu")
        # score it the way its training run did (autocast, memory format, batch size), so the result
        # reproduces the accuracy in its manifest; --amp/--no-amp, --memory-format, --batch-size override
        dtype = args.amp_dtype or (saved.amp_dtype if saved is not None else "bf16")
        amp = resolve_amp(
            args.amp if args.amp is not None else ("native-bf16" if saved is not None and saved.amp else False),
            dtype,
            d.device.type == "cuda",
        )
        memory_format = args.memory_format or (saved.memory_format if saved is not None else "channels_last")
        batch_size = args.batch_size or (saved.batch_size if saved is not None else 128)
        loader = make_loader(
            backend,
            files,
            labels,
            p,
            batch_size=batch_size,
            train=False,
            device=d.device,
            shard=Shard(d.rank, d.world),
            seed=seed,
            workers=args.workers if args.workers is not None else 2,  # 0 is a choice (one thread / in-process)
        )
        if memory_format == "channels_last":
            model = model.to(memory_format=torch.channels_last)
        top1, top5, n = run_eval(model, loader, d, amp, AMP_DTYPES[dtype], memory_format == "channels_last")
        if d.main:
            print(
                json.dumps(
                    {
                        "checkpoint": str(args.evaluate),
                        "data": str(data / "val"),
                        "images": n,
                        "top1": top1,
                        "top5": top5,
                        "autocast": dtype if amp else None,
                        "memory_format": memory_format,
                    }
                )
            )
        return 0


def _without(files: list[str], labels: list[int], drop: set[str]) -> tuple[list[str], list[int]]:
    if not drop:
        return files, labels
    keep = [i for i, f in enumerate(files) if f not in drop]
    return [files[i] for i in keep], [labels[i] for i in keep]


@torch.no_grad()
def run_eval(net: nn.Module, loader, d: distributed.Dist, amp: bool, amp_dtype, channels_last: bool):
    net.eval()
    c1 = c5 = n = 0
    for x, y in loader:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(d.device.type, dtype=amp_dtype, enabled=amp):
            logits = net(x)
        c = topk_correct(logits.float().cpu().numpy(), y.cpu().numpy(), (1, 5))
        c1, c5, n = c1 + c[1], c5 + c[5], n + int(y.shape[0])
    c1, c5, n = distributed.all_sum([c1, c5, n], d)
    return 100.0 * c1 / max(n, 1), 100.0 * c5 / max(n, 1), int(n)
