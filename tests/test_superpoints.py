"""Superpoints: `segment_mesh` against a slow, plain-Python implementation of the same
algorithm (explicit member lists instead of a union-find forest), plus properties of the
point-cloud variant."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dknet_jax.data.superpoints import compact_ids, segment_mesh, segment_points


# ----------------------------------------------------------------------------------------
# Reference: ScanNet's segmentator written out with Python loops and explicit sets.
def _ref_segment_mesh(vertices, faces, k, min_verts):
    verts = [tuple(float(c) for c in v) for v in vertices]
    nv = len(verts)
    sums = [[0.0, 0.0, 0.0] for _ in range(nv)]
    counts = [0] * nv
    edges = []
    for i1, i2, i3 in (tuple(int(x) for x in f) for f in faces):
        p1, p2, p3 = verts[i1], verts[i2], verts[i3]
        u = (p2[0] - p1[0], p2[1] - p1[1], p2[2] - p1[2])
        v = (p3[0] - p1[0], p3[1] - p1[1], p3[2] - p1[2])
        c = (u[1] * v[2] - u[2] * v[1], u[2] * v[0] - u[0] * v[2], u[0] * v[1] - u[1] * v[0])
        n = math.sqrt(c[0] * c[0] + c[1] * c[1] + c[2] * c[2])
        fn = (c[0] / n, c[1] / n, c[2] / n) if n > 0 else (0.0, 0.0, 0.0)
        for vi in (i1, i2, i3):
            for t in range(3):
                sums[vi][t] += fn[t]
            counts[vi] += 1
        edges += [(i1, i2), (i1, i3), (i3, i2)]
    normals = [
        tuple(s / counts[i] for s in sums[i]) if counts[i] else (0.0, 0.0, 0.0) for i in range(nv)
    ]
    weights = []
    for a, b in edges:
        pa, pb, na, nb = verts[a], verts[b], normals[a], normals[b]
        d = [pb[0] - pa[0], pb[1] - pa[1], pb[2] - pa[2]]
        dd = math.sqrt(d[0] * d[0] + d[1] * d[1] + d[2] * d[2])
        d = [x / dd for x in d] if dd > 0 else [0.0, 0.0, 0.0]
        dot = na[0] * nb[0] + na[1] * nb[1] + na[2] * nb[2]
        dot2 = nb[0] * d[0] + nb[1] * d[1] + nb[2] * d[2]
        w = 1.0 - dot
        weights.append(w * w if dot2 > 0 else w)
    order = sorted(range(len(edges)), key=lambda e: weights[e])  # stable
    label = list(range(nv))
    members = {i: [i] for i in range(nv)}
    thresh = {i: k for i in range(nv)}

    def merge(la, lb):
        for m in members[lb]:
            label[m] = la
        members[la] += members.pop(lb)

    for e in order:
        la, lb = label[edges[e][0]], label[edges[e][1]]
        if la != lb and weights[e] <= thresh[la] and weights[e] <= thresh[lb]:
            merge(la, lb)
            thresh[la] = weights[e] + k / len(members[la])
    for e in order:
        la, lb = label[edges[e][0]], label[edges[e][1]]
        if la != lb and (len(members[la]) < min_verts or len(members[lb]) < min_verts):
            merge(la, lb)
    return np.array(label)


def _same_partition(x, y):
    x, y = np.asarray(x), np.asarray(y)
    pairs = np.unique(np.stack([x, y], 1), axis=0)
    return len(pairs) == len(np.unique(x)) == len(np.unique(y))


# ----------------------------------------------------------------------------------------
# Test meshes
def _grid(nx, ny, z):
    xs, ys = np.meshgrid(
        np.arange(nx, dtype=np.float32), np.arange(ny, dtype=np.float32), indexing="ij"
    )
    verts = np.stack([xs.ravel() * 0.05, ys.ravel() * 0.05, z.ravel()], 1)
    idx = np.arange(nx * ny).reshape(nx, ny)
    a, b, c, d = idx[:-1, :-1], idx[1:, :-1], idx[1:, 1:], idx[:-1, 1:]
    faces = np.concatenate(
        [np.stack([a, b, c], -1).reshape(-1, 3), np.stack([a, c, d], -1).reshape(-1, 3)]
    )
    return verts.astype(np.float32), faces.astype(np.int32)


def _box_surface(n, size, noise, rng):
    """Closed box surface of 6 subdivided faces (vertices duplicated along seams are
    welded), optional noise."""
    verts, faces, key = [], [], {}

    def vid(p):
        q = tuple(np.round(p, 6))
        if q not in key:
            key[q] = len(verts)
            verts.append(p)
        return key[q]

    t = np.linspace(0.0, 1.0, n)
    for axis in range(3):
        for side in (0.0, 1.0):
            u_ax, v_ax = [a for a in range(3) if a != axis]
            ids = np.zeros((n, n), int)
            for i, u in enumerate(t):
                for j, v in enumerate(t):
                    p = np.zeros(3)
                    p[axis], p[u_ax], p[v_ax] = side, u, v
                    ids[i, j] = vid(p)
            for i in range(n - 1):
                for j in range(n - 1):
                    a, b, c, d = ids[i, j], ids[i + 1, j], ids[i + 1, j + 1], ids[i, j + 1]
                    if side == 0.0:
                        faces += [(a, c, b), (a, d, c)]
                    else:
                        faces += [(a, b, c), (a, c, d)]
    verts = np.array(verts) * np.asarray(size)
    verts = verts + noise * rng.standard_normal(verts.shape)
    return verts.astype(np.float32), np.array(faces, np.int32)


def _meshes():
    rng = np.random.default_rng(0)
    out = []
    # flat grid: every weight ties at exactly 0
    out.append(_grid(9, 7, np.zeros((9, 7), np.float32)))
    # terraced heightfield: many exact ties, concave and convex steps
    z = (rng.integers(0, 3, size=(12, 10)) * 0.05).astype(np.float32)
    out.append(_grid(12, 10, z))
    # smooth noisy heightfield
    out.append(_grid(15, 15, (0.02 * rng.standard_normal((15, 15))).astype(np.float32)))
    # boxes: exact (flat faces) and noisy
    out.append(_box_surface(6, (1.0, 0.6, 0.4), 0.0, rng))
    out.append(_box_surface(7, (0.5, 0.5, 0.9), 0.004, rng))
    # two grids sharing no vertex + an unused vertex + a degenerate face
    v1, f1 = _grid(6, 6, (0.03 * rng.standard_normal((6, 6))).astype(np.float32))
    v2, f2 = _grid(5, 8, np.zeros((5, 8), np.float32))
    verts = np.concatenate([v1, v2 + np.float32(3.0), np.zeros((1, 3), np.float32)])
    faces = np.concatenate([f1, f2 + len(v1), np.array([[0, 0, 1]], np.int32)])
    out.append((verts, faces))
    return out


@pytest.mark.parametrize(
    "k,min_verts", [(0.01, 20), (0.001, 1), (0.2, 1), (0.02, 3), (0.05, 5), (2.0, 20)]
)
def test_segment_mesh_matches_reference(k, min_verts):
    for verts, faces in _meshes():
        got = segment_mesh(verts, faces, k_thresh=k, seg_min_verts=min_verts)
        want = _ref_segment_mesh(verts, faces, k, min_verts)
        assert got.shape == (len(verts),) and got.dtype == np.int64
        assert _same_partition(got, want)
        # ids are root vertex indices: each id is a vertex of its own segment
        assert np.array_equal(got[got], got)


def test_segment_mesh_nontrivial_partitions():
    """Guards the reference comparison against degenerate cases (all one / all apart)."""
    for verts, faces in _meshes()[1:]:
        for k, m in ((0.2, 1), (0.02, 3)):
            count = len(np.unique(segment_mesh(verts, faces, k, m)))
            assert 2 < count < len(verts) * 2 // 3
    verts, faces = _meshes()[0]  # flat grid: one segment
    assert len(np.unique(segment_mesh(verts, faces, 0.01, 1))) == 1


def test_segment_mesh_min_size_and_box_faces():
    verts, faces = _box_surface(8, (1.0, 1.0, 1.0), 0.0, np.random.default_rng(1))
    seg = segment_mesh(verts, faces, 0.01, 20)
    sizes = np.bincount(compact_ids(seg))
    assert sizes.min() >= 20
    # the interior of each box face lies in one segment
    for axis in range(3):
        for side in (0.0, 1.0):
            inner = (np.abs(verts[:, axis] - side) < 1e-6) & np.all(
                np.abs(np.delete(verts, axis, 1) - 0.5) < 0.3, axis=1
            )
            assert len(np.unique(seg[inner])) == 1


def test_segment_mesh_bad_input():
    with pytest.raises(ValueError, match="vertices"):
        segment_mesh(np.zeros((4, 2)), np.zeros((1, 3), np.int32))
    with pytest.raises(ValueError, match="NaN"):
        segment_mesh(np.full((3, 3), np.nan), np.array([[0, 1, 2]]))
    with pytest.raises(ValueError, match="face indices"):
        segment_mesh(np.zeros((3, 3)), np.array([[0, 1, 3]]))


def _two_planes(rng, n=1500):
    floor = np.c_[rng.uniform(0, 1, (n, 2)), 0.002 * rng.standard_normal(n)]
    wall = np.c_[
        rng.uniform(0, 1, n), 0.002 * rng.standard_normal(n) + 1.2, rng.uniform(0.05, 1, n)
    ]
    return np.concatenate([floor, wall]).astype(np.float32), np.repeat([0, 1], n)


def test_segment_points_separates_planes():
    xyz, plane = _two_planes(np.random.default_rng(2))
    seg = segment_points(xyz, k=8, k_thresh=0.01, seg_min_verts=20)
    assert np.array_equal(seg[seg], seg)
    for s in np.unique(seg):
        assert len(np.unique(plane[seg == s])) == 1  # no segment spans both planes
    assert np.bincount(compact_ids(seg)).min() >= 20


def test_segment_points_voxel_grouping():
    xyz, plane = _two_planes(np.random.default_rng(3))
    seg = segment_points(xyz, k=8, voxel_size=0.05)
    assert np.array_equal(seg[seg], seg)
    keys = np.floor((xyz - xyz.min(0)) / 0.05).astype(np.int64)
    _, inv = np.unique(keys, axis=0, return_inverse=True)
    inv = inv.reshape(-1)
    for v in np.unique(inv)[:50]:
        assert len(np.unique(seg[inv == v])) == 1
    for s in np.unique(seg):
        assert len(np.unique(plane[seg == s])) == 1


def test_segment_points_tiny_inputs():
    assert segment_points(np.zeros((0, 3))).shape == (0,)
    assert np.array_equal(segment_points(np.zeros((1, 3))), [0])


def test_compact_ids():
    assert np.array_equal(compact_ids(np.array([7, 7, 3, 9, 3])), [0, 0, 1, 2, 1])
