"""Every DKNet loss term as a pure function, plus the stage-gated weighted total (Eq. 8).

Data flow: head outputs (``model.heads``), targets (``targets.compute_targets``), merge
targets (``aggregation``), mask logits (``mask_decoder.decode_masks``) and the Hungarian match
(``matching``) -> scalar terms -> :func:`total_loss` with weights from ``config.loss`` and
0/1 stage gates from :func:`stage_gates` (a traced epoch, so changing stage never
recompiles the train step).

Every term is a masked mean that returns 0 (not NaN) when nothing is counted.

Formulas (docs/method.md section 8; the released code where the paper is silent):
- semantic: CE over labelled valid points (ignore -100) + multi-class dice on softmax
  probabilities, V-Net form per class c over labelled points:
  ``1 - (2 sum p_c y_c + eps) / (sum p_c^2 + sum y_c^2 + eps)``, averaged over classes.
- offset: mean over instance points of ``sum_xyz |o - o_gt|``; optional direction term
  ``-cos(o, o_gt)`` averaged the same way (PointGroup).
- heatmap (Eq. 1): mean ``|H - H_gt|`` over the given mask (instance points that are
  predicted foreground, as in the code).
- merge (Eq. 2): BCE-with-logits averaged over valid pairs.
- mask (Eq. 6): per matched prediction k (gt ``g = gt_for_pred[k]``), over the points of
  k's scene: mean BCE(sigmoid(m_k), 1[instance == g]) + ``1 - 2 sum(p t) / (sum p + sum t)``;
  counted only when IoU(m_k > 0, gt) > iou_threshold; averaged over counted pairs. When
  no matched pair passes the gate, every matched pair is counted (``iou_fallback``, the
  released code's rule): an untrained decoder rarely reaches IoU 0.25, and without the
  fallback the gate would give it no gradient at all.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from dknet_jax.types import IGNORE_LABEL

Array = jax.Array


def _masked_mean(values: Array, mask: Array) -> Array:
    m = mask.astype(values.dtype)
    return jnp.sum(values * m) / jnp.maximum(jnp.sum(m), 1.0)


def cross_entropy(logits: Array, labels: Array, valid: Array | None = None) -> Array:
    """Mean CE over rows with ``labels != -100`` (and ``valid``).

    logits f32[N, S], labels i32[N]."""
    ok = labels != IGNORE_LABEL
    if valid is not None:
        ok = ok & valid
    logp = jax.nn.log_softmax(logits, axis=-1)
    safe = jnp.where(ok, labels, 0)
    nll = -jnp.take_along_axis(logp, safe[:, None], axis=-1)[:, 0]
    return _masked_mean(nll, ok)


def multiclass_dice(
    logits: Array, labels: Array, valid: Array | None = None, eps: float = 1e-5
) -> Array:
    """Multi-class dice loss on softmax(logits) over labelled rows; mean over S classes."""
    s = logits.shape[-1]
    ok = labels != IGNORE_LABEL
    if valid is not None:
        ok = ok & valid
    w = ok.astype(logits.dtype)[:, None]
    p = jax.nn.softmax(logits, axis=-1) * w
    y = jax.nn.one_hot(jnp.where(ok, labels, 0), s, dtype=logits.dtype) * w
    inter = jnp.sum(p * y, axis=0)
    denom = jnp.sum(p * p, axis=0) + jnp.sum(y * y, axis=0)
    return jnp.mean(1.0 - (2.0 * inter + eps) / (denom + eps))


def semantic_loss(logits: Array, labels: Array, valid: Array | None = None) -> Array:
    """CE (ignore -100) + multi-class dice. logits f32[N, S], labels i32[N] -> f32[]."""
    return cross_entropy(logits, labels, valid) + multiclass_dice(logits, labels, valid)


def offset_loss(pred: Array, target: Array, mask: Array, *, direction: bool = False) -> Array:
    """L1 offset loss on ``mask`` rows (+ optional cosine direction term).

    pred, target f32[N, 3]; mask bool[N] (instance points) -> f32[].
    """
    loss = _masked_mean(jnp.sum(jnp.abs(pred - target), axis=-1), mask)
    if direction:
        # sqrt(|x|^2 + tiny): finite gradient even for an exactly zero offset
        norm = lambda x: jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-16)
        pn = pred / (norm(pred) + 1e-8)
        tn = target / (norm(target) + 1e-8)
        loss = loss + _masked_mean(-jnp.sum(pn * tn, axis=-1), mask)
    return loss


def heatmap_loss(heat: Array, target: Array, mask: Array) -> Array:
    """Eq. 1: mean |H - H_gt| over ``mask`` rows. heat, target f32[N]; mask bool[N]."""
    return _masked_mean(jnp.abs(heat - target), mask)


def bce_with_logits(logits: Array, target: Array) -> Array:
    """Elementwise BCE(sigmoid(logits), target), numerically stable; same shape as inputs."""
    return jnp.maximum(logits, 0.0) - logits * target + jnp.log1p(jnp.exp(-jnp.abs(logits)))


def merge_loss(logits: Array, target: Array, pair_mask: Array) -> Array:
    """Eq. 2: BCE over valid pairs. logits f32[K, K], target f32[K, K] (1 = same GT
    instance), pair_mask bool[K, K] -> f32[]."""
    return _masked_mean(bce_with_logits(logits, target), pair_mask)


MASK_SUMS = 7  # columns of mask_pair_sums


def mask_pair_sums(mask_logits: Array, target: Array, point_mask: Array) -> Array:
    """Per-row sums that the mask loss needs; additive over point chunks.

    Args:
      mask_logits: f32[K, P]; target: bool/f32[K, P] GT mask of the matched instance;
      point_mask: bool[K, P] points each row is scored on.
    Returns:
      f32[K, 7]: [#points, sum BCE, sum p*t, sum p, sum t, sum hard*t, sum hard] with
      p = sigmoid(logit), hard = logit > 0 (the last two carry no gradient).
    """
    w = point_mask.astype(mask_logits.dtype)
    t = target.astype(mask_logits.dtype) * w
    p = jax.nn.sigmoid(mask_logits) * w
    hard = jax.lax.stop_gradient((mask_logits > 0).astype(mask_logits.dtype) * w)
    return jnp.stack(
        [
            jnp.sum(w, axis=1),
            jnp.sum(bce_with_logits(mask_logits, t) * w, axis=1),
            jnp.sum(p * t, axis=1),
            jnp.sum(p, axis=1),
            jnp.sum(t, axis=1),
            jnp.sum(hard * t, axis=1),
            jnp.sum(hard, axis=1),
        ],
        axis=1,
    )


def mask_loss_from_sums(
    sums: Array,
    matched: Array,
    *,
    iou_threshold: float = 0.25,
    iou_fallback: bool = True,
    eps: float = 1e-6,
):
    """Eq. 6 from :func:`mask_pair_sums` ``f32[K, 7]`` and ``matched bool[K]``.

    ``iou_fallback``: when no matched pair has IoU > ``iou_threshold``, count every matched
    pair instead of none (the released code does this; False = the gate alone).

    Returns (loss f32[], num_counted i32[], iou f32[K]); loss = 0 when nothing is counted.
    """
    n_pts, bce_sum, pt, p_sum, t_sum, hard_t, hard_sum = (sums[:, i] for i in range(MASK_SUMS))
    bce = bce_sum / jnp.maximum(n_pts, 1.0)
    dice = 1.0 - 2.0 * pt / (p_sum + t_sum + eps)
    iou = hard_t / jnp.maximum(hard_sum + t_sum - hard_t, 1.0)
    counted = matched & (iou > iou_threshold)
    if iou_fallback:
        counted = jnp.where(jnp.any(counted), counted, matched)
    num = jnp.sum(counted)
    loss = jnp.sum(jnp.where(counted, bce + dice, 0.0)) / jnp.maximum(num, 1).astype(bce.dtype)
    return loss, num, iou


def mask_loss(
    mask_logits: Array,
    instance: Array,
    gt_for_pred: Array,
    point_mask: Array,
    *,
    iou_threshold: float = 0.25,
    iou_fallback: bool = True,
    eps: float = 1e-6,
):
    """Eq. 6: BCE + dice per matched (prediction, GT) pair with IoU > ``iou_threshold``.

    Materialises several f32[K, N] temporaries; ``mask_loss.decoded_mask_loss`` computes the
    same value chunk by chunk without ever holding [K, N].

    Args:
      mask_logits: f32[K, N] from ``mask_decoder.decode_masks``.
      instance: i32[N] GT instance slot per point (-100 none).
      gt_for_pred: i32[K] matched GT slot per prediction, -1 when unmatched.
      point_mask: bool[K, N] the points each prediction is scored on (its scene's valid
        points: ``mask_decoder.scene_point_mask``).
      iou_threshold: pairs with IoU(mask_logits > 0, gt) <= this are not counted.
      iou_fallback: count every matched pair when none passes the threshold.
    Returns:
      (loss f32[], num_counted i32[], iou f32[K]); loss = 0 when no pair is counted.
    """
    matched = gt_for_pred >= 0
    pm = point_mask & matched[:, None]
    target = instance[None, :] == gt_for_pred[:, None]
    return mask_loss_from_sums(
        mask_pair_sums(mask_logits, target, pm),
        matched,
        iou_threshold=iou_threshold,
        iou_fallback=iou_fallback,
        eps=eps,
    )


@flax.struct.dataclass
class LossTerms:
    """One scalar per term of Eq. 8; also used for the weights and the stage gates.

    Field names match ``config.loss`` (semantic, offset, center, aggregation, mask).
    """

    semantic: Array
    offset: Array
    center: Array
    aggregation: Array
    mask: Array


def stage_gates(epoch: Array, *, heatmap_epoch: int, mask_epoch: int) -> LossTerms:
    """0/1 f32 gates for the staged schedule (docs/method.md section 8), traced so stages
    never recompile.

    ``epoch`` (0-based, i32/f32 scalar, may be traced): semantic + offset always; center and
    aggregation once ``epoch >= heatmap_epoch``; mask once ``epoch >= mask_epoch``.
    """
    one = jnp.ones((), jnp.float32)
    heat = (epoch >= heatmap_epoch).astype(jnp.float32)
    return LossTerms(
        semantic=one,
        offset=one,
        center=heat,
        aggregation=heat,
        mask=(epoch >= mask_epoch).astype(jnp.float32),
    )


def total_loss(terms: LossTerms, weights: LossTerms, gates: LossTerms) -> Array:
    """Eq. 8: ``sum_t weight_t * gate_t * term_t``; a gated-off term contributes exactly 0
    (``where``, so a non-finite inactive term cannot poison the sum)."""
    parts = jax.tree.map(lambda t, w, g: jnp.where(g > 0, w * g * t, 0.0), terms, weights, gates)
    return sum(jax.tree.leaves(parts))


def mask_gate_threshold(epoch: Array, threshold: float, gate_epoch: int) -> Array:
    """The Eq. 6 IoU threshold in force at ``epoch`` (traced): ``threshold`` from
    ``gate_epoch`` on, ``-inf`` before it (every matched pair counts, since IoU >= 0);
    ``gate_epoch = -1``: never gated.

    ``config.loss.mask_iou_gate_epoch``: a gate from the first mask epoch (the released
    code) lets only pairs that overlap by chance train the decoder, which can then learn
    their masks for every kernel (see ``configs/synthetic.py``)."""
    if gate_epoch < 0:
        return jnp.float32(-jnp.inf)
    return jnp.where(epoch >= gate_epoch, jnp.float32(threshold), -jnp.inf)
