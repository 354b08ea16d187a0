"""The serve commands as the serve tests call them, and the refusals they expect."""

from __future__ import annotations

from pathlib import Path


def run_validate(engine: Path, checkpoint: Path, val_dir: Path, *extra: str) -> int:
    """``serve.validate.main`` with ``--engine``, ``--checkpoint`` and VAL_DIR, then ``extra``."""
    from serve import validate

    return validate.main(["--engine", str(engine), "--checkpoint", str(checkpoint), str(val_dir), *extra])


def image_size_refusal(engine: Path, size: int) -> str:
    """How the error line for ``engine`` (a copy of a test engine, which takes 32 px images) starts
    when its manifest says ``image_size`` ``size``."""
    return (
        f"error: {engine}: the engine takes 3x32x32 (channels x height x width) images but its "
        f"manifest ({engine.name}.manifest.json) says image_size {size}, i.e. 3x{size}x{size}"
    )
