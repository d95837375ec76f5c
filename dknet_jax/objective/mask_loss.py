"""The mask loss (Eq. 6) and the matching classes computed from the kernels chunk by chunk.

Training's memory-saving path (``config.model.chunked_mask_loss``): the instance masks are
decoded again from the kernels (``model.mask_decoder``) one chunk of points at a time, so
neither the forward nor the backward pass holds the f32[K, N] mask logits.
:func:`decoded_mask_loss` equals ``terms.mask_loss(decode_masks(...), ...)`` and
:func:`decoded_class_counts` feeds ``matching.class_from_counts``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dknet_jax.model import mask_decoder as md
from dknet_jax.objective import terms as losses

Array = jax.Array


def decoded_mask_loss(
    kernels: Array,
    centroids: Array,
    inst_batch: Array,
    inst_ok: Array,
    mask_feats: Array,
    xyz: Array,
    batch_id: Array,
    valid: Array,
    instance: Array,
    gt_for_pred: Array,
    *,
    hidden: int = 16,
    chunk_size: int = 16384,
    iou_threshold: float = 0.25,
    iou_fallback: bool = True,
    scene_blocks: int = 1,
):
    """``terms.mask_loss(decode_masks(...), instance, gt_for_pred, scene_point_mask(...))``
    computed chunk by chunk: never holds f32[K, N], in reverse mode either.

    Extra args: instance i32[N] GT slot per point (-100 none); gt_for_pred i32[K] from
    ``matching`` (-1 unmatched); scene_blocks: as in ``decode_masks``. Returns (loss f32[],
    num_counted i32[], iou f32[K]).
    """
    md.check_inputs(
        kernels, centroids, mask_feats, xyz, batch_id, valid, chunk_size, "decoded_mask_loss"
    )
    params, x, per_point, _ = md.chunked_inputs(
        kernels, centroids, mask_feats, xyz, [batch_id, valid, instance], hidden, chunk_size
    )
    matched = gt_for_pred >= 0
    blocks = md.check_scene_blocks(kernels.shape[0], scene_blocks, "decoded_mask_loss")

    def body(logit, inside, gt_pred, inst):
        target = inst[None, :] == gt_pred[:, None]
        return losses.mask_pair_sums(logit, target, inside & (gt_pred >= 0)[:, None])

    sums = md.scan_sums(
        params,
        x,
        per_point,
        inst_batch,
        inst_ok,
        losses.MASK_SUMS,
        body,
        per_inst=gt_for_pred,
        blocks=blocks,
    )
    return losses.mask_loss_from_sums(
        sums, matched, iou_threshold=iou_threshold, iou_fallback=iou_fallback
    )


def decoded_class_counts(
    kernels: Array,
    centroids: Array,
    inst_batch: Array,
    inst_ok: Array,
    mask_feats: Array,
    xyz: Array,
    batch_id: Array,
    valid: Array,
    sem_pred: Array,
    num_classes: int,
    *,
    hidden: int = 16,
    chunk_size: int = 16384,
    scene_blocks: int = 1,
) -> Array:
    """f32[K, S]: per instance, how many of its points (logit > 0, own scene) have each
    predicted class; chunked like :func:`decoded_mask_loss`, no gradient. Feed it to
    ``matching.class_from_counts`` for the majority class."""
    md.check_inputs(
        kernels, centroids, mask_feats, xyz, batch_id, valid, chunk_size, "decoded_class_counts"
    )
    params, x, per_point, _ = md.chunked_inputs(
        jax.lax.stop_gradient(kernels),
        jax.lax.stop_gradient(centroids),
        jax.lax.stop_gradient(mask_feats),
        xyz,
        [batch_id, valid, sem_pred],
        hidden,
        chunk_size,
    )

    blocks = md.check_scene_blocks(kernels.shape[0], scene_blocks, "decoded_class_counts")

    def body(logit, inside, _, sem):
        hard = ((logit > 0) & inside).astype(jnp.float32)
        return hard @ jax.nn.one_hot(sem, num_classes, dtype=jnp.float32)

    return md.scan_sums(params, x, per_point, inst_batch, inst_ok, num_classes, body, blocks=blocks)
