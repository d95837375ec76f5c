"""Superpoints: Felzenszwalb graph segmentation of meshes and point clouds.

Place in the data flow: raw scene -> **superpoints** -> prepared npz (`superpoint` key) ->
post-processing (superpoint vote, docs/method.md section 9). ScanNet ships its superpoints
(`*_vh_clean_2.0.010000.segs.json`); this module reproduces that segmentation for meshes
that lack them (synthetic rooms) and offers a k-nearest-neighbour variant for bare point
clouds (S3DIS, users' scans).

What `segment_mesh` implements, step by step (ScanNet's `Segmentator/segmentator.cpp`):

1. Face normal = cross(p2 - p1, p3 - p1) normalised to unit length (a degenerate face
   contributes a zero vector). Vertex normal = the plain MEAN of the unit normals of the
   faces that use the vertex, *not* renormalised (ScanNet blends them with a running
   lerp, which is the same mean). Note: faces are therefore not area-weighted, as in
   ScanNet. Vertices in no face get a zero normal.
2. Edges: for each face (i1, i2, i3), in face order, the three directed edges
   (i1, i2), (i1, i3), (i3, i2) -- so an interior mesh edge appears twice, once from each
   face, exactly as ScanNet builds them. Self-loops (repeated indices) never merge.
3. Weight of edge (a, b): d = (p_b - p_a) / |p_b - p_a| (zero for coincident points),
   w = 1 - n_a . n_b, and w = w**2 when n_b . d > 0 (ScanNet's convexity tweak: a convex
   crease costs less than a concave one).
4. Edges sorted by weight with a *stable* sort (ties keep edge order; ScanNet's
   `std::sort` is not stable, so ties there are in an unspecified order).
5. Felzenszwalb: a disjoint-set forest (union by rank; `find` sets the parent of the
   queried element to its root), threshold(v) = k for singletons; for each edge in order,
   with roots A != B, merge when w <= threshold(A) and w <= threshold(B); the merged root
   gets threshold w + k / size.
6. Then, over the same sorted edges, merge A != B when size(A) < seg_min_verts or
   size(B) < seg_min_verts.
7. Output: the union-find root vertex of each vertex (ids are vertex indices, as in
   ScanNet's segs.json, not 0..S-1).

Arithmetic is float64 (ScanNet uses float32), so near-ties may order differently from
the C++ binary; the algorithm is otherwise the same.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

__all__ = [
    "felzenszwalb",
    "mesh_edges",
    "mesh_vertex_normals",
    "segment_mesh",
    "segment_points",
    "compact_ids",
]


def _check_xyz(xyz: np.ndarray, what: str) -> np.ndarray:
    xyz = np.asarray(xyz)
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise ValueError(f"{what} must have shape [N, 3], got {xyz.shape}")
    xyz = xyz.astype(np.float64)
    if not np.all(np.isfinite(xyz)):
        raise ValueError(f"{what} contains NaN or inf coordinates; clean the input first")
    return xyz


def mesh_vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """f64[V, 3]: mean of the unit normals of each vertex's faces (not renormalised).

    Args:
      vertices: f32/f64[V, 3] positions.
      faces: int[F, 3] vertex indices.
    """
    p = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces, dtype=np.int64)
    num = p.shape[0]
    u = p[f[:, 1]] - p[f[:, 0]]
    v = p[f[:, 2]] - p[f[:, 0]]
    cx = u[:, 1] * v[:, 2] - u[:, 2] * v[:, 1]
    cy = u[:, 2] * v[:, 0] - u[:, 0] * v[:, 2]
    cz = u[:, 0] * v[:, 1] - u[:, 1] * v[:, 0]
    norm = np.sqrt(cx * cx + cy * cy + cz * cz)
    ok = norm > 0
    safe = np.where(ok, norm, 1.0)
    fn = np.stack(
        [np.where(ok, cx / safe, 0.0), np.where(ok, cy / safe, 0.0), np.where(ok, cz / safe, 0.0)],
        axis=1,
    )
    # bincount accumulates in input order: per vertex, faces are summed in face order.
    flat = f.reshape(-1)
    rep = np.repeat(fn, 3, axis=0)
    total = np.stack(
        [np.bincount(flat, weights=rep[:, c], minlength=num) for c in range(3)], axis=1
    )
    count = np.bincount(flat, minlength=num).astype(np.float64)
    return np.where(count[:, None] > 0, total / np.maximum(count, 1.0)[:, None], 0.0)


def mesh_edges(
    vertices: np.ndarray, faces: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ScanNet's directed mesh edges and their weights (unsorted).

    Returns:
      (a i64[E], b i64[E], w f64[E]) with E = 3F, edges of face i at rows 3i..3i+2.
    """
    p = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces, dtype=np.int64)
    n = mesh_vertex_normals(p, f)
    a = np.stack([f[:, 0], f[:, 0], f[:, 2]], axis=1).reshape(-1)
    b = np.stack([f[:, 1], f[:, 2], f[:, 1]], axis=1).reshape(-1)
    d = p[b] - p[a]
    dd = np.sqrt(d[:, 0] * d[:, 0] + d[:, 1] * d[:, 1] + d[:, 2] * d[:, 2])
    d = np.where(dd[:, None] > 0, d / np.where(dd > 0, dd, 1.0)[:, None], 0.0)
    na, nb = n[a], n[b]
    dot = na[:, 0] * nb[:, 0] + na[:, 1] * nb[:, 1] + na[:, 2] * nb[:, 2]
    dot2 = nb[:, 0] * d[:, 0] + nb[:, 1] * d[:, 1] + nb[:, 2] * d[:, 2]
    w = 1.0 - dot
    w = np.where(dot2 > 0, w * w, w)
    return a, b, w


def felzenszwalb(
    num_vertices: int, a: np.ndarray, b: np.ndarray, w: np.ndarray, k_thresh: float, min_size: int
) -> np.ndarray:
    """Felzenszwalb graph segmentation + small-segment merging (steps 4-7 above).

    Args:
      num_vertices: V.
      a, b: int[E] edge endpoints; w: float[E] weights (any order; sorted stably here).
      k_thresh: the k of threshold = k / |segment|.
      min_size: segments smaller than this are merged along edges in sorted order.

    Returns:
      i64[V] union-find root vertex of each vertex.
    """
    order = np.argsort(np.asarray(w, dtype=np.float64), kind="stable")
    ea = np.asarray(a, dtype=np.int64)[order].tolist()
    eb = np.asarray(b, dtype=np.int64)[order].tolist()
    ew = np.asarray(w, dtype=np.float64)[order].tolist()
    parent = list(range(num_vertices))
    rank = [0] * num_vertices
    size = [1] * num_vertices
    thr = [float(k_thresh)] * num_vertices
    c = float(k_thresh)
    for x, y, wt in zip(ea, eb, ew, strict=True):
        ra = parent[x]
        if ra != x:
            while ra != parent[ra]:
                ra = parent[ra]
            parent[x] = ra
        rb = parent[y]
        if rb != y:
            while rb != parent[rb]:
                rb = parent[rb]
            parent[y] = rb
        if ra == rb or wt > thr[ra] or wt > thr[rb]:
            continue
        if rank[ra] > rank[rb]:
            parent[rb] = ra
            size[ra] += size[rb]
            thr[ra] = wt + c / size[ra]
        else:
            parent[ra] = rb
            size[rb] += size[ra]
            if rank[ra] == rank[rb]:
                rank[rb] += 1
            thr[rb] = wt + c / size[rb]
    if min_size > 1:
        m = int(min_size)
        for x, y in zip(ea, eb, strict=True):
            ra = parent[x]
            if ra != x:
                while ra != parent[ra]:
                    ra = parent[ra]
                parent[x] = ra
            rb = parent[y]
            if rb != y:
                while rb != parent[rb]:
                    rb = parent[rb]
                parent[y] = rb
            if ra == rb or (size[ra] >= m and size[rb] >= m):
                continue
            if rank[ra] > rank[rb]:
                parent[rb] = ra
                size[ra] += size[rb]
            else:
                parent[ra] = rb
                size[rb] += size[ra]
                if rank[ra] == rank[rb]:
                    rank[rb] += 1
    # Final roots, vectorised: pointer jumping until every parent is a root.
    p = np.asarray(parent, dtype=np.int64)
    while True:
        pp = p[p]
        if np.array_equal(pp, p):
            return p
        p = pp


# The parameters of ScanNet's shipped segmentation (the 0.010000 in `*.segs.json` names).
SCANNET_K_THRESH = 0.01
SCANNET_SEG_MIN_VERTS = 20


def segment_mesh(
    vertices: np.ndarray,
    faces: np.ndarray,
    k_thresh: float = SCANNET_K_THRESH,
    seg_min_verts: int = SCANNET_SEG_MIN_VERTS,
) -> np.ndarray:
    """ScanNet's mesh over-segmentation (see the module docstring for the exact steps).

    Args:
      vertices: f32[V, 3] positions in metres.
      faces: i32[F, 3] triangle vertex indices.
      k_thresh: Felzenszwalb k (ScanNet: 0.01, the number in the segs.json name).
      seg_min_verts: minimum segment size (ScanNet: 20).

    Returns:
      i64[V] segment id per vertex = union-find root vertex index (not 0..S-1).
    """
    p = _check_xyz(vertices, "segment_mesh: vertices")
    f = np.asarray(faces)
    if f.ndim != 2 or f.shape[1] != 3 or not np.issubdtype(f.dtype, np.integer):
        raise ValueError(
            f"segment_mesh: faces must be an int array [F, 3], got {f.dtype}{list(f.shape)}"
        )
    if f.size and (f.min() < 0 or f.max() >= p.shape[0]):
        raise ValueError(
            f"segment_mesh: face indices must lie in [0, {p.shape[0]}), got [{f.min()}, {f.max()}]"
        )
    a, b, w = mesh_edges(p, f)
    return felzenszwalb(p.shape[0], a, b, w, k_thresh, seg_min_verts)


def _pca_normals(xyz: np.ndarray, nbr: np.ndarray) -> np.ndarray:
    """f64[N, 3] unit normals (unoriented): smallest-eigenvalue eigenvector of the
    covariance of each point's neighbourhood ``xyz[nbr[i]]`` (nbr: int[N, k])."""
    pts = xyz[nbr]  # [N, k, 3]
    pts = pts - pts.mean(axis=1, keepdims=True)
    cov = np.einsum("nki,nkj->nij", pts, pts)
    _, vec = np.linalg.eigh(cov)
    return vec[:, :, 0]


def segment_points(
    xyz: np.ndarray,
    k: int = 10,
    k_thresh: float = 0.01,
    seg_min_verts: int = 20,
    voxel_size: float | None = None,
    max_edge: float | None = None,
) -> np.ndarray:
    """Felzenszwalb over-segmentation of a bare point cloud on a kNN graph.

    The graph: undirected edges between each point and its ``k`` nearest neighbours
    (deduplicated, ordered by (i, j)), dropped when longer than ``max_edge`` (if given).
    Normals come from local PCA over the point and its k neighbours and are unoriented,
    so the weight is ``1 - |n_i . n_j|`` (no convexity tweak). Segmentation and
    small-segment merging are those of `felzenszwalb`.

    With ``voxel_size``, points are first grouped into cubic voxels; the graph is built on
    voxel centroids (``seg_min_verts`` then counts voxels) and every point takes its
    voxel's segment. This bounds the cost on dense scans (S3DIS rooms hold ~1M points).

    Args:
      xyz: f32[N, 3] positions in metres.
      k: neighbours per point.
      k_thresh, seg_min_verts: as in `segment_mesh`.
      voxel_size: optional grouping size in metres.
      max_edge: optional maximum edge length in metres.

    Returns:
      i64[N] segment id per point = index of a point of the segment (its root), as
      `segment_mesh`.
    """
    pts = _check_xyz(xyz, "segment_points: xyz")
    n_in = pts.shape[0]
    if n_in == 0:
        return np.zeros(0, np.int64)
    if voxel_size is not None:
        if voxel_size <= 0:
            raise ValueError(f"segment_points: voxel_size must be > 0, got {voxel_size}")
        grid = np.floor((pts - pts.min(axis=0)) / voxel_size).astype(np.int64)
        dims = grid.max(axis=0) + 1
        keys = (grid[:, 0] * dims[1] + grid[:, 1]) * dims[2] + grid[:, 2]
        _, inverse = np.unique(keys, return_inverse=True)
        inverse = inverse.reshape(-1)
        cnt = np.bincount(inverse).astype(np.float64)
        nodes = np.stack([np.bincount(inverse, weights=pts[:, c]) for c in range(3)], 1)
        nodes = nodes / cnt[:, None]
        # representative point of a voxel: its lowest point index
        rep = np.full(cnt.shape[0], n_in, np.int64)
        np.minimum.at(rep, inverse, np.arange(n_in))
    else:
        nodes, inverse, rep = pts, None, None
    num = nodes.shape[0]
    kk = int(min(k, num - 1))
    if kk < 1:
        roots = np.arange(num, dtype=np.int64)
    else:
        _, nbr = cKDTree(nodes).query(nodes, k=kk + 1)
        nbr = np.asarray(nbr, dtype=np.int64)
        normals = _pca_normals(nodes, nbr)
        i = np.repeat(np.arange(num, dtype=np.int64), kk + 1)
        j = nbr.reshape(-1)
        keep = i != j
        lo, hi = np.minimum(i[keep], j[keep]), np.maximum(i[keep], j[keep])
        key = np.unique(lo * num + hi)
        a, b = key // num, key % num
        if max_edge is not None:
            ok = np.linalg.norm(nodes[a] - nodes[b], axis=1) <= max_edge
            a, b = a[ok], b[ok]
        w = 1.0 - np.abs(np.einsum("ei,ei->e", normals[a], normals[b]))
        roots = felzenszwalb(num, a, b, w, k_thresh, seg_min_verts)
    if inverse is None:
        return roots
    return rep[roots][inverse]


def compact_ids(ids: np.ndarray) -> np.ndarray:
    """i32[N]: segment ids renumbered 0..S-1 in order of first appearance."""
    ids = np.asarray(ids)
    _, first, inv = np.unique(ids, return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first, kind="stable"), kind="stable")
    return order[inv.reshape(-1)].astype(np.int32)
