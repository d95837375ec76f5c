"""Dynamic-convolution mask decoder: instance kernels -> mask logits (docs/method.md section 7).

Data flow: kernels ``f32[K, L]`` (``PointHeads.kernels``), instance centroids ``C_k`` (from
aggregation), mask features ``F_m f32[N, Cm]`` (``PointHeads``) -> :func:`decode_masks` ->
mask logits ``f32[K, N]`` (sigmoid = M) -> ``objective.terms.mask_loss`` / ``postprocess``.
The chunk helpers (:func:`chunked_inputs`, :func:`chunk_logits`, :func:`scan_sums`) are
shared with ``objective.mask_loss``, which computes Eq. 6 and the matching classes chunk by
chunk without the [K, N] array. This module is the one home of the kernel layout.

Kernel layout (``L = (Cm+3)*H + H + H + 1``; Cm = 16, H = 16 gives 337), row-major:

    kernels[k, 0            : Ci*H       ] -> W1[k] f32[Ci, H]   (W1[k, c, h] at c*H + h)
    kernels[k, Ci*H         : Ci*H+H     ] -> b1[k] f32[H]
    kernels[k, Ci*H+H       : Ci*H+2H    ] -> W2[k] f32[H]       (H -> 1)
    kernels[k, Ci*H+2H                   ] -> b2[k] f32[]
    with Ci = Cm + 3; input channel order [F_m (Cm), C_k - x_i (3)].

For instance k and point i: ``m[k, i] = W2[k] . relu(W1[k]^T [F_m,i, C_k - x_i] + b1[k]) + b2[k]``.
Every instance scans every point of its own scene; points of other scenes, padding rows
and invalid instance slots get ``fill_value`` (a large negative logit, sigmoid = 0). With
``scene_blocks=B`` (the model's B scenes, slots ``[s K/B, (s+1) K/B)`` of scene s) each
block of slots is decoded only on the chunks of its scenes' rows
(``aggregation.scene_chunk_spans``): ~1/B of the work for a packed batch.

Memory: the points are processed in chunks of P (``lax.map`` / ``lax.scan``), and each
chunk's body is rematerialised (``jax.checkpoint``) so reverse mode keeps only per-chunk
inputs. Peak intermediate per chunk: the hidden activations f32[K, P, H] = K*P*H*4 bytes
(K = 200, P = 4096, H = 16: 52 MB) instead of K*N*H*4 = 3.2 GB for N = 250k unchunked.
:func:`decode_masks` still returns f32[K, N] (200 MB at K = 200, N = 250k);
``objective.mask_loss`` never holds [K, N] at all, which is why training uses it
(``config.model.chunked_mask_loss``). XLA's memory estimates for each variant and chunk
size: ``docs/benchmarks.md``, "Mask decoder memory".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dknet_jax.aggregation import scene_chunk_spans

Array = jax.Array

MASK_FILL = -1e9  # logit for points outside an instance's scene (sigmoid -> exactly 0)


def num_kernel_params(in_dim: int = 19, hidden: int = 16) -> int:
    """Length L of an instance kernel for two dynamic 1x1 layers in_dim -> hidden -> 1.

    L = in_dim * hidden (W1) + hidden (b1) + hidden (W2) + 1 (b2); 19, 16 -> 337 (Eq. 4).
    """
    return in_dim * hidden + hidden + hidden + 1


def kernel_hidden(length: int, mask_feat_dim: int) -> int:
    """H from a kernel length L and the mask-feature width Cm (inverse of
    :func:`num_kernel_params` with in_dim = Cm + 3: L = (Cm + 5) * H + 1)."""
    hidden, rest = divmod(length - 1, mask_feat_dim + 5)
    if rest or hidden <= 0:
        raise ValueError(
            f"kernel length {length} does not fit mask features of width "
            f"{mask_feat_dim} (need (Cm + 3) * H + 2 * H + 1)"
        )
    return hidden


def split_kernels(kernels: Array, in_dim: int, hidden: int):
    """Split ``f32[K, L]`` into (W1 f32[K, in_dim, hidden], b1 f32[K, hidden],
    W2 f32[K, hidden], b2 f32[K]) following the layout in the module docstring."""
    k, length = kernels.shape
    expected = num_kernel_params(in_dim, hidden)
    if length != expected:
        raise ValueError(
            f"decode_masks: kernels have length {length} but in_dim={in_dim}, "
            f"hidden={hidden} need {expected}; check mask_feat_dim/dynamic_hidden"
        )
    n1 = in_dim * hidden
    w1 = kernels[:, :n1].reshape(k, in_dim, hidden)
    b1 = kernels[:, n1 : n1 + hidden]
    w2 = kernels[:, n1 + hidden : n1 + 2 * hidden]
    b2 = kernels[:, n1 + 2 * hidden]
    return w1, b1, w2, b2


def scene_point_mask(inst_batch: Array, inst_ok: Array, batch_id: Array, valid: Array) -> Array:
    """bool[K, N]: point i is a valid point of instance k's scene and slot k is valid."""
    return inst_ok[:, None] & valid[None, :] & (inst_batch[:, None] == batch_id[None, :])


def check_inputs(kernels, centroids, mask_feats, xyz, batch_id, valid, chunk_size, what):
    n = mask_feats.shape[0]
    if mask_feats.ndim != 2 or xyz.shape != (n, 3) or batch_id.shape != (n,) or valid.shape != (n,):
        raise ValueError(
            f"{what}: mask_feats {mask_feats.shape}, xyz {xyz.shape}, "
            f"batch_id {batch_id.shape}, valid {valid.shape} disagree on N"
        )
    if centroids.shape != (kernels.shape[0], 3):
        raise ValueError(f"{what}: centroids {centroids.shape} should be [{kernels.shape[0]}, 3]")
    if chunk_size <= 0:
        raise ValueError(f"{what}: chunk_size must be > 0, got {chunk_size}")


def chunked_inputs(kernels, centroids, mask_feats, xyz, per_point, hidden, chunk_size):
    """Fold C_k into the first bias and cut the per-point arrays into [n_chunks, P, ...].

    [F_m, C_k - x] @ W1 = [F_m, -x] @ W1 + C_k @ W1[Cm:], so the instance-only part is a
    bias and the per-chunk work is one batched matmul.
    """
    n, cm = mask_feats.shape
    w1, b1, w2, b2 = split_kernels(kernels, cm + 3, hidden)
    bias1 = b1 + jnp.einsum("kc,kch->kh", centroids, w1[:, cm:, :])
    p = min(chunk_size, n)
    n_chunks = -(-n // p)
    pad = n_chunks * p - n

    def cut(a):
        a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1))
        return a.reshape(n_chunks, p, *a.shape[1:])

    point_in = jnp.concatenate([mask_feats, -xyz], axis=-1)  # [N, Cm+3]
    return (w1, bias1, w2, b2), cut(point_in), [cut(a) for a in per_point], n_chunks * p


def _dynamic_mlp_apply(x, w1, bias1, w2, b2):
    h = jax.nn.relu(jnp.einsum("pc,kch->kph", x, w1) + bias1[:, None, :])
    return jnp.einsum("kph,kh->kp", h, w2) + b2[:, None]


@jax.custom_vjp
def dynamic_mlp(x, w1, bias1, w2, b2):
    """The two dynamic layers on one chunk: ``x f[P, Ci]``, ``w1 f[K, Ci, H]``, ``bias1
    f[K, H]``, ``w2 f[K, H]``, ``b2 f[K]`` -> logits ``f[K, P]``.

    The backward pass works in the layout the first layer's matmul produces, ``[P, K*H]``
    (``x @ W1`` with the instances' weights side by side): autodiff of the ``[K, P, H]``
    form transposed the hidden activations and their gradients between the two layouts,
    which on the CPU cost more than the matmuls. The forward pass is the plain formula
    (the same values as before)."""
    return _dynamic_mlp_apply(x, w1, bias1, w2, b2)


def _dynamic_mlp_fwd(x, w1, bias1, w2, b2):
    return _dynamic_mlp_apply(x, w1, bias1, w2, b2), (x, w1, bias1, w2, b2)


def _dynamic_mlp_bwd(res, g):
    x, w1, bias1, w2, b2 = res
    k, ci, hd = w1.shape
    f32 = jnp.float32
    # [x, 1] @ [W1; bias1]: the first layer's pre-activations and, transposed, the
    # gradients of W1 and bias1 in one matmul each (column reductions over the P rows
    # are slow on the CPU, matmuls are not)
    x1 = jnp.concatenate([x.astype(f32), jnp.ones((x.shape[0], 1), f32)], axis=1)
    w1r = jnp.concatenate(
        [jnp.transpose(w1, (1, 0, 2)).reshape(ci, k * hd), bias1.reshape(1, k * hd)], axis=0
    ).astype(f32)  # [Ci + 1, K*H], small
    a = jnp.dot(x1, w1r, preferred_element_type=f32).reshape(-1, k, hd)  # [P, K, H]
    gt = g.T.astype(f32)  # [P, K]
    da = jnp.where(a > 0, gt[:, :, None] * w2.astype(f32)[None], 0.0).reshape(-1, k * hd)
    ones = jnp.ones((1, x.shape[0]), f32)
    dw2 = jnp.dot(ones, (jnp.maximum(a, 0.0) * gt[:, :, None]).reshape(-1, k * hd))
    dx = jnp.dot(da, w1r[:ci].T, preferred_element_type=f32)
    dw1b = jnp.dot(x1.T, da, preferred_element_type=f32)  # [Ci + 1, K*H]
    dw1 = jnp.transpose(dw1b[:ci].reshape(ci, k, hd), (1, 0, 2))
    return (
        dx.astype(x.dtype),
        dw1.astype(w1.dtype),
        dw1b[ci].reshape(k, hd).astype(bias1.dtype),
        dw2.reshape(k, hd).astype(w2.dtype),
        jnp.dot(g.astype(f32), jnp.ones((g.shape[1],), f32)).astype(b2.dtype),
    )


dynamic_mlp.defvjp(_dynamic_mlp_fwd, _dynamic_mlp_bwd)


def chunk_logits(params, x, bid, ok, inst_batch, inst_ok):
    """Logits f32[K, P] and the in-scene mask bool[K, P] of one chunk of P points."""
    logit = dynamic_mlp(x, *params)
    inside = inst_ok[:, None] & ok[None, :] & (inst_batch[:, None] == bid[None, :])
    return logit, inside


def check_scene_blocks(k: int, scene_blocks: int, what: str) -> int:
    if not isinstance(scene_blocks, int) or scene_blocks < 1 or k % scene_blocks:
        raise ValueError(
            f"{what}: scene_blocks={scene_blocks!r} must be a positive integer that divides "
            f"the {k} instance slots"
        )
    return scene_blocks


def _by_block(tree, blocks: int):
    """Split the leading (slot) axis of every array into ``[blocks, K / blocks, ...]``."""
    return jax.tree.map(lambda a: a.reshape(blocks, -1, *a.shape[1:]), tree)


def decode_masks(
    kernels: Array,
    centroids: Array,
    inst_batch: Array,
    inst_ok: Array,
    mask_feats: Array,
    xyz: Array,
    batch_id: Array,
    valid: Array,
    *,
    hidden: int = 16,
    chunk_size: int = 16384,
    fill_value: float = MASK_FILL,
    scene_blocks: int = 1,
) -> Array:
    """Mask logits of every instance over every point of its scene.

    Args:
      kernels: f32[K, L] instance kernels (L = (Cm+3)*hidden + 2*hidden + 1).
      centroids: f32[K, 3] instance centroids C_k.
      inst_batch: i32[K] scene of each instance; inst_ok: bool[K] valid slots.
      mask_feats: f32[N, Cm] mask features F_m; xyz: f32[N, 3].
      batch_id: i32[N] scene of each point; valid: bool[N] real rows.
      hidden: H, output channels of the first dynamic layer (16).
      chunk_size: P, points per chunk (static); the peak hidden tensor is f32[K/B, P, H].
      fill_value: logit outside an instance's scene.
      scene_blocks: B (static, divides K): the slots are taken in B consecutive blocks
        and each block is decoded only on the chunks that hold its slots' scenes
        (``aggregation.scene_chunk_spans``). For a packed batch whose slots
        ``[s K/B, (s+1) K/B)`` belong to scene s (``DKNet``'s layout) that is 1/B of the
        work; exact for any layout (a slot of another scene widens its block's span).
    Returns:
      f32[K, N] mask logits.
    """
    check_inputs(kernels, centroids, mask_feats, xyz, batch_id, valid, chunk_size, "decode_masks")
    n = mask_feats.shape[0]
    k = kernels.shape[0]
    blocks = check_scene_blocks(k, scene_blocks, "decode_masks")
    params, x, (bid, ok), _ = chunked_inputs(
        kernels, centroids, mask_feats, xyz, [batch_id, valid], hidden, chunk_size
    )
    n_chunks, p = ok.shape
    start, count = scene_chunk_spans(inst_batch, inst_ok, ok, bid, blocks)

    def block(xs):
        pb, ib, iok, c0, cnt = xs

        @jax.checkpoint
        def one_chunk(args):
            c, xc, bc, oc = args

            def run(_):
                logit, inside = chunk_logits(pb, xc, bc, oc, ib, iok)
                return jnp.where(inside, logit, fill_value)

            fill = jnp.full((ib.shape[0], p), fill_value, kernels.dtype)
            return jax.lax.cond((c >= c0) & (c < c0 + cnt), run, lambda _: fill, None)

        return jax.lax.map(one_chunk, (jnp.arange(n_chunks), x, bid, ok))  # [n_chunks, K/B, P]

    xs = (_by_block(params, blocks), *_by_block((inst_batch, inst_ok), blocks), start, count)
    out = jax.lax.map(block, xs)  # [B, n_chunks, K/B, P]
    out = jnp.moveaxis(out, 1, 2).reshape(k, -1)
    return out[:, :n]


def scan_sums(params, x, per_point, inst_batch, inst_ok, width, body, *, per_inst=(), blocks=1):
    """Sum ``body(logit, inside, per_inst_block, *chunk_arrays) -> f32[K/B, width]`` over
    the chunks, slots in ``blocks`` blocks as in :func:`decode_masks` (each block over its
    scenes' chunks only). ``per_point`` starts with the chunked scene ids and validity;
    ``per_inst``: arrays with a leading slot axis, passed to ``body`` block by block."""
    k = inst_batch.shape[0]
    bid, ok = per_point[0], per_point[1]
    n_chunks = ok.shape[0]
    start, count = scene_chunk_spans(inst_batch, inst_ok, ok, bid, blocks)

    def block(_, xs):
        pb, ib, iok, pi, c0, cnt = xs

        @jax.checkpoint
        def step(acc, args):
            c, xc, bc, oc, *rest = args

            def run(acc):
                logit, inside = chunk_logits(pb, xc, bc, oc, ib, iok)
                return acc + body(logit, inside, pi, *rest)

            return jax.lax.cond((c >= c0) & (c < c0 + cnt), run, lambda acc: acc, acc), None

        init = jnp.zeros((ib.shape[0], width), jnp.float32)
        acc, _ = jax.lax.scan(step, init, (jnp.arange(n_chunks), x, *per_point))
        return None, acc

    xs = (*_by_block((params, inst_batch, inst_ok, per_inst), blocks), start, count)
    _, sums = jax.lax.scan(block, None, xs)
    return sums.reshape(k, width)
