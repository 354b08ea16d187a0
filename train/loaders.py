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
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rn50.errors import DataError, dali_message
from rn50.preprocess import Preprocessing, undecodable

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
    ):
        self.files, self.labels = list(files), np.asarray(labels, dtype=np.int64)
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
    """A built pipeline whose first batches are scheduled, with the files of its epoch."""

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

    def _start(self, epoch: int) -> _Started | None:
        """Epoch ``epoch``'s pipeline, built, with its first batches scheduled; None without files.
        A function of (files, seed, epoch, rank) only, wherever and whenever it runs."""
        idx = self._indices(epoch)
        files = [self.files[i] for i in idx]
        labels = [int(self.labels[i]) for i in idx]
        if not files:
            return None
        pipe = self._pipeline(files, labels, self._seed(epoch))
        t = time.perf_counter()
        pipe.build()
        build_s = time.perf_counter() - t
        # the scheduled API throughout (schedule_run, then outputs): the first call fills the
        # prefetch queue, so a pipeline started ahead has its first batches decoding already
        pipe.schedule_run()
        return _Started(pipe, files, build_s)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self.epoch
        ahead, self._ahead = self._ahead, None
        started = None
        if ahead is not None:
            if ahead.epoch == epoch:
                started = ahead.take()
            else:
                ahead.discard()
        built_ahead = started is not None
        if started is None:
            started = self._start(epoch)
        if started is None:
            return
        self.stats.append({"epoch": epoch, "built_ahead": built_ahead, "build_s": started.build_s})
        pipe, files = started.pipe, started.files
        del started
        steps = len(self)
        delivered = 0
        try:
            for step in range(steps):
                try:
                    if step:
                        pipe.schedule_run()
                    x, y = pipe.outputs()
                except RuntimeError as e:
                    # DALI names the operator, not the file: find the undecodable one(s) in this batch
                    # and the prefetched ones after it, and name them.
                    # First the failing batch and the two prefetched after it, then (rarely needed)
                    # the rest of this epoch's files; PIL decodes each one (rn50.preprocess.undecodable).
                    lo, hi = step * self.batch_size, (step + 3) * self.batch_size
                    bad = undecodable(files[lo:hi]) or undecodable(files[:lo] + files[hi:])
                    if bad:
                        raise DataError("undecodable image(s): " + "; ".join(bad[:5])) from None
                    first = dali_message(e)
                    raise DataError(
                        f"DALI failed on batch {step + 1} of {len(files)} files "
                        f"(PIL decodes all of them; DALI says: {first})"
                    ) from None
                n = self.batch_size if self.train else min(self.batch_size, len(files) - step * self.batch_size)
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
    def __init__(self, files, labels, transform):
        self.files, self.labels, self.transform = files, labels, transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from rn50.preprocess import load_rgb

        return self.transform(load_rgb(self.files[i])), int(self.labels[i])


class TorchLoader(_Base):
    """torchvision transforms of the shared contract, in a DataLoader."""

    def __iter__(self):
        from rn50.preprocess import torchvision_train, torchvision_val

        ds = _FileDataset(self.files, self.labels, torchvision_train(self.p) if self.train else torchvision_val(self.p))
        dl = torch.utils.data.DataLoader(
            ds,
            batch_size=self.batch_size,
            sampler=self._indices().tolist(),
            num_workers=self.workers,
            drop_last=self.train,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(self._seed()),
            persistent_workers=False,
        )
        try:
            for x, y in dl:
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
):
    """``epochs``: the run's epoch count; a DALI training loader that knows it builds each next
    epoch's pipeline while an epoch runs (``build_ahead=False`` turns that off, for comparisons)."""
    kw = dict(batch_size=batch_size, train=train, device=device, shard=shard, seed=seed, workers=workers)
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
