"""The short CPU training run the train tests start through ``train.main``: one set of settings
small enough for Fashion-MNIST at 32 px on a CPU, so the tests differ only in what they add."""

from __future__ import annotations

from pathlib import Path

import train

BASE = [
    "--profile",
    "cpu",
    "--image-size",
    "32",
    "--batch-size",
    "20",
    "--workers",
    "1",
    "--no-compile",
    "--min-crop-scale",
    "0.35",
]


def run(data: Path, out: Path, *extra: str) -> int:
    """``train.main`` on ``data`` into ``out`` with BASE and then ``extra`` (later flags win)."""
    return train.main(["--data", str(data), "--output", str(out), *BASE, *extra])
