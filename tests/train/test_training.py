"""Real short training runs on Fashion-MNIST: loss goes down, resume is exact, DDP, bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from rn50.checkpoint import load_checkpoint
from tests.train_cli import BASE, run

ROOT = Path(__file__).resolve().parents[2]


def test_trained_run_learns(trained_run):
    rows = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    # "elapsed" (what time-to-accuracy reads) grows by at least each epoch's own time
    for prev, r in zip(rows, rows[1:]):
        assert r["elapsed"] >= prev["elapsed"] + r["time"] - 1e-6
    assert rows[0]["elapsed"] >= rows[0]["time"]
    assert rows[-1]["val_top1"] >= 70.0  # 10 classes: chance is 10%; the fixture promises >= 70 %
    man = json.loads((trained_run / "best.pt.manifest.json").read_text())
    assert man["kind"] == "checkpoint" and man["num_classes"] == 10 and man["image_size"] == 32
    assert man["accuracy"]["top1"] == max(r["val_top1"] for r in rows)
    # each manifest says what it came from: the data folder, the run and the epochs trained
    data = load_checkpoint(trained_run / "last.pt")["manifest"]["train_config"]["data"]
    best_epoch = max(rows, key=lambda r: r["val_top1"])["epoch"]
    assert [r["epoch"] for r in rows] == [1, 2, 3]  # counted from 1, as everywhere else
    assert man["source"] == {"data": data, "data_backend": "dali-cpu", "run": str(trained_run), "epoch": best_epoch}
    assert load_checkpoint(trained_run / "best.pt")["manifest"]["source"] == man["source"]
    last = json.loads((trained_run / "last.pt.manifest.json").read_text())
    run_man = json.loads((trained_run / "manifest.json").read_text())
    assert last["source"] == run_man["source"] == {**man["source"], "epoch": 3}
    assert Path(data).is_dir() and (Path(data) / "train").is_dir()
    for f in ("last.pt", "manifest.json", "curves.png"):
        assert (trained_run / f).is_file()
    assert any((trained_run / "tb").iterdir())


def test_resume_equals_uninterrupted(fmnist_tiny, tmp_path, monkeypatch):
    assert run(fmnist_tiny, tmp_path / "a", "--epochs", "2") == 0
    assert run(fmnist_tiny, tmp_path / "b", "--epochs", "2", "--stop-after", "1") == 0
    first = load_checkpoint(tmp_path / "b" / "last.pt")
    assert first["epoch"] == 0
    # make the first job look long (as a 1-hour job would), to see that the resumed run's elapsed
    # time continues from it instead of starting again from zero
    first["history"][-1]["elapsed"] = 3600.0
    torch.save(first, tmp_path / "b" / "last.pt")
    # resumed with the data folder given relative to here: recorded absolute, for export run elsewhere
    monkeypatch.chdir(fmnist_tiny.parent)
    argv = ["--output", str(tmp_path / "b"), "--resume", "--workers", "1", "--data", fmnist_tiny.name]
    assert train.main(argv) == 0
    a = load_checkpoint(tmp_path / "a" / "last.pt")
    b = load_checkpoint(tmp_path / "b" / "last.pt")
    assert b["manifest"]["train_config"]["data"] == os.path.abspath(fmnist_tiny)
    assert a["epoch"] == b["epoch"] == 1 and a["step"] == b["step"]
    for k, v in a["model"].items():
        assert torch.allclose(v.float(), b["model"][k].float(), atol=1e-6), k
    hist_a = [r["train_loss"] for r in a["history"]]
    hist_b = [r["train_loss"] for r in b["history"]]
    assert hist_a == pytest.approx(hist_b, abs=1e-6)
    # the resumed run's elapsed time continues from the first job's, not from zero
    eb = [r["elapsed"] for r in b["history"]]
    assert eb[0] == 3600.0 and 3600.0 + b["history"][1]["time"] <= eb[1] < 3600.0 + 600


def test_evaluate_checkpoint(trained_run, fmnist_small, capsys):
    ck = str(trained_run / "best.pt")
    man = json.loads((trained_run / "best.pt.manifest.json").read_text())
    # scored as its training run scored it (autocast, memory format, batch): the manifest's figure
    assert train.main(["--evaluate", ck, "--data", str(fmnist_small), "--workers", "1"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["images"] == len(list((fmnist_small / "val").rglob("*.jpg")))
    assert res["autocast"] == man["accuracy"]["autocast"] and res["memory_format"] == "channels_last"
    assert res["top1"] == pytest.approx(man["accuracy"]["top1"], abs=0.01)
    # --no-amp scores the fp32 weights in fp32 (within a few images of the autocast figure)
    assert train.main(["--evaluate", ck, "--data", str(fmnist_small), "--workers", "1", "--no-amp"]) == 0
    fp32 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert fp32["autocast"] is None and fp32["images"] == res["images"]
    assert fp32["top1"] == pytest.approx(res["top1"], abs=2.0)


def test_two_process_gloo_ddp(fmnist_tiny, tmp_path):
    (tmp_path / "tmp").mkdir()  # torchrun leaves a torchelastic_* log folder in the temporary folder
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path / "tmp")}
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29533",
        "-m",
        "train",
        "--data",
        str(fmnist_tiny),
        "--output",
        str(out),
        *BASE,
        "--epochs",
        "1",
        "--batch-size",
        "10",
    ]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    ck = load_checkpoint(out / "last.pt")
    cfg = ck["manifest"]["train_config"]
    assert cfg["world_size"] == 2 and cfg["global_batch_size"] == 20
    assert cfg["lr"] == pytest.approx(0.256 * 20 / 256)
    assert ck["step"] == 200 // 20  # each rank took half the images per step
    assert ck["history"][0]["val_images"] == 50  # both ranks' validation shards counted once


# ---------------------------------------------------------------------------- bad input


def test_missing_data_folder(tmp_path, capsys):
    assert run(tmp_path / "missing", tmp_path / "o", "--epochs", "1") == 2
    assert "missing: data folder not found" in capsys.readouterr().err


def test_empty_data_folder(tmp_path, capsys):
    (tmp_path / "d" / "train").mkdir(parents=True)
    assert run(tmp_path / "d", tmp_path / "o", "--epochs", "1") == 2
    assert "no class folders" in capsys.readouterr().err


def test_class_mismatch(fmnist_tiny, tmp_path, capsys):
    d = tmp_path / "d"
    shutil.copytree(fmnist_tiny, d)
    shutil.rmtree(d / "val" / "bag")
    assert run(d, tmp_path / "o", "--epochs", "1") == 2
    err = capsys.readouterr().err
    assert "class folders differ" in err and "bag" in err


def test_corrupt_image_is_named(fmnist_tiny, tmp_path, capsys):
    d = tmp_path / "d"
    shutil.copytree(fmnist_tiny, d)
    victim = sorted((d / "train" / "coat").iterdir())[0]
    victim.write_bytes(b"this is not a jpeg at all")
    assert run(d, tmp_path / "o", "--epochs", "1", "--batch-size", "200") == 2
    err = capsys.readouterr().err
    assert victim.name in err and "not an image" in err


def test_resume_with_other_class_count(fmnist_tiny, trained_run, tmp_path, capsys):
    d = tmp_path / "d"
    shutil.copytree(fmnist_tiny, d)
    for split in ("train", "val"):
        shutil.rmtree(d / split / "bag")
    out = tmp_path / "o"
    out.mkdir()
    shutil.copy(trained_run / "last.pt", out / "last.pt")
    rc = train.main(["--data", str(d), "--output", str(out), "--resume", "--workers", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "10 classes but the data has 9" in err


def test_nan_loss_stops_and_keeps_last_good_checkpoint(fmnist_tiny, tmp_path, capsys, monkeypatch):
    out = tmp_path / "o"
    # diverging in its first epoch, a run has no checkpoint to keep, and says so
    assert run(fmnist_tiny, out, "--epochs", "1", "--lr", "1e30") == 2
    err = capsys.readouterr().err
    assert ("loss is nan" in err or "loss is inf" in err) and "no checkpoint was written" in err, err
    assert not (out / "last.pt").exists()
    # diverging in its second epoch (the loss made NaN there), the first epoch's checkpoint stays
    assert run(fmnist_tiny, out, "--epochs", "2", "--stop-after", "1") == 0
    before = (out / "last.pt").read_bytes()
    from train import loop

    real = loop.soft_cross_entropy
    monkeypatch.setattr(loop, "soft_cross_entropy", lambda *a, **k: real(*a, **k) * float("nan"))
    assert run(fmnist_tiny, out, "--resume") == 2
    err = capsys.readouterr().err
    assert "loss is nan" in err and f"the last good checkpoint ({out / 'last.pt'}) is untouched" in err, err
    assert (out / "last.pt").read_bytes() == before
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_corrupt_image_named_without_prescan(fmnist_tiny, tmp_path, capsys):
    """The ImageNet path: no header pre-scan, DALI fails on the batch, the file is found and named
    (and, with --max-bad-images 0, stops the run; tests/train/test_bad_data.py has it left out)."""
    d = tmp_path / "d"
    shutil.copytree(fmnist_tiny, d)
    victim = sorted((d / "train" / "dress").iterdir())[3]
    good = victim.read_bytes()
    victim.write_bytes(good[: len(good) // 3])  # a truncated JPEG: valid header, broken data
    assert run(d, tmp_path / "o", "--epochs", "1", "--check-images", "off", "--max-bad-images", "0") == 2
    err = capsys.readouterr().err
    line = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(line) == 1 and victim.name in line[0] and "Traceback" not in err
    assert not (tmp_path / "o" / "last.pt").exists()


def test_check_images_auto_only_for_small_sets():
    from train.config import should_check_images

    assert should_check_images("auto", 70_000) and not should_check_images("auto", 1_281_167)
    assert should_check_images("on", 1_281_167) and not should_check_images("off", 10)


@pytest.mark.parametrize("how", ["garbage", "truncated", "other-classes", "other-shape", "other-arch"])
def test_bad_checkpoint_for_evaluate_and_resume(how, trained_run, fmnist_tiny, tmp_path, capsys):
    from rn50.checkpoint import save_checkpoint
    from rn50.manifest import new_manifest
    from rn50.model import build_model
    from rn50.preprocess import Preprocessing

    ck = tmp_path / "bad.pt"
    expect_eval = expect_resume = None  # what the one error line must say, where it is specific
    if how == "garbage":
        ck.write_bytes(b"\x00not a checkpoint" * 100)
    elif how == "truncated":
        data = (trained_run / "last.pt").read_bytes()
        ck.write_bytes(data[: len(data) // 2])
    elif how == "other-classes":  # a valid checkpoint whose fc has 7 outputs: does not fit 10-class data
        m = build_model(7)
        man = new_manifest(
            "checkpoint",
            classes=[f"c{i}" for i in range(7)],
            preprocessing=Preprocessing.for_image_size(32),
            precision="fp32",
        )
        save_checkpoint(ck, m.state_dict(), man)
        expect_eval, expect_resume = "7 classes do not match", "no training state"
    else:  # the trained run's full training state, 10 classes, but weights of another shape
        obj = load_checkpoint(trained_run / "last.pt")
        state = {k: v for k, v in obj.items() if k not in ("format", "version", "model", "manifest")}
        assert {"optimizer", "scaler", "epoch", "step", "rng"} <= state.keys()  # reaches the shape check
        if how == "other-shape":  # one tensor of the wrong shape
            weights = {**obj["model"], "layer2.0.conv2.weight": torch.zeros(128, 128, 1, 1)}
            why = "layer2.0.conv2.weight has shape (128, 128, 1, 1) but the model's is (128, 128, 3, 3)"
        else:  # another architecture with the same 10 classes (ResNet18: 3x3 convs in layer1.0)
            import torchvision

            weights = torchvision.models.resnet18(num_classes=10).state_dict()
            why = "layer1.0.conv1.weight has shape (64, 64, 3, 3) but the model's is (64, 64, 1, 1)"
        save_checkpoint(ck, weights, obj["manifest"], **state)
        expect_eval = expect_resume = why
    assert train.main(["--evaluate", str(ck), "--data", str(fmnist_tiny), "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "bad.pt" in err and "Traceback" not in err
    if expect_eval:
        assert expect_eval in err, err
    # only flags a resume may change: the others would be refused as settings other than the run's
    rc = train.main(
        ["--data", str(fmnist_tiny), "--output", str(tmp_path / "o"), "--resume", str(ck), "--workers", "1"]
    )
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(lines) == 1 and "bad.pt" in lines[0] and "Traceback" not in err, err
    if expect_resume:
        assert expect_resume in lines[0], err


def test_explicit_dali_gpu_without_cuda_is_an_error(fmnist_tiny, tmp_path, capsys):
    """--cpu: no CUDA on any machine. Asked for, dali-gpu is refused (dry run too); the gpu
    profile's default dali-gpu still falls back to dali-cpu."""
    nowhere = tmp_path / "nowhere"
    assert train.main(["--dry-run", "--cpu", "--data-backend", "dali-gpu", "--data", str(nowhere)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "CUDA is not available" in err and "dali-cpu" in err
    assert not nowhere.exists()
    assert run(fmnist_tiny, tmp_path / "o", "--cpu", "--epochs", "1", "--data-backend", "dali-gpu") == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "CUDA is not available" in lines[0] and "Traceback" not in err
    assert not (tmp_path / "o").exists()
    assert train.main(["--dry-run", "--cpu", "--profile", "gpu", "--data", str(nowhere), "--output", str(nowhere)]) == 0
    assert json.loads(capsys.readouterr().out)["data_backend"] == "dali-cpu"


class _Interrupt:
    """Pickles as a KeyboardInterrupt: torch.save raises it after writing the tensors before it."""

    def __reduce__(self):
        raise KeyboardInterrupt


def test_interrupted_save_keeps_previous_checkpoint(trained_run, tmp_path):
    from rn50.checkpoint import save_checkpoint

    out = tmp_path / "run"
    shutil.copytree(trained_run, out)
    before = (out / "last.pt").read_bytes()
    obj = load_checkpoint(out / "last.pt")
    big = {k: v + 1 for k, v in obj["model"].items() if v.is_floating_point()}  # different weights
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(out / "last.pt", {**obj["model"], **big}, obj["manifest"], zz=_Interrupt())
    assert (out / "last.pt").read_bytes() == before
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    load_checkpoint(out / "last.pt")


def test_killed_writer_never_leaves_a_corrupt_checkpoint(trained_run, tmp_path):
    """SIGKILL a process that rewrites last.pt in a loop: whatever moment it dies, last.pt loads."""
    import signal
    import time

    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(trained_run / "last.pt", out / "last.pt")
    code = (
        "import sys; from rn50.checkpoint import load_checkpoint, save_checkpoint\n"
        "p = sys.argv[1]; o = load_checkpoint(p)\n"
        "print('ready', flush=True)\n"
        "while True: save_checkpoint(p, o['model'], o['manifest'], optimizer=o['optimizer'])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for delay in (0.3, 0.9, 1.7):
        proc = subprocess.Popen([sys.executable, "-c", code, str(out / "last.pt")], env=env, stdout=subprocess.PIPE)
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        load_checkpoint(out / "last.pt")  # raises CheckpointError if it were half-written
