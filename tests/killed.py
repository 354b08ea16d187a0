"""A process killed in the middle of publishing files: the tests of what a crash leaves behind."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest


class Killed(BaseException):
    """The process dies here (not an Exception: nothing on the way up handles it)."""


@contextlib.contextmanager
def killed_renaming(monkeypatch: pytest.MonkeyPatch, target: Path) -> Iterator[None]:
    """The body is killed as it renames a file onto ``target`` (``os.replace``, the last step of
    rn50.atomic's writers); the renames before that one happen."""
    replace = os.replace

    def dying_replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if Path(dst) == target:
            raise Killed
        replace(src, dst)

    monkeypatch.setattr(os, "replace", dying_replace)
    with pytest.raises(Killed):
        yield
    monkeypatch.setattr(os, "replace", replace)
