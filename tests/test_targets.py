"""Tests for dknet_jax.objective.targets against numpy loops."""

import jax.numpy as jnp
import numpy as np

from dknet_jax.model.heads import predicted_foreground, scene_softmax
from dknet_jax.objective.targets import compute_targets
from dknet_jax.types import IGNORE_LABEL, PointBatch


def _batch(seed=0, n=60, g=6, b=2):
    rng = np.random.default_rng(seed)
    xyz = rng.normal(size=(n, 3)).astype(np.float32) * 2
    batch_id = rng.integers(0, b, n).astype(np.int32)
    valid = np.ones(n, bool)
    valid[-5:] = False
    batch_id[~valid] = b
    inst_batch = np.array([0, 0, 1, 1, 1, b], np.int32)[:g]
    instance = np.full(n, IGNORE_LABEL, np.int32)
    for i in range(n):
        if valid[i] and rng.random() < 0.8:
            cands = np.flatnonzero(inst_batch == batch_id[i])
            instance[i] = rng.choice(cands)
    # slot 4 stays empty: no points
    instance[instance == 4] = IGNORE_LABEL
    inst_valid = np.array([1, 1, 1, 1, 1, 0], bool)
    inst_class = np.array([3, 5, 3, 7, 9, IGNORE_LABEL], np.int32)
    batch = PointBatch(
        xyz=jnp.asarray(xyz),
        feats=jnp.zeros((n, 6)),
        vox=jnp.zeros((n, 3), jnp.int32),
        batch_id=jnp.asarray(batch_id),
        valid=jnp.asarray(valid),
        semantic=jnp.zeros(n, jnp.int32),
        instance=jnp.asarray(instance),
        superpoint=jnp.zeros(n, jnp.int32),
        instance_class=jnp.asarray(inst_class),
        instance_batch=jnp.asarray(inst_batch),
        instance_valid=jnp.asarray(inst_valid),
        scene_valid=jnp.ones(b, bool),
    )
    return batch, xyz, instance, valid


def test_targets_match_numpy_loops():
    batch, xyz, instance, valid = _batch()
    t = compute_targets(batch)
    count, gt_ok, cen, rad = (np.asarray(a) for a in (t.count, t.gt_ok, t.centroid, t.radius))
    on_inst = np.asarray(t.on_instance)
    g = 6
    for j in range(g):
        pts = xyz[(instance == j) & valid]
        assert count[j] == len(pts)
        if len(pts) == 0:
            assert not gt_ok[j]
            continue
        assert gt_ok[j]
        c = pts.mean(0)
        np.testing.assert_allclose(cen[j], c, rtol=1e-5, atol=1e-5)
        r = max(pts[:, a].max() - pts[:, a].min() for a in range(3))
        np.testing.assert_allclose(rad[j], r, rtol=1e-5)
    heat = np.asarray(t.heat)
    off = np.asarray(t.offset)
    for i in range(len(xyz)):
        j = instance[i]
        if not valid[i] or j < 0:
            assert heat[i] == 0 and np.all(off[i] == 0) and not on_inst[i]
            continue
        pts = xyz[instance == j]
        c = pts.mean(0)
        r = max(pts[:, a].max() - pts[:, a].min() for a in range(3))
        d2 = float(np.sum((c - xyz[i]) ** 2))
        np.testing.assert_allclose(off[i], c - xyz[i], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(
            heat[i], np.exp(-25 * d2 / (r + 1e-4) ** 2), rtol=1e-4, atol=1e-6
        )
    np.testing.assert_array_equal(np.asarray(t.gt_class), [3, 5, 3, 7, 9, -100])


def test_single_point_instance_has_unit_heat():
    batch, xyz, instance, valid = _batch()
    inst = np.asarray(instance).copy()
    inst[inst == 1] = IGNORE_LABEL
    inst[0] = 1
    t = compute_targets(batch.replace(instance=jnp.asarray(inst)))
    assert int(t.count[1]) == 1 and float(t.radius[1]) == 0.0
    np.testing.assert_allclose(float(t.heat[0]), 1.0)
    assert np.all(np.isfinite(np.asarray(t.heat)))


def test_scene_softmax_vs_numpy():
    rng = np.random.default_rng(3)
    n, b = 40, 3
    logits = rng.normal(size=n).astype(np.float32) * 5
    seg = rng.integers(0, b + 1, n).astype(np.int32)  # id b = padding
    mask = rng.random(n) < 0.7
    mask[seg == 2] = False  # an empty scene
    out = np.asarray(scene_softmax(jnp.asarray(logits), jnp.asarray(seg), jnp.asarray(mask), b))
    ref = np.zeros(n, np.float32)
    for s in range(b):
        rows = np.flatnonzero((seg == s) & mask)
        if len(rows):
            e = np.exp(logits[rows] - logits[rows].max())
            ref[rows] = e / e.sum()
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-7)
    for s in (0, 1):
        np.testing.assert_allclose(out[(seg == s) & mask].sum(), 1.0, rtol=1e-5)
    assert np.all(out[seg == b] == 0) and np.all(out[~mask] == 0)


def test_predicted_foreground():
    logits = jnp.asarray(
        [[5.0, 0, 0, 0], [0, 5.0, 0, 0], [0, 0, 5.0, 0], [0, 0, 0, 5.0], [0, 0, 0, 5.0]]
    )
    valid = jnp.asarray([True, True, True, True, False])
    fg = predicted_foreground(logits, valid, first_instance_class=2)
    np.testing.assert_array_equal(np.asarray(fg), [False, False, True, True, False])
