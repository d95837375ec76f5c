"""Per-stage diagnostics of an evaluation: which stage of DKNet loses an instance.

Data flow: inside the jitted predict function (``predictor.make_predict_fn``) the GT
``PointBatch``, the model outputs (``DKNetOutputs``) and the post-processing result ->
:func:`stage_counts` -> a flat dict of per-batch **sums** (device scalars) -> host:
:class:`StageDiagnostics` ``.add`` over batches -> ``.summary()`` (ratios, JSON-ready; in
``results.json["diagnostics"]`` and the ``"diagnostics"`` entry of the periodic-eval record
in ``metrics.jsonl``) -> :func:`format_summary` (the printed lines).

Definitions (sums over every batch of the split; a ratio is NaN (JSON null) when its
denominator is 0). "Big GT instance": a real GT slot whose class is an instance class
(``>= first_instance_class``) and that has ``>= min_gt_points`` valid points (100, the
ScanNet benchmark's minimum region size).

- semantic: ``sem_points`` valid points with a label (semantic != -100), ``sem_correct``
  those whose argmax class equals it -> ``semantic_acc``; ``semantic_miou`` comes from the
  ``SemanticEvaluator`` (confusion matrix over the same points).
- offsets (valid points of a GT instance): ``offset_error_sum`` = sum of the Euclidean
  distance between the shifted point ``xyz + offset`` and its GT instance centroid (mean of
  the instance's valid points), ``offset_zero_sum`` the same with a zero offset;
  ``offset_points`` -> ``offset_error_m``, ``offset_error_zero_m`` (mean metres) and
  ``offset_error_ratio`` = error / zero-offset error (< 1: the offsets help).
- candidates (filled candidate slots; a candidate "lies on" the GT instance of its point):
  ``gt_big``, ``gt_big_with_candidate`` (big GT instances with >= 1 candidate on them) ->
  ``candidate_recall``; ``cand_on_big`` (candidates on big GT instances) ->
  ``candidates_per_gt`` = cand_on_big / gt_big; ``cand_total``, ``cand_on_none``
  (candidates on no GT instance: background, stuff, unlabelled) -> ``candidates_off_instance``
  = cand_on_none / cand_total.
- merging, over unordered pairs of distinct filled candidate slots of one scene: predicted
  positive = same group lead (``lead``), GT positive = both points in the same GT instance;
  ``merge_tp``, ``merge_pred_pos``, ``merge_gt_pos`` -> ``merge_precision`` = tp / pred_pos,
  ``merge_recall`` = tp / gt_pos.
- masks before post-processing: a slot's mask = ``sigmoid(mask_logits) > 0.5`` on the valid
  points of its scene, for instance slots (``inst_ok``) only; per big GT instance the best
  IoU over those masks (0 if none overlaps): ``mask_iou_sum``, ``mask_iou50`` / ``mask_iou25``
  (best IoU >= 0.5 / >= 0.25) -> ``mask_best_iou`` (mean), ``mask_recall_50``,
  ``mask_recall_25``.
- masks after post-processing: the same with the kept final masks: ``final_iou_sum``,
  ``final_iou50`` -> ``final_best_iou``, ``final_recall_50``.
- post-processing filters (``postprocess.Instances.removed_by``, each removed slot counted
  once, by the first stage that loses it, in pipeline order): ``post_slots`` (instance
  slots in), ``post_removed_otsu`` (no point left after the Otsu threshold + coverage
  refinement), ``post_removed_superpoint`` (the superpoint vote emptied it or took it below
  ``min_points``), ``post_removed_class`` (no instance class), ``post_removed_size``
  (< ``min_points``), ``post_removed_score`` (< ``min_score``), ``post_kept``;
  slots = kept + the five removals.
- ``scenes`` (real scenes), ``pool_exhausted`` (scenes whose LN-NMS pool ran out, so the
  exact whole-scene loop ran), ``instance_overflow`` (scenes with more groups than
  instance slots, ``model.max_instances``: the lowest-heat groups were dropped).

The funnel at a glance: gt_big -> gt_big_with_candidate -> mask_iou50 (before
post-processing) -> final_iou50 (after); merge precision/recall tell whether a mask loss
comes from grouping.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from dknet_jax.inference.postprocess import REMOVAL_REASONS
from dknet_jax.objective.targets import compute_targets

Array = jax.Array

MIN_GT_POINTS = 100  # ScanNet benchmark: smaller GT regions are not evaluated

COUNT_KEYS = (
    "scenes", "pool_exhausted", "instance_overflow",
    "sem_points", "sem_correct",
    "offset_points", "offset_error_sum", "offset_zero_sum",
    "gt_big", "gt_big_with_candidate", "cand_total", "cand_on_big", "cand_on_none",
    "merge_tp", "merge_pred_pos", "merge_gt_pos",
    "mask_iou_sum", "mask_iou50", "mask_iou25",
    "final_iou_sum", "final_iou50",
    "post_slots", *(f"post_removed_{r}" for r in REMOVAL_REASONS), "post_kept",
)  # fmt: skip


def _best_iou(pred: Array, inst_slot: Array, gt_count: Array) -> Array:
    """f32[G]: for each GT slot the best IoU over the rows of ``pred`` bool[M, N].

    ``inst_slot`` i32[N]: GT slot of each point (G = none); ``gt_count`` i32[G] points per
    GT slot (the points ``pred`` can cover). 0/1 products in bf16 with f32 accumulation are
    exact (counts < 2^24)."""
    g = gt_count.shape[0]
    onehot = inst_slot[:, None] == jnp.arange(g, dtype=inst_slot.dtype)[None, :]
    inter = jnp.matmul(
        pred.astype(jnp.bfloat16), onehot.astype(jnp.bfloat16), preferred_element_type=jnp.float32
    )  # [M, G]
    size = pred.sum(1).astype(jnp.float32)
    union = size[:, None] + gt_count.astype(jnp.float32)[None, :] - inter
    iou = jnp.where(union > 0, inter / jnp.maximum(union, 1.0), 0.0)
    return jnp.max(iou, axis=0, initial=0.0)


def stage_counts(
    batch, out, post: dict, *, first_instance_class: int, min_gt_points: int = MIN_GT_POINTS
) -> dict[str, Array]:
    """Per-stage sums for one packed batch (jit-able; module docstring for definitions).

    Args:
      batch: the GT ``PointBatch`` (N points, G GT slots, B scenes).
      out: ``DKNetOutputs`` (or anything with its fields ``heads.semantic_logits``,
        ``heads.offset``, ``cand_idx``, ``cand_ok``, ``cand_batch``, ``lead``, ``inst_ok``,
        ``mask_logits`` (decoded), ``pool_exhausted``), M = B*K slots.
      post: ``predictor.postprocess_batch`` output: ``masks`` bool[B, K, N], ``keep``
        bool[B, K], ``removed_by`` i32[B, K].
      first_instance_class: classes below it are stuff (not counted as GT instances).
      min_gt_points: GT instances with fewer valid points are left out of the instance
        diagnostics.
    Returns:
      dict ``COUNT_KEYS`` -> i32[] counts / f32[] sums.
    """
    n = batch.valid.shape[0]
    g = batch.instance_class.shape[0]
    valid = batch.valid
    i32 = lambda x: jnp.sum(x, dtype=jnp.int32)
    f32 = lambda x: jnp.sum(x, dtype=jnp.float32)
    c = {
        "scenes": i32(batch.scene_valid),
        "pool_exhausted": i32(out.pool_exhausted),
        "instance_overflow": jnp.int32(0)
        if out.instance_overflow is None
        else i32(out.instance_overflow),
    }

    # semantic
    labelled = valid & (batch.semantic >= 0)
    sem_pred = jnp.argmax(out.heads.semantic_logits, axis=-1).astype(jnp.int32)
    c["sem_points"] = i32(labelled)
    c["sem_correct"] = i32(labelled & (sem_pred == batch.semantic))

    # offsets: targets.offset = centroid - xyz, so |xyz + offset - centroid| = |offset - t|
    tg = compute_targets(batch)
    on = tg.on_instance
    err = jnp.sqrt(jnp.sum((out.heads.offset - tg.offset) ** 2, axis=-1))
    zero = jnp.sqrt(jnp.sum(tg.offset**2, axis=-1))
    c["offset_points"] = i32(on)
    c["offset_error_sum"] = f32(jnp.where(on, err, 0.0))
    c["offset_zero_sum"] = f32(jnp.where(on, zero, 0.0))

    # GT instances and the GT slot of each point (g: none)
    big = (
        batch.instance_valid
        & (tg.count >= min_gt_points)
        & (batch.instance_class >= first_instance_class)
    )
    inst_slot = jnp.where(on, batch.instance, g).astype(jnp.int32)
    c["gt_big"] = i32(big)

    # candidates
    cand_ok = out.cand_ok
    cand_inst = jnp.where(cand_ok, inst_slot[jnp.clip(out.cand_idx, 0, n - 1)], g)
    per_gt = jax.ops.segment_sum(cand_ok.astype(jnp.int32), cand_inst, num_segments=g + 1)[:g]
    c["gt_big_with_candidate"] = i32(big & (per_gt > 0))
    c["cand_total"] = i32(cand_ok)
    c["cand_on_big"] = i32(jnp.where(big, per_gt, 0))
    c["cand_on_none"] = i32(cand_ok & (cand_inst == g))

    # merging: unordered pairs of distinct filled slots of one scene
    m = cand_ok.shape[0]
    pair = (
        cand_ok[:, None]
        & cand_ok[None, :]
        & (out.cand_batch[:, None] == out.cand_batch[None, :])
        & (jnp.arange(m)[:, None] < jnp.arange(m)[None, :])
    )
    pred_pos = pair & (out.lead[:, None] == out.lead[None, :]) & (out.lead >= 0)[:, None]
    gt_pos = pair & (cand_inst[:, None] == cand_inst[None, :]) & (cand_inst < g)[:, None]
    c["merge_tp"] = i32(pred_pos & gt_pos)
    c["merge_pred_pos"] = i32(pred_pos)
    c["merge_gt_pos"] = i32(gt_pos)

    # masks before post-processing (instance slots, valid points of the slot's scene)
    in_scene = valid[None, :] & (batch.batch_id[None, :] == out.instance_batch[:, None])
    raw = (jax.nn.sigmoid(out.mask_logits) > 0.5) & in_scene & out.inst_ok[:, None]
    best = jnp.where(big, _best_iou(raw, inst_slot, tg.count), 0.0)
    c["mask_iou_sum"] = f32(best)
    c["mask_iou50"] = i32(big & (best >= 0.5))
    c["mask_iou25"] = i32(big & (best >= 0.25))

    # masks after post-processing (kept slots only)
    final = post["masks"].reshape(-1, n) & post["keep"].reshape(-1)[:, None] & valid[None, :]
    best = jnp.where(big, _best_iou(final, inst_slot, tg.count), 0.0)
    c["final_iou_sum"] = f32(best)
    c["final_iou50"] = i32(big & (best >= 0.5))

    # post-processing filters
    removed = post["removed_by"].reshape(-1)
    c["post_slots"] = i32(out.inst_ok)
    for code, reason in enumerate(REMOVAL_REASONS, start=1):
        c[f"post_removed_{reason}"] = i32(removed == code)
    c["post_kept"] = i32(post["keep"])
    return c


def _ratio(a, b) -> float:
    return float(a) / float(b) if b else math.nan


class StageDiagnostics:
    """Host accumulator of :func:`stage_counts` over the batches of a split."""

    def __init__(self, min_gt_points: int = MIN_GT_POINTS):
        self.min_gt_points = int(min_gt_points)
        self.counts: dict[str, float | int] = dict.fromkeys(COUNT_KEYS, 0)

    def add(self, counts: dict) -> None:
        """Adds one batch's counts (device or numpy scalars)."""
        counts = jax.device_get(counts)
        for k in COUNT_KEYS:
            v = np.asarray(counts[k])
            self.counts[k] += int(v) if np.issubdtype(v.dtype, np.integer) else float(v)

    def summary(self, miou: float | None = None) -> dict:
        """Ratios with their names (module docstring), the post-processing counts and the raw
        ``counts``; ``miou`` (from the ``SemanticEvaluator``) is copied in as
        ``semantic_miou``. NaN where undefined (``io_atomic.clean_json`` -> null)."""
        c = self.counts
        s = {
            "scenes": c["scenes"],
            "pool_exhausted_scenes": c["pool_exhausted"],
            "instance_overflow_scenes": c["instance_overflow"],
            "min_gt_points": self.min_gt_points,
            "semantic_acc": _ratio(c["sem_correct"], c["sem_points"]),
            "semantic_miou": math.nan if miou is None else float(miou),
            "offset_error_m": _ratio(c["offset_error_sum"], c["offset_points"]),
            "offset_error_zero_m": _ratio(c["offset_zero_sum"], c["offset_points"]),
            "offset_error_ratio": _ratio(c["offset_error_sum"], c["offset_zero_sum"]),
            "gt_instances": c["gt_big"],
            "candidate_recall": _ratio(c["gt_big_with_candidate"], c["gt_big"]),
            "candidates_per_gt": _ratio(c["cand_on_big"], c["gt_big"]),
            "candidates_total": c["cand_total"],
            "candidates_off_instance": _ratio(c["cand_on_none"], c["cand_total"]),
            "merge_precision": _ratio(c["merge_tp"], c["merge_pred_pos"]),
            "merge_recall": _ratio(c["merge_tp"], c["merge_gt_pos"]),
            "mask_best_iou": _ratio(c["mask_iou_sum"], c["gt_big"]),
            "mask_recall_50": _ratio(c["mask_iou50"], c["gt_big"]),
            "mask_recall_25": _ratio(c["mask_iou25"], c["gt_big"]),
            "final_best_iou": _ratio(c["final_iou_sum"], c["gt_big"]),
            "final_recall_50": _ratio(c["final_iou50"], c["gt_big"]),
            "post_slots": c["post_slots"],
            **{f"post_removed_{r}": c[f"post_removed_{r}"] for r in REMOVAL_REASONS},
            "post_kept": c["post_kept"],
            "counts": dict(c),
        }
        return s

    def format_summary(self, miou: float | None = None) -> str:
        return format_summary(self.summary(miou))


def _f(x, spec: str = ".2f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _pct(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.0f}%"


def format_summary(s: dict) -> str:
    """A :meth:`StageDiagnostics.summary` dict (also after ``clean_json``: None for NaN) ->
    five lines, one per stage group, readable at a glance."""
    c = s.get("counts", {})
    lines = [
        f"semantic acc {_f(s['semantic_acc'])} mIoU {_f(s['semantic_miou'])} | offsets "
        f"{_f(s['offset_error_m'], '.3f')} m (zero {_f(s['offset_error_zero_m'], '.3f')} m, "
        f"ratio {_f(s['offset_error_ratio'])}) | pool exhausted in "
        f"{s['pool_exhausted_scenes']}/{s['scenes']} scenes, instance slots overflowed in "
        f"{s.get('instance_overflow_scenes', 0)}",
        f"candidates: recall {_f(s['candidate_recall'])}, {_f(s['candidates_per_gt'], '.1f')} "
        f"per GT, {_pct(s['candidates_off_instance'])} of {s['candidates_total']} on no "
        f"instance | merge P {_f(s['merge_precision'])} R {_f(s['merge_recall'])}",
        f"masks: best IoU {_f(s['mask_best_iou'])}, {_pct(s['mask_recall_50'])} >= 0.5, "
        f"{_pct(s['mask_recall_25'])} >= 0.25 | after post: best IoU "
        f"{_f(s['final_best_iou'])}, {_pct(s['final_recall_50'])} >= 0.5",
        f"post: {s['post_slots']} in, "
        + ", ".join(f"-{s[f'post_removed_{r}']} {r}" for r in REMOVAL_REASONS)
        + f", {s['post_kept']} kept",
        f"GT instances >= {s['min_gt_points']} pts: {s['gt_instances']} -> with a candidate "
        f"{c.get('gt_big_with_candidate', 'n/a')} -> mask IoU >= 0.5 "
        f"{c.get('mask_iou50', 'n/a')} -> kept mask IoU >= 0.5 {c.get('final_iou50', 'n/a')}",
    ]
    return "\n".join(lines)
