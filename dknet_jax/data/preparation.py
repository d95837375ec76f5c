"""Shared driver of the dataset preparations: parallel, idempotent, atomic, reported.

Place in the data flow: raw dataset -> `scannet.py` / `s3dis.py` (one scene each) ->
**preparation** (runs them over all scenes) -> `O/<scene>.npz` -> `readers.load_prepared`
-> input pipeline.

Each scene is a `Job`; `run_jobs` skips scenes whose output exists (unless
``overwrite``), runs the rest in a process pool with a tqdm bar, writes each npz through
a temporary file + rename (a crash never leaves a half-written scene), prints every
distinct warning once, and returns a `Summary` whose counters say what was skipped or
unannotated, so nothing is dropped silently. Stopping the run (SIGTERM, Ctrl-C, or
SIGKILL of the parent) stops the pool workers too, so no scene is written afterwards.

Settings: the settings that change what a scene's npz holds (`check_settings`; S3DIS: the
superpoint parameters, ScanNet: the label table) are recorded in
``O/prepare_settings.json``. A rerun with other settings stops with an error naming them
(instead of silently keeping scenes made with the old ones) unless ``--overwrite``.

Report: ``O/prepare_report.json`` keeps per-scene counters (``scene_stats``) merged over
runs, so ``stats`` totals every scene prepared in O, not only this run's (a rerun that
skips everything keeps the totals). Split lists never drop a scene silently: failed
scenes are listed per split in ``split_failed`` and named in a warning, and a split with
no prepared scene gets no list file (training then stops with "split not found") rather
than a 0-byte one.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
import dataclasses
import json
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Callable

import numpy as np
from tqdm import tqdm

from dknet_jax.io_atomic import write_atomic as _write_atomic  # noqa: F401  (shared)

__all__ = [
    "Job",
    "SettingsMismatch",
    "Summary",
    "check_settings",
    "run_jobs",
    "save_prepared",
    "write_split_lists",
    "write_text_atomic",
]

SETTINGS_FILE = "prepare_settings.json"

PREPARED_DTYPES = {
    "xyz": np.float32,
    "rgb": np.uint8,
    "semantic": np.int32,
    "instance": np.int32,
    "superpoint": np.int32,
}


def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder + rename."""
    _write_atomic(path, lambda fh: fh.write(text), "w")


def save_prepared(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    """Write a prepared scene atomically (temp file in the same folder, then rename).

    Args:
      arrays: ``xyz`` [N, 3], ``rgb`` [N, 3], ``semantic`` [N], ``instance`` [N],
        ``superpoint`` [N]; cast to f32 / u8 / i32 / i32 / i32.
    """
    path = os.fspath(path)
    out = {k: np.ascontiguousarray(arrays[k], dtype=dt) for k, dt in PREPARED_DTYPES.items()}
    _write_atomic(path, lambda fh: np.savez(fh, **out), "wb")


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
      stats: summed per-scene counters (points, skipped rows, unannotated points, ...)
        of the scenes prepared in this run.
      scene_stats: scene name -> its counters (this run's scenes).
      totals: summed counters of every scene prepared in the output folder, this run's and
        earlier runs' (filled by `write_report`).
      warnings: distinct warning text -> number of scenes that raised it.
    """

    prepared: list[str] = dataclasses.field(default_factory=list)
    existing: list[str] = dataclasses.field(default_factory=list)
    failed: dict[str, str] = dataclasses.field(default_factory=dict)
    stats: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    warnings: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    scene_stats: dict[str, dict] = dataclasses.field(default_factory=dict)
    totals: collections.Counter | None = None

    def report(self, out: str) -> int:
        """Print the one-line outcome and the report path; return the CLI exit status
        (1 when a scene failed)."""
        print(
            f"prepared {len(self.prepared)}, already present {len(self.existing)}, "
            f"failed {len(self.failed)}; totals: "
            f"{dict(sorted((self.stats if self.totals is None else self.totals).items()))}"
        )
        print(f"report: {os.path.join(out, 'prepare_report.json')}")
        return 1 if self.failed else 0

    def to_json(self) -> dict:
        return {
            "prepared": len(self.prepared),
            "existing": len(self.existing),
            "failed": self.failed,
            "stats": dict(self.stats if self.totals is None else self.totals),
            "run_stats": dict(self.stats),
            "scene_stats": self.scene_stats,
            "warnings": dict(self.warnings),
        }


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


def _worker_init(parent_pid: int) -> None:
    """Pool worker start-up: die with the parent, leave Ctrl-C to the parent."""
    if sys.platform.startswith("linux"):
        try:  # the kernel sends SIGKILL to this worker when the parent dies (even by SIGKILL)
            import ctypes

            pr_set_pdeathsig = 1
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before the line above took effect
        os._exit(1)
    # Ctrl-C reaches the whole process group; the parent stops the workers itself
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def _sigterm_exits():
    """While active (main thread only), SIGTERM raises SystemExit(143) in the main thread,
    so ``run_jobs`` stops its workers before the process exits; the default SIGTERM would
    end this process at once and leave the workers running."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigterm(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stop_pool(pool: cf.ProcessPoolExecutor, grace_s: float = 2.0) -> None:
    """Cancel the queued jobs and end the pool's worker processes (terminate, then kill)."""
    procs = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(grace_s)
        if p.is_alive():
            p.kill()
            p.join(grace_s)


def run_jobs(
    jobs: list[Job],
    *,
    workers: int = 1,
    overwrite: bool = False,
    desc: str = "scenes",
    progress: bool = True,
) -> Summary:
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
            summary.scene_stats[name] = dict(stats)
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
        pool = cf.ProcessPoolExecutor(
            max_workers=workers, mp_context=ctx, initializer=_worker_init, initargs=(os.getpid(),)
        )
        try:
            with _sigterm_exits():
                futures = [pool.submit(_run_one, job) for job in todo]
                for fut in cf.as_completed(futures):
                    collect(fut.result())
                    bar.update()
        except BaseException:
            # SIGTERM, Ctrl-C or an error here: stop the workers now instead of letting
            # them finish (and write) the remaining scenes after this process is gone
            bar.close()
            _stop_pool(pool)
            raise
        pool.shutdown()
    bar.close()
    summary.prepared.sort()
    return summary


def write_report(path: str, summary: Summary, extra: dict | None = None) -> None:
    """Write the summary as JSON (``O/prepare_report.json``), atomically.

    The per-scene counters of an earlier report in ``path`` are kept for the scenes this
    run did not redo, and ``stats`` (also ``summary.totals``) sums them all: a rerun that
    skips every scene keeps the totals. A report of an older version without
    ``scene_stats`` contributes its ``stats`` as the earlier scenes' totals.
    """
    scene_stats: dict[str, dict] = {}
    base: collections.Counter = collections.Counter()
    if os.path.isfile(path):
        try:
            with open(path) as fh:
                old = json.load(fh)
        except (OSError, ValueError):
            old = {}
        if isinstance(old.get("scene_stats"), dict):
            scene_stats.update(old["scene_stats"])
        elif isinstance(old.get("stats"), dict) and summary.existing:
            base.update(old["stats"])
    scene_stats.update(summary.scene_stats)
    totals = collections.Counter(base)
    for stats in scene_stats.values():
        totals.update(stats)
    summary.totals = totals
    data = summary.to_json()
    data["scene_stats"] = dict(sorted(scene_stats.items()))
    data.update(extra or {})
    write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True))


class SettingsMismatch(ValueError):
    """The output folder was prepared with other settings (see `check_settings`)."""


def check_settings(
    out: str, settings: dict, *, overwrite: bool, scenes: list[str]
) -> Callable[[Summary], None]:
    """Compare ``settings`` with those recorded in ``O/prepare_settings.json``.

    - no record: record ``settings`` now (a folder prepared before records existed is
      taken to match);
    - same settings: nothing to do (existing scenes are skipped as usual);
    - other settings without ``overwrite``: `SettingsMismatch` naming each differing
      setting, its recorded and its new value, and ``--overwrite``;
    - other settings with ``overwrite``: every prepared scene in O must be among
      ``scenes`` (else `SettingsMismatch`: the others would keep the old settings).

    Returns ``commit(summary)``, to call after `run_jobs`: it records the new settings
    once every scene was redone (no failure; a failed scene keeps its old npz).
    """
    path = os.path.join(out, SETTINGS_FILE)
    settings = json.loads(json.dumps(settings))  # the JSON form, as compared later

    def record() -> None:
        write_text_atomic(path, json.dumps(settings, indent=1, sort_keys=True) + "\n")

    if not os.path.isfile(path):
        os.makedirs(out, exist_ok=True)
        record()
        return lambda summary: None
    with open(path) as fh:
        old = json.load(fh)
    diff = {
        k: (old.get(k), settings.get(k))
        for k in sorted(set(old) | set(settings))
        if old.get(k) != settings.get(k)
    }
    if not diff:
        return lambda summary: None
    named = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
    if not overwrite:
        raise SettingsMismatch(
            f"{out} was prepared with other settings ({named}; recorded in {path}); its "
            f"scenes would be kept as they are. Rerun with --overwrite to redo every scene "
            f"with the new settings, use the recorded settings, or choose another --out"
        )
    wanted = set(scenes)
    stale = sorted(f[:-4] for f in os.listdir(out) if f.endswith(".npz") and f[:-4] not in wanted)
    if stale:
        raise SettingsMismatch(
            f"{out} was prepared with other settings ({named}); --overwrite redoes only the "
            f"scenes of this run, and {len(stale)} other prepared scene(s) there (e.g. "
            f"{stale[:3]}) would keep the old ones. Prepare all scenes, remove those, or "
            f"choose another --out"
        )

    def commit(summary: Summary) -> None:
        if not summary.failed:
            record()

    return commit


def write_split_lists(
    out: str, lists: dict[str, list[str]], failed: dict[str, list[str]], note: Callable[[str], None]
) -> dict:
    """Write ``O/<split>.txt`` for each split (atomically) and return the report fields.

    ``lists``: split -> prepared scene names; ``failed``: split -> scenes of that split
    that failed in this run (named in a warning through ``note``). A split with no
    prepared scene gets no list file (an old one is removed) and a warning: an empty
    list would make training or evaluation run on nothing.
    """
    extra: dict = {"split_failed": {}}
    for split, names in lists.items():
        bad = sorted(failed.get(split, ()))
        if bad:
            extra["split_failed"][split] = bad
            note(
                f"split {split}: {len(bad)} scene(s) failed and are not in {split}.txt: "
                f"{', '.join(bad[:10])}{' ...' if len(bad) > 10 else ''} (errors under "
                f"'failed' in prepare_report.json)"
            )
        path = os.path.join(out, f"{split}.txt")
        if not names:
            if os.path.exists(path):
                os.remove(path)
            note(
                f"split {split}: no scene prepared; {path} not written (training or "
                f"evaluation on this split stops with 'split not found')"
            )
            continue
        write_text_atomic(path, "".join(f"{n}\n" for n in names))
    return extra
