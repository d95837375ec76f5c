"""The benchmarks' shared module (``dknet_jax.benchmarking``).

The synthetic-room cache must give, for the same seed and room index, exactly the
prepared scenes that ``scripts/make_synthetic.py`` + ``scripts/prepare_scannet.py``
write (the reference is the two scripts run as a user runs them); the machine and memory
helpers are checked against hand-worked sizes and against what the kernel reports."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from dknet_jax import benchmarking as bm
from dknet_jax.cli import UserError
from dknet_jax.data.dataset import SceneError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED, ROOMS = 5, 3
PREPARED_KEYS = ("xyz", "rgb", "semantic", "instance", "superpoint")


def _script(name: str, *args: str) -> None:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    r = subprocess.run(
        [sys.executable, os.path.join("scripts", name), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """{scene: npz path} written by make_synthetic.py + prepare_scannet.py (tiny rooms)."""
    tmp = tmp_path_factory.mktemp("reference")
    raw, out = tmp / "raw", tmp / "prepared"
    _script(
        "make_synthetic.py", "--out", str(raw), "--scenes", str(ROOMS), "--seed", str(SEED),
        "--size", "tiny",
    )  # fmt: skip
    _script("prepare_scannet.py", "--scannet_root", str(raw), "--out", str(out), "--workers", "1")
    return {f"scene{i:04d}_00": out / f"scene{i:04d}_00.npz" for i in range(ROOMS)}


def _assert_same_scene(path, ref_path):
    got, want = np.load(path), np.load(ref_path)
    assert sorted(got.files) == sorted(want.files) == sorted(PREPARED_KEYS)
    for k in want.files:
        assert got[k].dtype == want[k].dtype, k
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_cached_rooms_equal_the_scripts_output(tmp_path, reference, capsys):
    cache = tmp_path / "cache"
    # two rooms in spawned worker processes
    paths = bm.synthetic_scenes(str(cache), 2, "tiny", seed=SEED, workers=2)
    assert [os.path.basename(p) for p in paths] == ["scene0000_00.npz", "scene0001_00.npz"]
    # one more room: only the missing one is made (serial path), the others are kept
    before = [os.stat(p).st_mtime_ns for p in paths]
    paths = bm.synthetic_scenes(str(cache), ROOMS, "tiny", seed=SEED, workers=1)
    assert [os.stat(p).st_mtime_ns for p in paths[:2]] == before
    assert "generating 1 synthetic 'tiny' rooms" in capsys.readouterr().out
    for p in paths:
        _assert_same_scene(p, reference[os.path.basename(p)[:-4]])
    # the raw files are gone and no temporary npz is left beside the scenes
    assert sorted(os.listdir(cache)) == [f"scene{i:04d}_00.npz" for i in range(ROOMS)]
    # a cached run generates nothing
    bm.synthetic_scenes(str(cache), ROOMS, "tiny", seed=SEED)
    assert "generating" not in capsys.readouterr().out


def test_rooms_depend_on_the_seed(tmp_path, reference):
    (p,) = bm.synthetic_scenes(str(tmp_path), 1, "tiny", seed=SEED + 1)
    a, b = np.load(p)["xyz"], np.load(reference["scene0000_00"])["xyz"]
    assert a.shape != b.shape or not np.array_equal(a, b)


def test_bench_scenes_reads_a_prepared_folder(tmp_path, reference):
    folder = os.path.dirname(reference["scene0000_00"])
    # prepare_scannet wrote train.txt (make_synthetic's split), so the train split is used
    with open(os.path.join(folder, "train.txt")) as fh:
        train = [ln.strip() for ln in fh if ln.strip()]
    got = bm.bench_scenes(1, "tiny", data_dir=folder)
    assert [os.path.basename(p)[:-4] for p in got] == sorted(train)[:1]
    os.makedirs(tmp_path / "empty")
    with pytest.raises(SceneError, match="no .npz scenes"):
        bm.bench_scenes(2, "tiny", data_dir=str(tmp_path / "empty"))


def test_bad_room_requests_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="'huge'"):
        bm.synthetic_scenes(str(tmp_path), 1, "huge")
    with pytest.raises(UserError, match=">= 1"):
        bm.synthetic_scenes(str(tmp_path), 0, "tiny")


# ---------------------------------------------------------------------------------------
# machine and memory
def test_compiled_gib_counts_arguments_outputs_and_aliasing():
    x = np.zeros(1 << 20, np.float32)  # 4 MiB
    plain = jax.jit(lambda a: a * 2 + 1).lower(x).compile()
    donated = jax.jit(lambda a: a * 2 + 1, donate_argnums=0).lower(x).compile()
    mib = 1024.0**2
    # elementwise: no temporaries; argument 4 MiB + output 4 MiB, donated output aliases
    assert bm.compiled_gib(plain) * bm.GiB == pytest.approx(8 * mib)
    assert bm.compiled_gib(donated) * bm.GiB == pytest.approx(4 * mib)

    class NoAnalysis:
        def memory_analysis(self):
            raise NotImplementedError

    assert bm.compiled_gib(NoAnalysis()) is None


def test_cache_size_counts_compiled_shapes():
    f = jax.jit(lambda a: a + 1)
    assert bm.cache_size(f) == 0
    f(np.zeros(3, np.float32))
    f(np.ones(3, np.float32))  # same shape: no new executable
    assert bm.cache_size(f) == 1
    f(np.zeros(4, np.float32))
    assert bm.cache_size(f) == 2
    assert bm.cache_size(lambda a: a) is None


def test_host_peak_matches_the_kernels_high_water_mark():
    block = np.ones(64 * 1024**2 // 8)  # touch 64 MiB
    peak = bm.host_peak_gib()
    del block
    with open("/proc/self/status") as fh:
        hwm_kib = next(int(ln.split()[1]) for ln in fh if ln.startswith("VmHWM:"))
    assert peak >= 64 / 1024
    assert peak == pytest.approx(hwm_kib / 1024**2, rel=0.05)


def test_device_memory_and_device_line():
    dev = jax.local_devices()[0]
    stats = dev.memory_stats()
    peak = bm.device_peak_gib()
    if stats and "peak_bytes_in_use" in stats:
        assert peak is not None and peak >= 0
    else:  # CPU: not reported
        assert peak is None
    with open("/proc/meminfo") as fh:
        total_gib = next(int(ln.split()[1]) for ln in fh if ln.startswith("MemTotal:")) / 1024**2
    avail = bm.available_gib()
    assert 0 < avail <= (stats["bytes_limit"] / bm.GiB if stats else total_gib)
    line = bm.device_line()
    assert f"jax {jax.__version__}" in line
    assert f"({dev.platform})" in line and dev.device_kind in line
    assert f"{os.cpu_count()} CPU cores" in line


def test_table_aligns_two_columns():
    text = bm.table([("a", "1"), ("longer", "x y")], "Title")
    assert text == "Title\n-----\na       1\nlonger  x y"


# ---------------------------------------------------------------------------------------
# command line
def test_default_config_is_inserted_and_resolved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # configs/ is not here: paths resolve from the repo root
    repo_cfg = os.path.join(ROOT, "configs", "synthetic.py")
    assert bm.with_default_config(["prog", "--steps", "1"], "configs/synthetic.py") == [
        "prog",
        f"--config={repo_cfg}",
        "--steps",
        "1",
    ]
    got = bm.with_default_config(
        ["prog", "--config=configs/scannet.py:tiny", "--config.seed=3"], "configs/synthetic.py"
    )
    assert got == ["prog", f"--config={ROOT}/configs/scannet.py:tiny", "--config.seed=3"]
    got = bm.with_default_config(["prog", "--config", "configs/scannet.py"], "x.py")
    assert got == ["prog", "--config", f"{ROOT}/configs/scannet.py"]
    # a file in the current folder wins over the repo's
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "scannet.py").write_text("")
    got = bm.with_default_config(["prog", "--config=configs/scannet.py"], "x.py")
    assert got == ["prog", "--config=configs/scannet.py"]


def test_flag_given():
    assert bm.flag_given(["p", "--quick"], "quick")
    assert bm.flag_given(["p", "--quick=true"], "quick")
    assert not bm.flag_given(["p", "--quick=false"], "quick")
    assert not bm.flag_given(["p", "--quick", "--noquick"], "quick")
    assert not bm.flag_given(["p", "--quickly"], "quick")
    assert not bm.flag_given(["p"], "quick")


def test_scope_times_sums_kernels_by_named_scope(tmp_path):
    """A traced function with two named scopes, forward and backward: both scopes and both
    passes appear, the large matmul's scope dominates, event counts are per call."""
    import jax
    import jax.numpy as jnp

    from dknet_jax.benchmarking import scope_times

    def f(w, x):
        with jax.named_scope("big"):
            y = jnp.tanh(x @ w)
        with jax.named_scope("small"):
            z = jnp.sort(y[:, 0]).sum()  # a sort: a kernel of its own
        return z

    step = jax.jit(jax.grad(f))
    w = jnp.ones((384, 384)) * 1e-3
    x = jnp.ones((2048, 384))
    compiled = step.lower(w, x).compile()
    jax.block_until_ready(compiled(w, x))
    jax.profiler.start_trace(str(tmp_path), create_perfetto_trace=True)
    for _ in range(2):
        jax.block_until_ready(compiled(w, x))
    jax.profiler.stop_trace()
    rows = scope_times(str(tmp_path), compiled.as_text(), calls=2)
    got = {(s, p): (ms, n) for s, p, ms, n in rows}
    assert ("big", "fwd") in got and ("big", "bwd") in got, rows
    assert ("small", "fwd") in got, rows
    assert rows[0][0] == "big" and rows[0][2] > 0
    assert all(n == int(n) and n >= 1 for _, _, _, n in rows), rows  # whole events per call
    with pytest.raises(FileNotFoundError, match="perfetto_trace"):
        scope_times(str(tmp_path / "none"), compiled.as_text(), calls=1)
