"""scripts/crosscheck_released_torch.py: without torch / spconv it exits 2 with one line
saying what to install (the package never depends on them); with both importable it
runs the real cross-check (skipped here otherwise; docs/released_model.md section 7)."""

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "crosscheck_released_torch.py")

# run the script as __main__ with the named modules made unimportable
BLOCKED = (
    "import runpy, sys\n"
    "for name in sys.argv[1].split(','):\n"
    "    sys.modules[name] = None\n"
    "sys.argv = [sys.argv[2]]\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n"
)


@pytest.mark.parametrize("blocked", ["torch,spconv", "spconv"])
def test_without_torch_or_spconv_exits_2_naming_the_install(blocked):
    r = subprocess.run(
        [sys.executable, "-c", BLOCKED, blocked, SCRIPT],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT},
        timeout=120,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install torch spconv" in lines[0], r.stderr
    assert r.stdout == ""


def test_package_does_not_depend_on_torch():
    text = open(os.path.join(ROOT, "pyproject.toml")).read()
    deps = text.split("dependencies", 1)[1].split("]", 1)[0]
    assert "torch" not in deps and "spconv" not in deps


@pytest.mark.skipif(
    importlib.util.find_spec("torch") is None or importlib.util.find_spec("spconv") is None,
    reason="torch and spconv are not installed (optional cross-check)",
)
def test_crosscheck_against_torch_spconv():
    r = subprocess.run(
        [sys.executable, SCRIPT, "--points", "400"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=1200,
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "OK: worst normalised error" in r.stdout
