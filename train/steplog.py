"""Per-step training records: loss, learning rate and images/s every few steps.

``steps.jsonl`` in the run folder holds one JSON object per record (``step``, ``epoch`` as a
fraction of the schedule, ``loss`` averaged over the steps since the previous record, ``lr``,
``img_per_s``), and the same scalars go to TensorBoard under ``step/``. ``curves.png`` is drawn
from them (``rn50.plots.training_curves``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from rn50.atomic import write_text
from rn50.errors import DataError

# About this many records per run, whatever its length: every step of a short CPU run, every
# ~50th of a 90-epoch ImageNet run on 8 GPUs. Reading the loss back is a device sync, so a
# record every step would also slow a GPU run down.
RECORDS_PER_RUN = 1000


def log_interval(total_steps: int) -> int:
    """Steps between two records for a run of ``total_steps`` optimizer steps."""
    return max(1, total_steps // RECORDS_PER_RUN)


def read_steps(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``steps.jsonl`` (none if it does not exist). Records are appended as
    they come, so a run killed mid-write can leave a partial last line: it is skipped."""
    p = Path(path)
    if not p.is_file():
        return []
    lines = [line for line in p.read_text().splitlines() if line.strip()]
    out = []
    for i, line in enumerate(lines):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise DataError(f"{p}: line {i + 1} is not a JSON record (delete the file to start it again)") from None
    return out


class StepLogger:
    """Created once per run on the main rank; :meth:`step` is called after every optimizer step.

    A run that starts at ``start_step`` (a resumed one) keeps only the records up to that step:
    those written after the checkpoint it resumes from belong to steps that are trained again.
    """

    def __init__(self, path: str | Path, total_steps: int, steps_per_epoch: int, start_step: int = 0, tb: Any = None):
        self.path, self.tb = Path(path), tb
        self.every, self.steps_per_epoch = log_interval(total_steps), steps_per_epoch
        self.records = [r for r in read_steps(self.path) if r["step"] <= start_step]
        write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records))
        self._loss_sum: torch.Tensor | float = 0.0
        self._loss_steps = 0
        self.begin_epoch()

    def begin_epoch(self) -> None:
        """Restart the throughput clock (validation and checkpointing between epochs are not training)."""
        self._t, self._images = time.perf_counter(), 0

    def step(self, step: int, loss: torch.Tensor, lr: float, images: int) -> None:
        """Step ``step`` (counted from 1) trained ``images`` images (all ranks) with ``loss`` at ``lr``."""
        self._loss_sum = self._loss_sum + loss.detach().float()
        self._loss_steps += 1
        self._images += images
        if step % self.every:
            return
        mean = float(self._loss_sum) / self._loss_steps  # the one device sync per record
        now = time.perf_counter()
        rec = {
            "step": step,
            "epoch": round(step / self.steps_per_epoch, 4),
            "loss": mean,
            "lr": lr,
            "img_per_s": self._images / max(now - self._t, 1e-9),
        }
        self.records.append(rec)
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k in ("loss", "lr", "img_per_s"):
                self.tb.add_scalar(f"step/{k}", rec[k], step)
        self._loss_sum, self._loss_steps = 0.0, 0
        self._t, self._images = now, 0
