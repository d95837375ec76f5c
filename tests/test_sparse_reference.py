"""Brute-force numpy references and random sparse sets for the sparse-engine tests.

Independent of the engine: dictionaries of coordinate tuples and explicit loops.
"""

from __future__ import annotations

import itertools

import numpy as np


def random_coords(rng, kind: str, n: int = 200, batches: int = 3) -> np.ndarray:
    """i32[n, 4] unique rows (b, x, y, z) of a given flavour in random order ("single":
    one row). A fixed n keeps jitted shapes, hence compilations, shared across flavours."""
    if kind == "single":
        return np.array([[0, -3, 5, -7]], np.int32)
    want, n = n, 4 * n
    if kind == "clustered":  # dense blobs: many neighbours per voxel
        centres = rng.integers(-20, 20, size=(batches, 3))
        b = rng.integers(0, batches, n)
        xyz = centres[b] + rng.integers(-2, 3, size=(n, 3))
    elif kind == "scattered":  # mostly isolated voxels over a wide range
        b = rng.integers(0, batches, n)
        xyz = rng.integers(-500, 500, size=(n, 3))
    elif kind == "isolated":  # spacing 3: no neighbour at all
        b = rng.integers(0, batches, n)
        xyz = rng.integers(-30, 30, size=(n, 3)) * 3
    elif kind == "surface":  # a plane with holes and a wall, negatives included
        b = rng.integers(0, batches, n)
        xyz = np.stack([rng.integers(-6, 6, n), rng.integers(-6, 6, n), np.zeros(n, int)], 1)
        wall = rng.random(n) < 0.3
        xyz[wall] = np.stack(
            [
                np.full(wall.sum(), -7),
                rng.integers(-6, 6, wall.sum()),
                rng.integers(0, 8, wall.sum()),
            ],
            1,
        )
    else:
        raise ValueError(kind)
    c = np.unique(np.concatenate([b[:, None], xyz], 1).astype(np.int32), axis=0)
    assert len(c) >= want, (kind, len(c))
    return c[rng.permutation(len(c))[:want]]


KINDS = ["single", "clustered", "scattered", "isolated", "surface"]


def subm_ref(coords, feats, weight):
    """out[i] = sum_{abc} feats[j] @ weight[a,b,c], coords[j] = coords[i] + (0,a-1,b-1,c-1)."""
    index = {tuple(c): i for i, c in enumerate(coords.tolist())}
    out = np.zeros((len(coords), weight.shape[-1]), np.float64)
    for i, (b, x, y, z) in enumerate(coords.tolist()):
        for a, bb, c in itertools.product(range(3), repeat=3):
            j = index.get((b, x + a - 1, y + bb - 1, z + c - 1))
            if j is not None:
                out[i] += feats[j].astype(np.float64) @ weight[a, bb, c]
    return out


def strided_ref(coords, feats, weight):
    parents = {}
    for b, x, y, z in coords.tolist():
        parents[(b, x // 2, y // 2, z // 2)] = None
    out_coords = np.array(sorted(parents), np.int32).reshape(-1, 4)
    index = {tuple(c): o for o, c in enumerate(out_coords.tolist())}
    out = np.zeros((len(out_coords), weight.shape[-1]), np.float64)
    for i, (b, x, y, z) in enumerate(coords.tolist()):
        o = index[(b, x // 2, y // 2, z // 2)]
        out[o] += feats[i].astype(np.float64) @ weight[x % 2, y % 2, z % 2]
    return out_coords, out


def inverse_ref(coords, coarse_coords, coarse_feats, weight):
    index = {tuple(c): o for o, c in enumerate(coarse_coords.tolist())}
    out = np.zeros((len(coords), weight.shape[-1]), np.float64)
    for i, (b, x, y, z) in enumerate(coords.tolist()):
        o = index.get((b, x // 2, y // 2, z // 2))
        if o is not None:
            out[i] = coarse_feats[o].astype(np.float64) @ weight[x % 2, y % 2, z % 2]
    return out


def neighbour_table_ref(coords):
    """i32[N, 27] index of neighbour at offset 9a+3b+c (-1 when missing)."""
    index = {tuple(c): i for i, c in enumerate(coords.tolist())}
    nbr = -np.ones((len(coords), 27), np.int64)
    for i, (b, x, y, z) in enumerate(coords.tolist()):
        for k, (a, bb, c) in enumerate(itertools.product(range(3), repeat=3)):
            nbr[i, k] = index.get((b, x + a - 1, y + bb - 1, z + c - 1), -1)
    return nbr


def test_references_on_hand_worked_example():
    # Two voxels of scene 0 at x = 1 and x = 2 (neighbours along +x), one voxel of scene 1
    # at the same place as the first (other scene: not a neighbour). Cin = Cout = 1.
    coords = np.array([[0, 1, 0, 0], [0, 2, 0, 0], [1, 1, 0, 0]], np.int32)
    feats = np.array([[1.0], [10.0], [100.0]])
    w = np.zeros((3, 3, 3, 1, 1))
    w[1, 1, 1] = 1.0  # centre
    w[2, 1, 1] = 2.0  # neighbour at x + 1
    w[0, 1, 1] = 3.0  # neighbour at x - 1
    np.testing.assert_allclose(subm_ref(coords, feats, w)[:, 0], [1 + 20, 10 + 3, 100])
    w2 = np.arange(8, dtype=float).reshape(2, 2, 2, 1, 1)  # weight[a,b,c] = 4a + 2b + c
    oc, of = strided_ref(coords, feats, w2)
    # x = 1 -> parent 0, child a = 1 (w = 4); x = 2 -> parent 1, child a = 0 (w = 0)
    np.testing.assert_array_equal(oc, [[0, 0, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0]])
    np.testing.assert_allclose(of[:, 0], [4.0, 0.0, 400.0])
    up = inverse_ref(coords, oc[::-1], np.array([[1.0], [2.0], [3.0]]), w2)
    np.testing.assert_allclose(up[:, 0], [3 * 4, 2 * 0, 1 * 4])
    nbr0 = neighbour_table_ref(coords)[0]  # itself at k = 13, x + 1 at k = 9*2 + 3 + 1
    assert nbr0[13] == 0 and nbr0[22] == 1 and (nbr0 == -1).sum() == 25
