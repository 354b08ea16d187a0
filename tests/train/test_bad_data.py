"""Training on bad data or bad paths: one ``error:`` line naming the folder or file, exit 2,
before any epoch is spent; bad images within --max-bad-images are left out of the run instead,
each named in a ``warning:`` line and recorded in the run's manifest."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from rn50.checkpoint import load_checkpoint
from tests import train_cli
from tests.jpegs import bogus_huffman, jpeg_segments
from tests.stderr import error_line
from tests.webps import lossless_with_exif
from train.loop import Trainer


def run(data, out, *extra):
    """One epoch at most: the checks under test stop the run before it."""
    return train_cli.run(data, out, "--epochs", "1", *extra)


@pytest.fixture
def no_epochs(monkeypatch):
    """Fail the test if an epoch starts: the checks under test must stop the run before one."""

    def refuse(self, epoch):
        raise AssertionError("a training epoch started before the bad data was found")

    monkeypatch.setattr(Trainer, "train_epoch", refuse)


@pytest.mark.parametrize("split", ["train", "val"])
def test_empty_class_folder_is_named(split, fmnist_tiny, tmp_path, capsys, no_epochs):
    d = tmp_path / "d"
    shutil.copytree(fmnist_tiny, d)
    for f in (d / split / "coat").iterdir():
        f.unlink()
    assert run(d, tmp_path / "o") == 2
    line = error_line(capsys.readouterr().err)
    assert f"{d / split / 'coat'}: class folder has no image files" in line, line


def _corrupt_lzw_tiff() -> bytes:
    """An LZW TIFF whose strip data (after an intact header) is corrupt: libtiff, under DALI, only
    logs an error and returns pixels; PIL refuses it."""
    rng = np.random.default_rng(0)
    arr = (rng.integers(0, 255, (28, 28))).astype(np.uint8)
    b = io.BytesIO()
    Image.fromarray(arr).save(b, format="TIFF", compression="tiff_lzw")
    data = bytearray(b.getvalue())
    with Image.open(io.BytesIO(bytes(data))) as im:
        start, length = im.tag_v2[273][0], im.tag_v2[279][0]
    for i in range(start + 4, start + length - 4, 3):
        data[i] ^= 0xA5
    return bytes(data)


# A file the header check refuses although PIL reads it, by name: a corrupt TIFF (libtiff only
# logs the damage and returns pixels), and a lossless WebP with EXIF metadata, which DALI 2.4's
# decoder fails on (it stopped a run mid-epoch without naming the file).
NOT_JPEG_OR_PNG = {
    "scan.tif": (lambda: _corrupt_lzw_tiff(), "corrupt TIFF image"),
    "scan.webp": (lambda: lossless_with_exif(), "lossless WebP with EXIF metadata"),
}


@pytest.mark.parametrize("name", list(NOT_JPEG_OR_PNG))
@pytest.mark.parametrize("check", ["auto", "off-for-jpeg"])
def test_a_bad_file_that_is_not_jpeg_or_png_stops_training_before_an_epoch(
    name, check, fmnist_tiny, tmp_path, capsys, no_epochs, monkeypatch
):
    """Small sets get the full check; sets too large for it (forced here by lowering the limit)
    still get it for their files that are not JPEG or PNG."""
    make, why = NOT_JPEG_OR_PNG[name]
    d = tmp_path / "d"
    shutil.copytree(fmnist_tiny, d)
    bad = d / "train" / "coat" / name
    bad.write_bytes(make())
    if check == "off-for-jpeg":
        import train.config

        monkeypatch.setattr(train.config, "CHECK_IMAGES_AUTO_MAX", 10)
    assert run(d, tmp_path / "o", "--max-bad-images", "0") == 2
    line = error_line(capsys.readouterr().err)
    assert str(bad) in line and why in line, line


@pytest.mark.parametrize("damage", ["truncated", "bogus_huffman"])
def test_bad_val_jpeg_stops_before_the_first_epoch(damage, fmnist_tiny, tmp_path, capsys, no_epochs):
    """A JPEG cut short is found by the header check (its end marker is missing); one that is whole
    but undecodable only by decoding, in the validation pass before the first epoch."""
    d = tmp_path / "d"
    shutil.copytree(fmnist_tiny, d)
    victim = sorted((d / "val" / "dress").iterdir())[2]
    data = victim.read_bytes()
    if damage == "truncated":
        scan = jpeg_segments(data)[-1][1]
        victim.write_bytes(data[: scan + (len(data) - scan) // 3])  # the header is intact, the scan data is cut
    else:
        victim.write_bytes(bogus_huffman(data))
    from rn50.layout import check_header

    assert (check_header(victim.read_bytes()) is None) == (damage == "bogus_huffman")
    assert run(d, tmp_path / "o", "--max-bad-images", "0") == 2
    line = error_line(capsys.readouterr().err)
    want = "truncated JPEG file" if damage == "truncated" else "undecodable"
    assert str(victim) in line and want in line, line


@pytest.mark.parametrize("backend", ["dali-cpu", "pytorch"])
def test_undecodable_train_image_stops_in_the_first_epoch(backend, fmnist_tiny, tmp_path, capsys, monkeypatch):
    """The header check (on here) does not decode JPEG pixels and only validation
    images are decoded up front, so a whole training JPEG that cannot be decoded is found by the
    loader in the epoch that reads it (docs/serving.md): one error line naming it, exit 2, no
    checkpoint. The pytorch backend decodes in DataLoader worker processes (--workers 1), whose
    errors come back wrapped in the worker's traceback: the line is the cause alone."""
    d = tmp_path / "d"
    shutil.copytree(fmnist_tiny, d)
    victim = sorted((d / "train" / "dress").iterdir())[3]
    victim.write_bytes(bogus_huffman(victim.read_bytes()))
    started = []
    real = Trainer.train_epoch
    monkeypatch.setattr(Trainer, "train_epoch", lambda self, epoch: started.append(epoch) or real(self, epoch))
    # 200 images in batches of 20: no remainder, so epoch 1 reads every file
    flags = ["--check-images", "on", "--data-backend", backend, "--workers", "1", "--max-bad-images", "0"]
    assert run(d, tmp_path / "o", *flags) == 2
    err = capsys.readouterr().err
    line = error_line(err)
    assert started == [0] and str(victim) in line and ("undecodable" in line or "cannot decode" in line), line
    assert "Traceback" not in err and "DataLoader worker" not in err, err[-2000:]
    assert not (tmp_path / "o" / "last.pt").exists()


def test_a_format_dali_does_not_read_is_named_without_the_check(fmnist_tiny, tmp_path, capsys):
    """A GIF named .jpg, --check-images off (as for ImageNet-sized sets): DALI fails its batch,
    and PIL decodes GIFs, so finding the culprit must also ask the header check."""
    d = tmp_path / "d"
    shutil.copytree(fmnist_tiny, d)
    victim = sorted((d / "train" / "bag").iterdir())[4]
    Image.open(victim).convert("RGB").save(victim, format="GIF")
    assert run(d, tmp_path / "o", "--epochs", "1", "--check-images", "off", "--max-bad-images", "0") == 2
    line = error_line(capsys.readouterr().err)
    assert f"{victim}: unsupported image format GIF" in line, line


def _few(src, dst, train_per_class: int, val_per_class: int):
    """A copy of ``src`` with its first images per class only: a run of a few steps."""
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c in sorted((src / split).iterdir()):
            (dst / split / c.name).mkdir(parents=True)
            for f in sorted(c.iterdir())[:n]:
                shutil.copy(f, dst / split / c.name / f.name)
    return dst


def _warnings(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("warning:")]


@pytest.mark.parametrize("backend", ["dali-cpu", "pytorch"])
def test_an_undecodable_train_image_is_left_out_and_the_epoch_keeps_its_steps(backend, fmnist_tiny, tmp_path, capsys):
    """A whole JPEG whose data is corrupt, found only when the loader decodes it mid-epoch (the
    image check is off): the run goes on, names the file in a warning, records it in manifest.json
    and trains as many steps as on the same data without the damage (20 images, batches of 10)."""
    d = _few(fmnist_tiny, tmp_path / "d", 2, 1)
    victim = sorted((d / "train" / "dress").iterdir())[1]
    good = victim.read_bytes()
    victim.write_bytes(bogus_huffman(good))
    flags = ["--check-images", "off", "--data-backend", backend, "--workers", "1", "--batch-size", "10"]
    assert run(d, tmp_path / "o", *flags) == 0
    err = capsys.readouterr().err
    assert [w for w in _warnings(err) if str(victim) in w], err[-2000:]
    assert "1 bad image(s) left out" in err.splitlines()[-1], err[-2000:]
    man = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert [b["path"] for b in man["bad_images"]] == [str(victim)] and man["bad_images"][0]["error"]
    assert load_checkpoint(tmp_path / "o" / "last.pt")["manifest"]["bad_images"] == man["bad_images"]
    steps = load_checkpoint(tmp_path / "o" / "last.pt")["step"]
    if backend == "dali-cpu":  # (the other backend's step count is the same by construction: len(files) // batch)
        victim.write_bytes(good)
        assert run(d, tmp_path / "clean", *flags) == 0
        assert load_checkpoint(tmp_path / "clean" / "last.pt")["step"] == steps
    assert steps == 2


def test_files_the_header_check_refuses_are_left_out_before_training(fmnist_tiny, tmp_path, capsys, monkeypatch):
    """A truncated training JPEG and a text file named .jpg among the validation images: each named
    in one warning, neither in the run's file lists, both in manifest.json; no epoch needed."""
    d = tmp_path / "d"
    shutil.copytree(fmnist_tiny, d)
    cut = sorted((d / "train" / "coat").iterdir())[1]
    data = cut.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    text = d / "val" / "bag" / "notes.jpg"
    text.write_text("not an image\n")
    seen = {}
    monkeypatch.setattr(
        Trainer,
        "fit",
        lambda self, stop_after=None: seen.update(train=self.train_loader.files, val=self.val_loader.files),
    )
    assert run(d, tmp_path / "o", "--check-images", "on") == 0
    warnings = _warnings(capsys.readouterr().err)
    assert len(warnings) == 2 and str(cut) in warnings[0] and str(text) in warnings[1], warnings
    assert str(cut) not in seen["train"] and len(seen["train"]) == 199 and str(text) not in seen["val"]
    man = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert {b["path"] for b in man["bad_images"]} == {str(cut), str(text)}


def test_more_bad_images_than_allowed_stop_the_run_naming_them(fmnist_tiny, tmp_path, capsys, no_epochs):
    d = tmp_path / "d"
    shutil.copytree(fmnist_tiny, d)
    cut = sorted((d / "train" / "coat").iterdir())[:2]
    for f in cut:
        f.write_bytes(f.read_bytes()[:100])
    assert run(d, tmp_path / "o", "--check-images", "on", "--max-bad-images", "1") == 2
    line = error_line(capsys.readouterr().err)
    assert all(str(f) in line for f in cut) and "more than --max-bad-images 1" in line, line


def test_one_class_is_refused_before_any_work(fmnist_tiny, tmp_path, capsys, no_epochs):
    d = tmp_path / "d"
    for split in ("train", "val"):
        shutil.copytree(fmnist_tiny / split / "bag", d / split / "bag")
    assert run(d, tmp_path / "o") == 2
    assert error_line(capsys.readouterr().err) == (
        f"error: {d / 'train'}: only one class folder (bag): a classifier needs at least two "
        "(expected <data>/train/<class>/ for each class)"
    )


def test_resume_from_a_directory(fmnist_tiny, tmp_path, capsys):
    (tmp_path / "ckdir").mkdir()
    assert run(fmnist_tiny, tmp_path / "o", "--resume", str(tmp_path / "ckdir")) == 2
    line = error_line(capsys.readouterr().err)
    assert f"{tmp_path / 'ckdir'}: is a directory" in line, line


def test_random_bytes_checkpoint_without_weights_only_advice(fmnist_tiny, tmp_path, capsys):
    ck = tmp_path / "random.pt"
    ck.write_bytes(np.random.default_rng(0).bytes(4096))
    assert run(fmnist_tiny, tmp_path / "o", "--resume", str(ck)) == 2
    line = error_line(capsys.readouterr().err)
    assert str(ck) in line and "not a readable checkpoint" in line, line
    assert "weights_only" not in line, line


def test_stale_temporaries_are_removed_at_start(fmnist_tiny, tmp_path, monkeypatch):
    """A write killed mid-way (SIGKILL) leaves ``.last.pt.<random>.tmp``; the next start removes
    the trainer's own temporaries and nothing else."""
    out = tmp_path / "o"
    out.mkdir()
    ours = [
        out / ".last.pt.k3j9x_2a.tmp",
        out / ".best.pt.manifest.json.abcdefgh.tmp",
        out / ".curves.png.12345678.tmp",
    ]
    foreign = [
        out / ".notes.txt.abcdefgh.tmp",
        out / "last.pt.abcdefgh.tmp",
        out / ".last.pt.tmp",
        out / ".last.pt.abcdefghij.tmp",
    ]
    for f in ours + foreign:
        f.write_bytes(b"partial")
    monkeypatch.setattr(Trainer, "fit", lambda self, stop_after=None: None)
    assert run(fmnist_tiny, out) == 0
    assert not [f for f in ours if f.exists()]
    assert all(f.exists() for f in foreign)


def test_max_bad_images_is_a_setting_a_resume_may_change(tmp_path):
    """How many bad images a run may leave out is how it executes, not what it computes; a run
    saved before the setting existed resumes with the default."""
    from train.__main__ import build_parser
    from train.config import RunConfig, resolve, resumed_config

    def cfg(*extra):
        return resolve(build_parser().parse_args(["--data", str(tmp_path), *extra]), 1, False)

    saved = cfg()
    assert saved.max_bad_images == 100
    assert resumed_config(saved, cfg("--max-bad-images", "3"), {"max_bad_images"}, "x").max_bad_images == 3
    old = {k: v for k, v in saved.to_dict().items() if k != "max_bad_images"}
    assert RunConfig.from_dict(old, "old").max_bad_images == 100
