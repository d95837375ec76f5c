"""Public sparse convolutions on plain, unpadded arrays (``docs/contracts.md`` section 1).

Place in the data flow: a user-facing wrapper over ``hashing`` (kernel maps) and ``conv``
(gather-GEMM-scatter); the model uses the padded engine directly (``model/backbone``).
Both run the same convolution code (``conv``): pair tiles walked in cache-sized steps on
the CPU, the centre offset as a plain matmul.

Coordinates are ``i32[N, 4]`` rows ``(batch, x, y, z)``, unique, any order, negatives
allowed; weights are ``[kx, ky, kz, Cin, Cout]``. All three ops are differentiable w.r.t.
``feats`` / ``coarse_feats`` and ``weight`` and work under ``jax.jit``.

Key budget: the bounding box of the coordinates (batches x extents, plus one cell of
margin per side) must fit in ~4.29e9 cells (``hashing.KEY_LIMIT``). On concrete inputs a
larger box raises ValueError; under ``jit`` the outputs are NaN instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dknet_jax.sparse import conv, hashing

Array = jax.Array


def _is_concrete(*xs) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


def _coords(coords, name: str) -> Array:
    c = jnp.asarray(coords)
    if c.ndim != 2 or c.shape[1] != 4:
        raise ValueError(f"{name}: coords must be i32[N, 4] rows (batch, x, y, z), got {c.shape}")
    if not jnp.issubdtype(c.dtype, jnp.integer):
        raise ValueError(f"{name}: coords must be integers, got {c.dtype}")
    return c.astype(jnp.int32)


def _feats(feats, n: int, name: str, what: str = "feats") -> Array:
    f = jnp.asarray(feats)
    if f.ndim != 2 or f.shape[0] != n:
        raise ValueError(f"{name}: {what} must be [{n}, C] (one row per coordinate), got {f.shape}")
    return f


def _bucket(n: int) -> int:
    """Static row count used inside jit: the smallest of 2^k, 1.25 2^k, 1.5 2^k and 1.75 2^k
    (>= 16) that holds ``n`` rows, so that sets of similar size share one compilation
    while the padding rows (which every pass of the op pays for) stay under 25%; plain
    powers of two padded a 158k-voxel room to 262k rows."""
    n = max(int(n), 16)
    p = 1 << (n - 1).bit_length()  # the next power of two
    half = p // 2
    for q in (half * 5 // 4, half * 3 // 2, half * 7 // 4):
        if q >= n:
            return q
    return p


def _pad_rows(x: Array, rows: int) -> Array:
    return jnp.concatenate([x, jnp.zeros((rows - x.shape[0],) + x.shape[1:], x.dtype)])


def _poison(out: Array, overflow: Array) -> Array:
    return jnp.where(overflow, jnp.nan, out).astype(out.dtype)


def subm_conv3d(coords, feats, weight, *, impl: str = "auto") -> Array:
    """Submanifold 3x3x3 convolution.

    ``out[i] = sum_{a,b,c} feats[j] @ weight[a, b, c]`` where
    ``coords[j] == coords[i] + (0, a-1, b-1, c-1)``; missing neighbours add nothing.

    Args:
      coords: i32[N, 4] unique rows (b, x, y, z).
      feats: f[N, Cin].
      weight: f[3, 3, 3, Cin, Cout].
      impl: "auto" | "xla" | "pallas" (see ``conv.resolve_impl``).
    Returns:
      f[N, Cout], rows aligned with ``coords``.
    Inside, rows are padded to a bucket (``_bucket``) so that similar sizes share one
    compilation.
    """
    c = _coords(coords, "subm_conv3d")
    f = _feats(feats, c.shape[0], "subm_conv3d")
    if _is_concrete(coords):
        hashing.check_key_budget(np.asarray(coords))
    if c.shape[0] == 0:
        return jnp.zeros((0, jnp.shape(weight)[-1]), f.dtype)
    n, nb = c.shape[0], _bucket(c.shape[0])
    out = _subm(
        _pad_rows(c, nb), _pad_rows(f, nb), jnp.asarray(weight), n, impl=conv.resolve_impl(impl)
    )
    return out[:n]


@jax.jit(static_argnames=("impl",))
def _subm(c, f, w, n, *, impl):
    # Tiles for every possible pair (26 per row): never overflow, and the conv walks only
    # the tiles in use, so the model's fast path at no risk (index memory: 208 B/row).
    ppv = None if impl == "pallas" else 26.0
    smap = hashing.subm_map(c, jnp.arange(c.shape[0]) < n, pairs_per_voxel=ppv)
    out = conv.subm_conv(f, w, smap, impl=impl)
    return _poison(out, smap.overflow)


def strided_conv3d(coords, feats, weight, *, capacity: int | None = None):
    """Kernel-2 stride-2 sparse convolution.

    Args:
      coords: i32[N, 4] unique rows (b, x, y, z).
      feats: f[N, Cin].
      weight: f[2, 2, 2, Cin, Cout].
      capacity: number of output rows. Needed only under ``jit`` (traced coords), where
        the number of coarse voxels is not known; rows past the real count are then
        padding ``(1 + max batch, 0, 0, 0)`` with zero features. By default the exact
        count is computed from the concrete coords.
    Returns:
      out_coords: i32[M, 4] unique ``(b, x//2, y//2, z//2)`` sorted lexicographically.
      out_feats: f[M, Cout], ``out_feats[o] = sum_{i: coords[i]//2 == out_coords[o]}
        feats[i] @ weight[x_i - 2X_o, y_i - 2Y_o, z_i - 2Z_o]``.
    """
    c = _coords(coords, "strided_conv3d")
    f = _feats(feats, c.shape[0], "strided_conv3d")
    if _is_concrete(coords):
        cn = np.asarray(coords).astype(np.int64)
        hashing.check_key_budget(cn)
        coarse = hashing.parent_coords(cn)
        exact = len(np.unique(coarse, axis=0))
        if capacity is None:
            capacity = exact
        elif capacity < exact:
            raise ValueError(
                f"strided_conv3d: capacity {capacity} is below the {exact} output voxels"
            )
    elif capacity is None:
        raise ValueError(
            "strided_conv3d: under jit the number of output voxels is unknown; pass "
            "capacity=<max output rows> (e.g. len(coords))"
        )
    if c.shape[0] == 0 or capacity == 0:
        return jnp.zeros((0, 4), jnp.int32), jnp.zeros((0, jnp.shape(weight)[-1]), f.dtype)
    n, nb, m = c.shape[0], _bucket(c.shape[0]), int(capacity)
    # The coarse count is <= N: the input bucket bounds it, one compilation per bucket.
    oc, of = _strided(
        _pad_rows(c, nb), _pad_rows(f, nb), jnp.asarray(weight), n, max(nb, _bucket(m))
    )
    return oc[:m], of[:m]


@jax.jit(static_argnames=("capacity",))
def _strided(c, f, w, n, capacity):
    dmap = hashing.down_map(c, jnp.arange(c.shape[0]) < n, capacity=capacity)
    out = conv.strided_conv(f, w, dmap)
    return dmap.coords, _poison(out, dmap.overflow)


def inverse_conv3d(coords, coarse_coords, coarse_feats, weight) -> Array:
    """Inverse (transposed) kernel-2 stride-2 sparse convolution.

    Args:
      coords: i32[N, 4] fine rows (b, x, y, z).
      coarse_coords: i32[M, 4] unique coarse rows, any order.
      coarse_feats: f[M, Cin].
      weight: f[2, 2, 2, Cin, Cout].
    Returns:
      f[N, Cout]: ``out[i] = coarse_feats[o] @ weight[x_i - 2X_o, y_i - 2Y_o, z_i - 2Z_o]``
      where ``coarse_coords[o] == coords[i] // 2`` (same batch); zero when absent.
    """
    c = _coords(coords, "inverse_conv3d")
    cc = _coords(coarse_coords, "inverse_conv3d")
    cf = _feats(coarse_feats, cc.shape[0], "inverse_conv3d", "coarse_feats")
    if _is_concrete(coords, coarse_coords):
        cn = np.asarray(coords).astype(np.int64)
        ccn = np.asarray(coarse_coords).astype(np.int64)
        up = hashing.parent_coords(cn)
        hashing.check_key_budget(np.concatenate([ccn, up]))
    if c.shape[0] == 0 or cc.shape[0] == 0:
        return jnp.zeros((c.shape[0], jnp.shape(weight)[-1]), cf.dtype)
    n, m = c.shape[0], cc.shape[0]
    nb = _bucket(n)
    mb = max(nb, _bucket(m))  # usually m <= n: one compilation per fine bucket
    out = _inverse(
        _pad_rows(c, nb), _pad_rows(cc, mb), _pad_rows(cf, mb), jnp.asarray(weight), n, m
    )
    return out[:n]


@jax.jit
def _inverse(c, cc, cf, w, n, m):
    dmap = hashing.match_down_map(c, jnp.arange(c.shape[0]) < n, cc, jnp.arange(cc.shape[0]) < m)
    out = conv.inverse_conv(cf, w, dmap)
    return _poison(out, dmap.overflow)
