"""The data backends on real Fashion-MNIST JPEGs: DALI CPU against the torchvision reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rn50.layout import load_dataset
from rn50.preprocess import Preprocessing, load_rgb, torchvision_val
from tests.train.cpu_loaders import cpu_loader
from train.loaders import Shard, epoch_order, make_loader, shard_indices

DALI_VS_PIL_TOL = 0.05  # max |difference| in normalised units; measured 0.0175 at 64 and 224 px


@pytest.fixture(scope="module")
def split(fmnist_tiny):
    return load_dataset(fmnist_tiny)


def _loader(backend, split, train, size=64, bs=16, seed=0):
    return cpu_loader(backend, split[0] if train else split[1], train=train, size=size, bs=bs, seed=seed, workers=1)


@pytest.mark.parametrize("size", [64, 224])
def test_dali_cpu_val_matches_torchvision_reference(split, size):
    loader = _loader("dali-cpu", split, train=False, size=size)
    xs, ys = zip(*loader)
    x, y = torch.cat(xs), torch.cat(ys)
    val = split[1]
    assert x.shape == (len(val), 3, size, size) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.is_contiguous()  # NCHW (CHW per image), not channels_last
    assert y.tolist() == val.labels
    ref = torch.stack([torchvision_val(Preprocessing.for_image_size(size))(load_rgb(f)) for f in val.files])
    assert (x - ref).abs().max().item() < DALI_VS_PIL_TOL


def test_normalisation_per_channel(split):
    """(x - mean) / std with ImageNet statistics: undo it and the pixels are back in 0..255, and the
    three channels of these grayscale images differ by exactly the per-channel constants."""
    p = Preprocessing.for_image_size(32)
    x = torch.cat([b for b, _ in _loader("dali-cpu", split, train=False, size=32)])
    mean = torch.tensor(p.mean).view(1, 3, 1, 1)
    std = torch.tensor(p.std).view(1, 3, 1, 1)
    pix = x * std + mean
    assert pix.min().item() > -1.0 and pix.max().item() < 256.0
    assert (pix[:, 0] - pix[:, 1]).abs().max().item() < 1e-3  # gray: R == G == B before normalising
    # the per-channel mean of normalised real images is O(1) around 0, not O(100) (unnormalised)
    assert x.mean(dim=(0, 2, 3)).abs().max().item() < 2.5


def test_dali_cpu_train_batches(split):
    loader = _loader("dali-cpu", split, train=True)
    assert len(loader) == len(split[0]) // 16
    x, y = next(iter(loader))
    assert x.shape == (16, 3, 64, 64) and x.dtype == torch.float32
    # normalised: Fashion-MNIST is mostly dark background, so the mean is negative but bounded
    assert -2.5 < x.mean().item() < 1.0 and 0.3 < x.std().item() < 2.5
    assert not torch.allclose(x[:, 0], x[:, 2])  # grayscale in, but per-channel mean/std applied


def test_train_order_depends_only_on_seed_and_epoch(split):
    a = _loader("dali-cpu", split, train=True, seed=3)
    b = _loader("dali-cpu", split, train=True, seed=3)
    a.set_epoch(1)
    b.set_epoch(1)
    xa, ya = next(iter(a))
    xb, yb = next(iter(b))
    assert torch.equal(ya, yb) and torch.equal(xa, xb)
    assert not np.array_equal(epoch_order(200, 3, 1), epoch_order(200, 3, 2))


def test_shards_are_disjoint_and_equal():
    order = epoch_order(103, 0, 0)
    parts = [shard_indices(order, Shard(r, 4), batch_size=5, drop_last=True) for r in range(4)]
    assert all(len(p) == 25 for p in parts)
    assert len(set(np.concatenate(parts))) == 100


def test_pytorch_backend_same_contract(split):
    x, y = next(iter(_loader("pytorch", split, train=False)))
    ref = torchvision_val(Preprocessing.for_image_size(64))(load_rgb(split[1].files[0]))
    assert torch.allclose(x[0], ref)


def test_synthetic_backend():
    loader = make_loader(
        "synthetic",
        [],
        [],
        Preprocessing.for_image_size(32),
        batch_size=4,
        train=True,
        device=torch.device("cpu"),
        shard=Shard(),
        seed=0,
        workers=1,
        num_classes=10,
        synthetic_steps=3,
    )
    batches = list(loader)
    assert len(batches) == 3 and batches[0][0].shape == (4, 3, 32, 32) and int(batches[0][1].max()) < 10


def test_bad_images_record_counts_names_and_stops_past_its_limit(capsys):
    from rn50.errors import DataError
    from train.loaders import BadImages, undecodable_error

    bad = BadImages(2)
    assert bad.add([("a.jpg", "broken")], undecodable_error, "training loader") == [("a.jpg", "broken")]
    assert bad.add([("a.jpg", "broken")], undecodable_error, "training loader") == []  # known: not counted again
    bad.add([("b.jpg", "cut short")], undecodable_error, "header check", announce=False)
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: a.jpg: broken: left out of the run"), warnings
    with pytest.raises(DataError) as e:
        bad.add([("c.jpg", "gone")], undecodable_error, "validation loader")
    assert str(e.value) == "undecodable image(s): c.jpg: gone (more than --max-bad-images 2 in all)"
    with pytest.raises(DataError) as e:  # 0: the first one stops the run, with the error as it was
        BadImages(0).add([("c.jpg", "gone")], undecodable_error, "training loader")
    assert str(e.value) == "undecodable image(s): c.jpg: gone"
    # a resumed run takes the record over from its checkpoint's manifest
    again = BadImages(0)
    again.restore(bad.records())
    assert again.records() == bad.records() and "b.jpg" in again and again.where["b.jpg"] == "header check"
