"""Shared driver of the dataset preparations: parallel, idempotent, atomic, reported.

Place in the data flow: raw dataset -> `scannet.py` / `s3dis.py` (one scene each) ->
**preparation** (runs them over all scenes) -> `O/<scene>.npz` -> `readers.load_prepared`
-> input pipeline.

Each scene is a `Job`; `run_jobs` skips scenes whose output exists (unless
``overwrite``), runs the rest in a process pool with a tqdm bar, writes each npz through
a temporary file + rename (a crash never leaves a half-written scene), prints every
distinct warning once, and returns a `Summary` whose counters say what was skipped or
unannotated, so nothing is dropped silently.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import json
import multiprocessing
import os
import sys
import tempfile
from collections.abc import Callable

import numpy as np
from tqdm import tqdm

__all__ = ["Job", "Summary", "run_jobs", "save_prepared"]

PREPARED_DTYPES = {"xyz": np.float32, "rgb": np.uint8, "semantic": np.int32,
                   "instance": np.int32, "superpoint": np.int32}


def save_prepared(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    """Write a prepared scene atomically (temp file in the same folder, then rename).

    Args:
      arrays: ``xyz`` [N, 3], ``rgb`` [N, 3], ``semantic`` [N], ``instance`` [N],
        ``superpoint`` [N]; cast to f32 / u8 / i32 / i32 / i32.
    """
    path = os.fspath(path)
    out = {k: np.ascontiguousarray(arrays[k], dtype=dt) for k, dt in PREPARED_DTYPES.items()}
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                               dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **out)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


@dataclasses.dataclass
class Job:
    """One scene: ``fn(*args, warn=...) -> (arrays, stats)`` written to ``out``."""

    name: str
    out: str
    fn: Callable
    args: tuple


@dataclasses.dataclass
class Summary:
    """Outcome of `run_jobs`.

    Attributes:
      prepared / existing: scene names written now / skipped because already present.
      failed: scene name -> error message.
      stats: summed per-scene counters (points, skipped rows, unannotated points, ...).
      warnings: distinct warning text -> number of scenes that raised it.
    """

    prepared: list[str] = dataclasses.field(default_factory=list)
    existing: list[str] = dataclasses.field(default_factory=list)
    failed: dict[str, str] = dataclasses.field(default_factory=dict)
    stats: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    warnings: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def report(self, out: str) -> int:
        """Print the one-line outcome and the report path; return the CLI exit status
        (1 when a scene failed)."""
        print(f"prepared {len(self.prepared)}, already present {len(self.existing)}, "
              f"failed {len(self.failed)}; totals: {dict(sorted(self.stats.items()))}")
        print(f"report: {os.path.join(out, 'prepare_report.json')}")
        return 1 if self.failed else 0

    def to_json(self) -> dict:
        return {"prepared": len(self.prepared), "existing": len(self.existing),
                "failed": self.failed, "stats": dict(self.stats),
                "warnings": dict(self.warnings)}


def _run_one(job: Job):
    messages: list[str] = []
    try:
        arrays, stats = job.fn(*job.args, warn=messages.append)
        save_prepared(job.out, arrays)
        return job.name, None, stats, messages
    except (OSError, ValueError, KeyError) as e:  # bad input: a clear one-line error
        return job.name, str(e), {}, messages
    except Exception as e:  # noqa: BLE001 - any other failure must not kill the pool
        return job.name, f"{type(e).__name__}: {e}", {}, messages


def run_jobs(jobs: list[Job], *, workers: int = 1, overwrite: bool = False,
             desc: str = "scenes", progress: bool = True) -> Summary:
    """Run the preparation jobs; see the module docstring."""
    summary = Summary()
    todo = []
    for job in jobs:
        if not overwrite and os.path.exists(job.out):
            summary.existing.append(job.name)
        else:
            todo.append(job)

    def emit(text: str) -> None:
        tqdm.write(text, file=sys.stderr)

    def collect(result) -> None:
        name, error, stats, messages = result
        for m in dict.fromkeys(messages):
            if m not in summary.warnings:
                emit(f"warning: {m}")
            summary.warnings[m] += 1
        if error is None:
            summary.prepared.append(name)
            summary.stats.update(stats)
        else:
            summary.failed[name] = error
            emit(f"error: {name}: {error}")

    bar = tqdm(total=len(todo), desc=desc, unit="scene", disable=not progress)
    if workers <= 1 or len(todo) <= 1:
        for job in todo:
            collect(_run_one(job))
            bar.update()
    else:
        # spawn, not fork: the caller may have JAX (multithreaded) loaded
        ctx = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            futures = [pool.submit(_run_one, job) for job in todo]
            for fut in cf.as_completed(futures):
                collect(fut.result())
                bar.update()
    bar.close()
    summary.prepared.sort()
    return summary


def write_report(path: str, summary: Summary, extra: dict | None = None) -> None:
    """Write the summary as JSON (``O/prepare_report.json``)."""
    data = summary.to_json()
    data.update(extra or {})
    with open(path, "w") as fh:
        json.dump(data, fh, indent=1, sort_keys=True)
