"""An independent float64 numpy implementation of the released DKNet per-point forward.

Works directly on a released-format state dict (names and shapes of
:mod:`dknet_jax.released.spec`, spconv weights in KRSC ``[Cout, kx, ky, kz, Cin]``) in
inference mode (BatchNorm with running statistics). It shares no code with the JAX model:
sparse convolutions are dict / table based over explicit voxel coordinates.

spconv conventions used (evidence in docs/released_model.md):

- Submanifold 3x3x3 (``SubMConv3d``, padding 1): kernel index ``r = (kx, ky, kz)`` in
  ``{0,1,2}^3`` pairs output voxel ``p`` with input voxel ``p + (kx-1, ky-1, kz-1)`` (same
  batch), i.e. ``out[p] = sum_r W[:, kx, ky, kz, :] @ x[p + r - 1]``: a correlation, like
  ``torch.nn.functional.conv3d``. Flattened offset ``9 kx + 3 ky + kz``.
- 1x1 ``SubMConv3d`` (``i_branch``): ``out = x @ weight.reshape(Cin, Cout)`` (spconv's
  1x1 shortcut; :func:`spec.subm1_matrix`).
- ``SparseConv3d(kernel 2, stride 2)``: output ``q = floor(p / 2)`` per axis, kernel index
  ``(px - 2 qx, py - 2 qy, pz - 2 qz) = (px & 1, py & 1, pz & 1)``; ``out[q] = sum over the
  children p of q of W[:, px&1, py&1, pz&1, :] @ x[p]``.
- ``SparseInverseConv3d(kernel 2)`` with the same ``indice_key``: back onto the fine
  voxels of that down conv, ``out[p] = W[:, px&1, py&1, pz&1, :] @ x[floor(p / 2)]``.

Coordinates are rows ``(b, x, y, z)`` (the released data loader's ``voxel_locs`` order).
"""

from __future__ import annotations

import functools
import itertools

import numpy as np

from dknet_jax.released import spec as S

OFFSETS_3 = np.array(list(itertools.product(range(3), repeat=3)), np.int64) - 1  # [27, 3]


@functools.lru_cache(maxsize=1)
def _bn_eps() -> dict[str, float]:
    return {e.name: e.eps for e in S.released_spec() if e.role == "bn_weight"}


def _f64(a) -> np.ndarray:
    return np.asarray(a, np.float64)


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0)


# --------------------------------------------------------------------------- sparse ops


def _check_coords(coords) -> np.ndarray:
    c = np.asarray(coords)
    if c.ndim != 2 or c.shape[1] != 4 or not np.issubdtype(c.dtype, np.integer):
        raise ValueError(
            f"voxel coords must be int[V, 4] rows (b, x, y, z), got {c.dtype}{c.shape}"
        )
    c = c.astype(np.int64)
    if len({tuple(r) for r in c.tolist()}) != len(c):
        raise ValueError("voxel coords must be unique rows")
    return c


def neighbour_table(coords: np.ndarray) -> np.ndarray:
    """``int[V, 27]``: row of the voxel at ``coords[i] + OFFSETS_3[r]`` (same batch), -1 if
    absent; column ``r = 9 kx + 3 ky + kz`` <-> displacement ``(kx-1, ky-1, kz-1)``."""
    c = _check_coords(coords)
    index = {tuple(r): i for i, r in enumerate(c.tolist())}
    nbr = np.full((len(c), 27), -1, np.int64)
    for i, (b, x, y, z) in enumerate(c.tolist()):
        for r, (dx, dy, dz) in enumerate(OFFSETS_3.tolist()):
            nbr[i, r] = index.get((b, x + dx, y + dy, z + dz), -1)
    return nbr


def subm_conv3(x: np.ndarray, nbr: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Submanifold 3x3x3 conv, KRSC weight ``[Cout, 3, 3, 3, Cin]`` -> ``f64[V, Cout]``."""
    x, w = _f64(x), _f64(weight)
    cout, cin = w.shape[0], w.shape[-1]
    if w.shape != (cout, 3, 3, 3, cin) or x.shape[1] != cin:
        raise ValueError(f"subm_conv3: weight {w.shape} does not fit features {x.shape}")
    w = w.reshape(cout, 27, cin)
    out = np.zeros((x.shape[0], cout))
    for r in range(27):
        rows = nbr[:, r] >= 0
        out[rows] += x[nbr[rows, r]] @ w[:, r, :].T
    return out


def down_map(coords: np.ndarray):
    """Kernel-2 stride-2 map: (coarse coords int[Vc, 4] sorted lexicographically,
    parent int[V] row of each fine voxel's coarse voxel, child int[V] = 4(x&1)+2(y&1)+(z&1))."""
    c = _check_coords(coords)
    coarse = np.concatenate([c[:, :1], c[:, 1:] // 2], axis=1)
    ucoarse, parent = np.unique(coarse, axis=0, return_inverse=True)
    child = (c[:, 1] & 1) * 4 + (c[:, 2] & 1) * 2 + (c[:, 3] & 1)
    return ucoarse, parent.reshape(-1), child


def down_conv2(x, parent, child, num_coarse: int, weight) -> np.ndarray:
    """``SparseConv3d(k=2, s=2)``, KRSC weight ``[Cout, 2, 2, 2, Cin]`` -> f64[Vc, Cout]."""
    x, w = _f64(x), _f64(weight)
    cout, cin = w.shape[0], w.shape[-1]
    if w.shape != (cout, 2, 2, 2, cin) or x.shape[1] != cin:
        raise ValueError(f"down_conv2: weight {w.shape} does not fit features {x.shape}")
    w = w.reshape(cout, 8, cin)
    out = np.zeros((num_coarse, cout))
    for r in range(8):
        rows = child == r
        np.add.at(out, parent[rows], x[rows] @ w[:, r, :].T)
    return out


def inverse_conv2(xc, parent, child, weight) -> np.ndarray:
    """``SparseInverseConv3d(k=2)`` onto the fine voxels of a down map -> f64[V, Cout]."""
    xc, w = _f64(xc), _f64(weight)
    cout, cin = w.shape[0], w.shape[-1]
    if w.shape != (cout, 2, 2, 2, cin) or xc.shape[1] != cin:
        raise ValueError(f"inverse_conv2: weight {w.shape} does not fit features {xc.shape}")
    w = w.reshape(cout, 8, cin)
    return np.einsum("vc,voc->vo", xc[parent], w[:, child, :].transpose(1, 0, 2))


def batch_norm(x, sd, prefix: str) -> np.ndarray:
    """Inference BatchNorm with the module's eps (spec): (x - mean) / sqrt(var + eps) * w + b."""
    eps = _bn_eps()[prefix + "weight"]
    mean, var = _f64(sd[prefix + "running_mean"]), _f64(sd[prefix + "running_var"])
    w, b = _f64(sd[prefix + "weight"]), _f64(sd[prefix + "bias"])
    return (_f64(x) - mean) / np.sqrt(var + eps) * w + b


def linear(x, sd, prefix: str) -> np.ndarray:
    return _f64(x) @ _f64(sd[prefix + "weight"]).T + _f64(sd[prefix + "bias"])


def conv1x1(x, sd, prefix: str, bias: bool) -> np.ndarray:
    """1x1 ``nn.Conv1d`` applied per point (rows of ``x``): weight ``[out, in, 1]``."""
    y = _f64(x) @ _f64(sd[prefix + "weight"])[:, :, 0].T
    return y + _f64(sd[prefix + "bias"]) if bias else y


# --------------------------------------------------------------------------- backbone


def _residual(x, nbr, sd, p: str, cin: int, cout: int) -> np.ndarray:
    h = relu(batch_norm(x, sd, p + "conv_branch.0."))
    h = subm_conv3(h, nbr, sd[p + "conv_branch.2.weight"])
    h = relu(batch_norm(h, sd, p + "conv_branch.3."))
    h = subm_conv3(h, nbr, sd[p + "conv_branch.5.weight"])
    if cin == cout:
        skip = _f64(x)
    else:
        skip = _f64(x) @ _f64(S.subm1_matrix(sd[p + "i_branch.0.weight"], cin, cout))
    return h + skip


def _ublock(x, coords, sd, p: str, planes) -> np.ndarray:
    nbr = neighbour_table(coords)
    w = planes[0]
    for i in range(S.BLOCK_REPS):
        x = _residual(x, nbr, sd, f"{p}blocks.block{i}.", w, w)
    if len(planes) > 1:
        identity = x
        h = relu(batch_norm(x, sd, p + "conv.0."))
        ccoords, parent, child = down_map(coords)
        h = down_conv2(h, parent, child, len(ccoords), sd[p + "conv.2.weight"])
        h = _ublock(h, ccoords, sd, p + "u.", planes[1:])
        h = relu(batch_norm(h, sd, p + "deconv.0."))
        h = inverse_conv2(h, parent, child, sd[p + "deconv.2.weight"])
        x = np.concatenate([identity, h], axis=1)
        for i in range(S.BLOCK_REPS):
            x = _residual(x, nbr, sd, f"{p}blocks_tail.block{i}.", w * (2 - i), w)
    return x


def backbone(sd, voxel_coords, voxel_feats) -> np.ndarray:
    """input_conv -> UNet -> output_layer (BN + ReLU): per-voxel features f64[V, 32]."""
    coords = _check_coords(voxel_coords)
    x = subm_conv3(voxel_feats, neighbour_table(coords), sd["input_conv.0.weight"])
    x = _ublock(x, coords, sd, "unet.", S.WIDTHS)
    return relu(batch_norm(x, sd, "output_layer.0."))


def tower(x, sd, p: str) -> np.ndarray:
    """mask_branch / kernel_branch / merge_branch on rows: 3 x (conv1x1 no bias, BN eps
    1e-5, ReLU), then conv1x1 with bias."""
    h = _f64(x)
    for i in range(S.TOWER_CONVS):
        h = relu(batch_norm(conv1x1(h, sd, f"{p}{i}.0.", bias=False), sd, f"{p}{i}.1."))
    return conv1x1(h, sd, f"{p}{S.TOWER_CONVS}.", bias=True)


def point_forward(sd, voxel_coords, voxel_feats, point_to_voxel) -> dict[str, np.ndarray]:
    """The released per-point forward (model/DKNet.py forward up to the candidate mining).

    Returns f64 arrays: ``voxel_feats [V, 32]`` (after output_layer), ``point_feats
    [N, 32]``, ``semantic_logits [N, 20]``, ``offsets [N, 3]``, ``heat_logits [N]``
    (precision_linear on candidate_linear([F, offset]), computed for every point: the
    released code runs it on predicted-foreground rows only, which in inference mode gives
    the same rows), ``mask_feats [N, 16]`` and ``kernel_feats [N, 16]``.
    """
    v = backbone(sd, voxel_coords, voxel_feats)
    f = v[np.asarray(point_to_voxel, np.int64)]
    h = relu(batch_norm(linear(f, sd, "linear.0."), sd, "linear.1."))
    h = relu(batch_norm(linear(h, sd, "linear.3."), sd, "linear.4."))
    sem = linear(h, sd, "linear.6.")
    off = linear(
        relu(batch_norm(linear(f, sd, "offset.0."), sd, "offset.1.")), sd, "offset_linear."
    )
    c = np.concatenate([f, off], axis=1)
    c = relu(batch_norm(linear(c, sd, "candidate_linear.0."), sd, "candidate_linear.1."))
    c = relu(batch_norm(linear(c, sd, "candidate_linear.3."), sd, "candidate_linear.4."))
    heat = linear(c, sd, "precision_linear.")[:, 0]
    return {
        "voxel_feats": v,
        "point_feats": f,
        "semantic_logits": sem,
        "offsets": off,
        "heat_logits": heat,
        "mask_feats": tower(f, sd, "mask_branch."),
        "kernel_feats": tower(f, sd, "kernel_branch."),
    }


# --------------------------------------------------------------------------- later stages


def scene_heatmap(heat_logits, batch_id, foreground) -> np.ndarray:
    """``utils.batch_softmax`` over each scene's predicted-foreground points (0 elsewhere)."""
    heat_logits, batch_id = _f64(heat_logits), np.asarray(batch_id)
    out = np.zeros_like(heat_logits)
    for b in np.unique(batch_id[foreground]):
        rows = np.asarray(foreground, bool) & (batch_id == b)
        e = np.exp(heat_logits[rows] - heat_logits[rows].max())
        out[rows] = e / e.sum()
    return out


def merge_scores(sd, agg_feats) -> np.ndarray:
    """``candidate_merge``: sigmoid(merge_branch(clamp(|F_i - F_j|, min=1e-6))) ``[K, K]``
    for candidate features ``[K, 35]`` = [fg pooled 16, bg pooled 16, shifted position 3]
    (the batch mask and the greedy grouping are not included)."""
    a = _f64(agg_feats)
    diff = np.maximum(np.abs(a[:, None, :] - a[None, :, :]), 1e-6)
    k = a.shape[0]
    logits = tower(diff.reshape(k * k, -1), sd, "merge_branch.")[:, 0].reshape(k, k)
    return 1.0 / (1.0 + np.exp(-logits))


def kernel_weights(sd, kernel_feats) -> np.ndarray:
    """``weight_generator``: conv1x1 16->16 (no bias), BN (eps 1e-5), ReLU, controller
    conv1x1 16->337 (bias): ``[I, 16] -> [I, 337]``."""
    p = "weight_generator."
    h = conv1x1(kernel_feats, sd, p + "before_embedding_tower.0.0.", bias=False)
    h = relu(batch_norm(h, sd, p + "before_embedding_tower.0.1."))
    return conv1x1(h, sd, p + "controller.", bias=True)


def decode_masks(weights, mask_feats, centers, coords) -> np.ndarray:
    """``instance_decoder`` + ``DynamicFilterLayer([16, 1])`` in inference: for instance
    i, x = [mask_feats, coords - centers[i]] (19 channels), h = relu(W1 x + b1),
    mask = sigmoid(W2 h + b2) with, in the 337-vector, W1 = w[0:304] as [16, 19]
    (output-major: W1[o, c] = w[19 o + c]), b1 = w[304:320], W2 = w[320:336], b2 = w[336].
    Returns f64[I, N] in (0, 1)."""
    w = _f64(weights)
    feats = _f64(mask_feats)
    out = np.zeros((w.shape[0], feats.shape[0]))
    cin = feats.shape[1] + 3
    n1 = cin * 16
    for i in range(w.shape[0]):
        x = np.concatenate([feats, _f64(coords) - _f64(centers[i])], axis=1)
        w1 = w[i, :n1].reshape(16, cin)
        b1 = w[i, n1 : n1 + 16]
        w2 = w[i, n1 + 16 : n1 + 32]
        b2 = w[i, n1 + 32]
        h = relu(x @ w1.T + b1)
        out[i] = 1.0 / (1.0 + np.exp(-(h @ w2 + b2)))
    return out


def voxelize_mean(point_coords, point_feats):
    """``dknet_ops.voxelization_idx`` + ``voxelization(mode=4)``: one voxel per distinct
    int row ``(b, x, y, z)`` (sorted), features = mean over its points.

    Returns (voxel_coords int[V, 4], voxel_feats f64[V, C], point_to_voxel int[N])."""
    c = np.asarray(point_coords, np.int64)
    vox, inv = np.unique(c, axis=0, return_inverse=True)
    inv = inv.reshape(-1)
    feats = np.zeros((len(vox), np.shape(point_feats)[1]))
    np.add.at(feats, inv, _f64(point_feats))
    feats /= np.bincount(inv, minlength=len(vox))[:, None]
    return vox, feats, inv
