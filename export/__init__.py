"""Stage two: ONNX / FP16 / INT8 Q/DQ / TensorRT / AOTInductor export (``python -m export --help``)."""


def main(argv=None) -> int:
    from .__main__ import main as _main

    return _main(argv)
