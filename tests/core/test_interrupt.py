"""SIGTERM (a scheduler's time limit, Kubernetes, ``timeout``) stops a command as Ctrl-C does
(rn50.interrupt): its temporaries are removed, nothing half-written is left, and it ends with one
line and the status 143 instead of dying where it stood."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _terminate_when(cmd: list[str], folder: Path, pattern: str, timeout: float = 300) -> tuple[int, str]:
    """Run ``python -m cmd``; once ``pattern`` exists in ``folder`` (the command is writing), send
    SIGTERM. The exit status and stderr."""
    proc = subprocess.Popen(
        [sys.executable, "-m", *cmd],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + timeout
    while not list(folder.glob(pattern)):
        assert proc.poll() is None, f"{cmd[0]} ended ({proc.returncode}) before writing:\n{proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, f"{cmd[0]} wrote no {pattern} in {timeout} s"
        time.sleep(0.05)
    time.sleep(0.5)  # well inside the work
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def _leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name.endswith((".tmp", ".work")))


def test_sigterm_during_serve_infer_leaves_no_partial_output(engine_checkpoint, fmnist_small, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    cmd = ["serve.infer", "--engine", str(engine_checkpoint), "--batch-size", "1", "--device", "cpu"]
    rc, err = _terminate_when(
        [*cmd, "--output", str(out / "p.jsonl"), str(fmnist_small / "val")], out, ".p.jsonl.*.tmp"
    )
    assert rc == 128 + signal.SIGTERM, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("interrupted (SIGTERM): an --output file appears only"), err[-2000:]
    assert "Traceback" not in err
    assert list(out.iterdir()) == []


def test_sigterm_during_export_removes_its_work_folder_and_temporaries(trained_run, tmp_path):
    out = tmp_path / "art"
    out.mkdir()
    cmd = ["export", "--checkpoint", str(trained_run / "best.pt"), "--precision", "int8"]
    rc, err = _terminate_when([*cmd, "--output", str(out / "x.onnx")], out, ".x.onnx.*.work")
    assert rc == 128 + signal.SIGTERM, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("interrupted (SIGTERM): artifacts already complete"), err[-2000:]
    assert "Traceback" not in err
    assert _leftovers(out) == [] and not (out / "x.onnx").exists()


def test_the_interruption_line_is_asked_when_the_signal_comes(monkeypatch, capsys):
    """A callable ``what_is_kept`` describes what is on disk then; serve.infer's depends on --output."""
    from rn50.interrupt import run_command
    from serve import infer

    said = []

    def interrupted() -> int:
        said.append("main ran")
        raise KeyboardInterrupt

    assert run_command(interrupted, lambda: f"asked after {said[0]}") == 130
    assert capsys.readouterr().err == "interrupted (SIGINT): asked after main ran\n"
    monkeypatch.setitem(infer._OUTPUT, "output", "p.jsonl")
    assert infer.what_is_kept().startswith("an --output file appears only when its run completes")
    monkeypatch.setitem(infer._OUTPUT, "output", None)
    assert infer.what_is_kept().startswith("the lines already printed are complete")
