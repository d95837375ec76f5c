"""End-to-end training on tiny synthetic rooms: a 2-step smoke run, exact resume after a
kill, and data parallelism over 2 host devices giving the single-device loss."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from dknet_jax import checkpoint as ckpt_lib
from dknet_jax.data.scannet import prepare_scannet
from dknet_jax.synthetic import make_dataset
from tests.step_reuse import sharing_step_factory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import synthetic  # noqa: E402


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    base = tmp_path_factory.mktemp("synth")
    make_dataset(
        str(base / "raw"),
        scenes=4,
        seed=3,
        format="scannet",
        size="tiny",
        val_fraction=0.25,
        progress=False,
    )
    prepare_scannet(str(base / "raw"), str(base / "prepared"), progress=False, workers=1)
    return str(base / "prepared")


def _config(root):
    c = synthetic.get_config("tiny")
    c.data.root = root
    c.data.augment = False  # keep the smoke run cheap; augmentation is tested on its own
    return c


def _params(workdir):
    from dknet_jax.inference.predictor import load_model

    model = load_model(workdir, _config("unused"), which="latest")
    return jax.tree.leaves(model.params) + jax.tree.leaves(model.rest), model.meta


def test_two_steps_then_resume_equals_uninterrupted(prepared, tmp_path, monkeypatch):
    from dknet_jax.training import train as train_mod
    from dknet_jax.training.train import train_and_evaluate

    # the three runs have one config: one jitted step (compiled once, not three times)
    factory, compiled = sharing_step_factory(train_mod.make_train_step)
    monkeypatch.setattr(train_mod, "make_train_step", factory)

    # uninterrupted 2-step run (also the smoke test: log, checkpoints, evaluation)
    straight = str(tmp_path / "straight")
    results = train_and_evaluate(_config(prepared), straight)
    records = [json.loads(x) for x in open(os.path.join(straight, "metrics.jsonl"))]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        for name in ("loss", "semantic", "offset", "center", "aggregation", "mask"):
            assert np.isfinite(r[name]), (name, r)
    assert steps[1]["mask"] >= 0 and results["scenes"] == 1
    assert "all_ap" in results["instance"]
    # per-stage diagnostics in the results and in the periodic-eval record
    diag = results["diagnostics"]
    assert diag["scenes"] == 1 and diag["post_slots"] == diag["post_kept"] + sum(
        diag[f"post_removed_{r}"] for r in ("otsu", "superpoint", "class", "size", "score")
    )
    evals = [r for r in records if "val" in r]
    assert evals and evals[-1]["diagnostics"] == json.loads(json.dumps(diag))

    # killed after the first checkpoint, then the same command again
    killed = str(tmp_path / "killed")
    real_save = ckpt_lib.Checkpoints.save

    def save_then_die(self, step, *a, **k):
        real_save(self, step, *a, **k)
        raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(ckpt_lib.Checkpoints, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_and_evaluate(_config(prepared), killed)
    monkeypatch.setattr(ckpt_lib.Checkpoints, "save", real_save)
    assert ckpt_lib.Checkpoints(killed).latest_step() == 1
    train_and_evaluate(_config(prepared), killed)

    assert len(compiled) == 1
    a, meta_a = _params(straight)
    b, meta_b = _params(killed)
    assert meta_a["step"] == meta_b["step"] == 2
    assert meta_a["data"] == meta_b["data"]
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


_DP_SCRIPT = r"""
import os, sys, json
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax, numpy as np
sys.path.insert(0, sys.argv[2])
import synthetic
from jax.sharding import Mesh
from dknet_jax.model import build_model
from dknet_jax.training.train import make_train_step, shard_batch
from dknet_jax.training.optim import make_optimizer
from dknet_jax.data.dataset import list_scenes
from dknet_jax.data.pipeline import EvalIterator
c = synthetic.get_config("tiny"); c.data.root = sys.argv[1]
d = c.data
it = EvalIterator(list_scenes(d.root, "train")[:2], batch_size=2, voxel_size=d.voxel_size,
                  num_classes=c.model.num_classes, buckets=d.point_buckets,
                  instance_buckets=d.instance_buckets, num_workers=0)
batch, _ = next(iter(it))
assert jax.device_count() == 2
out = {}
for name, mesh in (("one", None), ("two", Mesh(np.array(jax.devices()), ("data",)))):
    g, p, r = build_model(c)
    tx, _ = make_optimizer(c.train, 10, 1)
    step = make_train_step(g, tx, c, mesh)
    _, _, _, m = step(p, r, tx.init(p), shard_batch(batch, mesh), jax.random.PRNGKey(0),
                      np.int32(5))
    out[name] = {k: float(v) for k, v in m.items()}
print(json.dumps(out))
"""


def test_data_parallel_two_devices_same_loss(prepared, tmp_path):
    script = tmp_path / "dp.py"
    script.write_text(_DP_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
    proc = subprocess.run(
        [sys.executable, str(script), prepared, os.path.join(ROOT, "configs")],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in ("loss", "semantic", "offset", "center", "aggregation", "mask"):
        np.testing.assert_allclose(
            out["two"][name], out["one"][name], rtol=2e-4, atol=1e-5, err_msg=name
        )


def test_empty_val_split_warns_and_skips_evaluation(prepared, tmp_path, monkeypatch):
    """A 0-byte val.txt: a warning naming the split and root up front, no evaluation
    records (no NaN), checkpoints saved, best/ left empty. The train step is stubbed (the
    loop's bookkeeping is under test, not the model)."""
    from dknet_jax.training import train as train_mod

    root = tmp_path / "data"
    root.mkdir()
    names = open(os.path.join(prepared, "train.txt")).read().split()
    for n in names:
        os.symlink(os.path.join(prepared, n + ".npz"), root / (n + ".npz"))
    (root / "train.txt").write_text("".join(n + "\n" for n in names))
    (root / "val.txt").write_text("")  # e.g. the only val scene failed to prepare

    def fake_step_factory(graphdef, tx, config, mesh=None):
        def step(params, rest, opt_state, batch, key, epoch):
            return (
                params,
                rest,
                opt_state,
                {"loss": np.float32(1.0), "skipped": 0.0, "voxel_overflow": 0.0},
            )

        return step

    monkeypatch.setattr(train_mod, "make_train_step", fake_step_factory)
    c = _config(str(root))
    c.train.epochs, c.train.steps_per_epoch, c.train.eval_every_epochs = 2, 1, 1
    workdir = str(tmp_path / "w")
    with pytest.warns(
        UserWarning,
        match=r"no validation scenes in .*data/val .*without "
        r"evaluation; best/ will not be written",
    ):
        results = train_mod.train_and_evaluate(c, workdir)
    assert results == {}
    records = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in records] == [1, 2] and all("val" not in r for r in records)
    assert all(np.isfinite(v) for r in records for v in r.values() if isinstance(v, float))
    assert ckpt_lib.Checkpoints(workdir).latest_step() == 2
    assert not [f for f in os.listdir(os.path.join(workdir, "best")) if f.isdigit()]


def test_overflowing_batch_is_rerun_with_overflow_safe_settings(prepared, tmp_path, monkeypatch):
    """A step whose UNet reports an overflow (a level's voxels or its conv tiles) is run
    again on the same batch by a step built from ``overflow_safe(config)``: compiled once,
    with the state the first step left untouched; nothing is skipped."""
    from dknet_jax.training import train as train_mod

    calls = []  # (factory's tile_fallback, level_capacity_ratio, step index)

    def fake_step_factory(graphdef, tx, config, mesh=None):
        m = config.model
        safe = bool(m.tile_fallback) and tuple(m.level_capacity_ratio) == (1.0,)

        def step(params, rest, opt_state, batch, key, epoch):
            calls.append((safe, int(batch.valid.shape[0])))
            # the first step's batch overflows; the safe step never does
            over = float(not safe and len(calls) == 1)
            metrics = {"loss": np.float32(1.0), "skipped": over, "voxel_overflow": over}
            return params, rest, opt_state, metrics

        return step

    monkeypatch.setattr(train_mod, "make_train_step", fake_step_factory)
    c = _config(prepared)
    c.model.tile_fallback = False
    c.train.epochs, c.train.steps_per_epoch, c.train.eval_every_epochs = 1, 3, 100
    with pytest.warns(UserWarning, match=r"step 1: .*conv tiles overflowed.*reran it with"):
        train_mod.train_and_evaluate(c, str(tmp_path / "w"))
    # step 1 ran twice on one batch (normal, then safe), steps 2 and 3 normally
    assert [safe for safe, _ in calls] == [False, True, False, False]
    assert calls[0][1] == calls[1][1]
    records = [json.loads(x) for x in open(tmp_path / "w" / "metrics.jsonl")]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]


def test_truncate_log_drops_rows_past_the_restored_step(tmp_path):
    from dknet_jax.training.train import truncate_log

    path = str(tmp_path / "metrics.jsonl")
    rows = [{"step": s, "loss": 1.0 / s, "time": 10.0 * s} for s in range(1, 6)]
    rows.insert(3, {"step": 3, "val": {"all_ap": 0.5}})  # an evaluation record at step 3
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "lo'  # killed mid-write
    open(path, "w").write(text)
    assert truncate_log(path, 3) == 30.0
    assert [json.loads(x) for x in open(path)] == rows[:4]
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    assert truncate_log(path, 0) == 0.0 and open(path).read() == ""
    assert truncate_log(str(tmp_path / "absent.jsonl"), 5) == 0.0
