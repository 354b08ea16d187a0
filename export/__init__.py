"""Stage two: ONNX / FP16 / INT8 Q/DQ / TensorRT / AOTInductor export (``python -m export --help``)."""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Run the export CLI with ``argv``; returns the exit status (0 ok, 2 bad input/missing TensorRT, 3 gate)."""
    from .__main__ import main as _main

    rc: int = _main(argv)
    return rc
