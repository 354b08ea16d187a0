"""``serve.validate`` as the serve tests call it: an engine against a checkpoint on a labelled split."""

from __future__ import annotations

from pathlib import Path


def run_validate(engine: Path, checkpoint: Path, val_dir: Path, *extra: str) -> int:
    """``serve.validate.main`` with ``--engine``, ``--checkpoint`` and VAL_DIR, then ``extra``."""
    from serve import validate

    return validate.main(["--engine", str(engine), "--checkpoint", str(checkpoint), str(val_dir), *extra])
