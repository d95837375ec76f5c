"""Sparse convolutions as gather-GEMM-scatter over kernel maps, with hand-written VJPs.

Place in the data flow: ``hashing`` (``SubmMap``, ``DownMap``) -> **conv** ->
``model/backbone`` (layers) and ``functional`` (public plain-array ops).

Two XLA formulations:
- *tiled* (:func:`tile_conv`, ``_subm_pairs``): the existing pairs of a map, compacted into
  tiles of one offset each (``hashing.Tiles``; submanifold tiles leave the centre out, it
  is one plain ``x @ W[13]`` over the valid rows). On the CPU the used tiles (a prefix,
  ``Tiles.used``) are walked in a loop of steps of ~``STEP_ROWS`` pair rows: gather the
  step's input rows, multiply by each tile's ``W[k]``, add into the output rows. A
  step's buffers stay in cache, so the pairs never make whole ``[R, C]`` round trips
  through memory (on XLA:CPU that round trip, not the FLOPs, was the cost), and
  capacity beyond the real pairs costs no time. On other backends all tiles run in one
  batched pass. Only existing pairs are touched.
- *dense per offset* (:func:`table_conv`): ``out = sum_k feats[nbr[:, k]] @ W[k]`` over the
  27 columns of a submanifold table, one offset at a time (``lax.scan``), O(V C) memory.
  Used when a tile capacity below "every pair" overflowed (``lax.cond`` on ``Tiles.ok``;
  complete tiles, ``Tiles.complete``, compile no fallback, nor does ``fallback=False``,
  whose caller checks ``Tiles.ok`` itself).

The model (``backbone``) and the public ops (``functional``) run this same code.

Backward passes reuse the maps and never build ``[V, 27, C]``; only the inputs are saved
as residuals (gathers are recomputed). On the table path the feature gradient of a
submanifold conv is the same convolution with mirrored offsets and transposed weights
(``W'[k] = W[26-k]^T``; the pair set is symmetric), gathers only. On the tiled path the
pairs are walked in the transposed direction (gather and scatter indices swapped, which
for a submanifold map *is* the mirrored convolution): the gathered output-gradient rows
serve both dW (``dW[k] += x[j]^T g[i]`` per tile) and dx (``g[i] @ W[k]^T`` added into
row j), one gather fewer than re-gathering for a separate mirrored conv; on the CPU in
the same cache-sized steps as the forward.

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

from dknet_jax.sparse.hashing import CENTER, DownMap, SubmMap

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

# Pair rows handled per step of the CPU loop: the gathered rows, their products and the
# weights of one step stay in cache (4096 x 64 f32 = 1 MiB) instead of making whole
# [R, C] round trips through memory.
STEP_ROWS = 4096


# Below this many pair-row elements (tile capacity rows x the wider channel count, 4 MiB
# of f32) a conv runs as one batched pass even on the CPU: its arrays are small enough that
# whole passes cost little, and every loop adds compile time. On the demo UNet (configs/
# synthetic.py) this threshold and "always loop" ran equally fast, the threshold compiled
# in 29 s against 48 s (docs/benchmarks.md, "Sparse engine").
LOOP_MIN_ELEMS = 1 << 20


_ROWS = lax.GatherDimensionNumbers(
    offset_dims=(1,), collapsed_slice_dims=(0,), start_index_map=(0,)
)
_ADD_ROWS = lax.ScatterDimensionNumbers(
    update_window_dims=(1,), inserted_window_dims=(0,), scatter_dims_to_operand_dims=(0,)
)


def _gather_rows(x: Array, idx: Array, *, zero_missing: bool) -> Array:
    """``x[idx]`` for row indices ``idx: i32[P]`` in ``[0, len(x)]`` (``len(x)`` = padding).

    ``zero_missing=False`` leaves the rows of padding indices unspecified (XLA clamps the
    index): only for rows whose results are dropped afterwards (their scatter index is
    padding too). On XLA:CPU ``jnp.take(mode="fill")`` compiles two extra kernels per
    gather (the index normalisation and the fill select); the clamped gather compiles
    none, and kernels are what the train step's compile time is made of
    (docs/benchmarks.md, "Train-step compile time")."""
    mode = lax.GatherScatterMode.FILL_OR_DROP if zero_missing else lax.GatherScatterMode.CLIP
    return lax.gather(
        x,
        idx[:, None],
        _ROWS,
        slice_sizes=(1, x.shape[1]),
        mode=mode,
        fill_value=0 if zero_missing else None,
    )


def _add_rows(acc: Array, idx: Array, rows: Array) -> Array:
    """``acc[idx] += rows``, padding indices (``>= len(acc)``) dropped."""
    return lax.scatter_add(
        acc,
        idx[:, None],
        rows.astype(acc.dtype),
        _ADD_ROWS,
        mode=lax.GatherScatterMode.FILL_OR_DROP,
    )


def _add_block(dw: Array, k: Array, block: Array) -> Array:
    """``dw[k] += block`` for a traced scalar ``k`` (an in-place update, no scatter)."""
    start = (k, 0, 0)
    cur = lax.dynamic_slice(dw, start, (1, *dw.shape[1:]))
    return lax.dynamic_update_slice(dw, cur + block[None].astype(dw.dtype), start)


def _add_blocks(dw: Array, ks: Array, blocks: Array) -> Array:
    """``dw[ks[t]] += blocks[t]`` for every t (repeats add up), as a one-hot matmul over
    the K offsets instead of a scatter: XLA:CPU compiles every scatter into a kernel of
    its own, while identical fusions and matmuls are compiled once per shape."""
    onehot = (ks[:, None] == jnp.arange(dw.shape[0], dtype=ks.dtype)[None, :]).astype(blocks.dtype)
    return dw + jnp.einsum("tk,tcd->kcd", onehot, blocks, preferred_element_type=jnp.float32)


def _loop_on_backend() -> bool:
    """CPU: walk the used tiles in a loop; other backends: one batched pass."""
    return jax.default_backend() == "cpu"


def _use_loop(rows: int, width: int) -> bool:
    """The loop for large convs on the CPU (static decision from the capacity)."""
    return _loop_on_backend() and rows * width >= LOOP_MIN_ELEMS


def _step_layout(gather_idx, scatter_idx, tile_k, num_in, num_out, width):
    """Group ``G`` tiles per loop step (about ``STEP_ROWS`` pair rows, and no more than
    ``STEP_ROWS / width`` tiles, so that the step's gathered ``[G, Cin, Cout]`` weights stay
    below its ``[G T, C]`` rows); pad the tile count to a multiple of ``G`` with empty
    tiles (sentinel rows) so that every step's slice is in bounds."""
    nt = tile_k.shape[0]
    t = gather_idx.shape[0] // nt
    g = max(1, min(nt, STEP_ROWS // t, STEP_ROWS // width))
    extra = -nt % g
    if extra:
        gather_idx = jnp.concatenate([gather_idx, jnp.full((extra * t,), num_in, jnp.int32)])
        scatter_idx = jnp.concatenate([scatter_idx, jnp.full((extra * t,), num_out, jnp.int32)])
        tile_k = jnp.concatenate([tile_k, jnp.zeros((extra,), jnp.int32)])
    return gather_idx, scatter_idx, tile_k, g, t


def _pairs_apply(x, w, gather_idx, scatter_idx, tile_k, used, acc):
    """``acc[scatter_idx[p]] += x[gather_idx[p]] @ w[tile_k[p // T]]`` over the pair rows of
    the first ``used`` tiles (f32 accumulator ``acc: [num_out, Cout]``)."""
    num_out = acc.shape[0]
    cin = x.shape[1]
    if not _use_loop(gather_idx.shape[0], max(w.shape[1:])):
        nt = tile_k.shape[0]
        # padding pair rows have padding scatter indices too: their gathered rows are dropped
        xg = _gather_rows(x, gather_idx, zero_missing=False).reshape(nt, -1, cin)
        y = jnp.einsum("tic,tcd->tid", xg, w[tile_k], preferred_element_type=jnp.float32)
        return _add_rows(acc, scatter_idx, y.reshape(-1, w.shape[-1]))
    gi, si, tk, g, t = _step_layout(
        gather_idx, scatter_idx, tile_k, x.shape[0], num_out, max(w.shape[1:])
    )

    def step(s, acc):
        gs = lax.dynamic_slice(gi, (s * g * t,), (g * t,))
        ss = lax.dynamic_slice(si, (s * g * t,), (g * t,))
        ks = lax.dynamic_slice(tk, (s * g,), (g,))
        xg = _gather_rows(x, gs, zero_missing=False)
        if g == 1:
            y = jnp.dot(xg, w[ks[0]], preferred_element_type=jnp.float32)
        else:
            y = jnp.einsum(
                "tic,tcd->tid", xg.reshape(g, t, cin), w[ks], preferred_element_type=jnp.float32
            ).reshape(g * t, -1)
        return _add_rows(acc, ss, y)

    return lax.fori_loop(0, (used + g - 1) // g, step, acc)


def _pairs_grads(x, w, gather_idx, scatter_idx, tile_k, used, g, dx, dw):
    """Adds the pair terms of the gradients into ``dx: f32[Vin, Cin]`` and ``dw: f32[K, Cin,
    Cout]``: the transposed map (gather and scatter swapped). The output-gradient rows
    gathered once per pair serve both dW (outer products with the gathered inputs,
    ``dW[k] = x[j]^T g[i]``) and dx (times ``W[k]^T``, added into the input rows)."""
    g = g.astype(x.dtype)
    cin, cout = w.shape[1], w.shape[2]
    if not _use_loop(gather_idx.shape[0], max(w.shape[1:])):
        nt = tile_k.shape[0]
        # zero output-gradient rows on padding pairs keep them out of dW; their dx rows
        # go to padding indices (dropped), so the input rows may be clamped garbage
        gg = _gather_rows(g, scatter_idx, zero_missing=True).reshape(nt, -1, cout)
        xg = _gather_rows(x, gather_idx, zero_missing=False).reshape(nt, -1, cin)
        dw_t = jnp.einsum("tic,tid->tcd", xg, gg, preferred_element_type=jnp.float32)
        dxg = jnp.einsum("tid,tcd->tic", gg, w[tile_k], preferred_element_type=jnp.float32)
        dx = _add_rows(dx, gather_idx, dxg.reshape(-1, cin))
        return dx, _add_blocks(dw, tile_k, dw_t)
    gi, si, tk, grp, t = _step_layout(
        gather_idx, scatter_idx, tile_k, x.shape[0], g.shape[0], max(w.shape[1:])
    )

    def step(s, carry):
        dx, dw = carry
        gs = lax.dynamic_slice(gi, (s * grp * t,), (grp * t,))
        ss = lax.dynamic_slice(si, (s * grp * t,), (grp * t,))
        ks = lax.dynamic_slice(tk, (s * grp,), (grp,))
        gg = _gather_rows(g, ss, zero_missing=True)  # as in the batched branch above
        xg = _gather_rows(x, gs, zero_missing=False)
        if grp == 1:
            k = ks[0]
            dw = _add_block(dw, k, jnp.dot(xg.T, gg, preferred_element_type=jnp.float32))
            dxg = jnp.dot(gg, w[k].T, preferred_element_type=jnp.float32)
        else:
            gg3, xg3 = gg.reshape(grp, t, cout), xg.reshape(grp, t, cin)
            dw_t = jnp.einsum("tic,tid->tcd", xg3, gg3, preferred_element_type=jnp.float32)
            dw = _add_blocks(dw, ks, dw_t)
            dxg = jnp.einsum("tid,tcd->tic", gg3, w[ks], preferred_element_type=jnp.float32)
            dxg = dxg.reshape(grp * t, cin)
        return _add_rows(dx, gs, dxg), dw

    return lax.fori_loop(0, (used + grp - 1) // grp, step, (dx, dw))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def tile_conv(x, w, gather_idx, scatter_idx, tile_k, used, num_out):
    """Tiled pair convolution.

    ``out[scatter_idx[p]] += x[gather_idx[p]] @ w[tile_k[p // T]]`` over the pair rows p of
    the first ``used`` tiles.

    Args:
      x: f[Vin, Cin]; w: f[K, Cin, Cout]; gather_idx, scatter_idx: i32[NT * T] (out-of-range
        = padding); tile_k: i32[NT]; used: i32[] tiles in use; num_out: Vout (static).
    Returns:
      f[Vout, Cout].
    """
    return _tile_conv_fwd(x, w, gather_idx, scatter_idx, tile_k, used, num_out)[0]


def _tile_conv_fwd(x, w, gather_idx, scatter_idx, tile_k, used, num_out):
    acc = jnp.zeros((num_out, w.shape[-1]), jnp.float32)
    out = _pairs_apply(x, w, gather_idx, scatter_idx, tile_k, used, acc).astype(x.dtype)
    return out, (x, w, gather_idx, scatter_idx, tile_k, used)


def _tile_conv_bwd(num_out, res, g):
    x, w, gather_idx, scatter_idx, tile_k, used = res
    dx = jnp.zeros(x.shape, jnp.float32)
    dw = jnp.zeros(w.shape, jnp.float32)
    dx, dw = _pairs_grads(x, w, gather_idx, scatter_idx, tile_k, used, g, dx, dw)
    return dx.astype(x.dtype), dw.astype(w.dtype), None, None, None, None


tile_conv.defvjp(_tile_conv_fwd, _tile_conv_bwd)


# ------------------------------------------------------------- dense per-offset path


def _table_apply(x, w, nbr):
    def step(acc, kw):
        idx, wk = kw
        xk = _gather_rows(x, idx, zero_missing=True)
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
        xk = _gather_rows(x, idx, zero_missing=True)
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


def subm_conv(
    x: Array, weight: Array, smap: SubmMap, *, impl: str = "auto", fallback: bool = True
) -> Array:
    """Submanifold 3x3x3 convolution on a padded level.

    Args:
      x: f[V, Cin] features (padded rows are ignored: no pair touches them).
      weight: f[3, 3, 3, Cin, Cout] or f[27, Cin, Cout].
      smap: the level's :class:`SubmMap`.
      impl: "auto" | "xla" | "pallas".
      fallback: compile the dense per-offset path for tiles that overflowed (exact
        whatever the pair count). False: the tiles alone, so a map whose
        ``tiles.ok`` is False gives a wrong result, and the caller must check ``ok``
        (the UNet does: ``SparseUNet(tile_fallback=False)`` reports it as an overflow).
        Saves the fallback's kernels in the compiled program (~95 of a paper-config
        train step's ~1,300; docs/benchmarks.md, "Train-step compile time").
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
    return _subm_tiled(x, w, tiles, smap.nbr, fallback)


def _subm_tiled(x, w, tiles, nbr, fallback=True):
    if tiles.complete or not fallback:  # no fallback branch to compile
        return _subm_pairs(x, w, tiles.col, tiles.row, tiles.tile_k, tiles.used, nbr)
    return _subm_pairs_or_table(x, w, tiles.col, tiles.row, tiles.tile_k, tiles.used, tiles.ok, nbr)


def _valid_rows(x, nbr):
    # The centre offset is the identity on valid rows (nbr[i, 13] == i); padding rows
    # (garbage allowed) become 0.
    return jnp.where((nbr[:, CENTER] < x.shape[0])[:, None], x, 0)


def _subm_pairs_apply(xm, w, col, row, tile_k, used):
    """Centre matmul + off-centre pair tiles on ``xm`` (padding rows 0); f32 result."""
    acc = jnp.dot(xm, w[CENTER], preferred_element_type=jnp.float32)
    return _pairs_apply(xm, w, col, row, tile_k, used, acc)


def _subm_pairs_grads(xm, w, col, row, tile_k, used, nbr, g):
    g = g.astype(xm.dtype)
    gv = _valid_rows(g, nbr)
    dx = jnp.dot(gv, w[CENTER].T, preferred_element_type=jnp.float32)
    dw = (
        jnp.zeros(w.shape, jnp.float32)
        .at[CENTER]
        .set(jnp.dot(xm.T, gv, preferred_element_type=jnp.float32))
    )
    dx, dw = _pairs_grads(xm, w, col, row, tile_k, used, g, dx, dw)
    return dx.astype(xm.dtype), dw.astype(w.dtype)


@jax.custom_vjp
def _subm_pairs(x, w, col, row, tile_k, used, nbr):
    """Submanifold conv on tiles alone (complete tiles, or ``fallback=False``): centre
    matmul + off-centre pair tiles."""
    return _subm_pairs_fwd(x, w, col, row, tile_k, used, nbr)[0]


def _subm_pairs_fwd(x, w, col, row, tile_k, used, nbr):
    # The masked rows, not x, are the residual: the backward pass needs them for the
    # centre's dW, and XLA would otherwise keep both x and this masked copy (the forward
    # and backward expressions are the same, so XLA computes it once, in the forward
    # pass): one [V, Cin] buffer per conv, +3.2 GiB at batch 4 (docs/benchmarks.md).
    xm = _valid_rows(x, nbr)
    out = _subm_pairs_apply(xm, w, col, row, tile_k, used).astype(x.dtype)
    return out, (xm, w, col, row, tile_k, used, nbr)


def _subm_pairs_bwd(res, g):
    return (*_subm_pairs_grads(*res, g), None, None, None, None, None)


_subm_pairs.defvjp(_subm_pairs_fwd, _subm_pairs_bwd)


@jax.custom_vjp
def _subm_pairs_or_table(x, w, col, row, tile_k, used, ok, nbr):
    """Pair tiles when they hold every pair (``ok``), else the per-offset table conv.
    One custom VJP around two ``lax.cond`` (forward, backward): much cheaper to compile
    than differentiating a cond of two custom-VJP functions."""
    return _subm_pt_fwd(x, w, col, row, tile_k, used, ok, nbr)[0]


def _subm_pt_fwd(x, w, col, row, tile_k, used, ok, nbr):
    out = lax.cond(
        ok,
        lambda x, w: _subm_pairs_apply(_valid_rows(x, nbr), w, col, row, tile_k, used).astype(
            x.dtype
        ),
        lambda x, w: _table_apply(x, w, nbr),
        x,
        w,
    )
    return out, (x, w, col, row, tile_k, used, ok, nbr)


def _subm_pt_bwd(res, g):
    x, w, col, row, tile_k, used, ok, nbr = res
    dx, dw = lax.cond(
        ok,
        lambda g: _subm_pairs_grads(_valid_rows(x, nbr), w, col, row, tile_k, used, nbr, g),
        lambda g: _table_grads(x, w, nbr, g),
        g,
    )
    return dx, dw, None, None, None, None, None, None


_subm_pairs_or_table.defvjp(_subm_pt_fwd, _subm_pt_bwd)


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
    return tile_conv(x, w, t.row, t.col, t.tile_k, t.used, dmap.coords.shape[0])


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
    return tile_conv(xc, w, t.col, t.row, t.tile_k, t.used, dmap.parent.shape[0])
