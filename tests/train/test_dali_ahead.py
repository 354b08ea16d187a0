"""The DALI training loader builds each next epoch's pipeline ahead (train.loaders): the batches
are bit for bit those of a pipeline built when its epoch starts, a loader started at a later
epoch (a resumed run) sees the uninterrupted run's batches, and an epoch that ends early leaves
no pipeline and no thread behind."""

from __future__ import annotations

import os
import shutil
import threading
import weakref

import pytest
import torch

from rn50.errors import DataError
from rn50.layout import load_dataset
from tests.train.cpu_loaders import cpu_loader
from train.loaders import DaliLoader, epoch_order

BATCH = 16  # fmnist_tiny: 200 training images, 12 batches an epoch


def _loader(split, epochs=None, build_ahead=True, seed=3):
    return cpu_loader(
        "dali-cpu", split, train=True, size=32, bs=BATCH, seed=seed, workers=2, epochs=epochs, build_ahead=build_ahead
    )


def _epoch(loader, epoch):
    loader.set_epoch(epoch)
    return [(x.clone(), y.clone()) for x, y in loader]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))


@pytest.fixture(scope="module")
def train_split(fmnist_tiny):
    return load_dataset(fmnist_tiny)[0]


def test_batches_identical_with_and_without_building_ahead(train_split):
    ahead, fresh = _loader(train_split, epochs=3), _loader(train_split, epochs=3, build_ahead=False)
    try:
        for epoch in range(3):
            a, f = _epoch(ahead, epoch), _epoch(fresh, epoch)
            assert len(a) == len(train_split.files) // BATCH
            assert _same(a, f), f"epoch {epoch}: batches differ when the pipeline was built ahead"
        # the path under test was taken: epochs 1 and 2 ran on pipelines built during the epoch before
        assert [s["built_ahead"] for s in ahead.stats] == [False, True, True]
        assert [s["built_ahead"] for s in fresh.stats] == [False, False, False]
        assert not _same(_epoch(fresh, 1), _epoch(fresh, 2))  # epochs do differ: order and augmentation
    finally:
        ahead.close()
        fresh.close()


def test_resumed_loader_sees_the_uninterrupted_runs_batches(train_split):
    """A run resumed at epoch 2 builds epoch 2 when it starts and epoch 3 ahead; both must be the
    batches the uninterrupted run trained on."""
    whole = _loader(train_split, epochs=4)
    resumed = _loader(train_split, epochs=4)
    try:
        uninterrupted = [_epoch(whole, e) for e in range(4)]
        for epoch in (2, 3):
            assert _same(_epoch(resumed, epoch), uninterrupted[epoch]), f"resumed run, epoch {epoch}"
        assert [(s["epoch"], s["built_ahead"]) for s in resumed.stats] == [(2, False), (3, True)]
    finally:
        whole.close()
        resumed.close()


def test_set_epoch_elsewhere_drops_the_pipeline_ahead(train_split):
    jumping, fresh = _loader(train_split, epochs=4), _loader(train_split, epochs=4, build_ahead=False)
    try:
        _epoch(jumping, 0)  # builds epoch 1 ahead, which is not what comes next
        assert _same(_epoch(jumping, 2), _epoch(fresh, 2))
        assert jumping.stats[-1] == {**jumping.stats[-1], "epoch": 2, "built_ahead": False}
    finally:
        jumping.close()
        fresh.close()


def _os_threads() -> int:
    """Threads of this process, DALI's native worker threads included (Linux)."""
    return len(os.listdir("/proc/self/task"))


@pytest.fixture
def pipelines(monkeypatch):
    """Weak references to every DALI pipeline the loaders build during the test."""
    made: list[weakref.ref] = []
    build = DaliLoader._pipeline

    def spy(self, *a, **kw):
        pipe = build(self, *a, **kw)
        made.append(weakref.ref(pipe))
        return pipe

    monkeypatch.setattr(DaliLoader, "_pipeline", spy)
    return made


def _settled(pipelines, py_threads, os_threads):
    alive = [r for r in pipelines if r() is not None]
    return not alive and threading.active_count() == py_threads and _os_threads() == os_threads, (
        f"{len(alive)} pipeline(s) alive, {threading.active_count()} Python threads (was {py_threads}), "
        f"{_os_threads()} OS threads (was {os_threads})"
    )


def test_an_epoch_that_ends_early_leaves_no_pipeline_or_thread(train_split, pipelines):
    warm = _loader(train_split)
    _epoch(warm, 0)  # DALI's and torch's one-time threads start here, not inside the counts below
    del warm
    py_threads, os_threads = threading.active_count(), _os_threads()

    loader = _loader(train_split, epochs=3)
    loader.set_epoch(0)
    for i, _ in enumerate(loader):  # a loop left with break, while epoch 1 is being built ahead
        if i == 2:
            assert threading.active_count() > py_threads or pipelines[-1]() is not None
            break
    ok, why = _settled(pipelines, py_threads, os_threads)
    assert ok, "after break: " + why
    assert len(pipelines) == 3  # the warm-up's, epoch 0's and the one built ahead for epoch 1

    with pytest.raises(KeyboardInterrupt):  # Ctrl-C (or any error) in the training step
        for i, _ in enumerate(loader):
            if i == 1:
                raise KeyboardInterrupt
    ok, why = _settled(pipelines, py_threads, os_threads)
    assert ok, "after an exception in the loop: " + why

    assert len(_epoch(loader, 0)) == len(loader)  # a complete epoch keeps the one built ahead ...
    assert pipelines[-1]() is not None
    loader.close()  # ... until the run ends
    ok, why = _settled(pipelines, py_threads, os_threads)
    assert ok, "after close(): " + why


def test_undecodable_file_is_named_and_nothing_is_left(train_split, fmnist_tiny, tmp_path, pipelines):
    """The file DALI fails on is named as before, also when the next epoch is being built ahead."""
    d = tmp_path / "d"
    shutil.copytree(fmnist_tiny, d)
    split = load_dataset(d)[0]
    # the victim sits in epoch 0's second batch: the first batch is out and epoch 1 is building
    victim = split.files[int(epoch_order(len(split.files), 3, 0)[BATCH + 3])]
    good = open(victim, "rb").read()
    with open(victim, "wb") as f:
        f.write(good[: len(good) // 3])  # a truncated JPEG: valid header, broken data
    warm = _loader(train_split)
    _epoch(warm, 0)
    del warm
    py_threads, os_threads = threading.active_count(), _os_threads()
    loader = _loader(split, epochs=3)
    with pytest.raises(DataError, match="undecodable image") as e:
        _epoch(loader, 0)
    assert victim in str(e.value)
    assert loader.stats[-1]["epoch"] == 0 and len(pipelines) == 3  # epoch 1 was started ahead
    del e
    ok, why = _settled(pipelines, py_threads, os_threads)
    assert ok, "after the undecodable file: " + why
