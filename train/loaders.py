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
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from rn50.errors import DataError, first_line
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

    def _indices(self) -> np.ndarray:
        if self.train:
            order = epoch_order(len(self.files), self.seed, self.epoch)
            return shard_indices(order, self.shard, self.batch_size, drop_last=True)
        return np.arange(len(self.files))[self.shard.rank :: self.shard.world]

    def __len__(self) -> int:
        n = len(self._indices())
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def _seed(self) -> int:
        return (self.seed * 1_000_003 + self.epoch * 1009 + self.shard.rank) % (2**31 - 1)


class DaliLoader(_Base):
    """DALI on the CPU or the GPU; one pipeline per epoch over that epoch's file order."""

    def __init__(self, *a, gpu: bool, **kw):
        super().__init__(*a, **kw)
        self.gpu = gpu

    def _pipeline(self, files: list[str], labels: list[int]):
        from nvidia.dali import fn, pipeline_def

        from rn50.preprocess import dali_decode, dali_train, dali_val

        p, train, gpu = self.p, self.train, self.gpu

        @pipeline_def(
            batch_size=self.batch_size,
            num_threads=max(1, self.workers),
            device_id=(self.device.index or 0) if gpu else None,
            seed=self._seed(),
            prefetch_queue_depth=2,
        )
        def pipe():
            jpegs, lab = fn.readers.file(
                files=files, labels=labels, random_shuffle=False, pad_last_batch=True, name="Reader"
            )
            imgs = dali_decode(jpegs, "mixed" if gpu else "cpu")
            out = dali_train(imgs, p) if train else dali_val(imgs, p)
            return out, (lab.gpu() if gpu else lab)

        pp = pipe()
        pp.build()
        return pp

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = self._indices()
        files = [self.files[i] for i in idx]
        labels = [int(self.labels[i]) for i in idx]
        if not files:
            return
        pipe = self._pipeline(files, labels)
        steps = len(self)
        for step in range(steps):
            try:
                x, y = pipe.run()
            except RuntimeError as e:
                # DALI names the operator, not the file: find the undecodable one(s) in this batch
                # and the prefetched ones after it, and name them.
                # First the failing batch and the two prefetched after it, then (rarely needed)
                # the rest of this epoch's files; PIL decodes each one (rn50.preprocess.undecodable).
                lo, hi = step * self.batch_size, (step + 3) * self.batch_size
                bad = undecodable(files[lo:hi]) or undecodable(files[:lo] + files[hi:])
                if bad:
                    raise DataError("undecodable image(s): " + "; ".join(bad[:5])) from None
                first = first_line(e, prefer="error")
                raise DataError(
                    f"DALI failed on batch {step + 1} of {len(files)} files "
                    f"(PIL decodes all of them; DALI says: {first})"
                ) from None
            n = self.batch_size if self.train else min(self.batch_size, len(files) - step * self.batch_size)
            yield self._to_torch(x)[:n], self._to_torch(y).view(-1)[:n].long().to(self.device)

    def _to_torch(self, out) -> torch.Tensor:
        t = out.as_tensor()
        if self.gpu:
            return torch.from_dlpack(t).clone()  # DALI reuses its buffer at the next run()
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
        for x, y in dl:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


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
):
    kw = dict(batch_size=batch_size, train=train, device=device, shard=shard, seed=seed, workers=workers)
    if backend == "dali-gpu":
        if device.type != "cuda":
            raise DataError("--data-backend dali-gpu needs a CUDA GPU; use dali-cpu on this machine")
        return DaliLoader(files, labels, p, gpu=True, **kw)
    if backend == "dali-cpu":
        return DaliLoader(files, labels, p, gpu=False, **kw)
    if backend == "pytorch":
        return TorchLoader(files, labels, p, **kw)
    if backend == "synthetic":
        kw["train"] = False  # no files to check against the batch size
        return SyntheticLoader(files, labels, p, num_classes=num_classes, steps=synthetic_steps, **kw)
    raise ValueError(f"unknown data backend {backend!r} (choose from {', '.join(BACKENDS)})")


def default_workers() -> int:
    return max(1, min(8, (os.cpu_count() or 2) - 1))
