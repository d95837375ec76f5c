"""Kernel maps (dknet_jax.sparse.hashing) against brute-force numpy references."""

import functools

import jax
import numpy as np
import pytest

from dknet_jax.sparse import hashing
from tests.test_sparse_reference import KINDS, neighbour_table_ref, random_coords

CAP = 224  # every padded test set has this many rows: one compilation per jitted map


@functools.partial(jax.jit, static_argnames=("ppv",))
def _subm(c, v, ppv=27):
    return hashing.subm_map(c, v, pairs_per_voxel=ppv, tile_rows=8)


@jax.jit
def _down(c, v):
    return hashing.down_map(c, v, capacity=CAP, tile_rows=8)


def _pad(rng, c, total=CAP):
    """Pad to `total` rows with garbage coords (some duplicating real rows), shuffle."""
    extra = total - len(c)
    junk = np.concatenate(
        [c[rng.integers(0, len(c), extra // 2)], rng.integers(-5, 5, size=(extra - extra // 2, 4))]
    ).astype(np.int32)
    allc = np.concatenate([c, junk])
    valid = np.arange(len(allc)) < len(c)
    perm = rng.permutation(len(allc))
    return allc[perm], valid[perm], perm


@pytest.mark.parametrize("kind", KINDS)
def test_subm_table_matches_bruteforce(kind):
    rng = np.random.default_rng(1)
    c = random_coords(rng, kind)
    cp, valid, perm = _pad(rng, c)
    smap = _subm(cp, valid)
    nbr = np.asarray(smap.nbr)
    v = len(cp)
    inv = np.argsort(perm)  # padded-row index of original row
    ref = neighbour_table_ref(c)
    got = nbr[inv[: len(c)]]
    want = np.where(ref >= 0, inv[np.maximum(ref, 0)], v)
    np.testing.assert_array_equal(got, want)
    assert (nbr[~valid] == v).all()
    assert not bool(smap.overflow)

    # Tiles hold every existing off-centre pair once, one offset per tile; the centre
    # (applied as a plain matmul by the conv) is in no tile; used tiles form a prefix.
    t = smap.tiles
    assert bool(t.ok) and t.complete
    row, col, tk = np.asarray(t.row), np.asarray(t.col), np.asarray(t.tile_k)
    real = row < v
    k_of_row = np.repeat(tk, t.tile_rows)[real]
    pairs = sorted(zip(row[real].tolist(), k_of_row.tolist(), col[real].tolist(), strict=True))
    ii, kk = np.nonzero(nbr < v)
    off = kk != hashing.CENTER
    ii, kk = ii[off], kk[off]
    assert pairs == sorted(zip(ii.tolist(), kk.tolist(), nbr[ii, kk].tolist(), strict=True))
    assert (col[~real] == v).all()
    used = int(t.used)
    assert real.reshape(-1, t.tile_rows)[:used].any(axis=1).all()
    assert not real.reshape(-1, t.tile_rows)[used:].any()


@pytest.mark.parametrize("kind", KINDS)
def test_down_map_matches_bruteforce(kind):
    rng = np.random.default_rng(3)
    c = random_coords(rng, kind)
    cp, valid, _ = _pad(rng, c)
    dmap = _down(cp, valid)  # (capacity overflow: test_backbone / test_voxelize)
    want = np.unique(np.concatenate([c[:, :1], c[:, 1:] // 2], 1), axis=0)  # lexicographic
    m = int(dmap.count)
    assert m == len(want) and not bool(dmap.overflow)
    np.testing.assert_array_equal(np.asarray(dmap.coords)[:m], want)
    assert np.asarray(dmap.valid).sum() == m
    par, child = np.asarray(dmap.parent), np.asarray(dmap.child)
    cc = np.asarray(dmap.coords)
    np.testing.assert_array_equal(
        cc[par[valid]], np.concatenate([cp[valid, :1], cp[valid, 1:] // 2], 1)
    )
    x, y, z = (cp[valid, 1:] % 2).T
    np.testing.assert_array_equal(child[valid], 4 * x + 2 * y + z)
    assert (par[~valid] == len(cp)).all()


def test_subm_table_at_the_edges_of_the_key_box():
    """Rows on every face of the bounding box, in two batches: the neighbour search steps
    by +-1 along z from the found place, which must never reach the next z column or the
    next batch (the frame's margin). Hand-built set, checked against the brute force."""
    full = np.array(
        [(b, x, y, z) for b in (0, 1) for x in (0, 1) for y in (0, 1) for z in (0, 1, 2)],
        np.int32,
    )
    # z runs that end where the next (x, y) column starts, a lone row per batch corner
    extra = np.array([[0, 0, 2, 0], [0, 0, 2, 2], [0, 1, 2, 1], [1, 1, 1, 3], [1, -1, 0, 0]])
    c = np.concatenate([full, extra]).astype(np.int32)
    rng = np.random.default_rng(3)
    cp, valid, perm = _pad(rng, c)
    nbr = np.asarray(_subm(cp, valid).nbr)
    inv = np.argsort(perm)
    ref = neighbour_table_ref(c)
    want = np.where(ref >= 0, inv[np.maximum(ref, 0)], len(cp))
    np.testing.assert_array_equal(nbr[inv[: len(c)]], want)
    assert (nbr[~valid] == len(cp)).all()


def test_keys_follow_lexicographic_order():
    rng = np.random.default_rng(5)
    c = random_coords(rng, "scattered")
    valid = np.ones(len(c), bool)
    keys = np.asarray(
        jax.jit(lambda c, v: hashing.pack_keys(hashing.key_frame(c, v), c, v))(c, valid)
    )
    lex = np.lexsort(c.T[::-1])
    assert (np.diff(keys[lex].astype(np.int64)) > 0).all()


def _box(batches, ex, ey, ez):
    """Corner rows of a (batches, ex, ey, ez) box: the extremes decide the key frame."""
    return np.array([[0, 0, 0, 0], [batches - 1, ex - 1, ey - 1, ez - 1]], np.int32)


def test_key_budget_real_scene_sizes_fit():
    # 8 ScanNet scenes (15 m x 15 m x 5 m at 2 cm) and 4 S3DIS halls (60 x 20 x 6 m at 5 cm).
    for c in (_box(8, 750, 750, 250), _box(4, 1200, 400, 120)):
        hashing.check_key_budget(c)
        v = np.ones(len(c), bool)
        assert not bool(hashing.key_frame(c, v).overflow)
        # neighbour lookups right at the box corners still work
        cp, vp = np.zeros((CAP, 4), np.int32), np.zeros(CAP, bool)
        cp[:2], vp[:2] = c, True
        nbr = np.asarray(_subm(cp, vp).nbr)
        assert (nbr[:2, hashing.CENTER] == [0, 1]).all() and (nbr[:2, :13] == CAP).all()


def test_key_budget_overflow_raises_and_flags():
    c = _box(4, 2000, 2000, 300)  # 4.8e9 cells
    with pytest.raises(ValueError, match="32-bit voxel keys"):
        hashing.check_key_budget(c)
    v = np.ones(len(c), bool)
    assert bool(hashing.key_frame(c, v).overflow)
    cp, vp = np.zeros((CAP, 4), np.int32), np.zeros(CAP, bool)
    cp[:2], vp[:2] = c, True
    assert bool(_subm(cp, vp).overflow)
    # huge coordinates (int32 range) do not wrap around silently either
    big = np.array([[0, -(2**30), 0, 0], [0, 2**30, 0, 0]], np.int32)
    assert bool(hashing.key_frame(big, v).overflow)


@pytest.mark.parametrize("kind", KINDS)
def test_derived_bounds_give_the_same_maps(kind):
    """The UNet reduces the box once and halves it per level (``Bounds.halve``): same
    maps as the per-level reductions."""
    rng = np.random.default_rng(7)
    c = random_coords(rng, kind)
    c = c - np.array([0, 3, 5, 7], np.int32)  # negative coordinates: halving is a floor
    cp, valid, _ = _pad(rng, c)
    box = jax.jit(hashing.bounds)(cp, valid)
    np.testing.assert_array_equal(np.asarray(box.lo), c.min(0))
    np.testing.assert_array_equal(np.asarray(box.hi), c.max(0))
    fine = jax.jit(lambda c, v: hashing.down_map(c, v, capacity=CAP, tile_rows=8))(cp, valid)
    derived = jax.jit(lambda c, v, b: hashing.down_map(c, v, capacity=CAP, tile_rows=8, box=b))(
        cp, valid, box
    )
    for a, b in zip(jax.tree.leaves(fine), jax.tree.leaves(derived), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The coarse rows come sorted with padding last; their box is the halved box.
    cc, cv = np.asarray(fine.coords), np.asarray(fine.valid)
    half = box.halve()
    np.testing.assert_array_equal(np.asarray(half.lo), cc[cv].min(0))
    np.testing.assert_array_equal(np.asarray(half.hi), cc[cv].max(0))

    @jax.jit
    def both(c, v, b):
        plain = hashing.subm_map(c, v, pairs_per_voxel=27, tile_rows=8)
        fast = hashing.subm_map(c, v, pairs_per_voxel=27, tile_rows=8, box=b)
        return plain, fast

    plain, fast = both(fine.coords, fine.valid, half)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(fast), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bounds_of_an_empty_set_and_unique_rows_padding():
    c = np.array([[0, 1, 2, 3], [2, -4, 0, 9]], np.int32)
    box = hashing.bounds(c, np.zeros(2, bool))
    assert np.asarray(box.lo).tolist() == [0, 0, 0, 0] == np.asarray(box.hi).tolist()
    u, uv, inv, count, over = hashing.unique_rows(c, np.array([True, True]), capacity=4)
    assert int(count) == 2 and not bool(over)
    # Padded rows carry the batch index after the largest real one.
    np.testing.assert_array_equal(np.asarray(u)[~np.asarray(uv)], [[3, 0, 0, 0]] * 2)
    u, uv, inv, count, over = hashing.unique_rows(c, np.zeros(2, bool), capacity=4)
    assert int(count) == 0 and (np.asarray(u) == 0).all()


@pytest.mark.parametrize(
    "shape",
    [(1,), (63,), (64,), (65, 3), (500, 27), (64 * 64, 2), (64 * 64 + 1, 8), (300, 2, 3)],
)
def test_prefix_count_equals_numpy_cumsum(shape):
    """Blocked triangular-matmul running count against numpy's cumsum: lengths below,
    at and past one block and one block of blocks (two levels of recursion), trailing
    axes flattened and restored, and a block-total input that is not 0/1."""
    rng = np.random.default_rng(sum(shape))
    mask = rng.random(shape) < 0.4
    got = np.asarray(jax.jit(hashing.prefix_count)(mask))
    assert got.dtype == np.int32 and got.shape == shape
    np.testing.assert_array_equal(got, np.cumsum(mask, axis=0))
    counts = rng.integers(0, 65, size=shape).astype(np.int32)  # like the block totals
    np.testing.assert_array_equal(
        np.asarray(jax.jit(hashing.prefix_count)(counts)), np.cumsum(counts, axis=0)
    )


def _chain_maps(c, v, caps, ppv):
    """The UNet's maps level by level: subm_map, then down_map to the next level."""
    box = hashing.bounds(c, v)
    subms, downs = [], []
    for lvl in range(len(caps)):
        subms.append(hashing.subm_map(c, v, pairs_per_voxel=ppv[lvl], box=box))
        if lvl + 1 < len(caps):
            d = hashing.down_map(c, v, capacity=caps[lvl + 1], box=box)
            downs.append(d)
            c, v, box = d.coords, d.valid, box.halve()
    return subms, downs


LEVEL_CAPS = [CAP, 112, 112, 104, 104]  # 100 input rows: no level overflows
LEVEL_PPV = [14.0, 26.0, None, 2.0, 26.0]  # sized tiles, complete, none, overflowing tiles


@pytest.mark.parametrize("kind", KINDS)
def test_level_maps_equal_the_chain_of_single_level_maps(kind):
    """hashing.level_maps builds every level at once (one sort, one concatenated search,
    one tile build per map kind); it must give exactly the maps of the level-by-level
    chain (which the tests above check against brute force), field by field."""
    rng = np.random.default_rng(7)
    c = random_coords(rng, kind, n=100, batches=2)
    cp, valid, _ = _pad(rng, c)
    chain = jax.jit(lambda c, v: _chain_maps(c, v, LEVEL_CAPS, LEVEL_PPV))(cp, valid)
    fused = jax.jit(lambda c, v: hashing.level_maps(c, v, LEVEL_CAPS, pairs_per_voxel=LEVEL_PPV))(
        cp, valid
    )
    assert jax.tree_util.tree_structure(chain) == jax.tree_util.tree_structure(fused)
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(chain), jax.tree_util.tree_leaves(fused), strict=True
    ):
        np.testing.assert_array_equal(
            np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path)
        )
    subms, downs = fused
    assert not any(bool(d.overflow) for d in downs)
    assert not any(bool(s.overflow) for s in subms)
    # Every coarse level holds exactly the unique parents of the input rows.
    for j, d in enumerate(downs, start=1):
        want = np.unique(np.concatenate([c[:, :1], c[:, 1:] >> j], axis=1), axis=0)
        got = np.asarray(d.coords)[np.asarray(d.valid)]
        np.testing.assert_array_equal(got, want)


def test_level_maps_flag_a_level_over_capacity():
    """A coarse level with more unique rows than its capacity sets its map's overflow."""
    rng = np.random.default_rng(3)
    c = random_coords(rng, "scattered", n=100, batches=2)  # isolated: halving keeps ~all rows
    cp, valid, _ = _pad(rng, c)
    _, downs = jax.jit(
        lambda c, v: hashing.level_maps(c, v, [CAP, 64, 32], pairs_per_voxel=[8.0, 8.0, 8.0])
    )(cp, valid)
    assert bool(downs[0].overflow) and int(downs[0].count) > 64
    assert bool(downs[1].overflow)
