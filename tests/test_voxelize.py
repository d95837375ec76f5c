"""Voxelisation (dknet_jax.sparse.voxelize) against a numpy unique/mean reference."""

import functools

import jax
import numpy as np
import pytest

from dknet_jax.sparse.voxelize import check_voxels, voxel_coords, voxel_to_point, voxelize

N, C, B = 300, 4, 3


@functools.partial(jax.jit, static_argnames=("cap",))
def _vox(vox, b, valid, f, cap=256):
    return voxelize(vox, b, valid, f, capacity=cap)


def _points(seed):
    rng = np.random.default_rng(seed)
    vox = rng.integers(-4, 4, size=(N, 3)).astype(np.int32)  # negatives, many collisions
    b = rng.integers(0, B, N).astype(np.int32)
    valid = rng.random(N) < 0.85
    b[~valid] = B  # padding rows
    vox[~valid] = 999  # garbage that must be ignored
    f = rng.normal(size=(N, C)).astype(np.float32)
    return vox, b, valid, f


def _reference(vox, b, valid, f):
    rows = np.concatenate([b[:, None], vox], 1)[valid]
    uniq, inv = np.unique(rows, axis=0, return_inverse=True)
    inv = inv.ravel()
    mean = np.zeros((len(uniq), C))
    np.add.at(mean, inv, f[valid])
    mean /= np.bincount(inv)[:, None]
    return uniq, inv, mean


def test_voxelize_matches_numpy():
    vox, b, valid, f = _points(0)
    out = _vox(vox, b, valid, f)
    uniq, inv, mean = _reference(vox, b, valid, f)
    m = len(uniq)
    assert int(out.num) == m and not bool(out.overflow)
    np.testing.assert_array_equal(np.asarray(out.coords)[:m], uniq)
    np.testing.assert_array_equal(np.asarray(out.valid), np.arange(256) < m)
    np.testing.assert_allclose(np.asarray(out.feats)[:m], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out.feats)[m:], 0)
    p2v = np.asarray(out.point_to_voxel)
    np.testing.assert_array_equal(p2v[valid], inv)
    assert (p2v[~valid] == 256).all()
    back = np.asarray(voxel_to_point(out.feats, out.point_to_voxel))
    np.testing.assert_allclose(back[valid], mean[inv], rtol=1e-5, atol=1e-6)
    assert (back[~valid] == 0).all()
    check_voxels(out)


def test_voxelize_invariant_to_point_order():
    vox, b, valid, f = _points(1)
    perm = np.random.default_rng(2).permutation(N)
    a = _vox(vox, b, valid, f)
    p = _vox(vox[perm], b[perm], valid[perm], f[perm])
    np.testing.assert_array_equal(np.asarray(a.coords), np.asarray(p.coords))
    np.testing.assert_allclose(np.asarray(a.feats), np.asarray(p.feats), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(a.point_to_voxel)[perm], np.asarray(p.point_to_voxel))


def test_voxelize_capacity_overflow_is_flagged():
    vox, b, valid, f = _points(3)
    m = len(_reference(vox, b, valid, f)[0])
    out = _vox(vox, b, valid, f, cap=m - 5)
    assert bool(out.overflow) and int(out.num) == m
    with pytest.raises(ValueError, match="capacity"):
        check_voxels(out)


def test_voxel_coords_helper():
    xyz = np.array([[-0.01, 0.0, 0.019], [0.03, -0.05, 0.02], [1.0, 1.0, 1.0]])
    np.testing.assert_array_equal(
        voxel_coords(xyz, 0.02, shift=False), [[-1, 0, 0], [1, -3, 1], [50, 50, 50]]
    )
    shifted = voxel_coords(xyz, 0.02, batch_id=np.array([0, 0, 1]))
    np.testing.assert_array_equal(shifted, [[0, 3, 0], [2, 0, 1], [0, 0, 0]])
    with pytest.raises(ValueError, match="voxel_size"):
        voxel_coords(xyz, 0.0)
