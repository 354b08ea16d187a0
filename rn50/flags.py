"""Numeric command-line flags: the values each accepts, checked before any work.

Every command (``train``, ``export``, ``serve.infer``, ``serve.validate``, ``serve.triton``) keeps
one table, option string -> :class:`Range`, beside its parser, and calls :func:`flag_problem`
before it reads a file. So a value the code downstream would divide by, loop over or hand to
DALI or TensorRT fails as one ``error: --flag VALUE: must be ...`` line, and NaN or an infinity
never gets through a float flag. ``tests/core/test_flag_ranges.py`` checks that every int and float flag
of each parser has a row.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Range:
    """The values a numeric flag accepts: ``lo`` and ``hi`` (None: unbounded), each included
    unless ``lo_open``/``hi_open``; NaN and infinities never. ``why``: said after the range;
    ``message``: said instead of it."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    why: str = ""
    message: str = ""

    def problem(self, v: float) -> str | None:
        """None if ``v`` is in the range, else what the error line says after the flag."""
        try:
            finite = math.isfinite(v)
        except OverflowError:  # an int too large for a float is outside every range here
            finite = False
        ok = finite and (
            (self.lo is None or (v > self.lo if self.lo_open else v >= self.lo))
            and (self.hi is None or (v < self.hi if self.hi_open else v <= self.hi))
        )
        if ok:
            return None
        if self.message:
            return self.message
        parts = []
        if self.lo is not None:
            parts.append(f"{'above' if self.lo_open else 'at least'} {number(self.lo)}")
        if self.hi is not None:
            parts.append(f"{'below' if self.hi_open else 'at most'} {number(self.hi)}")
        bounds = " and ".join(parts)
        return f"must be {'' if finite else 'a finite number '}{bounds}" + (f" ({self.why})" if self.why else "")


AT_LEAST_1 = Range(lo=1)
PORT = Range(lo=1, hi=65535, message="a port is a number from 1 to 65535")


def number(v: float) -> str:
    """``v`` as the user would write it: ints as given (however large), 2.0 as 2, else ``%g``."""
    if isinstance(v, int):  # float() of a huge int overflows
        return str(v)
    return str(int(v)) if v.is_integer() else f"{v:g}"


def flag_problem(args: argparse.Namespace, ranges: Mapping[str, Range]) -> str | None:
    """``--flag VALUE: must be ...`` for the first flag of ``ranges`` given outside its range, else
    None (a flag left at None, "not given", is not checked)."""
    for flag, rng in ranges.items():
        v = getattr(args, flag[2:].replace("-", "_"))
        why = rng.problem(v) if v is not None else None
        if why:
            return f"{flag} {number(v)}: {why}"
    return None
