"""Atomic file writes: write to a temporary file in the target's folder, then
``os.replace`` it onto the target, so a reader (or a later run) never sees a truncated
file after a full disk, a crash or a kill; the temp file is removed on failure."""

from __future__ import annotations

import os
import tempfile


def write_atomic(path: str | os.PathLike, write, mode: str) -> None:
    """Call ``write(file)`` on a temporary file in ``path``'s folder (opened with ``mode``,
    "w" or "wb"), then rename it to ``path``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                               dir=folder)
    try:
        with os.fdopen(fd, mode) as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
