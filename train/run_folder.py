"""The run folder (``--output``): the files a training run writes there, which of them make it an
earlier run's folder, and what an interrupted or diverged run leaves in it (one answer for the
interruption line of ``python -m train`` and the trainer's divergence message)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

CHECKPOINTS = ("last.pt", "best.pt")  # the last completed epoch's (with its training state), the best's
# The files the trainer writes into the run folder atomically (temporary file, then rename) ...
ATOMIC_FILES = (
    *(f for ck in CHECKPOINTS for f in (ck, f"{ck}.manifest.json")),
    "manifest.json",
    "metrics.jsonl",
    "curves.png",
)
# ... and all it writes there (StepLogger appends to steps.jsonl, TensorBoard fills tb/): what a
# new run in an earlier run's folder removes first; anything else there is the user's and stays.
RUN_FILES = (*ATOMIC_FILES, "steps.jsonl", "tb")


def earlier_checkpoints(out: Path) -> list[str]:
    """The checkpoints of an earlier run in the run folder ``out`` (what --overwrite is needed for)."""
    return [f for f in CHECKPOINTS if (out / f).exists()]


def kept_checkpoint(out: Path) -> Path | None:
    """The checkpoint of the run's last completed epoch in ``out``, if one was written: what an
    interrupted or diverged run leaves to ``--resume`` from."""
    last = out / CHECKPOINTS[0]
    return last if last.is_file() else None


def holds_a_run(out: Path) -> bool:
    """Whether ``out`` holds an earlier run of the trainer: its checkpoints, or its run manifest
    (a run stopped before its first epoch). A folder that merely has files of the same names
    (``tb/``, a ``manifest.json`` of something else) is not one, and its files are not removed."""
    if earlier_checkpoints(out):
        return True
    try:
        return json.loads((out / "manifest.json").read_text()).get("kind") == "run"
    except (OSError, ValueError, AttributeError):
        return False


def remove_run_files(out: Path) -> list[str]:
    """Remove an earlier run's files (:data:`RUN_FILES`) from ``out``; returns the names removed."""
    removed = []
    for name in RUN_FILES:
        p = out / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
        else:
            continue
        removed.append(name)
    return removed
