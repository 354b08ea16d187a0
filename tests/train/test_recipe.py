"""The recipe's numbers, read back from the trainer itself."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from train.__main__ import build_parser
from train.config import resolve
from train.recipe import WarmupCosine, make_optimizer, mixup, smooth_one_hot, soft_cross_entropy


def cfg(*argv, world=1, cuda=False):
    return resolve(build_parser().parse_args(list(argv)), world, cuda)


def test_dry_run_prints_resolved_json(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "train",
            "--dry-run",
            "--output",
            str(tmp_path / "o"),
            "--data",
            str(tmp_path / "nowhere"),
            "--batch-size",
            "256",
            "--profile",
            "gpu",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    c = json.loads(out.stdout)
    assert c["lr"] == pytest.approx(0.256) and c["momentum"] == 0.875
    assert c["weight_decay"] == pytest.approx(1 / 32768) and c["label_smoothing"] == 0.1
    assert c["epochs"] == 90 and c["lr_schedule"] == "cosine" and c["mixup"] == 0
    assert c["batch_size"] == 256 and c["warmup_epochs"] == 0
    # the gpu profile's dali-gpu, with CUDA; without, its silent fallback dali-cpu
    assert c["data_backend"] == ("dali-gpu" if torch.cuda.is_available() else "dali-cpu")
    assert not (tmp_path / "nowhere").exists()


def test_data_backend_resolution():
    from rn50.errors import DataError

    assert cfg().data_backend == "dali-cpu"  # auto on CPU: the cpu profile
    assert cfg("--profile", "gpu").data_backend == "dali-cpu"  # the profile's dali-gpu falls back
    assert cfg(cuda=True).data_backend == "dali-gpu"
    assert cfg("--profile", "cpu", cuda=True).data_backend == "dali-cpu"
    for b in ("pytorch", "synthetic", "dali-cpu"):  # an explicit choice is honoured
        for cuda in (False, True):
            assert cfg("--data-backend", b, cuda=cuda).data_backend == b
            assert cfg("--profile", "gpu", "--data-backend", b, cuda=cuda).data_backend == b
    assert cfg("--data-backend", "dali-gpu", cuda=True).data_backend == "dali-gpu"
    with pytest.raises(DataError, match="CUDA is not available.*dali-cpu"):  # asked for: never replaced
        cfg("--data-backend", "dali-gpu", "--profile", "gpu")


def test_warmup_help_states_the_real_defaults():
    from train.config import PROFILES

    text = " ".join(build_parser().format_help().split())
    assert "else 0)" not in text
    assert (
        "at a global batch of 512 or more, the preset's (2 for 50 and 90, 5 for 250); "
        "below that, the profile's (none for gpu and gpu-small, 0.1 for cpu)"
    ) in text
    assert PROFILES["cpu"]["warmup_epochs"] == 0.1 and "warmup_epochs" not in PROFILES["gpu"]
    assert cfg("--profile", "cpu").warmup_epochs == 0.1  # small batch: the profile's
    assert cfg("--profile", "gpu", "--batch-size", "256").warmup_epochs == 0
    assert cfg("--profile", "cpu", "--batch-size", "512").warmup_epochs == 2  # >= 512: the preset's


def test_lr_scales_with_global_batch_and_warmup_default():
    assert cfg("--batch-size", "256", "--profile", "gpu").lr == pytest.approx(0.256)
    c = cfg("--batch-size", "256", "--profile", "gpu", world=2)
    assert c.lr == pytest.approx(0.512) and c.global_batch_size == 512 and c.warmup_epochs == 2
    assert cfg("--batch-size", "128", "--profile", "gpu").lr == pytest.approx(0.128)


def test_cpu_profile_amp_follows_native_bf16(monkeypatch):
    import train.recipe as tr

    for native in (True, False):
        monkeypatch.setattr(tr, "cpu_has_native_bf16", lambda native=native: native)
        c = cfg("--profile", "cpu")
        assert c.amp is native and c.amp_dtype == "bf16"
        assert c.batch_size == 64 and c.lr == pytest.approx(0.064) and c.limit_train is None
        assert cfg("--profile", "cpu", "--no-amp").amp is False
        assert cfg("--profile", "cpu", "--amp").amp is True  # asked for: bf16 even if emulated
        assert cfg("--profile", "cpu", "--amp-dtype", "fp16").amp is False  # no fp16 autocast on CPU
    assert cfg("--profile", "cpu", cuda=True).amp is True
    assert isinstance(tr.cpu_has_native_bf16(), bool)


def test_presets_and_mixup():
    assert cfg("--preset", "50").epochs == 50
    c = cfg("--preset", "250", "--batch-size", "256", world=4)
    assert c.epochs == 250 and c.mixup == 0.2 and c.warmup_epochs == 5
    assert cfg("--preset", "90").mixup == 0 and cfg("--mixup", "0.4").mixup == 0.4


def test_schedule_warmup_cosine_points():
    s = WarmupCosine(peak_lr=1.0, total_steps=1000, warmup_steps=100)
    assert s(0) == pytest.approx(0.01)  # warmup start: 1/100 of peak
    assert s(99) == pytest.approx(1.0)  # warmup end: peak
    assert s(100) == pytest.approx(1.0)
    assert s(550) == pytest.approx(0.5)  # cosine midpoint: half the peak
    assert s(999) == pytest.approx(0.5 * (1 + math.cos(math.pi * 899 / 900)))
    assert s(999) < 1e-4  # final step ~0
    assert WarmupCosine(1.0, 10)(0) == 1.0  # no warmup: starts at the peak


def test_optimizer_momentum_and_groups():
    from rn50.model import build_model

    opt = make_optimizer(build_model(10), lr=0.1)
    assert all(g["momentum"] == 0.875 and not g["nesterov"] for g in opt.param_groups)
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, pytest.approx(1 / 32768)]


def test_label_smoothing_targets():
    t = smooth_one_hot(torch.tensor([2, 0]), 10, 0.1)
    assert t.sum(1).tolist() == pytest.approx([1.0, 1.0])
    assert t[0, 2].item() == pytest.approx(0.91) and t[0, 0].item() == pytest.approx(0.01)
    logits = torch.randn(2, 10)
    ref = torch.nn.functional.cross_entropy(logits, torch.tensor([2, 0]), label_smoothing=0.1)
    assert soft_cross_entropy(logits, t).item() == pytest.approx(ref.item(), rel=1e-5)


def test_mixup_mixes_images_and_labels():
    torch.manual_seed(0)
    x = torch.randn(16, 3, 8, 8)
    y = torch.arange(16) % 10
    xm, t = mixup(x, y, 10, alpha=0.2, smoothing=0.1, generator=torch.Generator().manual_seed(1))
    assert t.sum(1).allclose(torch.ones(16))
    assert not torch.allclose(xm, x)
    assert (t > 0.02).sum(1).max() >= 2  # some rows carry two labels
    x0, t0 = mixup(x, y, 10, alpha=0.0, smoothing=0.1)
    assert torch.equal(x0, x) and torch.equal(t0, smooth_one_hot(y, 10, 0.1))


def test_gpu_small_profile_keeps_the_recipe_and_changes_only_size_epochs_and_crop():
    """The small-image profile differs from the gpu profile in exactly the three settings it
    exists for; the recipe's optimizer, lr rule, schedule, smoothing and AMP stay."""
    gpu, small = cfg("--profile", "gpu", cuda=True), cfg("--profile", "gpu-small", cuda=True)
    a, b = gpu.to_dict(), small.to_dict()
    differ = {k for k in a if a[k] != b[k]}
    assert differ == {"profile", "image_size", "epochs", "min_crop_scale"}, differ
    assert (small.image_size, small.epochs, small.min_crop_scale) == (112, 60, 0.3)
    assert small.lr == pytest.approx(0.256) and small.label_smoothing == 0.1 and small.amp and small.compile
    # every flag still overrides it
    c = cfg("--profile", "gpu-small", "--epochs", "40", "--image-size", "96", "--min-crop-scale", "0.5", cuda=True)
    assert (c.image_size, c.epochs, c.min_crop_scale) == (96, 40, 0.5)
    assert "gpu-small" in " ".join(build_parser().format_help().split())
