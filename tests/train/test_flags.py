"""``python -m train``'s numeric flags: a value outside its range is one ``error: --flag VALUE:
why`` line and exit 2 before any work (nothing read, nothing written), ``--dry-run`` included;
the values at the edges of each range are accepted."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest

import train
import train.distributed
from tests import train_cli
from tests.stderr import error_line
from train.__main__ import build_parser

DRY_OUTPUT = str(Path(tempfile.gettempdir()) / "rn50-dry-run")  # never written

# (flag, value, the words of the reason that must follow "--flag VALUE:", extra flags it needs to
# reach its check): every numeric flag, each side of its range that has a bound
BAD = [
    ("--epochs", "0", "at least 1", ()),
    ("--epochs", "-1", "at least 1", ()),
    ("--batch-size", "1", "at least 2 (batch normalisation", ()),
    ("--batch-size", "-8", "at least 2", ()),
    ("--lr", "0", "above 0", ()),
    ("--lr", "-1", "above 0", ()),
    ("--lr", "nan", "above 0", ()),
    ("--lr", "inf", "finite", ()),
    ("--momentum", "1", "below 1", ()),
    ("--momentum", "-0.1", "at least 0", ()),
    ("--weight-decay", "-0.0001", "at least 0", ()),
    ("--label-smoothing", "1", "below 1", ()),
    ("--label-smoothing", "-0.1", "at least 0", ()),
    ("--mixup", "-0.2", "at least 0", ()),
    ("--warmup-epochs", "-1", "at least 0", ()),
    ("--image-size", "8", "ResNet50 needs at least 16 px", ()),
    ("--min-crop-scale", "1.5", "at most 1", ()),
    ("--min-crop-scale", "0", "above 0", ()),
    ("--min-crop-scale", "-0.5", "above 0", ()),
    ("--workers", "-1", "at least 0", ()),
    ("--seed", "-1", "at least 0", ()),
    ("--seed", str(2**32), "at most 4294967295", ()),
    ("--seed", "9" * 400, "a finite number at least 0", ()),
    ("--limit-train", "0", "at least 1", ()),
    ("--limit-val", "0", "at least 1", ()),
    ("--synthetic-steps", "0", "at least 1", ()),
    ("--num-classes", "1", "at least 2", ("--data-backend", "synthetic")),
    ("--backbone-lr-scale", "-0.1", "at least 0", ("--init-from", "w.pth")),
    ("--stop-after", "0", "at least 1", ()),
]


def _id(case):
    return f"{case[0]}={case[1] if len(case[1]) < 20 else f'{len(case[1])}-digits'}"


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if the run starts (process group, data, model): the flags must stop it before."""

    def refuse(*a, **kw):
        raise AssertionError("the run started before its flags were checked")

    monkeypatch.setattr(train.distributed, "init", refuse)


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
@pytest.mark.parametrize("case", BAD, ids=[_id(c) for c in BAD])
def test_bad_numeric_flag_is_one_error_line(case, dry_run, fmnist_tiny, tmp_path, capsys, no_work):
    flag, value, why, extra = case
    out = tmp_path / "o"
    argv = [*extra, flag, value] + (["--dry-run"] if dry_run else [])
    if flag == "--num-classes":  # synthetic without a folder: the data flag would be refused first
        rc = train.main(["--output", str(out), *train_cli.BASE, *argv])
    else:
        rc = train_cli.run(fmnist_tiny, out, *argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    line = error_line(err)
    assert line.startswith(f"error: {flag} {value}: ") and why in line, line
    assert not out.exists()


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
@pytest.mark.parametrize(
    "make, why",
    [
        (lambda t: (t / "best.pt").write_bytes(b"x") and t / "best.pt", "best.pt is not a folder (it is a file)"),
        (lambda t: Path("/dev/null"), "/dev/null is not a folder (it is a device, pipe or socket)"),
        (lambda t: (t / "f").write_text("x") and t / "f" / "run", "/f is not a folder (it is a file)"),
    ],
    ids=["a-file", "a-device", "under-a-file"],
)
def test_output_that_cannot_be_a_run_folder_is_refused(make, why, dry_run, fmnist_tiny, tmp_path, capsys, no_work):
    """``--output runs/x/best.pt`` (a checkpoint path, as other scripts take), a device or a path
    under a file: one error line naming it, before any data is read."""
    out = make(tmp_path)
    rc = train_cli.run(fmnist_tiny, out, *(["--dry-run"] if dry_run else []))
    err = capsys.readouterr().err
    assert rc == 2, err
    line = error_line(err)
    assert line.startswith(f"error: --output {out}: ") and why in line, line


def test_bad_flag_stops_evaluate_too(tmp_path, capsys, no_work):
    """--evaluate reads --limit-val and --batch-size as well: the same check, before the checkpoint is read."""
    rc = train.main(["--evaluate", str(tmp_path / "none.pt"), "--limit-val", "0"])
    assert rc == 2
    assert error_line(capsys.readouterr().err).startswith("error: --limit-val 0: ")


def _dry(capsys, *argv: str) -> dict:
    """The dry run's configuration; its run folder is one that holds no run (the default,
    runs/default, may hold one in a working copy, which a dry run refuses as the run would)."""
    assert train.main(["--dry-run", "--profile", "cpu", "--output", DRY_OUTPUT, *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_edges_of_the_ranges_are_accepted(capsys, resnet50_weights):
    """Legal if surprising: 0 workers (the pytorch backend loads in the main process), no smoothing,
    no momentum, no decay, no warmup, a crop of the whole image, the smallest image ResNet50 takes."""
    c = _dry(
        capsys,
        *("--workers", "0", "--label-smoothing", "0", "--momentum", "0", "--weight-decay", "0"),
        *("--mixup", "0", "--warmup-epochs", "0", "--min-crop-scale", "1", "--image-size", "16"),
        *("--seed", "0", "--epochs", "1", "--batch-size", "2", "--limit-train", "1", "--limit-val", "1"),
    )
    assert (c["workers"], c["label_smoothing"], c["momentum"], c["weight_decay"]) == (0, 0, 0, 0)
    assert (c["mixup"], c["warmup_epochs"], c["min_crop_scale"], c["image_size"]) == (0, 0, 1, 16)
    assert (c["seed"], c["epochs"], c["batch_size"], c["limit_train"], c["limit_val"]) == (0, 1, 2, 1, 1)
    assert _dry(capsys, "--init-from", str(resnet50_weights), "--backbone-lr-scale", "0")["backbone_lr_scale"] == 0
    assert _dry(capsys, "--seed", str(2**32 - 1))["seed"] == 2**32 - 1


def test_epochs_not_given_is_the_profiles(capsys):
    assert _dry(capsys)["epochs"] == 2
    assert _dry(capsys, "--epochs", "1")["epochs"] == 1


def test_help_states_the_defaults():
    text = " ".join(build_parser().format_help().split())
    for s in (
        "images per process per step (global batch = this x processes; default: the profile's: 256 on GPU, 64 on CPU)",
        "default: the profile's: 224 on GPU (112 with gpu-small), 32 on CPU",
        "default: the profile's: fp16 on GPU, bf16 on CPU",
        "(default: all of them)",
        "steps per epoch with --data-backend synthetic (default: 100)",
    ):
        assert s in text, s
    memory_format = next(a for a in build_parser()._actions if a.dest == "memory_format")
    assert memory_format.help


def test_the_data_folder_is_recorded_as_an_absolute_path(capsys, tmp_path, monkeypatch):
    """The checkpoint's manifest carries it to export, which may run from another folder."""
    import os

    monkeypatch.chdir(tmp_path)
    assert _dry(capsys, "--data", "some/data")["data"] == os.path.join(tmp_path, "some", "data")
    assert _dry(capsys, "--data-backend", "synthetic")["data"] is None


def test_dry_run_refuses_what_the_run_would(tmp_path, capsys, no_work):
    """--dry-run is the pre-flight check: what the run would refuse before training, it refuses."""
    import torch
    import torchvision

    r18 = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), r18)
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "last.pt").write_bytes(b"x")
    cases = [
        (["--resume", "--init-from", str(r18)], "--resume continues a run from its own checkpoint, --init-from"),
        (["--init-from", str(tmp_path / "none.pth")], f"{tmp_path / 'none.pth'}: weights file not found"),
        (["--init-from", str(r18)], f"{r18}: not ResNet50 v1.5 weights"),
        (["--output", str(earlier)], f"{earlier} holds an earlier run (last.pt)"),
    ]
    for argv, why in cases:
        assert train.main(["--dry-run", "--profile", "cpu", "--output", str(tmp_path / "o"), *argv]) == 2, argv
        assert error_line(capsys.readouterr().err).startswith(f"error: {why}"), argv
    assert _dry(capsys, "--output", str(earlier), "--overwrite")["output"] == str(earlier)
