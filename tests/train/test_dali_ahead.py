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
from tests.jpegs import bogus_huffman
from tests.train.cpu_loaders import cpu_loader
from train.loaders import BadImages, DaliLoader, epoch_order, replace_bad

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


def test_replace_bad_keeps_the_count_and_takes_the_next_good_file():
    files = ["a", "b", "c", "d", "e"]
    assert replace_bad(files, {"b"}) == [0, 2, 2, 3, 4]
    assert replace_bad(files, {"b", "c"}) == [0, 3, 3, 3, 4]
    assert replace_bad(files, {"e"}) == [0, 1, 2, 3, 0]  # the last one: the first good, cyclically
    assert replace_bad(files, set()) == [0, 1, 2, 3, 4]
    with pytest.raises(DataError, match="every one"):
        replace_bad(files, set(files))


def test_a_bad_file_is_replaced_and_every_epoch_keeps_its_batches(fmnist_tiny, tmp_path, pipelines):
    """Within --max-bad-images, the file DALI fails on is recorded and named, the epoch goes on from
    the failing step on a pipeline without it (each bad file replaced by the next good one, so the
    step count stays), and the next epoch, built ahead while the file was still unknown, is built
    again without it: its batches are those of a loader that knew the file from the start."""
    d = tmp_path / "d"
    shutil.copytree(fmnist_tiny, d)
    split = load_dataset(d)[0]
    # the victim sits in epoch 0's second batch (the first is out, epoch 1 is being built ahead),
    # and in epoch 1's batches too
    order0, order1 = epoch_order(len(split.files), 3, 0), epoch_order(len(split.files), 3, 1)
    victim_i = next(int(i) for i in order0[BATCH : 2 * BATCH] if i in order1[: len(split.files) // BATCH * BATCH])
    victim = split.files[victim_i]
    with open(victim, "rb") as f:
        good = f.read()
    with open(victim, "wb") as f:
        f.write(bogus_huffman(good))
    bad = BadImages(5)
    loader = cpu_loader("dali-cpu", split, train=True, size=32, bs=BATCH, seed=3, workers=2, epochs=3, bad=bad)
    knew = BadImages(5)
    knew.found[victim], knew.where[victim] = "known", "training loader"
    fresh = cpu_loader(
        "dali-cpu", split, train=True, size=32, bs=BATCH, seed=3, workers=2, epochs=3, build_ahead=False, bad=knew
    )
    try:
        e0 = _epoch(loader, 0)
        assert len(e0) == len(split.files) // BATCH == len(loader)
        assert list(bad.found) == [victim]
        e1 = _epoch(loader, 1)
        assert _same(e1, _epoch(fresh, 1)), "epoch 1 differs from a loader that knew the bad file"
        assert loader.stats[-1]["epoch"] == 1 and loader.stats[-1]["built_ahead"]
    finally:
        loader.close()
        fresh.close()


def test_a_bad_validation_file_is_dropped_from_scoring(fmnist_tiny, tmp_path, capsys):
    d = tmp_path / "d"
    shutil.copytree(fmnist_tiny, d)
    val = load_dataset(d)[1]
    victim = val.files[7]
    with open(victim, "rb") as f:
        good = f.read()
    with open(victim, "wb") as f:
        f.write(bogus_huffman(good))
    bad = BadImages(5)
    loader = cpu_loader("dali-cpu", val, train=False, size=32, bs=BATCH, seed=3, workers=2, bad=bad)
    for _ in range(2):  # found in the first pass, left out of the next without failing on it
        n = sum(int(y.shape[0]) for _, y in loader)
        assert n == len(val.files) - 1 and list(bad.found) == [victim]
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and victim in warnings[0], warnings
