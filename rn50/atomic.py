"""Write-to-temp-then-rename, so that a crash never leaves a half-written artifact.

The temporary file lives in the destination folder (``os.replace`` is only atomic on one
file system) and is removed if the body raises. A destination that is a symbolic link is written
through it, as ``cp`` and shell redirection do: the link's target is replaced and the link stays
(renaming onto the link would replace the link itself with a plain file). Only regular files are
written: a device, pipe or socket (``/dev/null``, ``/dev/stdout``) is refused, since renaming onto
one would replace it, as root, with a plain file.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _target(dest: Path) -> Path:
    """The file a write to ``dest`` replaces: the end of its chain of links (which may not exist yet)."""
    return Path(os.path.realpath(dest)) if dest.is_symlink() else dest


def _not_a_file(dest: Path) -> str | None:
    """Why ``dest``, or what its links lead to, is something other than a regular file or nothing.
    ``os.stat`` follows every link, /proc's too: ``/dev/stdout`` leads to ``pipe:[N]`` when
    stdout is a pipe, a name that ``realpath`` returns but no path opens."""
    try:
        st = os.stat(dest)
    except OSError:
        return None  # nothing there yet (or a broken link, whose target is created)
    if stat.S_ISDIR(st.st_mode):
        return "is a directory (give a file name)"
    if not stat.S_ISREG(st.st_mode):
        return "is a device, pipe or socket, not a file (give a file path)"
    return None


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``dest`` (the target of a link); rename it onto ``dest`` if
    the body succeeds."""
    why = _not_a_file(Path(dest))
    if why:
        raise (IsADirectoryError if Path(dest).is_dir() else OSError)(f"{dest}: {why}")
    dest = _target(Path(dest))
    parent = dest.parent if str(dest.parent) else Path(".")
    if not parent.exists():
        parent.mkdir(parents=True, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"{parent}: folder is not writable, cannot write {dest.name}")
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            # mkstemp creates the file 0600; give the artifact the usual umask-based permissions
            os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def write_bytes(dest: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


def write_text(dest: str | os.PathLike[str], text: str) -> None:
    write_bytes(dest, text.encode("utf-8"))


def write_json(dest: str | os.PathLike[str], obj: Any) -> None:
    write_text(dest, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def unwritable_reason(dest: str | os.PathLike[str]) -> str | None:
    """Why :func:`atomic_path` could not put a file at ``dest``, or None if it can.

    Checked before a long job starts, so that a bad output path fails in a second instead of
    after the work: ``dest`` is a directory, a device or a pipe, a parent is a file, or the folder
    (or, when it does not exist yet, the nearest existing folder above it, where it would be
    created) is not writable. A link is judged by its target, where the file will go.
    """
    why = _not_a_file(Path(dest))
    if why:
        return why
    dest = _target(Path(dest))
    folder = dest.parent if str(dest.parent) else Path(".")
    while not folder.exists() and not folder.is_symlink() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        kind = "a broken link" if not folder.exists() else "a file" if folder.is_file() else "a device, pipe or socket"
        return f"{folder} is not a folder (it is {kind})"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"folder {folder} is not writable"
    try:  # where permissions do not tell (root; /proc, /sys, read-only mounts): try it
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=folder)
    except OSError as e:
        return f"cannot create a file in folder {folder} ({e.strerror or e})"
    os.close(fd)
    os.unlink(probe)
    return None


def remove_stale_temporaries(folder: str | os.PathLike[str], names: Iterable[str]) -> list[Path]:
    """Delete the temporaries :func:`atomic_path` left in ``folder`` for ``names`` when a process was
    killed mid-write (``.<name>.<8 random characters>.tmp``); nothing else is touched. Returns
    what was removed. Call it only where no other process writes those names at the same time."""
    import re

    folder = Path(folder)
    if not folder.is_dir():
        return []
    names = list(names)
    # a name that is a link was written in its target's folder, under the target's name
    places = {(folder, n) for n in names} | {(t.parent, t.name) for t in (_target(folder / n) for n in names)}
    removed = []
    for where in sorted({p for p, _ in places}):
        own = [n for p, n in places if p == where]
        pattern = re.compile(r"\.(" + "|".join(re.escape(n) for n in own) + r")\.[A-Za-z0-9_]{8}\.tmp")
        for f in where.iterdir() if where.is_dir() else ():
            if pattern.fullmatch(f.name) and f.is_file() and not f.is_symlink():
                with contextlib.suppress(FileNotFoundError):
                    f.unlink()
                    removed.append(f)
    return removed
