"""How the commands end when they are stopped: SIGTERM is handled as Ctrl-C is.

SIGTERM is what batch schedulers (Slurm's time limit), Kubernetes, ``timeout`` and torchrun send
to stop a process. Python's default for it is to die at once, so no ``finally`` runs: the
temporaries of :mod:`rn50.atomic` (a checkpoint, an engine, a predictions file being written)
and export's work folder would stay behind. :func:`run_command` raises :class:`Terminated`, a
KeyboardInterrupt, in the main thread instead, so the cleanup that Ctrl-C gets runs for SIGTERM
too, and the command ends with one line instead of a traceback.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from types import FrameType

EXIT_SIGINT, EXIT_SIGTERM = 128 + signal.SIGINT, 128 + signal.SIGTERM  # the shell's convention


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the main thread is, like KeyboardInterrupt for SIGINT."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated()


def run_command(main: Callable[[], int], what_is_kept: str | Callable[[], str]) -> int:
    """``main()``'s exit status; SIGINT or SIGTERM during it unwinds (every ``finally`` and
    context manager runs, temporaries are removed), prints ``interrupted (SIG...): what_is_kept``
    (a callable: asked then, for what is on disk at that moment) and returns 130 or 143. For a
    command's ``__main__`` only: signal handlers are the process's."""
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return main()
    except KeyboardInterrupt as e:
        name = "SIGTERM" if isinstance(e, Terminated) else "SIGINT"
        kept = what_is_kept() if callable(what_is_kept) else what_is_kept
        print(f"interrupted ({name}): {kept}", file=sys.stderr)
        return EXIT_SIGTERM if isinstance(e, Terminated) else EXIT_SIGINT
    finally:
        signal.signal(signal.SIGTERM, previous)
