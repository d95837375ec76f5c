"""Stopping a preparation (SIGTERM, Ctrl-C, SIGKILL) stops its pool workers too: none is
left running (re-parented to init) and no scene is written after the stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SLOW_JOB = """
import os
import time

import numpy as np


def slow_scene(started_dir, warn):
    open(os.path.join(started_dir, str(os.getpid())), "a").close()
    time.sleep(0.4)
    n = 4
    arrays = {"xyz": np.zeros((n, 3)), "rgb": np.zeros((n, 3)), "semantic": np.zeros(n),
              "instance": np.zeros(n), "superpoint": np.zeros(n)}
    return arrays, {"points": n}
"""

DRIVER = """
import faulthandler
import os
import signal
import sys

faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test's stack dump on a hang

sys.path[:0] = [{repo!r}, {here!r}]
from dknet_jax.data.preparation import Job, run_jobs
from slow_job import slow_scene

if __name__ == "__main__":  # the spawned workers import this file too
    # Ctrl-C as from a terminal: a process inherits an ignored SIGINT from a launcher that
    # ignores it (e.g. the test run started as a background job of a non-interactive
    # shell, which then never sees Ctrl-C at all); Python's own handler, as at a prompt
    signal.signal(signal.SIGINT, signal.default_int_handler)
    out, started = {out!r}, {started!r}
    jobs = [Job(f"s{{i:03d}}", os.path.join(out, f"s{{i:03d}}.npz"), slow_scene, (started,))
            for i in range(60)]
    run_jobs(jobs, workers=2, progress=False)
    print("finished all jobs")
"""


def _descendants(pid: int) -> set[int]:
    """Live descendants of ``pid`` (from /proc/<pid>/task/*/children, recursively)."""
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        task_dir = f"/proc/{p}/task"
        try:
            tids = os.listdir(task_dir)
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"{task_dir}/{tid}/children") as f:
                    kids = [int(x) for x in f.read().split()]
            except OSError:
                continue
            for k in kids:
                if k not in found:
                    found.add(k)
                    todo.append(k)
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="needs Linux /proc")
@pytest.mark.parametrize("how", ["sigterm", "ctrl-c", "sigkill"])
def test_stopping_the_parent_stops_its_workers(tmp_path, how):
    out, started = tmp_path / "out", tmp_path / "started"
    out.mkdir()
    started.mkdir()
    (tmp_path / "slow_job.py").write_text(textwrap.dedent(SLOW_JOB))
    driver = tmp_path / "driver.py"
    driver.write_text(
        DRIVER.format(repo=REPO, here=str(tmp_path), out=str(out), started=str(started))
    )
    log = open(tmp_path / "driver.log", "w")  # a file: orphaned workers cannot block it
    proc = subprocess.Popen(
        [sys.executable, str(driver)], stdout=log, stderr=log, start_new_session=True
    )
    kids: set[int] = set()
    try:
        deadline = time.monotonic() + 60
        while len(os.listdir(started)) < 2:  # both workers are running a scene
            assert proc.poll() is None, (tmp_path / "driver.log").read_text()
            assert time.monotonic() < deadline, "the workers did not start within 60 s"
            time.sleep(0.05)
        kids = _descendants(proc.pid)
        workers = {int(p) for p in os.listdir(started)}
        assert workers <= kids, (workers, kids)
        if how == "sigterm":
            os.kill(proc.pid, signal.SIGTERM)  # `kill <pid>`: the parent only
        elif how == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)  # the terminal signals the whole group
        else:
            os.kill(proc.pid, signal.SIGKILL)
        try:
            rc = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # say where it hangs: every thread's stack
            os.kill(proc.pid, signal.SIGUSR1)
            time.sleep(1.0)
            log.flush()
            pytest.fail(
                f"the stopped preparation did not exit within 10 s ({how}); its threads:\n"
                + (tmp_path / "driver.log").read_text()
            )
        deadline = time.monotonic() + 5
        while any(_alive(k) for k in kids) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = sorted(k for k in kids if _alive(k))
        assert not left, f"processes of the stopped preparation still alive: {left}"
        assert rc != 0
        written = sorted(os.listdir(out))
        assert len([f for f in written if f.endswith(".npz")]) < 60
        time.sleep(1.0)
        assert sorted(os.listdir(out)) == written, "scenes were written after the stop"
    finally:  # clean up whatever a failure left behind (pids seen before the stop)
        for k in kids | _descendants(proc.pid) | {proc.pid}:
            if _alive(k):
                os.kill(k, signal.SIGKILL)
        proc.wait()
        log.close()
