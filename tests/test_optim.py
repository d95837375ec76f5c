"""Learning-rate schedule against hand-computed values, and AdamW wiring."""

import functools
import math

import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

from dknet_jax.training.optim import learning_rate_schedule, make_optimizer


def test_constant_then_cosine_values():
    s = learning_rate_schedule(lr=1e-3, total_steps=100, cosine_start_step=40, final_lr=1e-6)
    for step in (0, 10, 39):
        assert float(s(step)) == pytest.approx(1e-3)
    # halfway through the cosine part (step 70 of [40, 100]) -> mean of lr and final_lr
    assert float(s(70)) == pytest.approx((1e-3 + 1e-6) / 2, rel=1e-5)
    # a quarter in: final + (lr - final) * (1 + cos(pi/4)) / 2
    want = 1e-6 + (1e-3 - 1e-6) * (1 + math.cos(math.pi / 4)) / 2
    assert float(s(55)) == pytest.approx(want, rel=1e-5)
    assert float(s(100)) == pytest.approx(1e-6, rel=1e-4)
    assert float(s(1000)) == pytest.approx(1e-6, rel=1e-4)


def test_warmup_is_linear():
    s = learning_rate_schedule(
        lr=2e-3, total_steps=100, cosine_start_step=50, final_lr=0.0, warmup_steps=10
    )
    np.testing.assert_allclose(
        [float(s(i)) for i in (0, 5, 10, 20)], [0.0, 1e-3, 2e-3, 2e-3], rtol=1e-6
    )


def test_bad_total_steps():
    with pytest.raises(ValueError, match="total_steps"):
        learning_rate_schedule(lr=1e-3, total_steps=0, cosine_start_step=0, final_lr=0.0)


def test_optimizer_clips_and_decays():
    cfg = ConfigDict(
        dict(
            lr=0.1,
            final_lr=0.0,
            warmup_steps=0,
            cosine_start_epoch=100,
            weight_decay=0.0,
            grad_clip=1.0,
        )
    )
    tx, _ = make_optimizer(cfg, total_steps=10, steps_per_epoch=1)
    params = {"w": np.zeros(4, np.float32)}
    state = tx.init(params)
    updates, _ = tx.update({"w": np.full(4, 100.0, np.float32)}, state, params)
    # Adam's first step has magnitude lr per coordinate regardless of the gradient scale
    np.testing.assert_allclose(np.asarray(updates["w"]), -0.1, rtol=1e-4)
    assert isinstance(tx, optax.GradientTransformation)


def test_train_step_update_commits_finite_and_skips_non_finite_steps():
    """The optimiser half of ``TrainStep`` (compiled once per run): a finite step is
    AdamW's update of the gradients, BatchNorm statistics replaced; a NaN loss or
    gradient leaves parameters, statistics and moments as they were (``skipped`` = 1)."""
    import os
    import sys

    import jax
    import jax.numpy as jnp

    from dknet_jax.training.train import make_train_step

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
    import synthetic

    c = synthetic.get_config("tiny")
    tx, _ = make_optimizer(c.train, 10, 1)
    step = make_train_step(None, tx, c)  # the update half never touches the model
    params = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float32)}
    rest = {"mean": np.zeros(3, np.float32)}
    new_rest = {"mean": np.full(3, 0.5, np.float32)}
    grads = {"w": np.full((2, 3), 0.25, np.float32), "b": np.array([1.0, -2.0, 3.0], np.float32)}
    opt = tx.init(params)

    want_upd, want_opt = tx.update(grads, opt, params)
    copy = functools.partial(jax.tree.map, jnp.array)  # the update donates its inputs
    p, r, o, m = step.update(
        copy(params), copy(rest), copy(opt), copy(grads), copy(new_rest), jnp.float32(1.5)
    )
    assert float(m["skipped"]) == 0.0
    np.testing.assert_allclose(float(m["grad_norm"]), np.sqrt(6 * 0.0625 + 14), rtol=1e-6)
    for k in params:
        np.testing.assert_allclose(np.asarray(p[k]), params[k] + np.asarray(want_upd[k]), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(r["mean"]), new_rest["mean"])
    for a, b in zip(jax.tree.leaves(o), jax.tree.leaves(want_opt), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)

    for loss, g in (
        (jnp.float32(np.nan), grads),
        (jnp.float32(1.0), {**grads, "b": grads["b"] * np.nan}),
    ):
        p, r, o, m = step.update(copy(params), copy(rest), copy(opt), copy(g), copy(new_rest), loss)
        assert float(m["skipped"]) == 1.0
        for k in params:
            np.testing.assert_array_equal(np.asarray(p[k]), params[k])
        np.testing.assert_array_equal(np.asarray(r["mean"]), rest["mean"])
        for a, b in zip(jax.tree.leaves(o), jax.tree.leaves(opt), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
