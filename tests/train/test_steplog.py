"""Per-step training records (steps.jsonl, TensorBoard's step/ scalars) and curves.png, from real runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import train
from rn50.checkpoint import load_checkpoint
from tests.pngs import check_png
from tests.stderr import error_line
from tests.train_cli import run
from train.recipe import WarmupCosine
from train.steplog import log_interval, read_steps


def tb_scalars(folder: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of ``tag`` as TensorBoard shows it (purged steps left out)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_step_records_follow_the_run(trained_run):
    last = load_checkpoint(trained_run / "last.pt")
    cfg, total = last["manifest"]["train_config"], int(last["step"])
    history = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    per_epoch = total // len(history)
    recs = read_steps(trained_run / "steps.jsonl")
    every = log_interval(total)
    assert [r["step"] for r in recs] == list(range(every, total + 1, every))
    sched = WarmupCosine(cfg["lr"], total, int(round(cfg["warmup_epochs"] * per_epoch)))
    for r in recs:
        # the rate the step was trained at, and its place in the schedule
        assert r["lr"] == pytest.approx(sched(r["step"] - 1), rel=1e-9)
        assert r["epoch"] == pytest.approx(r["step"] / per_epoch, abs=1e-4)
        assert math.isfinite(r["loss"]) and r["img_per_s"] > 0
    # a record's loss is the mean over its steps: the records of an epoch average to its loss
    assert every == 1, "the shared run is short enough for a record every step"
    for e, h in enumerate(history):
        losses = [r["loss"] for r in recs if e * per_epoch < r["step"] <= (e + 1) * per_epoch]
        assert sum(losses) / len(losses) == pytest.approx(h["train_loss"], rel=1e-4)
    # TensorBoard got the same records
    assert tb_scalars(trained_run / "tb", "step/loss") == [
        (r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in recs
    ]
    assert check_png(trained_run / "curves.png") == (1100, 700)


def test_resume_keeps_one_record_per_step(fmnist_tiny, tmp_path):
    """An interrupted run's records past its checkpoint are dropped on --resume, in steps.jsonl and
    in TensorBoard, and the resumed run's records are the uninterrupted run's."""
    from torch.utils.tensorboard import SummaryWriter

    assert run(fmnist_tiny, tmp_path / "a", "--epochs", "2") == 0
    assert run(fmnist_tiny, tmp_path / "b", "--epochs", "2", "--stop-after", "1") == 0
    a = read_steps(tmp_path / "a" / "steps.jsonl")
    done = int(load_checkpoint(tmp_path / "b" / "last.pt")["step"])
    # what a run killed during its second epoch leaves behind: records past the checkpoint, the
    # last one cut off mid-line, and TensorBoard scalars for the same steps
    later = [{**r, "loss": 99.0} for r in a if r["step"] > done][:3]
    assert later
    steps_file = tmp_path / "b" / "steps.jsonl"
    with steps_file.open("a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in later) + '{"step": ')
    before = set((tmp_path / "b" / "tb").iterdir())
    tb = SummaryWriter(str(tmp_path / "b" / "tb"))
    for r in later:
        tb.add_scalar("step/loss", 99.0, r["step"])
    tb.close()
    # dated a minute back, as a killed job's file is: TensorBoard reads event files in name order
    # (events.out.tfevents.<seconds>.<host>.<pid>.<counter>), and two writers of one process in
    # one second differ only by the counter, which does not sort as a number (.10 before .9)
    (fake,) = set((tmp_path / "b" / "tb").iterdir()) - before
    secs = fake.name.split(".")[3]
    fake.rename(fake.with_name(fake.name.replace(f".{secs}.", f".{int(secs) - 60}.", 1)))

    assert train.main(["--output", str(tmp_path / "b"), "--resume", "--workers", "1"]) == 0
    b = read_steps(steps_file)
    assert [r["step"] for r in b] == [r["step"] for r in a]
    for ra, rb in zip(a, b):
        assert (rb["lr"], rb["epoch"]) == (ra["lr"], ra["epoch"])
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-5)  # resume is exact
    shown = tb_scalars(tmp_path / "b" / "tb", "step/loss")
    assert [s for s, _ in shown] == [r["step"] for r in a]
    assert all(v != 99.0 for _, v in shown)
    check_png(tmp_path / "b" / "curves.png")


def test_step_logger_starts_from_its_step(tmp_path):
    """Fresh run: no records; resumed at step 5: the records up to 5 (a cut-off last line skipped)."""
    import torch

    from train.steplog import StepLogger

    path = tmp_path / "steps.jsonl"
    path.write_text(
        "".join(
            json.dumps({"step": s, "epoch": s / 4, "loss": 1.0, "lr": 0.1, "img_per_s": 1.0}) + "\n"
            for s in range(1, 9)
        )
        + '{"step": 9, "ep'
    )
    log = StepLogger(path, total_steps=12, steps_per_epoch=4, start_step=5)
    assert [r["step"] for r in read_steps(path)] == [r["step"] for r in log.records] == [1, 2, 3, 4, 5]
    for s in (6, 7):
        log.step(s, torch.tensor(float(s)), 0.05, images=8)
    assert [(r["step"], r["loss"]) for r in read_steps(path)][-2:] == [(6, 6.0), (7, 7.0)]
    assert [r["step"] for r in StepLogger(path, 12, 4).records] == [] == read_steps(path)


def test_damaged_step_records_are_named(tmp_path):
    """Only a cut-off last line is the mark of a killed run; damage before it is an error naming the file."""
    from rn50.errors import DataError

    path = tmp_path / "steps.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(DataError, match=rf"^{path}: line 2 is not a JSON record"):
        read_steps(path)


def test_a_new_run_in_an_earlier_runs_folder_is_refused_or_replaces_it(fmnist_tiny, tmp_path, capsys):
    """Not --resume into a folder holding a run: refused, naming the way on, before any work and
    with nothing touched; with --overwrite the earlier run's files go as the new run starts, so
    TensorBoard and the logs show the new run's steps only (the earlier, longer run's later steps
    would otherwise stay on its curves) and a user file in the folder stays."""
    assert run(fmnist_tiny, tmp_path / "r", "--epochs", "2") == 0
    capsys.readouterr()
    (tmp_path / "r" / "notes.txt").write_text("mine")
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "r").iterdir()}
    assert run(fmnist_tiny, tmp_path / "r", "--epochs", "1", "--seed", "7") == 2
    assert error_line(capsys.readouterr().err) == (
        f"error: {tmp_path / 'r'} holds an earlier run (last.pt, best.pt): continue it with --resume, "
        "replace it with --overwrite, or choose another --output"
    )
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "r").iterdir()} == before
    assert run(fmnist_tiny, tmp_path / "r", "--epochs", "1", "--seed", "7", "--overwrite") == 0
    assert f"{tmp_path / 'r'}: removed the earlier run's last.pt," in capsys.readouterr().err
    assert (tmp_path / "r" / "notes.txt").read_text() == "mine"
    assert len((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()) == 1  # the new run's one epoch
    recs = read_steps(tmp_path / "r" / "steps.jsonl")
    shown = tb_scalars(tmp_path / "r" / "tb", "step/loss")
    assert [s for s, _ in shown] == [r["step"] for r in recs]
    assert [v for _, v in shown] == [pytest.approx(r["loss"], rel=1e-6) for r in recs]


def test_the_epoch_line_shows_slow_rates_with_two_digits():
    from train.loop import rate

    assert [rate(v) for v in (0.04, 0.4, 3.25, 9.96, 12.4, 1234.6)] == ["0.04", "0.4", "3.2", "10", "12", "1235"]
