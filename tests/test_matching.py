"""Tests for dknet_jax.objective.matching: brute-force permutation search, scipy, scene
separation."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

from dknet_jax.objective import matching


def _brute_force(cost):
    """Min-cost rectangular assignment by enumerating all injections (tiny sizes only)."""
    k, g = cost.shape
    best, best_pairs = np.inf, None
    if k >= g:
        for rows in itertools.permutations(range(k), g):
            c = sum(cost[r, j] for j, r in enumerate(rows))
            if c < best - 1e-12:
                best, best_pairs = c, [(r, j) for j, r in enumerate(rows)]
    else:
        for cols in itertools.permutations(range(g), k):
            c = sum(cost[i, col] for i, col in enumerate(cols))
            if c < best - 1e-12:
                best, best_pairs = c, list(enumerate(cols))
    return best, best_pairs


def _total(cost, gt_for_pred):
    return sum(cost[i, j] for i, j in enumerate(gt_for_pred) if j >= 0)


def test_cost_matrix_eq5():
    pc = np.array([[0, 0, 0], [1, 2, 2]], np.float32)
    gc = np.array([[0, 0, 1], [1, 2, 2], [5, 5, 5]], np.float32)
    cost, allowed = matching.match_cost(
        jnp.asarray(pc),
        jnp.asarray([3, 4]),
        jnp.asarray([0, 0]),
        jnp.asarray([True, True]),
        jnp.asarray(gc),
        jnp.asarray([3, 3, 4]),
        jnp.asarray([0, 0, 1]),
        jnp.asarray([True, True, True]),
    )
    cost = np.asarray(cost)
    np.testing.assert_allclose(cost[0, 0], 1.0, rtol=1e-6)  # d=1, same class
    np.testing.assert_allclose(cost[0, 1], 3.0 + 0.0, rtol=1e-6)  # d=3, same class
    np.testing.assert_allclose(cost[1, 0], np.sqrt(1 + 4 + 1) + 1.0, rtol=1e-6)
    np.testing.assert_allclose(cost[1, 1], 0.0 + 1.0, atol=1e-6)  # d=0, class differs
    assert not bool(allowed[0, 2]) and cost[0, 2] == matching.INVALID_COST


def test_hungarian_vs_brute_force_and_scipy():
    rng = np.random.default_rng(0)
    solve = jax.jit(matching.hungarian)
    for k, g in [(3, 3), (4, 2), (2, 4), (5, 4), (1, 3)]:
        for _ in range(3):
            cost = rng.random((k, g)).astype(np.float32)
            cost[rng.random((k, g)) < 0.2] = 0.5  # ties
            pfg, gfp = solve(jnp.asarray(cost), jnp.zeros(k, jnp.int32), jnp.zeros(g, jnp.int32))
            pfg, gfp = np.asarray(pfg), np.asarray(gfp)
            best, _ = _brute_force(cost.astype(np.float64))
            np.testing.assert_allclose(_total(cost, gfp), best, rtol=1e-6, atol=1e-6)
            assert (gfp >= 0).sum() == min(k, g) == (pfg >= 0).sum()
            for i, j in enumerate(gfp):  # the two views agree
                if j >= 0:
                    assert pfg[j] == i
            r, c = linear_sum_assignment(cost)
            np.testing.assert_allclose(_total(cost, gfp), cost[r, c].sum(), rtol=1e-6)


def test_match_instances_per_scene_never_crosses_scenes():
    rng = np.random.default_rng(1)
    k, g = 7, 6
    pred_batch = np.array([0, 0, 0, 1, 1, 1, 1], np.int32)
    pred_ok = np.array([1, 1, 1, 1, 1, 1, 0], bool)
    gt_batch = np.array([0, 0, 1, 1, 1, 2], np.int32)
    gt_ok = np.array([1, 1, 1, 1, 1, 0], bool)
    pc = rng.normal(size=(k, 3)).astype(np.float32)
    gc = rng.normal(size=(g, 3)).astype(np.float32)
    pcls = rng.integers(0, 3, k).astype(np.int32)
    gcls = rng.integers(0, 3, g).astype(np.int32)
    args = [jnp.asarray(a) for a in (pc, pcls, pred_batch, pred_ok, gc, gcls, gt_batch, gt_ok)]
    pfg, gfp = jax.jit(matching.match_instances)(*args)
    pfg, gfp = np.asarray(pfg), np.asarray(gfp)
    assert pfg.shape == (g,) and gfp.shape == (k,)
    # every valid GT matched (each scene has >= as many valid predictions), none invalid
    np.testing.assert_array_equal(pfg >= 0, gt_ok)
    assert np.all(gfp[~pred_ok] == -1)
    for i, j in enumerate(gfp):
        if j >= 0:
            assert pred_batch[i] == gt_batch[j] and pfg[j] == i
    # each scene's total equals the brute-force optimum of that scene alone
    full = np.linalg.norm(pc[:, None] - gc[None], axis=-1) + (pcls[:, None] != gcls[None])
    for s in (0, 1):
        rows = np.flatnonzero(pred_ok & (pred_batch == s))
        cols = np.flatnonzero(gt_ok & (gt_batch == s))
        best, _ = _brute_force(full[np.ix_(rows, cols)])
        got = sum(full[i, gfp[i]] for i in rows if gfp[i] >= 0)
        np.testing.assert_allclose(got, best, rtol=1e-5)


def test_fewer_predictions_than_gt_leaves_gt_unmatched_not_dropped():
    cost = jnp.asarray([[0.1, 0.9, 0.5]])
    pfg, gfp = matching.hungarian(cost, jnp.asarray([0]), jnp.asarray([0, 0, 0]))
    np.testing.assert_array_equal(np.asarray(pfg), [0, -1, -1])
    np.testing.assert_array_equal(np.asarray(gfp), [0])


def test_vmap_and_batched_cost_agree():
    rng = np.random.default_rng(2)
    b, k, g = 3, 4, 3
    cost = jnp.asarray(rng.random((b, k, g)).astype(np.float32))
    rg = jnp.zeros((b, k), jnp.int32).at[1, 2].set(-1)
    cg = jnp.zeros((b, g), jnp.int32)
    batched = matching.hungarian(cost, rg, cg)
    vmapped = jax.jit(jax.vmap(matching.hungarian))(cost, rg, cg)
    for x, y in zip(batched, vmapped, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    for i in range(b):
        ok = np.asarray(rg[i]) >= 0
        sub = np.asarray(cost[i])[ok]
        r, c = linear_sum_assignment(sub)
        gfp = np.asarray(batched[1][i])
        assert gfp[~ok].tolist() == [-1] * int((~ok).sum())
        np.testing.assert_allclose(_total(np.asarray(cost[i]), gfp), sub[r, c].sum(), rtol=1e-6)


def test_majority_class():
    sem = jnp.asarray([2, 2, 3, 3, 3, 5, 2, 0], jnp.int32)
    mask = jnp.asarray(
        [
            [1, 1, 1, 0, 0, 0, 1, 0],  # 2,2,3,2 -> 2
            [0, 0, 1, 1, 1, 1, 1, 0],  # 3,3,3,5,2 -> 3
            [0, 0, 0, 0, 0, 0, 0, 0],  # empty -> -1
            [1, 0, 1, 0, 0, 1, 0, 0],  # 2,3,5 tie -> lowest class 2
        ],
        bool,
    )
    np.testing.assert_array_equal(np.asarray(matching.majority_class(mask, sem, 6)), [2, 3, -1, 2])
