"""Reading what a command wrote to stderr, shared by the tests of every stage."""

from __future__ import annotations


def error_line(err: str) -> str:
    """The one ``error: ...`` line of stderr (libraries may log warnings around it), no traceback."""
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]
