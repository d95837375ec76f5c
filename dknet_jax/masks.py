"""Dynamic-convolution mask decoder: instance kernels -> mask logits (method.md 5, Eq. 3-4).

Data flow: kernels ``f32[K, L]`` (``PointHeads.kernels``), instance centroids ``C_k`` (from
aggregation), mask features ``F_m f32[N, Cm]`` (``PointHeads``) -> :func:`decode_masks` ->
mask logits ``f32[K, N]`` (sigmoid = M) -> ``losses.mask_loss`` / ``postprocess``.

Kernel layout (``L = (Cm+3)*H + H + H + 1``; Cm = 16, H = 16 gives 337), row-major:

    kernels[k, 0            : Ci*H       ] -> W1[k] f32[Ci, H]   (W1[k, c, h] at c*H + h)
    kernels[k, Ci*H         : Ci*H+H     ] -> b1[k] f32[H]
    kernels[k, Ci*H+H       : Ci*H+2H    ] -> W2[k] f32[H]       (H -> 1)
    kernels[k, Ci*H+2H                   ] -> b2[k] f32[]
    with Ci = Cm + 3; input channel order [F_m (Cm), C_k - x_i (3)].

For instance k and point i: ``m[k, i] = W2[k] . relu(W1[k]^T [F_m,i, C_k - x_i] + b1[k]) + b2[k]``.
Every instance scans every point of its own scene; points of other scenes, padding rows
and invalid instance slots get ``fill_value`` (a large negative logit, sigmoid = 0).

Memory: the points are processed in chunks of P (``lax.map``), and each chunk's body is
rematerialised (``jax.checkpoint``) so reverse mode keeps only per-chunk inputs. Peak
intermediate per chunk: the hidden activations f32[K, P, H] = K*P*H*4 bytes (K = 200,
P = 16384, H = 16: 210 MB; P = 4096: 52 MB) instead of K*N*H*4 = 3.2 GB for N = 250k
unchunked. The output itself is f32[K, N] (200 MB at K = 200, N = 250k).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dknet_jax.model.heads import num_kernel_params

Array = jax.Array

MASK_FILL = -1e9  # logit for points outside an instance's scene (sigmoid -> exactly 0)


def split_kernels(kernels: Array, in_dim: int, hidden: int):
    """Split ``f32[K, L]`` into (W1 f32[K, in_dim, hidden], b1 f32[K, hidden],
    W2 f32[K, hidden], b2 f32[K]) following the layout in the module docstring."""
    k, length = kernels.shape
    expected = num_kernel_params(in_dim, hidden)
    if length != expected:
        raise ValueError(f"decode_masks: kernels have length {length} but in_dim={in_dim}, "
                         f"hidden={hidden} need {expected}; check mask_feat_dim/dynamic_hidden")
    n1 = in_dim * hidden
    w1 = kernels[:, :n1].reshape(k, in_dim, hidden)
    b1 = kernels[:, n1:n1 + hidden]
    w2 = kernels[:, n1 + hidden:n1 + 2 * hidden]
    b2 = kernels[:, n1 + 2 * hidden]
    return w1, b1, w2, b2


def scene_point_mask(inst_batch: Array, inst_ok: Array, batch_id: Array,
                     valid: Array) -> Array:
    """bool[K, N]: point i is a valid point of instance k's scene and slot k is valid."""
    return (inst_ok[:, None] & valid[None, :]
            & (inst_batch[:, None] == batch_id[None, :]))


def decode_masks(kernels: Array, centroids: Array, inst_batch: Array, inst_ok: Array,
                 mask_feats: Array, xyz: Array, batch_id: Array, valid: Array, *,
                 hidden: int = 16, chunk_size: int = 16384,
                 fill_value: float = MASK_FILL) -> Array:
    """Mask logits of every instance over every point of its scene.

    Args:
      kernels: f32[K, L] instance kernels (L = (Cm+3)*hidden + 2*hidden + 1).
      centroids: f32[K, 3] instance centroids C_k.
      inst_batch: i32[K] scene of each instance; inst_ok: bool[K] valid slots.
      mask_feats: f32[N, Cm] mask features F_m; xyz: f32[N, 3].
      batch_id: i32[N] scene of each point; valid: bool[N] real rows.
      hidden: H, output channels of the first dynamic layer (16).
      chunk_size: P, points per chunk (static); the peak hidden tensor is f32[K, P, H].
      fill_value: logit outside an instance's scene.
    Returns:
      f32[K, N] mask logits.
    """
    n, cm = mask_feats.shape
    if xyz.shape != (n, 3) or batch_id.shape != (n,) or valid.shape != (n,):
        raise ValueError(f"decode_masks: mask_feats {mask_feats.shape}, xyz {xyz.shape}, "
                         f"batch_id {batch_id.shape}, valid {valid.shape} disagree on N")
    if centroids.shape != (kernels.shape[0], 3):
        raise ValueError(f"decode_masks: centroids {centroids.shape} should be "
                         f"[{kernels.shape[0]}, 3]")
    if chunk_size <= 0:
        raise ValueError(f"decode_masks: chunk_size must be > 0, got {chunk_size}")
    w1, b1, w2, b2 = split_kernels(kernels, cm + 3, hidden)
    # [F_m, C_k - x] @ W1 = [F_m, -x] @ W1 + C_k @ W1[Cm:], so the instance-only part is
    # folded into the bias once and the per-chunk work is one batched matmul.
    bias1 = b1 + jnp.einsum("kc,kch->kh", centroids, w1[:, cm:, :])
    point_in = jnp.concatenate([mask_feats, -xyz], axis=-1)  # [N, Cm+3]

    p = min(chunk_size, n)
    n_chunks = -(-n // p)
    pad = n_chunks * p - n
    chunks = (jnp.pad(point_in, ((0, pad), (0, 0))).reshape(n_chunks, p, cm + 3),
              jnp.pad(batch_id, (0, pad)).reshape(n_chunks, p),
              jnp.pad(valid, (0, pad)).reshape(n_chunks, p))

    @jax.checkpoint
    def one_chunk(args):
        x, bid, ok = args
        h = jax.nn.relu(jnp.einsum("pc,kch->kph", x, w1) + bias1[:, None, :])
        logit = jnp.einsum("kph,kh->kp", h, w2) + b2[:, None]
        inside = inst_ok[:, None] & ok[None, :] & (inst_batch[:, None] == bid[None, :])
        return jnp.where(inside, logit, fill_value)

    out = jax.lax.map(one_chunk, chunks)  # [n_chunks, K, P]
    out = jnp.moveaxis(out, 0, 1).reshape(kernels.shape[0], n_chunks * p)
    return out[:, :n]
