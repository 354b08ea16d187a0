"""Data backends behind one interface.

A loader is an iterable of ``(images, labels)`` batches already on the training device
(``images``: float32 NCHW, normalised by the shared contract; ``labels``: int64), with ``len()``
(steps per epoch) and ``set_epoch(epoch)``. Backends:

* ``dali-gpu``: DALI ``readers.file`` + nvJPEG (``mixed``) decoding + GPU augmentation.
* ``dali-cpu``: the same graph on the CPU (``device_id=None``); runs without a GPU.
* ``pytorch``: torchvision transforms of the same contract in a ``DataLoader``.
* ``synthetic``: random tensors made on the device, for throughput measurements.

Data order is a function of ``(seed, epoch, rank)`` only: each epoch's file order is a seeded
permutation, split across ranks (each rank gets ``len // world`` files, whole batches), and the
augmentation RNG is seeded from the same numbers. That is what makes ``--resume`` continue
exactly where an uninterrupted run would have been.

The DALI training loader therefore builds one pipeline per epoch, over that epoch's file order
and seed, and builds the *next* epoch's pipeline ahead: when epoch e's first batch is out, a
background thread builds epoch e+1's pipeline and schedules its first batches, so epoch e+1
starts on decoded data instead of on a build and an empty prefetch queue. Nothing about a batch
depends on whether its pipeline was built ahead: the pipeline built ahead is the one ``__iter__``
would build (same files, same seed, same construction), and it is used only for the epoch it
was built for (``set_epoch`` to another epoch discards it). Alternatives that were weighed:

* one pipeline for the whole run, fed each epoch's order through ``external_source``: DALI's
  random operators cannot be re-seeded once built, so epoch e's augmentation would depend on
  every epoch before it, and ``--resume`` would need DALI's own checkpoint of operator state
  saved with each checkpoint, and would not be exact for runs saved without it;
* drawing the crop windows and flips outside DALI from ``(seed, epoch, rank, index)``: exact
  and pipeline-free, but it re-implements the random-resized-crop of the one preprocessing
  contract (``rn50.preprocess``).

What building ahead cannot hide: DALI's ``Pipeline.Build`` (operator construction, nvJPEG
set-up) holds the GIL (DALI 2.4's binding releases it in ``Run``, ``Outputs`` and ``Shutdown``
only), so the training thread still pauses for that part, wherever it runs; defining the graph,
the first decodes and the prefetch fill overlap. Each epoch's ``build_s`` (``stats``) says how
long that pause can be.

Limits kept: at most two DALI pipelines are alive in a training process (and hold GPU memory):
during an epoch its own and the next epoch's; during validation the next epoch's and the
validation pass's, since an epoch's pipeline is dropped as soon as its last batch is out. None
is built past ``epochs``. An epoch that ends early (``break``, an exception, Ctrl-C, an abandoned
iterator) joins the thread and drops both of its pipelines before the exception goes on;
``close()`` drops the one ahead of a finished epoch. Validation loaders (``train=False``) build
on demand: building theirs ahead would keep a third pipeline alive through training.

Bad images (:class:`BadImages`, ``--max-bad-images``): when DALI fails on a batch, PIL decodes its
files to find the culprit(s). Within the run's limit the epoch goes on from the failing step, on
a pipeline over the rest of its files with each bad one replaced by the next good file of the
epoch's order (training: the step count, which DDP ranks must agree on, stays) or dropped
(validation). Every later pipeline is built from its epoch's files with the same replacement;
one built ahead is started again when a bad file is found, and is used only if its files are
those of its epoch with every bad image known by then replaced.
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rn50.errors import DataError, dali_message
from rn50.preprocess import Preprocessing, undecodable_causes

BACKENDS = ("dali-gpu", "dali-cpu", "pytorch", "synthetic")


@dataclass
class Shard:
    rank: int = 0
    world: int = 1


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def shard_indices(order: np.ndarray, shard: Shard, batch_size: int, drop_last: bool) -> np.ndarray:
    per_rank = len(order) // shard.world if drop_last else -(-len(order) // shard.world)
    mine = order[shard.rank :: shard.world][:per_rank]
    if drop_last:
        mine = mine[: (len(mine) // batch_size) * batch_size]
    return mine


class BadImages:
    """The images a run leaves out, at most ``limit`` of them per process (``--max-bad-images``): those
    the header check before training refuses and those a loader fails to decode mid-epoch. Each
    new one is named in a ``warning:`` line (where ``announce``); one past the limit stops the run
    with the error naming the files, as a limit of 0 does at the first one. One record per
    process: a rank knows the files it found itself, those every rank's header check finds, and
    those its run had recorded before a --resume."""

    def __init__(self, limit: int = 0):
        self.limit = limit
        self.found: dict[str, str] = {}  # path -> cause, in the order found
        self.where: dict[str, str] = {}  # path -> what found it: "header check", "training loader", "validation loader"

    def __contains__(self, path: object) -> bool:
        return path in self.found

    def __len__(self) -> int:
        return len(self.found)

    def add(
        self,
        bad: Sequence[tuple[str, str]],
        error: Callable[[list[tuple[str, str]]], str],
        where: str,
        announce: bool = True,
    ) -> list[tuple[str, str]]:
        """Record ``bad`` (``(path, cause)`` pairs) found by ``where``; the new ones. DataError
        ``error(new ones)`` when the run's total would exceed the limit."""
        new = [(f, c) for f, c in dict(bad).items() if f not in self.found]
        if not new:
            return new
        if len(self.found) + len(new) > self.limit:
            over = f" (more than --max-bad-images {self.limit} in all)" if self.limit else ""
            raise DataError(error(new) + over)
        for f, cause in new:
            self.found[f], self.where[f] = cause, where
            if announce:
                from tqdm import tqdm

                # through tqdm: a line of its own, not the tail of an epoch's progress bar
                tqdm.write(
                    f"warning: {f}: {cause}: left out of the run, found by the {where} "
                    f"(bad image {len(self.found)} of at most {self.limit}, --max-bad-images)",
                    file=sys.stderr,
                )
        return new

    def restore(self, records: Any) -> None:
        """Take over the records of the run a resumed run continues (:meth:`records`), unannounced
        and whatever the limit: its later epochs then leave them out as the uninterrupted run would."""
        for r in records if isinstance(records, list) else []:
            if isinstance(r, dict) and isinstance(r.get("path"), str):
                self.found[r["path"]] = str(r.get("error", ""))
                self.where[r["path"]] = str(r.get("found", "training loader"))

    def records(self) -> list[dict[str, str]]:
        """What the manifests record: ``[{"path", "error", "found"}]``."""
        return [{"path": f, "error": c, "found": self.where[f]} for f, c in self.found.items()]


def undecodable_error(bad: list[tuple[str, str]]) -> str:
    return "undecodable image(s): " + "; ".join(f"{f}: {c}" for f, c in bad[:5])


def replace_bad(files: Sequence[str], bad: BadImages | Sequence[str]) -> list[int]:
    """Positions into ``files`` with each bad file's position replaced by the next good file's
    (cyclically): the same number of samples, so steps per epoch (which every rank must agree on)
    stay; deterministic, so a pipeline built ahead and one built in the foreground agree."""
    if not any(f in bad for f in files):
        return list(range(len(files)))
    good = [i for i, f in enumerate(files) if f not in bad]
    if not good:
        raise DataError(f"every one of this epoch's {len(files)} files is a bad image")
    out, k = [], 0
    for i, f in enumerate(files):
        while k < len(good) and good[k] < i:
            k += 1
        out.append(i if f not in bad else good[k % len(good)])
    return out


class _Base:
    def __init__(
        self,
        files: Sequence[str],
        labels: Sequence[int],
        p: Preprocessing,
        batch_size: int,
        train: bool,
        device: torch.device,
        shard: Shard,
        seed: int,
        workers: int,
        bad: BadImages | None = None,
    ):
        self.files, self.labels = list(files), np.asarray(labels, dtype=np.int64)
        # the images left out; without a record (a scoring pass), the first one stops it
        self.bad = bad if bad is not None else BadImages(0)
        self.p, self.batch_size, self.train, self.device = p, batch_size, train, device
        self.shard, self.seed, self.workers, self.epoch = shard, seed, workers, 0
        if train and len(self.files) < batch_size * shard.world:
            raise DataError(
                f"{len(self.files)} training images are fewer than one global batch "
                f"({batch_size} x {shard.world} processes): lower --batch-size"
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def close(self) -> None:
        """Release whatever the loader holds between epochs (nothing, except for DALI)."""

    def _indices(self, epoch: int | None = None) -> np.ndarray:
        if self.train:
            order = epoch_order(len(self.files), self.seed, self.epoch if epoch is None else epoch)
            return shard_indices(order, self.shard, self.batch_size, drop_last=True)
        return np.arange(len(self.files))[self.shard.rank :: self.shard.world]

    def __len__(self) -> int:
        n = len(self._indices())
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def _seed(self, epoch: int | None = None) -> int:
        e = self.epoch if epoch is None else epoch
        return (self.seed * 1_000_003 + e * 1009 + self.shard.rank) % (2**31 - 1)


class _Started:
    """A built pipeline whose first batches are scheduled, with the files it reads."""

    def __init__(self, pipe: Any, files: list[str], build_s: float):
        self.pipe, self.files, self.build_s = pipe, files, build_s


class _Ahead:
    """Epoch ``epoch``'s pipeline, started in a background thread (non-daemon: an interpreter
    that exits waits for a build in progress instead of tearing DALI down under it)."""

    def __init__(self, epoch: int, start: Callable[[int], _Started | None]):
        self.epoch = epoch
        self._started: _Started | None = None
        self._thread = threading.Thread(target=self._run, args=(start,), name=f"dali-ahead-epoch-{epoch}")
        self._thread.start()

    def _run(self, start: Callable[[int], _Started | None]) -> None:
        try:
            self._started = start(self.epoch)
        except BaseException:  # the epoch builds again in the foreground, and fails there
            self._started = None

    def take(self) -> _Started | None:
        """Wait for the build; the started pipeline, or None when building it failed."""
        self._thread.join()
        started, self._started = self._started, None
        return started

    def discard(self) -> None:
        self._thread.join()
        self._started = None


class DaliLoader(_Base):
    """DALI on the CPU or the GPU; one pipeline per epoch over that epoch's file order, the next
    epoch's built ahead (see the module docstring)."""

    def __init__(self, *a, gpu: bool, epochs: int | None = None, build_ahead: bool = True, **kw):
        super().__init__(*a, **kw)
        self.gpu = gpu
        # the epochs a pipeline may be built ahead for: training only, and never past the run's end
        self.ahead_until = epochs if self.train and build_ahead else None
        self._ahead: _Ahead | None = None
        # per epoch iterated: {"epoch", "built_ahead", "build_s"} (build_s: seconds in Pipeline.build)
        self.stats: list[dict[str, Any]] = []

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if self._ahead is not None and self._ahead.epoch != epoch:
            self.close()  # built for an epoch that is not coming: free its memory now

    def close(self) -> None:
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            ahead.discard()

    def _pipeline(self, files: list[str], labels: list[int], seed: int):
        from nvidia.dali import fn, pipeline_def

        from rn50.preprocess import dali_decode, dali_train, dali_val

        p, train, gpu = self.p, self.train, self.gpu

        # DALI 2.4's defaults otherwise: the dynamic executor (exec_async + exec_pipelined), whose
        # outputs are freshly allocated per iteration. prefetch_queue_depth 2 is DALI's default:
        # one batch ahead of the one being trained on, enough for batches of uniform cost.
        @pipeline_def(
            batch_size=self.batch_size,
            num_threads=max(1, self.workers),
            device_id=(self.device.index or 0) if gpu else None,
            seed=seed,
            prefetch_queue_depth=2,
        )
        def pipe():
            jpegs, lab = fn.readers.file(
                files=files, labels=labels, random_shuffle=False, pad_last_batch=True, name="Reader"
            )
            imgs = dali_decode(jpegs, "mixed" if gpu else "cpu")
            out = dali_train(imgs, p) if train else dali_val(imgs, p)
            return out, (lab.gpu() if gpu else lab)

        return pipe()

    def _epoch_lists(self, epoch: int) -> tuple[list[str], list[int]]:
        """Epoch ``epoch``'s files and labels on this rank, without the bad images found so far:
        in training each is replaced by the next good file of the epoch (:func:`replace_bad`), so
        the epoch keeps its step count; in validation each is dropped from scoring."""
        idx = self._indices(epoch)
        files = [self.files[i] for i in idx]
        labels = [int(self.labels[i]) for i in idx]
        if self.train:
            pos = replace_bad(files, self.bad)
            return [files[i] for i in pos], [labels[i] for i in pos]
        keep = [i for i, f in enumerate(files) if f not in self.bad]
        return [files[i] for i in keep], [labels[i] for i in keep]

    def _start(self, epoch: int) -> _Started | None:
        """Epoch ``epoch``'s pipeline, built, with its first batches scheduled; None without files.
        A function of (files, bad images found, seed, epoch, rank) only, wherever and whenever it runs."""
        files, labels = self._epoch_lists(epoch)
        return self._build(files, labels, self._seed(epoch))

    def _build(self, files: list[str], labels: list[int], seed: int) -> _Started | None:
        if not files:
            return None
        pipe = self._pipeline(files, labels, seed)
        t = time.perf_counter()
        pipe.build()
        build_s = time.perf_counter() - t
        # the scheduled API throughout (schedule_run, then outputs): the first call fills the
        # prefetch queue, so a pipeline started ahead has its first batches decoding already
        pipe.schedule_run()
        return _Started(pipe, files, build_s)

    def _culprits(self, files: list[str], step: int, e: RuntimeError) -> list[tuple[str, str]]:
        """The bad images new to the run that made DALI fail on batch ``step`` of ``files``,
        recorded (DataError past --max-bad-images), or DataError when there is none: DALI names the
        operator, not the file. First the failing batch and the two prefetched after it, then
        (rarely needed) the rest of the epoch's files; PIL decodes each one
        (rn50.preprocess.undecodable_causes)."""
        lo, hi = step * self.batch_size, (step + 3) * self.batch_size
        bad = undecodable_causes(files[lo:hi]) or undecodable_causes(files[:lo] + files[hi:])
        new = [(f, c) for f, c in bad if f not in self.bad]
        if not new:
            raise DataError(
                f"DALI failed on batch {step + 1} of {len(files)} files "
                f"(PIL decodes all of them; DALI says: {dali_message(e)})"
            ) from None
        self.bad.add(new, undecodable_error, "training loader" if self.train else "validation loader")
        return new

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self.epoch
        ahead, self._ahead = self._ahead, None
        files, labels = self._epoch_lists(epoch)
        started = None
        if ahead is not None:
            if ahead.epoch == epoch:
                started = ahead.take()
                if started is not None and started.files != files:
                    started = None  # built before a bad image it reads was found: built again without it
            else:
                ahead.discard()
        built_ahead = started is not None
        if started is None:
            started = self._build(files, labels, self._seed(epoch))
        if started is None:
            return
        self.stats.append({"epoch": epoch, "built_ahead": built_ahead, "build_s": started.build_s})
        pipe = started.pipe
        del started
        bs = self.batch_size
        steps = len(self) if self.train else -(-len(files) // bs)
        delivered = 0
        fresh = True  # the current pipeline's first batch is scheduled already
        try:
            while delivered < steps:
                step = delivered
                try:
                    if not fresh:
                        pipe.schedule_run()
                    fresh = False
                    x, y = pipe.outputs()
                except RuntimeError as e:
                    pipe = None  # the failed pipeline goes before another is built
                    self._culprits(files, step, e)
                    # the rest of the epoch from this step, on a pipeline over its remaining files
                    # without the bad ones (training: each replaced, so the step count stays)
                    done = step * bs
                    if self.train:
                        files, labels = self._epoch_lists(epoch)
                    else:
                        keep = [i for i in range(done, len(files)) if files[i] not in self.bad]
                        files = files[:done] + [files[i] for i in keep]
                        labels = labels[:done] + [labels[i] for i in keep]
                        steps = -(-len(files) // bs)
                    if self._ahead is not None:  # it may read the bad image: started again without it
                        nxt = self._ahead.epoch
                        self._ahead.discard()
                        self._ahead = _Ahead(nxt, self._start)
                    # its augmentation seed: a function of (seed, epoch, rank, step), as every other's
                    seed = (self._seed(epoch) + 7919 * step) % (2**31 - 1)
                    rebuilt = self._build(files[done:], labels[done:], seed)
                    if rebuilt is None:
                        break
                    pipe, fresh = rebuilt.pipe, True
                    del rebuilt
                    continue
                n = bs if self.train else min(bs, len(files) - step * bs)
                batch = self._to_torch(x)[:n], self._to_torch(y).view(-1)[:n].long().to(self.device)
                del x, y
                if step == 0 and self.ahead_until is not None and epoch + 1 < self.ahead_until:
                    self._ahead = _Ahead(epoch + 1, self._start)
                delivered = step + 1
                yield batch
        except BaseException:
            # an epoch that ends early (break, exception, Ctrl-C) also ends the build ahead: it
            # joins the thread, so no pipeline outlives the epoch half-built. A consumer that
            # took every batch and only did not ask for the end keeps it.
            if delivered < steps:
                self.close()
            raise
        finally:
            del pipe  # this epoch's pipeline goes now (its threads and memory), not at the next GC

    def _to_torch(self, out) -> torch.Tensor:
        t = out.as_tensor()
        if self.gpu:
            return torch.from_dlpack(t).clone()  # a batch of its own, whatever DALI does with its buffer
        return torch.from_numpy(np.array(t)).to(self.device)


class _FileDataset(torch.utils.data.Dataset):
    """Decoded, transformed samples ``(image, label, bad)``. A file that does not decode is, with
    ``skip`` (a --max-bad-images above 0), not an error here: in training the next good file in
    file order is returned in its place, so the batch stays whole; in validation the sample's image
    is None and :func:`_collate` drops it. ``bad`` lists the ``(path, cause)`` pairs met for the
    sample, so that the training process, which may not be the worker process decoding it, records
    them against the run's limit (:class:`BadImages`). ``known`` (files already found bad) are
    passed over without decoding them again."""

    def __init__(self, files, labels, transform, train: bool = True, skip: bool = False, known=frozenset()):
        self.files, self.labels, self.transform = files, labels, transform
        self.train, self.skip, self.known = train, skip, set(known)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from rn50.layout import strip_path
        from rn50.preprocess import load_rgb

        bad: list[tuple[str, str]] = []
        n = len(self.files)
        for j in itertools.chain([i], range(i + 1, n), range(i)) if self.skip else [i]:
            f = self.files[j]
            if f not in self.known:
                try:
                    img = load_rgb(f)
                except DataError as e:
                    if not self.skip:
                        raise
                    self.known.add(f)
                    bad.append((f, strip_path(f, str(e))))
                else:
                    return self.transform(img), int(self.labels[j]), bad
            if not self.train:
                return None, int(self.labels[i]), bad
        raise DataError(f"none of the {len(self.files)} images decodes")


def _collate(samples):
    """A batch of :class:`_FileDataset` samples, without those whose image is None, and the bad
    images met while making it."""
    kept = [(x, y) for x, y, _ in samples if x is not None]
    bad = [b for _, _, found in samples for b in found]
    if not kept:
        return None, None, bad
    return torch.stack([x for x, _ in kept]), torch.tensor([y for _, y in kept], dtype=torch.int64), bad


class TorchLoader(_Base):
    """torchvision transforms of the shared contract, in a DataLoader."""

    def __iter__(self):
        from rn50.preprocess import torchvision_train, torchvision_val

        ds = _FileDataset(
            self.files,
            self.labels,
            torchvision_train(self.p) if self.train else torchvision_val(self.p),
            train=self.train,
            skip=self.bad.limit > 0,
            known=self.bad.found,
        )
        dl = torch.utils.data.DataLoader(
            ds,
            batch_size=self.batch_size,
            sampler=self._indices().tolist(),
            num_workers=self.workers,
            drop_last=self.train,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(self._seed()),
            persistent_workers=False,
            collate_fn=_collate,
        )
        try:
            for x, y, bad in dl:
                self.bad.add(bad, undecodable_error, "training loader" if self.train else "validation loader")
                if x is not None:
                    yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        except DataError as e:
            raise DataError(worker_cause(str(e))) from None


def worker_cause(message: str) -> str:
    """The cause alone of an error a DataLoader worker raised: the main process re-raises it with
    the worker's traceback folded into the message ("Caught DataError in DataLoader worker process
    0. Original Traceback ... rn50.errors.DataError: CAUSE"), which is not a terminal line."""
    lines = message.strip().splitlines()
    if len(lines) < 2 or "DataLoader worker" not in lines[0]:
        return message
    last = lines[-1]
    name, sep, cause = last.partition(": ")
    return cause if sep and name.rsplit(".", 1)[-1] == DataError.__name__ else last


class SyntheticLoader(_Base):
    """Random images and labels generated on the device (no decoding, no host transfer)."""

    def __init__(self, *a, num_classes: int, steps: int, **kw):
        super().__init__(*a, **kw)
        self.num_classes, self.steps = num_classes, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        g = torch.Generator(device=self.device).manual_seed(self._seed())
        s = self.p.image_size
        x = torch.randn(self.batch_size, 3, s, s, device=self.device, generator=g)
        y = torch.randint(0, self.num_classes, (self.batch_size,), device=self.device, generator=g)
        for _ in range(self.steps):
            yield x, y


def make_loader(
    backend: str,
    files,
    labels,
    p: Preprocessing,
    *,
    batch_size: int,
    train: bool,
    device: torch.device,
    shard: Shard,
    seed: int,
    workers: int,
    num_classes: int = 1000,
    synthetic_steps: int = 100,
    epochs: int | None = None,
    build_ahead: bool = True,
    bad: BadImages | None = None,
):
    """``epochs``: the run's epoch count; a DALI training loader that knows it builds each next
    epoch's pipeline while an epoch runs (``build_ahead=False`` turns that off, for comparisons).
    ``bad``: the run's record of images left out, shared by its loaders; without one the first
    undecodable image stops the loader."""
    kw = dict(batch_size=batch_size, train=train, device=device, shard=shard, seed=seed, workers=workers, bad=bad)
    if backend == "dali-gpu":
        if device.type != "cuda":
            raise DataError("--data-backend dali-gpu needs a CUDA GPU; use dali-cpu on this machine")
        return DaliLoader(files, labels, p, gpu=True, epochs=epochs, build_ahead=build_ahead, **kw)
    if backend == "dali-cpu":
        return DaliLoader(files, labels, p, gpu=False, epochs=epochs, build_ahead=build_ahead, **kw)
    if backend == "pytorch":
        return TorchLoader(files, labels, p, **kw)
    if backend == "synthetic":
        kw["train"] = False  # no files to check against the batch size
        return SyntheticLoader(files, labels, p, num_classes=num_classes, steps=synthetic_steps, **kw)
    raise ValueError(f"unknown data backend {backend!r} (choose from {', '.join(BACKENDS)})")


def default_workers() -> int:
    return max(1, min(8, (os.cpu_count() or 2) - 1))
