"""Atomic file writes: write to a temporary file in the target's folder, then
``os.replace`` it onto the target, so a reader (or a later run) never sees a truncated
file after a full disk, a crash or a kill; the temp file is removed on failure."""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np


def write_atomic(path: str | os.PathLike, write, mode: str) -> None:
    """Call ``write(file)`` on a temporary file in ``path``'s folder (opened with ``mode``,
    "w" or "wb"), then rename it to ``path``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode) as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path: str | os.PathLike, obj) -> None:
    """``obj`` as indented JSON (through :func:`clean_json`), written atomically."""
    write_atomic(path, lambda fh: json.dump(clean_json(obj), fh, indent=2), "w")


def clean_json(obj):
    """NaN -> None recursively, so the JSON is valid."""
    if isinstance(obj, dict):
        return {k: clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_json(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return None if np.isnan(obj) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return clean_json(obj.tolist())
    return obj
