"""``python -m serve.triton``: the command line (see serve/triton/__init__.py and docs/serving.md)."""

from __future__ import annotations

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
