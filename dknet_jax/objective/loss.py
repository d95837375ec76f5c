"""The training objective: DKNet outputs + GT batch -> the five loss terms of Eq. 8.

Data flow: ``DKNet(batch) -> DKNetOutputs`` -> **objective** (targets, Hungarian matching,
each loss term, stage gates) -> scalar loss for ``jax.grad``.

Two paths to the matching classes and the mask loss (Eq. 5-6), same values up to float
rounding: *dense* when the outputs carry ``mask_logits`` f32[M, N] (``DKNet(batch)``), and
*chunked* when they do not (``DKNet(batch, decode_masks=False)``): the masks are decoded
again from the kernels chunk by chunk (``mask_loss.decoded_class_counts`` and
``mask_loss.decoded_mask_loss``), so neither the forward nor the backward pass holds [M, N]
(``config.model.chunked_mask_loss``, the training default).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dknet_jax.aggregation import same_instance
from dknet_jax.model import mask_decoder
from dknet_jax.model.dknet import DKNetOutputs
from dknet_jax.objective import mask_loss
from dknet_jax.objective import terms as L
from dknet_jax.objective.matching import class_from_counts, majority_class, match_instances
from dknet_jax.objective.targets import compute_targets
from dknet_jax.types import PointBatch

Array = jax.Array


def loss_weights(loss_config) -> L.LossTerms:
    """``config.loss`` -> per-term weights."""
    f = lambda v: jnp.float32(v)
    return L.LossTerms(
        semantic=f(loss_config.semantic),
        offset=f(loss_config.offset),
        center=f(loss_config.center),
        aggregation=f(loss_config.aggregation),
        mask=f(loss_config.mask),
    )


def compute_losses(
    out: DKNetOutputs,
    batch: PointBatch,
    *,
    weights: L.LossTerms,
    gates: L.LossTerms,
    num_classes: int,
    offset_direction: bool = False,
    mask_iou_threshold: float = 0.25,
    mask_iou_fallback: bool = True,
    aggregation_loss: bool = True,
    mask_chunk: int = 16_384,
):
    """Eq. 8 on one packed batch.

    Args:
      out: model outputs; batch: the GT batch the model ran on.
      weights, gates: per-term weights (``config.loss``) and 0/1 stage gates
        (``terms.stage_gates``), both traced so stages never recompile.
      mask_iou_threshold, mask_iou_fallback: the Eq. 6 IoU gate (``terms.mask_loss``); the
        threshold may be traced (-inf counts every matched pair).
      aggregation_loss: False for the "w/o aggregation" ablation (no merge loss).
      mask_chunk: points per chunk (``config.model.mask_chunk``) of the chunked path,
        taken when ``out.mask_logits`` is None; the dense path ignores it.
    Returns:
      (total f32[], metrics dict of f32[] scalars: every term, counts of candidates,
      instances and matched pairs).
    """
    t = compute_targets(batch)
    h = out.heads
    sem = L.semantic_loss(h.semantic_logits, batch.semantic, batch.valid)
    off = L.offset_loss(h.offset, t.offset, t.on_instance, direction=offset_direction)
    # averaged over instance points that are predicted foreground (H is 0 elsewhere)
    center = L.heatmap_loss(out.heat, t.heat, t.on_instance & h.foreground)

    n = batch.valid.shape[0]
    safe = jnp.clip(out.cand_idx, 0, n - 1)
    cand_inst = jnp.where(out.cand_ok, batch.instance[safe], -1)
    if aggregation_loss:
        target = same_instance(cand_inst, out.cand_ok)
        merge = L.merge_loss(out.merge_logits, target, out.pair_mask)
    else:
        merge = jnp.zeros((), jnp.float32)

    sem_pred = jnp.argmax(h.semantic_logits, axis=-1)
    if out.mask_logits is None:  # chunked: decode again from the kernels, never [M, N]
        decoder = (
            out.kernels,
            out.inst_pos,
            out.instance_batch,
            out.inst_ok,
            h.mask_feats,
            batch.xyz,
            batch.batch_id,
            batch.valid,
        )
        hidden = mask_decoder.kernel_hidden(out.kernels.shape[-1], h.mask_feats.shape[-1])
        # the model's slots [s M, (s+1) M) are scene s's: each block decodes its scene only
        blocks = batch.scene_valid.shape[0]
        counts = mask_loss.decoded_class_counts(
            *decoder,
            sem_pred,
            num_classes,
            hidden=hidden,
            chunk_size=mask_chunk,
            scene_blocks=blocks,
        )
        pred_class = class_from_counts(counts)
    else:
        point_mask = mask_decoder.scene_point_mask(
            out.instance_batch, out.inst_ok, batch.batch_id, batch.valid
        )
        pred_class = majority_class((out.mask_logits > 0) & point_mask, sem_pred, num_classes)
    _, gt_for_pred = match_instances(
        out.inst_pos,
        pred_class,
        out.instance_batch,
        out.inst_ok,
        t.centroid,
        t.gt_class,
        t.gt_batch,
        t.gt_ok,
    )
    if out.mask_logits is None:
        mask, num_counted, _ = mask_loss.decoded_mask_loss(
            *decoder,
            batch.instance,
            gt_for_pred,
            hidden=hidden,
            chunk_size=mask_chunk,
            iou_threshold=mask_iou_threshold,
            iou_fallback=mask_iou_fallback,
            scene_blocks=blocks,
        )
    else:
        mask, num_counted, _ = L.mask_loss(
            out.mask_logits,
            batch.instance,
            gt_for_pred,
            point_mask,
            iou_threshold=mask_iou_threshold,
            iou_fallback=mask_iou_fallback,
        )
    terms = L.LossTerms(semantic=sem, offset=off, center=center, aggregation=merge, mask=mask)
    total = L.total_loss(terms, weights, gates)
    metrics = {
        "loss": total,
        "semantic": sem,
        "offset": off,
        "center": center,
        "aggregation": merge,
        "mask": mask,
        "candidates": jnp.sum(out.cand_ok).astype(jnp.float32),
        "instances": jnp.sum(out.inst_ok).astype(jnp.float32),
        "matched": num_counted.astype(jnp.float32),
        "gt_instances": jnp.sum(t.gt_ok).astype(jnp.float32),
    }
    return total, metrics
