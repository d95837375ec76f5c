"""Sparse convolutions as gather-GEMM-scatter over kernel maps, with hand-written VJPs.

Place in the data flow: ``hashing`` (``SubmMap``, ``DownMap``) -> **conv** ->
``model/backbone`` (layers) and ``functional`` (public plain-array ops).

Two XLA formulations:
- *tiled* (:func:`tile_conv`): the existing pairs of a map, compacted into tiles of one
  offset each (``hashing.Tiles``): gather ``[NT, T, Cin]`` rows, one batched matmul with
  ``W[tile_k]``, ``segment_sum`` into the output rows. Only existing pairs are touched.
- *dense per offset* (:func:`table_conv`): ``out = sum_k feats[nbr[:, k]] @ W[k]`` over the
  27 columns of a submanifold table, one offset at a time (``lax.scan``), O(V C) memory.
  Used when the tile capacity overflowed (``lax.cond`` on ``Tiles.ok``) and by the
  functional API.

Backward passes reuse the maps and never build ``[V, 27, C]``; only the inputs are saved
as residuals (gathers are recomputed). On the table path the feature gradient of a
submanifold conv is the same convolution with mirrored offsets and transposed weights
(``W'[k] = W[26-k]^T``; the pair set is symmetric), gathers only. On the tiled path the
pairs are walked in the transposed direction (gather and scatter indices swapped, which
for a submanifold map *is* the mirrored convolution): the gathered output-gradient rows
serve both dW (per-tile outer products, summed per offset) and dx, one ``[R, C]`` gather
fewer than re-gathering for a separate mirrored conv.

``impl``: ``"xla"``, ``"pallas"`` (``pallas_kernels.sparse_conv.gather_matmul`` on the
neighbour table; submanifold convs only, strided / inverse stay on XLA) or ``"auto"``
(Pallas on a GPU backend, XLA otherwise). ``"pallas"`` off a GPU runs the Pallas
interpreter (correct but slow; used by the tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from dknet_jax.sparse.hashing import DownMap, SubmMap

Array = jax.Array

IMPLS = ("auto", "xla", "pallas")


# Whether "auto" picks the Pallas kernel on a GPU backend. Off until the kernel has run
# the whole UNet forward+backward on a card and matched XLA: on an H200 (jax 0.11.2) the
# first kernel version matched the reference alone at 32/64 channels, but the full UNet
# with it failed with "Shared memory size limit exceeded" (docs/benchmarks.md). The kernel
# now derives its tiles from a shared-memory model (pallas_kernels/sparse_conv.py,
# derive_block_sizes), checked on CPU by lowering every UNet shape and by offline Triton
# compiles, not yet on a card. Turn this on when `scripts/gpu_check_pallas.py
# --unet_only` (a step of scripts/gpu_checks.sh) prints "UNET OK" on a GPU. Until then
# opt in with impl="pallas".
AUTO_PALLAS_ON_GPU = False


def resolve_impl(impl: str) -> str:
    """Validate the name; map ``"auto"`` to ``"xla"`` (to ``"pallas"`` on GPU only when
    ``AUTO_PALLAS_ON_GPU``)."""
    if impl not in IMPLS:
        raise ValueError(f"sparse conv impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        gpu = jax.default_backend() == "gpu"
        return "pallas" if (gpu and AUTO_PALLAS_ON_GPU) else "xla"
    return impl


def _pallas_gather_matmul():
    try:
        from pallas_kernels.sparse_conv import gather_matmul
    except ImportError as e:  # pragma: no cover - depends on the checkout
        raise RuntimeError(
            "sparse conv impl='pallas' needs pallas_kernels.sparse_conv.gather_matmul, which "
            f"could not be imported ({e}). Use impl='xla' or install the Pallas kernels."
        ) from e
    return gather_matmul


# ------------------------------------------------------------------------ tiled path


def _tile_apply(x, w, gather_idx, scatter_idx, tile_k, num_out):
    nt = tile_k.shape[0]
    xg = jnp.take(x, gather_idx, axis=0, mode="fill", fill_value=0)
    xg = xg.reshape(nt, -1, x.shape[1])
    y = jnp.einsum("tic,tcd->tid", xg, w[tile_k], preferred_element_type=jnp.float32)
    y = y.reshape(-1, w.shape[-1]).astype(x.dtype)
    return jax.ops.segment_sum(y, scatter_idx, num_segments=num_out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def tile_conv(x, w, gather_idx, scatter_idx, tile_k, num_out):
    """Tiled pair convolution.

    ``out[scatter_idx[p]] += x[gather_idx[p]] @ w[tile_k[p // T]]`` over all pair rows p.

    Args:
      x: f[Vin, Cin]; w: f[K, Cin, Cout]; gather_idx, scatter_idx: i32[NT * T] (out-of-range
        = padding); tile_k: i32[NT]; num_out: Vout (static).
    Returns:
      f[Vout, Cout].
    """
    return _tile_apply(x, w, gather_idx, scatter_idx, tile_k, num_out)


def _tile_conv_fwd(x, w, gather_idx, scatter_idx, tile_k, num_out):
    out = _tile_apply(x, w, gather_idx, scatter_idx, tile_k, num_out)
    return out, (x, w, gather_idx, scatter_idx, tile_k)


def _tile_conv_bwd(num_out, res, g):
    x, w, gather_idx, scatter_idx, tile_k = res
    dx, dw = _tile_grads(x, w, gather_idx, scatter_idx, tile_k, g)
    return dx, dw, None, None, None


def _tile_grads(x, w, gather_idx, scatter_idx, tile_k, g):
    # The transposed map: gather the output gradient once per pair row and use it twice,
    # for dW (outer products with the gathered inputs) and for dx (times W^T, summed into
    # the input rows). For a submanifold map this is the mirrored convolution
    # (W[26-k]^T on the same pairs) with one gather fewer than re-gathering g[col].
    g = g.astype(x.dtype)
    nt = tile_k.shape[0]
    gg = jnp.take(g, scatter_idx, axis=0, mode="fill", fill_value=0).reshape(nt, -1, g.shape[1])
    xg = jnp.take(x, gather_idx, axis=0, mode="fill", fill_value=0).reshape(nt, -1, x.shape[1])
    dw_t = jnp.einsum("tic,tid->tcd", xg, gg, preferred_element_type=jnp.float32)
    dw = jax.ops.segment_sum(dw_t, tile_k, num_segments=w.shape[0]).astype(w.dtype)
    dxg = jnp.einsum("tid,tcd->tic", gg, w[tile_k], preferred_element_type=jnp.float32)
    dx = jax.ops.segment_sum(
        dxg.reshape(-1, x.shape[1]).astype(x.dtype), gather_idx, num_segments=x.shape[0]
    )
    return dx, dw


tile_conv.defvjp(_tile_conv_fwd, _tile_conv_bwd)


# ------------------------------------------------------------- dense per-offset path


def _table_apply(x, w, nbr):
    def step(acc, kw):
        idx, wk = kw
        xk = jnp.take(x, idx, axis=0, mode="fill", fill_value=0)
        return acc + jnp.dot(xk, wk, preferred_element_type=jnp.float32), None

    acc0 = jnp.zeros((nbr.shape[0], w.shape[-1]), jnp.float32)
    out, _ = lax.scan(step, acc0, (nbr.T, w))
    return out.astype(x.dtype)


@jax.custom_vjp
def table_conv(x, w, nbr):
    """Submanifold convolution over a full neighbour table, one offset at a time.

    Args:
      x: f[V, Cin]; w: f[K, Cin, Cout]; nbr: i32[V, K] with offset k the mirror of K-1-k
        (entries outside [0, V) are missing).
    Returns:
      f[V, Cout] with ``out[i] = sum_k x[nbr[i, k]] @ w[k]``.
    """
    return _table_apply(x, w, nbr)


def _table_conv_fwd(x, w, nbr):
    return _table_apply(x, w, nbr), (x, w, nbr)


def _table_conv_bwd(res, g):
    x, w, nbr = res
    return (*_table_grads(x, w, nbr, g), None)


def _table_grads(x, w, nbr, g):
    g = g.astype(x.dtype)
    dx = _table_apply(g, jnp.swapaxes(w[::-1], 1, 2), nbr)

    def step(_, idx):
        xk = jnp.take(x, idx, axis=0, mode="fill", fill_value=0)
        return None, jnp.dot(xk.T, g, preferred_element_type=jnp.float32)

    _, dw = lax.scan(step, None, nbr.T)
    return dx, dw.astype(w.dtype)


table_conv.defvjp(_table_conv_fwd, _table_conv_bwd)


# -------------------------------------------------------------------- public engine


def _flat_weight(weight: Array, k: int, name: str) -> Array:
    weight = jnp.asarray(weight)
    if weight.ndim == 5:
        if weight.shape[:3] != (round(k ** (1 / 3)),) * 3:
            raise ValueError(
                f"{name}: weight must be [{k}^(1/3)]*3 + [Cin, Cout], got {weight.shape}"
            )
        weight = weight.reshape(k, weight.shape[3], weight.shape[4])
    if weight.ndim != 3 or weight.shape[0] != k:
        raise ValueError(f"{name}: weight must have {k} kernel offsets, got shape {weight.shape}")
    return weight


def _check_feats(x: Array, w: Array, rows: int, name: str) -> None:
    if x.ndim != 2 or x.shape[0] != rows or x.shape[1] != w.shape[1]:
        raise ValueError(
            f"{name}: feats must be [{rows}, {w.shape[1]}] (rows of the map, Cin of the "
            f"weight), got {x.shape}"
        )


def subm_conv(x: Array, weight: Array, smap: SubmMap, *, impl: str = "auto") -> Array:
    """Submanifold 3x3x3 convolution on a padded level.

    Args:
      x: f[V, Cin] features (padded rows are ignored: no pair touches them).
      weight: f[3, 3, 3, Cin, Cout] or f[27, Cin, Cout].
      smap: the level's :class:`SubmMap`.
      impl: "auto" | "xla" | "pallas".
    Returns:
      f[V, Cout] (padded rows 0).
    """
    w = _flat_weight(weight, 27, "subm_conv")
    _check_feats(x, w, smap.nbr.shape[0], "subm_conv")
    if resolve_impl(impl) == "pallas":
        # Off GPU the kernel runs in the Pallas interpreter (slow; for tests).
        interpret = jax.default_backend() != "gpu"
        return _pallas_gather_matmul()(x, smap.nbr, w, mirrored=True, interpret=interpret)
    tiles = smap.tiles
    if tiles is None:
        return table_conv(x, w, smap.nbr)
    return _subm_tiled_or_table(x, w, tiles.col, tiles.row, tiles.tile_k, tiles.ok, smap.nbr)


@jax.custom_vjp
def _subm_tiled_or_table(x, w, col, row, tile_k, ok, nbr):
    """Tiled conv when the tiles hold every pair (``ok``), else the per-offset table conv.
    One custom VJP around two ``lax.cond`` (forward, backward): much cheaper to compile
    than differentiating a cond of two custom-VJP functions."""
    return _subm_tt_fwd(x, w, col, row, tile_k, ok, nbr)[0]


def _subm_tt_fwd(x, w, col, row, tile_k, ok, nbr):
    v = x.shape[0]
    out = lax.cond(
        ok,
        lambda x, w: _tile_apply(x, w, col, row, tile_k, v),
        lambda x, w: _table_apply(x, w, nbr),
        x,
        w,
    )
    return out, (x, w, col, row, tile_k, ok, nbr)


def _subm_tt_bwd(res, g):
    x, w, col, row, tile_k, ok, nbr = res
    dx, dw = lax.cond(
        ok,
        lambda g: _tile_grads(x, w, col, row, tile_k, g),
        lambda g: _table_grads(x, w, nbr, g),
        g,
    )
    return dx, dw, None, None, None, None, None


_subm_tiled_or_table.defvjp(_subm_tt_fwd, _subm_tt_bwd)


def strided_conv(x: Array, weight: Array, dmap: DownMap) -> Array:
    """Kernel-2 stride-2 convolution fine -> coarse.

    Args:
      x: f[V, Cin] fine features; weight: f[2, 2, 2, Cin, Cout] or f[8, Cin, Cout];
      dmap: :class:`DownMap` of the fine level.
    Returns:
      f[Vc, Cout] on ``dmap.coords``.
    """
    w = _flat_weight(weight, 8, "strided_conv")
    _check_feats(x, w, dmap.parent.shape[0], "strided_conv")
    t = dmap.tiles
    return tile_conv(x, w, t.row, t.col, t.tile_k, dmap.coords.shape[0])


def inverse_conv(xc: Array, weight: Array, dmap: DownMap) -> Array:
    """Inverse (transposed) kernel-2 convolution coarse -> fine on the map of a down conv.

    Args:
      xc: f[Vc, Cin] coarse features; weight: f[2, 2, 2, Cin, Cout] or f[8, Cin, Cout];
      dmap: the :class:`DownMap` that produced the coarse level.
    Returns:
      f[V, Cout] on the fine rows: ``out[i] = xc[parent[i]] @ w[child[i]]``.
    """
    w = _flat_weight(weight, 8, "inverse_conv")
    _check_feats(xc, w, dmap.coords.shape[0], "inverse_conv")
    t = dmap.tiles
    return tile_conv(xc, w, t.col, t.row, t.tile_k, dmap.parent.shape[0])
