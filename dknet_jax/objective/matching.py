"""Hungarian matching of predicted instances to GT instances (paper Eq. 5; docs/method.md
section 8).

Data flow: predicted instance slots (centroids ``C_k`` from aggregation, classes from
:func:`majority_class` over the decoded masks, or :func:`class_from_counts` over
``mask_loss.decoded_class_counts``) and GT (``targets.Targets``) ->
:func:`match_cost` (inside jit) -> :func:`hungarian` (host, ``scipy`` through
``jax.pure_callback``) -> ``gt_for_pred`` for ``terms.mask_loss``.

Instances of all scenes are packed flat: K predicted slots with ``pred_batch i32[K]`` and G
GT slots with ``gt_batch i32[G]``; a match never crosses scenes. Each scene is solved as
its own rectangular assignment, so every GT instance of a scene is matched whenever the
scene has at least as many valid predictions; nothing is truncated.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

Array = jax.Array

INVALID_COST = 1e6  # cost of a forbidden pair (other scene / invalid slot); never assigned


def majority_class(pred_mask: Array, sem_pred: Array, num_classes: int) -> Array:
    """Majority predicted semantic label inside each predicted mask.

    Args:
      pred_mask: bool[K, N] (e.g. ``mask_logits > 0`` restricted to the scene's points).
      sem_pred: i32[N] argmax semantic class per point.
      num_classes: S (static).
    Returns:
      i32[K]: most frequent class (ties: lowest class); -1 for an empty mask.
    """
    onehot = jax.nn.one_hot(sem_pred, num_classes, dtype=jnp.float32)
    return class_from_counts(pred_mask.astype(jnp.float32) @ onehot)  # exact below 2^24


def class_from_counts(counts: Array) -> Array:
    """i32[K] majority class from per-class point counts f32[K, S] (ties: lowest class;
    -1 where the count is all zero). ``mask_loss.decoded_class_counts`` gives the counts
    without materialising the [K, N] masks."""
    cls = jnp.argmax(counts, axis=-1).astype(jnp.int32)
    return jnp.where(jnp.sum(counts, axis=-1) > 0, cls, -1)


def match_cost(
    pred_centroid: Array,
    pred_class: Array,
    pred_batch: Array,
    pred_ok: Array,
    gt_centroid: Array,
    gt_class: Array,
    gt_batch: Array,
    gt_ok: Array,
    *,
    class_weight: float = 1.0,
):
    """Eq. 5 cost ``||C_pred - C_gt||_2 + class_weight * 1[class differs]``.

    Args:
      pred_centroid f32[K, 3], pred_class i32[K], pred_batch i32[K], pred_ok bool[K];
      gt_centroid f32[G, 3], gt_class i32[G], gt_batch i32[G], gt_ok bool[G].
    Returns:
      cost f32[K, G] (``INVALID_COST`` where not allowed) and allowed bool[K, G]
      (both slots valid and in the same scene).
    """
    d = jnp.linalg.norm(pred_centroid[:, None, :] - gt_centroid[None, :, :], axis=-1)
    cost = d + class_weight * (pred_class[:, None] != gt_class[None, :]).astype(d.dtype)
    allowed = pred_ok[:, None] & gt_ok[None, :] & (pred_batch[:, None] == gt_batch[None, :])
    return jnp.where(allowed, cost, INVALID_COST), allowed


def _assign_host(cost: np.ndarray, row_group: np.ndarray, col_group: np.ndarray):
    """numpy: per group id >= 0, optimal assignment of that group's rows to its columns."""
    cost = np.asarray(cost, dtype=np.float64)
    row_group = np.asarray(row_group)
    col_group = np.asarray(col_group)
    k, g = cost.shape[-2:]
    lead = np.broadcast_shapes(cost.shape[:-2], row_group.shape[:-1], col_group.shape[:-1])
    cost = np.broadcast_to(cost, (*lead, k, g)).reshape(-1, k, g)
    rg = np.broadcast_to(row_group, (*lead, k)).reshape(-1, k)
    cg = np.broadcast_to(col_group, (*lead, g)).reshape(-1, g)
    gt_for_pred = np.full((cost.shape[0], k), -1, np.int32)
    pred_for_gt = np.full((cost.shape[0], g), -1, np.int32)
    for b in range(cost.shape[0]):
        for grp in np.unique(rg[b][rg[b] >= 0]):
            rows = np.flatnonzero(rg[b] == grp)
            cols = np.flatnonzero(cg[b] == grp)
            if cols.size == 0:
                continue
            sub = cost[b][np.ix_(rows, cols)]
            if not np.all(np.isfinite(sub)):
                raise ValueError(
                    "hungarian: the cost matrix has NaN/inf entries; check the "
                    "predicted centroids (a diverged model?)"
                )
            r, c = linear_sum_assignment(sub)
            gt_for_pred[b, rows[r]] = cols[c]
            pred_for_gt[b, cols[c]] = rows[r]
    return pred_for_gt.reshape(*lead, g), gt_for_pred.reshape(*lead, k)


def hungarian(cost: Array, row_group: Array, col_group: Array):
    """Minimum-cost assignment within groups, on the host.

    Args:
      cost: f32[..., K, G] (leading batch dims allowed; ``jax.vmap`` also works).
      row_group: i32[..., K] group (scene) of each row, < 0 = invalid row.
      col_group: i32[..., G] group of each column, < 0 = invalid column.
    Returns:
      pred_for_gt i32[..., G], gt_for_pred i32[..., K]: the matched index or -1. Rows and
      columns only match within their group; each group is a full rectangular
      assignment (min(#rows, #cols) pairs).
    """
    lead = cost.shape[:-2]
    k, g = cost.shape[-2:]
    out = (jax.ShapeDtypeStruct((*lead, g), jnp.int32), jax.ShapeDtypeStruct((*lead, k), jnp.int32))
    return jax.pure_callback(
        _assign_host,
        out,
        jax.lax.stop_gradient(cost),
        row_group.astype(jnp.int32),
        col_group.astype(jnp.int32),
        vmap_method="expand_dims",
    )


def match_instances(
    pred_centroid: Array,
    pred_class: Array,
    pred_batch: Array,
    pred_ok: Array,
    gt_centroid: Array,
    gt_class: Array,
    gt_batch: Array,
    gt_ok: Array,
    *,
    class_weight: float = 1.0,
):
    """Match packed predictions to packed GT per scene (cost of :func:`match_cost`).

    Shapes as in :func:`match_cost`. Returns ``pred_for_gt i32[G]``, ``gt_for_pred i32[K]``
    (-1 = unmatched); pairs are only ever within one scene and between valid slots.
    """
    cost, _ = match_cost(
        pred_centroid,
        pred_class,
        pred_batch,
        pred_ok,
        gt_centroid,
        gt_class,
        gt_batch,
        gt_ok,
        class_weight=class_weight,
    )
    row_group = jnp.where(pred_ok, pred_batch, -1)
    col_group = jnp.where(gt_ok, gt_batch, -1)
    return hungarian(cost, row_group, col_group)
