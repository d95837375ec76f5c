"""Training does what it should, not only something finite.

- The real train step (``train.make_train_step``: DKNet forward, objective, gradients,
  AdamW) on one fixed batch lowers the semantic + offset loss clearly within a few tens
  of steps: gradient ascent, a dropped update or a broken optimiser fails this.
- Kill and resume with augmentation on: the resumed run logs steps k+1..2k exactly once
  after the killed run's 1..k, restores the data-iterator state and the RNG key that were
  saved (the key equals k splits of ``PRNGKey(seed)``, worked out here), feeds the same
  batches and keys as an uninterrupted run, and ends with the same parameters.

Validation inside ``train_and_evaluate`` is stubbed out in the resume test (the
evaluation path has its own tests; ``tests/test_train.py`` runs it for real).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dknet_jax import checkpoint as ckpt_lib
from dknet_jax.data.scannet import prepare_scannet
from dknet_jax.synthetic import make_dataset
from tests.step_reuse import sharing_step_factory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import synthetic  # noqa: E402

FIT_STEPS = 20


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    base = tmp_path_factory.mktemp("synth_learning")
    make_dataset(
        str(base / "raw"),
        scenes=3,
        seed=5,
        format="scannet",
        size="tiny",
        val_fraction=0.34,
        progress=False,
    )
    prepare_scannet(str(base / "raw"), str(base / "prepared"), progress=False, workers=1)
    return str(base / "prepared")


def test_train_step_fits_one_batch(prepared):
    from dknet_jax.data.dataset import list_scenes
    from dknet_jax.data.pipeline import EvalIterator
    from dknet_jax.model import build_model
    from dknet_jax.training.optim import make_optimizer
    from dknet_jax.training.train import make_train_step

    c = synthetic.get_config("tiny")
    c.data.root = prepared
    c.train.stage_heatmap_epoch = c.train.stage_mask_epoch = 1  # epoch 0: semantic + offset
    d = c.data
    it = EvalIterator(
        list_scenes(d.root, "train")[:1],
        batch_size=1,
        voxel_size=d.voxel_size,
        num_classes=c.model.num_classes,
        buckets=d.point_buckets,
        instance_buckets=d.instance_buckets,
        num_workers=0,
    )
    batch, _ = next(iter(it))
    assert int(np.sum(batch.instance_valid)) >= 2
    graphdef, params, rest = build_model(c)
    tx, _ = make_optimizer(c.train, FIT_STEPS, FIT_STEPS)
    opt = tx.init(params)
    step = make_train_step(graphdef, tx, c)
    batch = jax.device_put(batch)
    history = []
    for i in range(FIT_STEPS):
        params, rest, opt, m = step(params, rest, opt, batch, jax.random.PRNGKey(i), jnp.int32(0))
        m = jax.device_get(m)
        assert m["skipped"] == 0 and np.isfinite(m["loss"])
        history.append((float(m["loss"]), float(m["semantic"]), float(m["offset"])))
    loss, sem, off = np.array(history).T
    np.testing.assert_allclose(loss, sem + off, rtol=1e-5)  # only these two terms are on
    # the metrics are of the parameters before each update: the last row is after
    # FIT_STEPS - 1 updates
    assert loss[-1] < 0.7 * loss[0], loss
    assert sem[-1] < 0.8 * sem[0] and off[-1] < off[0], (sem, off)
    assert np.mean(loss[-5:]) < np.mean(loss[:5])


def _digest(batch) -> str:
    h = hashlib.sha1()
    for x in (batch.xyz, batch.feats, batch.semantic, batch.instance, batch.valid):
        h.update(np.ascontiguousarray(np.asarray(x)).tobytes())
    return h.hexdigest()


def _config(root, total_steps):
    c = synthetic.get_config("tiny")
    c.data.root = root
    c.data.augment = True  # the point: augmented batches must resume exactly
    c.data.batch_size = 1
    c.train.epochs = total_steps // 2
    c.train.steps_per_epoch = 2
    c.train.eval_every_epochs = 1000  # validation only at the last step (stubbed)
    c.train.ckpt_every_steps = 1
    return c


def _restore_state(config, workdir):
    """(state, meta) of the latest checkpoint in ``workdir``, with the key."""
    from flax import nnx

    from dknet_jax.model import build_model
    from dknet_jax.training.optim import make_optimizer

    # shapes only: the restore target needs no initialised parameters
    _, params, rest = nnx.split(
        nnx.eval_shape(lambda: nnx.merge(*build_model(config))), nnx.Param, ...
    )
    tx, _ = make_optimizer(config.train, 1, 1)
    target = {
        "params": params,
        "rest": rest,
        "opt": jax.eval_shape(tx.init, params),
        "key": jax.eval_shape(lambda: jax.random.PRNGKey(0)),
    }
    ck = ckpt_lib.Checkpoints(workdir)
    try:
        return ck.restore(target)
    finally:
        ck.close()


def test_kill_and_resume_with_augmentation(prepared, tmp_path, monkeypatch):
    from dknet_jax.data import pipeline
    from dknet_jax.training import train as train_mod

    k = 2
    total = 2 * k
    calls: dict[str, list] = {}
    iterator_states: dict[str, list] = {}
    run = {"name": None}
    real_iterator = pipeline.TrainIterator  # built by pipeline.train_iterator
    real_optimizer = train_mod.make_optimizer
    optimizer_args: list = []

    def spy_optimizer(train_config, total_steps, steps_per_epoch):
        optimizer_args.append((train_config.to_json(), total_steps, steps_per_epoch))
        return real_optimizer(train_config, total_steps, steps_per_epoch)

    # one jitted step for the three runs when the config and the optimiser arguments agree
    shared_factory, compiled = sharing_step_factory(
        train_mod.make_train_step, lambda: optimizer_args[-1]
    )

    def spy_step_factory(graphdef, tx, config, mesh=None):
        step = shared_factory(graphdef, tx, config, mesh)

        def wrapped(params, rest, opt_state, batch, key, epoch):
            calls[run["name"]].append((np.asarray(key).tolist(), _digest(batch), int(epoch)))
            return step(params, rest, opt_state, batch, key, epoch)

        return wrapped

    class SpyIterator(real_iterator):
        def __init__(self, *a, state=None, **kw):
            iterator_states[run["name"]].append(state)
            super().__init__(*a, state=state, **kw)

    def stub_eval(*a, **kw):  # the shape of evaluate_split's result, no inference
        from dknet_jax.inference.diagnostics import StageDiagnostics

        return {
            "instance": {"all_ap": 0.0},
            "semantic": {"miou": 0.0},
            "diagnostics": StageDiagnostics().summary(),
        }

    monkeypatch.setattr(train_mod, "make_train_step", spy_step_factory)
    monkeypatch.setattr(train_mod, "make_optimizer", spy_optimizer)
    monkeypatch.setattr(pipeline, "TrainIterator", SpyIterator)
    monkeypatch.setattr(train_mod.ev, "evaluate_split", stub_eval)

    def train(name, workdir):
        run["name"] = name
        calls.setdefault(name, [])
        iterator_states.setdefault(name, [])
        train_mod.train_and_evaluate(_config(prepared, total), workdir)

    straight = str(tmp_path / "straight")
    train("straight", straight)

    killed = str(tmp_path / "killed")
    real_save = ckpt_lib.Checkpoints.save

    def save_then_die(self, step, *a, **kw):
        real_save(self, step, *a, **kw)
        if step == k:
            raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(ckpt_lib.Checkpoints, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train("first", killed)
    monkeypatch.setattr(ckpt_lib.Checkpoints, "save", real_save)
    saved_state, saved_meta = _restore_state(_config(prepared, total), killed)
    assert saved_meta["step"] == k
    with open(os.path.join(killed, "metrics.jsonl"), "a") as fh:  # logged after the checkpoint
        fh.write(json.dumps({"step": k + 1, "loss": -1.0, "time": 1e9}) + "\n")
    train("resumed", killed)

    # metrics.jsonl: 1..k from the killed run, then k+1..2k, each step once
    records = [json.loads(x) for x in open(os.path.join(killed, "metrics.jsonl"))]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, total + 1)), steps
    times = [r["time"] for r in records if "loss" in r]
    assert times == sorted(times) and -1.0 not in [r["loss"] for r in records if "loss" in r]
    straight_steps = [
        json.loads(x)["step"]
        for x in open(os.path.join(straight, "metrics.jsonl"))
        if "loss" in json.loads(x)
    ]
    assert straight_steps == list(range(1, total + 1))

    # the resumed run started from the saved iterator state and the saved key
    assert iterator_states["first"] == [None]
    assert iterator_states["resumed"] == [saved_meta["data"]]
    assert saved_meta["data"]["position"] + 2 * saved_meta["data"]["epoch"] == k
    key = jax.random.PRNGKey(_config(prepared, total).seed)
    for _ in range(k):
        key, _ = jax.random.split(key)
    np.testing.assert_array_equal(np.asarray(saved_state["key"]), np.asarray(key))

    # the same batches (augmented) and keys as the uninterrupted run, step for step
    assert len(calls["straight"]) == total
    assert calls["first"] == calls["straight"][:k]
    assert calls["resumed"] == calls["straight"][k:]
    digests = [d for _, d, _ in calls["straight"]]
    assert len(set(digests)) == total  # augmentation makes every batch different
    assert [e for _, _, e in calls["straight"]] == [i // 2 for i in range(total)]

    assert len(compiled) == 1 and len(set(optimizer_args)) == 1 and len(optimizer_args) == 3

    # and the same final parameters
    a, meta_a = _restore_state(_config(prepared, total), straight)
    b, meta_b = _restore_state(_config(prepared, total), killed)
    assert meta_a["step"] == meta_b["step"] == total and meta_a["data"] == meta_b["data"]
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
