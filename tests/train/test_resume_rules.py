"""What --resume keeps and what it may change, --stop-after per job, and what an interrupted run
says it left: a resumed run is the run its checkpoint describes, or it is refused."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

import train
from rn50.checkpoint import load_checkpoint
from tests.stderr import error_line
from tests.train_cli import run
from train.__main__ import build_parser, given_flags
from train.config import ConfigError, resolve, resumed_config


def _cfg(argv: list[str], cuda: bool = False):
    args = build_parser().parse_args(argv)
    return resolve(args, 1, cuda), given_flags(argv)


def test_resume_refuses_recipe_changes_and_takes_how_it_runs():
    saved, _ = _cfg(["--profile", "cpu", "--output", "o"])
    # how the run executes may change, and does
    cfg, given = _cfg(["--profile", "cpu", "--output", "o", "--data-backend", "pytorch", "--workers", "3", "--compile"])
    got = resumed_config(saved, cfg, given, "o/last.pt")
    assert (got.data_backend, got.workers, got.compile) == ("pytorch", 3, True)
    assert dataclasses.replace(got, data_backend=saved.data_backend, workers=saved.workers, compile=False) == saved
    # what it computes may not: each differing flag is named with the run's value
    cfg, given = _cfg(["--output", "o", "--profile", "cpu", "--lr", "1.0", "--batch-size", "8", "--image-size", "64"])
    with pytest.raises(ConfigError) as e:
        resumed_config(saved, cfg, given, "o/last.pt")
    msg = str(e.value)
    assert msg.startswith("o/last.pt: a resumed run keeps the settings it was started with, and these differ: ")
    for part in ("--batch-size 8 (the run has 64)", "--image-size 64 (the run has 32)", "--lr 1.0 (the run has 0.256)"):
        assert part in msg, msg
    # the same values given again are no change
    cfg, given = _cfg(["--output", "o", "--profile", "cpu", "--batch-size", "64", "--seed", "0"])
    assert resumed_config(saved, cfg, given, "o/last.pt") == saved


def test_a_gpu_run_resumes_on_a_cpu():
    """dali-gpu becomes dali-cpu and fp16 autocast goes off, as they do for a new run on a CPU."""
    saved, _ = _cfg(["--profile", "gpu", "--output", "o"], cuda=True)
    assert (saved.data_backend, saved.amp, saved.amp_dtype, saved.tf32) == ("dali-gpu", True, "fp16", True)
    cfg, given = _cfg(["--output", "o"])
    got = resumed_config(saved, cfg, given, "o/last.pt")
    assert (got.data_backend, got.amp, got.tf32) == ("dali-cpu", False, False)
    assert (got.batch_size, got.image_size, got.lr) == (saved.batch_size, saved.image_size, saved.lr)
    # and another process count is refused: the global batch and learning rate would change
    cfg = dataclasses.replace(cfg, world_size=2)
    with pytest.raises(ConfigError, match="trains on 1 process"):
        resumed_config(dataclasses.replace(saved, world_size=1), cfg, given, "o/last.pt")


def test_resume_edge_cases():
    """A fine-tune run's own --freeze-backbone is no change; --amp takes the run's autocast dtype
    (fp16: none on a CPU); --profile auto names no profile; synthetic data is no backend to switch to."""
    saved, _ = _cfg(["--profile", "cpu", "--output", "o", "--init-from", "w.pth", "--freeze-backbone"])
    cfg, given = _cfg(["--output", "o", "--profile", "cpu", "--freeze-backbone", "--resume"])
    assert resumed_config(saved, cfg, given, "o/last.pt") == saved
    gpu, _ = _cfg(["--profile", "gpu", "--output", "o"], cuda=True)
    cfg, given = _cfg(["--output", "o", "--amp", "--resume"])
    assert resumed_config(gpu, cfg, given, "o/last.pt", amp=True).amp is False
    cfg, given = _cfg(["--output", "o", "--profile", "cpu", "--data-backend", "synthetic", "--resume"])
    with pytest.raises(ConfigError, match="a resumed run keeps its data"):
        resumed_config(saved, cfg, given, "o/last.pt")


def test_resume_takes_profile_auto_and_refuses_overwrite(one_epoch, fmnist_tiny, capsys):
    assert run(fmnist_tiny, one_epoch, "--resume", "--overwrite") == 2
    assert "--overwrite starts a new one: give one of them" in error_line(capsys.readouterr().err)
    argv = [
        "--data",
        str(fmnist_tiny),
        "--output",
        str(one_epoch),
        "--resume",
        "--profile",
        "auto",
        "--stop-after",
        "1",
    ]
    assert train.main([*argv, "--workers", "1"]) == 0
    assert load_checkpoint(one_epoch / "last.pt")["epoch"] == 1


def test_a_folder_of_other_files_is_not_taken_for_a_run(tmp_path):
    """Only an earlier run's folder is cleared when a new run starts in it."""
    from train.run_folder import holds_a_run

    (tmp_path / "tb").mkdir()
    (tmp_path / "manifest.json").write_text('{"kind": "dataset"}')
    assert not holds_a_run(tmp_path)
    (tmp_path / "manifest.json").write_text('{"kind": "run"}')
    assert holds_a_run(tmp_path)
    (tmp_path / "manifest.json").unlink()
    (tmp_path / "best.pt").write_bytes(b"x")
    assert holds_a_run(tmp_path)


@pytest.fixture
def one_epoch(fmnist_tiny, tmp_path):
    """A run of a 3-epoch schedule stopped after its first epoch."""
    out = tmp_path / "o"
    assert run(fmnist_tiny, out, "--epochs", "3", "--stop-after", "1") == 0
    assert load_checkpoint(out / "last.pt")["epoch"] == 0
    return out


def test_resume_applies_flags_refuses_others_and_stop_after_counts_this_job(one_epoch, fmnist_tiny, capsys):
    out = one_epoch
    before = (out / "last.pt").read_bytes()
    assert run(fmnist_tiny, out, "--resume", "--lr", "1.0") == 2
    assert "--lr 1.0 (the run has 0.256)" in error_line(capsys.readouterr().err)
    assert (out / "last.pt").read_bytes() == before
    # the same command again goes on by one epoch each time, and says when the schedule is done
    for epoch in (1, 2):
        assert run(fmnist_tiny, out, "--resume", "--stop-after", "1", "--data-backend", "pytorch") == 0
        ck = load_checkpoint(out / "last.pt")
        assert ck["epoch"] == epoch and ck["manifest"]["train_config"]["data_backend"] == "pytorch"
    capsys.readouterr()
    before = {f: f.read_bytes() for f in sorted(out.rglob("*")) if f.is_file()}
    assert json.loads((out / "manifest.json").read_text())["accuracy"]["epoch"] == 3
    assert run(fmnist_tiny, out, "--resume", "--stop-after", "1") == 0
    assert "nothing to train: the run in" in capsys.readouterr().err
    # a resume with nothing left to train leaves the run folder as it was (manifest, TensorBoard)
    assert {f: f.read_bytes() for f in sorted(out.rglob("*")) if f.is_file()} == before


def test_a_resumed_run_keeps_its_accuracy_until_an_epoch_replaces_it(one_epoch, fmnist_tiny, monkeypatch):
    """The run manifest written as a resumed job starts carries the accuracy it resumed with, so a
    job stopped in its first epoch (pre-empted, or failing) leaves the run's accuracy on record."""
    from train.loop import Trainer

    acc = json.loads((one_epoch / "manifest.json").read_text())["accuracy"]
    assert acc["epoch"] == 1 and "top1" in acc and "best_top1" in acc

    def stopped(self, epoch):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_fit_epoch", stopped)
    with pytest.raises(KeyboardInterrupt):
        run(fmnist_tiny, one_epoch, "--resume")
    assert json.loads((one_epoch / "manifest.json").read_text())["accuracy"] == acc


def test_resume_on_renamed_classes_is_refused(one_epoch, fmnist_tiny, tmp_path, capsys):
    """Same class count, another name: output 1 would go on under another class's name."""
    d = tmp_path / "renamed"
    shutil.copytree(fmnist_tiny, d)
    for split in ("train", "val"):
        (d / split / "coat").rename(d / split / "zebra")
    before = (one_epoch / "last.pt").read_bytes()
    assert run(d, one_epoch, "--resume") == 2
    line = error_line(capsys.readouterr().err)
    assert "the run was trained on other classes than" in line and "'coat' -> 'dress'" in line, line
    assert (one_epoch / "last.pt").read_bytes() == before


def test_the_interruption_message_says_what_is_on_disk(tmp_path, monkeypatch):
    from train import __main__ as cli

    monkeypatch.delitem(cli._RUN, "output", raising=False)  # --evaluate, --dry-run
    assert cli.what_is_kept() == "nothing was written"
    monkeypatch.setitem(cli._RUN, "output", tmp_path)
    assert cli.what_is_kept() == "no epoch of this run was completed, so it wrote no checkpoint"
    (tmp_path / "last.pt").write_bytes(b"x")
    assert cli.what_is_kept().startswith(f"the last completed epoch's checkpoint ({tmp_path / 'last.pt'}) is intact")


def test_evaluate_scores_the_runs_validation_subset(fmnist_tiny, tmp_path, capsys):
    """--evaluate reproduces the manifest's accuracy: the run's --limit-val subset, unless given."""
    out = tmp_path / "o"
    assert run(fmnist_tiny, out, "--epochs", "1", "--limit-val", "20", "--seed", "3") == 0
    man = load_checkpoint(out / "best.pt")["manifest"]
    capsys.readouterr()
    assert train.main(["--evaluate", str(out / "best.pt"), "--workers", "1"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["images"] == man["accuracy"]["images"] == 20
    assert got["top1"] == pytest.approx(man["accuracy"]["top1"], abs=1e-6)
    assert train.main(["--evaluate", str(out / "best.pt"), "--workers", "1", "--limit-val", "30"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 30
    # data moved since: the error says to pass --data, as export's does
    from rn50.checkpoint import save_checkpoint

    obj = load_checkpoint(out / "best.pt")
    obj["manifest"]["train_config"]["data"] = str(tmp_path / "moved")
    moved = save_checkpoint(tmp_path / "moved.pt", obj["model"], obj["manifest"])
    assert train.main(["--evaluate", str(moved), "--workers", "1"]) == 2
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"error: {tmp_path / 'moved' / 'val'}: the validation folder of the data recorded in "), line
    assert str(moved) in line and "pass --data ROOT" in line


def test_lengthening_a_run_says_how_its_learning_rate_jumps(one_epoch, fmnist_tiny, capsys):
    """--epochs N with --resume stretches the cosine: the learning rate at the resumed step rises,
    and one line says from what to what."""
    import re

    from train.recipe import WarmupCosine

    ck = load_checkpoint(one_epoch / "last.pt")
    cfg = ck["manifest"]["train_config"]
    step = ck["step"]
    assert run(fmnist_tiny, one_epoch, "--resume", "--epochs", "6", "--stop-after", "1") == 0
    err = capsys.readouterr().err
    said = r"the schedule is now 6 epochs \(the run had 3\): the cosine learning rate at step (\d+) "
    m = re.search(said + r"goes from (\S+) to (\S+)\n", err)
    assert m, err
    steps_per_epoch = step  # one epoch done
    warmup = int(round(cfg["warmup_epochs"] * steps_per_epoch))
    want = [WarmupCosine(cfg["lr"], e * steps_per_epoch, warmup)(step) for e in (3, 6)]
    assert int(m[1]) == step and [float(m[2]), float(m[3])] == pytest.approx(want, rel=1e-3)
    assert want[1] > want[0]
    # the same schedule resumed says nothing of it
    assert run(fmnist_tiny, one_epoch, "--resume", "--stop-after", "1") == 0
    assert "the schedule is now" not in capsys.readouterr().err


def test_metrics_count_epochs_from_1_and_a_run_that_counted_from_0_resumes_counting_from_1(one_epoch, fmnist_tiny):
    """metrics.jsonl and the manifests' history count epochs from 1, as the console, manifests,
    TensorBoard and steps.jsonl do; a checkpoint whose history counted from 0 is renumbered."""
    import torch

    assert [json.loads(ln)["epoch"] for ln in (one_epoch / "metrics.jsonl").read_text().splitlines()] == [1]
    ck = load_checkpoint(one_epoch / "last.pt")
    ck["history"] = [{**r, "epoch": r["epoch"] - 1} for r in ck["history"]]  # as runs before wrote it
    torch.save(ck, one_epoch / "last.pt")
    assert run(fmnist_tiny, one_epoch, "--resume", "--stop-after", "1") == 0
    assert [json.loads(ln)["epoch"] for ln in (one_epoch / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert [r["epoch"] for r in json.loads((one_epoch / "manifest.json").read_text())["history"]] == [1, 2]
