"""Stage one: train ResNet50 v1.5 with NVIDIA's recipe (``python -m train --help``)."""


def main(argv=None) -> int:
    from .__main__ import main as _main

    return _main(argv)
