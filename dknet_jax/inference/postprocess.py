"""Inference post-processing (paper Sec. 3.5, docs/method.md section 9): soft masks -> instances.

Sits after the dynamic-conv mask head (soft masks ``M`` f32[K, N] for K instance slots over
one scene's N points) and before evaluation / export. Jit-compiled on padded slots; for a
batch vmap over scenes. Definitions (all deterministic):

1. **Otsu threshold per instance.** Bin ``b = clip(floor(M * bins), 0, bins - 1)`` (float32
   product) over the scene's *valid points* (the instance scans the whole scene). For a
   split ``t`` in 1..bins-1 (class 0: bins < t) the between-class variance is
   ``n0 * n1 * (mu0 - mu1)^2`` (bin indices as values); ``t*`` is the first maximiser and
   ``T = t* / bins``. If every split has zero variance (one occupied bin), ``t* = bins // 2``.
   A point is *above* instance k's threshold iff ``b_k >= t*_k`` (same binning).
2. **Raw label** of a point: argmax of ``M_k`` over the instances it is above (ties: lower
   slot); background (-1) if it is above none.
3. **Coverage** ``S_c,k = #(raw label == k) / #(above k)`` (in [0, 1]; 0 when empty).
   **Refined label**: argmax of ``S_c,k * M_k`` over instances the point is above and with
   ``S_c,k > 0``; background if none.
4. **Superpoint vote** (optional): among a superpoint's valid points, the label (-1 =
   background counts as a label) held by most points wins; ties: lower label (so
   background wins a tie). Points with a superpoint id outside [0, num_superpoints) keep
   their label.
5. **Class** of instance k: the majority predicted semantic class (argmax of ``sem_prob``)
   among its final points, skipping ``ignore_classes``; ties: lower class; -1 if none.
   **Score** = mean of ``M_k`` x mean of ``sem_prob[:, class_k]``, both over the points
   above k's threshold (the paper's "intra-points"); 0 when there are none or no class.
6. **Filters**: keep = valid slot, class >= 0, final point count >= ``min_points``,
   score >= ``min_score``. Dropped instances do not hand their points to others.
7. **Removal reason** (diagnostics only; changes nothing above): every valid slot that is
   not kept gets exactly one code in ``Instances.removed_by``, the first stage of the
   pipeline that loses it, checked in this order (``n_pre`` = points whose refined label
   of step 3 is the slot, ``n`` = final points after step 4):
   ``REMOVED_OTSU`` (1): ``n_pre == 0`` (no point above its Otsu threshold survives the
   coverage refinement); ``REMOVED_SUPERPOINT`` (2): ``n_pre > 0`` and the vote emptied it
   (``n == 0``) or took it below the size filter (``n_pre >= min_points > n``); never
   without a vote (then ``n == n_pre``); ``REMOVED_CLASS`` (3): class -1 (its points are
   all predicted as ``ignore_classes``); ``REMOVED_SIZE`` (4): ``n < min_points``;
   ``REMOVED_SCORE`` (5): score < ``min_score``. Kept and invalid slots: 0.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# Instances.removed_by codes (module docstring, step 7); REMOVAL_REASONS[code - 1] names them
REMOVED_OTSU, REMOVED_SUPERPOINT, REMOVED_CLASS, REMOVED_SIZE, REMOVED_SCORE = 1, 2, 3, 4, 5
REMOVAL_REASONS = ("otsu", "superpoint", "class", "size", "score")


@flax.struct.dataclass
class Instances:
    """Post-processed instances of one scene, in K fixed slots.

    Attributes:
      masks: bool[K, N] final point masks (all False for dropped slots).
      labels: i32[K] semantic class 0..S-1 of each instance (-1: no class).
      scores: f32[K] confidence (mean mask x mean semantic score over intra-points).
      keep: bool[K] slots that survive the filters.
      point_instance: i32[N] final instance slot of every point (-1: background; points
        of dropped instances keep their slot here, use ``keep`` to filter).
      thresholds: f32[K] Otsu threshold T_k of each slot.
      coverage: f32[K] coverage score S_c,k.
      removed_by: i32[K] why a valid slot was dropped (``REMOVED_*``, step 7 of the
        module docstring); 0 for kept and invalid slots.
    """

    masks: Array
    labels: Array
    scores: Array
    keep: Array
    point_instance: Array
    thresholds: Array
    coverage: Array
    removed_by: Array


def _bin(masks, bins):
    return jnp.clip(jnp.floor(masks * jnp.float32(bins)), 0, bins - 1).astype(jnp.int32)


def _otsu_from_bins(b, valid, bins, degenerate=None):
    """b: i32[K, N] bin indices; valid: bool[N]. Returns the split t* i32[K]
    (``degenerate``, default ``bins // 2``, when no split has positive variance)."""
    k = b.shape[0]
    # One row at a time: a scatter over all K N entries needs [K, N] keys and weights
    # written out first (~190 ms at K 150, N 197k on a 2-core CPU), the loop ~30 ms.
    w = valid.astype(jnp.int32)

    def row(i, hist):
        return hist.at[i].set(jax.ops.segment_sum(w, b[i], num_segments=bins))

    hist = jax.lax.fori_loop(0, k, row, jnp.zeros((k, bins), jnp.int32))
    idx = jnp.arange(bins, dtype=jnp.int32)
    n0 = jnp.cumsum(hist, axis=1)[:, :-1]  # split t = 1..bins-1: bins < t
    s0 = jnp.cumsum(hist * idx, axis=1)[:, :-1]
    n_tot = hist.sum(1, keepdims=True)
    s_tot = (hist * idx).sum(1, keepdims=True)
    n1 = n_tot - n0
    s1 = s_tot - s0
    f = lambda a: a.astype(jnp.float32)
    both = (n0 > 0) & (n1 > 0)
    mu0 = f(s0) / jnp.maximum(f(n0), 1.0)
    mu1 = f(s1) / jnp.maximum(f(n1), 1.0)
    var = jnp.where(both, f(n0) * f(n1) * (mu0 - mu1) ** 2, 0.0)
    t = jnp.argmax(var, axis=1).astype(jnp.int32) + 1
    return jnp.where(jnp.max(var, axis=1) > 0, t, bins // 2 if degenerate is None else degenerate)


@functools.partial(jax.jit, static_argnames=("bins",))
def _otsu_jit(values, valid, *, bins):
    t = _otsu_from_bins(_bin(values, bins), valid, bins)
    return t.astype(jnp.float32) / bins


def otsu_threshold(values, valid=None, *, bins=100) -> Array:
    """Per-row Otsu threshold of values in [0, 1] (definition 1 of the module docstring).

    Args:
      values: f32[K, N] (or f32[N]) soft masks; valid: bool[N] points in the histogram
        (all when None).
    Returns:
      f32[K] (or f32[]) thresholds t*/bins; a value v is above iff floor(v*bins) >= t*.
    """
    values = jnp.asarray(values, jnp.float32)
    squeeze = values.ndim == 1
    values = values[None] if squeeze else values
    if values.ndim != 2:
        raise ValueError(f"otsu_threshold: values must be f32[K, N] or [N], got {values.shape}")
    valid = jnp.ones(values.shape[1], bool) if valid is None else jnp.asarray(valid, bool)
    if valid.shape != values.shape[1:]:
        raise ValueError(f"otsu_threshold: valid must be [N]={values.shape[1:]}, got {valid.shape}")
    if int(bins) < 2:
        raise ValueError(f"otsu_threshold: bins must be >= 2, got {bins}")
    t = _otsu_jit(values, valid, bins=int(bins))
    return t[0] if squeeze else t


def _argmax_over_slots(k: int, n: int, row):
    """Column max, argmax and any of a [K, N] array given row by row: ``row(i)`` ->
    (eligible bool[N], values f32[N]) of slot i. Returns (``values.max(0)``,
    ``argmax(values, axis=0)`` (the first maximum; a NaN counts as the maximum, as in
    ``jnp.argmax``), ``eligible.any(0)``).

    A loop over the K slots of elementwise steps over the N points: XLA:CPU reduces a
    wide [K, N] array over axis 0 at ~4 ns per element (~110 ms at K 150, N 197k), the
    loop in ~6 ms, and the [K, N] operands are never written out (docs/benchmarks.md)."""

    def step(i, carry):
        top, best, seen = carry
        e, v = row(i)
        better = (v > top) | (jnp.isnan(v) & ~jnp.isnan(top))
        return jnp.where(better, v, top), jnp.where(better, i, best), seen | e

    e0, v0 = row(0)
    init = (v0, jnp.zeros((n,), jnp.int32), jnp.broadcast_to(e0, (n,)))
    return jax.lax.fori_loop(1, k, step, init)


@functools.partial(jax.jit, static_argnames=("bins", "num_superpoints"))
def _postprocess_jit(
    masks,
    slot_ok,
    sem_prob,
    valid,
    superpoint,
    class_ok,
    min_score,
    min_points,
    *,
    bins,
    num_superpoints,
):
    k, n = masks.shape
    s = sem_prob.shape[1]
    slots = jnp.arange(k, dtype=jnp.int32)
    b = _bin(masks, bins)
    t = _otsu_from_bins(b, valid, bins)
    above = (b >= t[:, None]) & valid[None, :] & slot_ok[:, None]
    intra = above.sum(1)

    def argmax_over(eligible_row, value_row):
        def row(i):
            e = eligible_row(i)
            return e, jnp.where(e, value_row(i), -jnp.inf)

        _, best, seen = _argmax_over_slots(k, n, row)
        return jnp.where(seen, best, -1)

    def per_slot(label):
        """Points per slot of a label i32[N] (-1: none) = (label == slots[:, None]).sum(1)."""
        return jax.ops.segment_sum(
            jnp.ones((n,), jnp.int32), jnp.where(label >= 0, label, k), num_segments=k + 1
        )[:k]

    raw = argmax_over(lambda i: above[i], lambda i: masks[i])
    inter = per_slot(raw)
    coverage = inter.astype(jnp.float32) / jnp.maximum(intra, 1).astype(jnp.float32)
    label = argmax_over(lambda i: above[i] & (coverage[i] > 0), lambda i: coverage[i] * masks[i])
    # points per slot before the superpoint vote (label is -1 off valid points)
    count_pre = per_slot(label)

    if num_superpoints > 0:
        p = num_superpoints
        has_sp = valid & (superpoint >= 0) & (superpoint < p)
        key = jnp.where(has_sp, superpoint * (k + 1) + label + 1, p * (k + 1))
        votes = jax.ops.segment_sum(jnp.ones((n,), jnp.int32), key, num_segments=p * (k + 1) + 1)[
            :-1
        ].reshape(p, k + 1)
        winner = jnp.argmax(votes, axis=1).astype(jnp.int32) - 1  # first max: lower label
        label = jnp.where(has_sp, winner[jnp.clip(superpoint, 0, p - 1)], label)
    label = jnp.where(valid, label, -1)

    final = label[None, :] == slots[:, None]  # [K, N]
    count = final.sum(1)
    hi = jax.lax.Precision.HIGHEST
    sem_arg = jnp.argmax(sem_prob, axis=1)
    onehot = (sem_arg[:, None] == jnp.arange(s)[None, :]).astype(jnp.float32)
    onehot = onehot * class_ok[None, :]
    class_votes = jnp.matmul(final.astype(jnp.float32), onehot, precision=hi)  # [K, S]
    cls = jnp.where(class_votes.max(1) > 0, jnp.argmax(class_votes, axis=1), -1)
    cls = cls.astype(jnp.int32)

    above_f = above.astype(jnp.float32)
    n_intra = jnp.maximum(intra, 1).astype(jnp.float32)
    mask_mean = (above_f * masks).sum(1) / n_intra
    sem_sums = jnp.matmul(above_f, sem_prob.astype(jnp.float32), precision=hi)  # [K, S]
    sem_sum = jnp.take_along_axis(sem_sums, jnp.clip(cls, 0, s - 1)[:, None], 1)[:, 0]
    sem_mean = sem_sum / n_intra
    score = jnp.where((intra > 0) & (cls >= 0), mask_mean * sem_mean, 0.0)

    keep = slot_ok & (cls >= 0) & (count >= min_points) & (score >= min_score)
    vote_lost = (count_pre > 0) & (
        (count == 0) | ((count_pre >= min_points) & (count < min_points))
    )
    reason = jnp.select(
        [count_pre == 0, vote_lost, cls < 0, count < min_points],
        [REMOVED_OTSU, REMOVED_SUPERPOINT, REMOVED_CLASS, REMOVED_SIZE],
        REMOVED_SCORE,
    )
    removed_by = jnp.where(slot_ok & ~keep, reason, 0).astype(jnp.int32)
    return Instances(
        masks=final & keep[:, None],
        labels=cls,
        scores=score,
        keep=keep,
        point_instance=label,
        thresholds=t.astype(jnp.float32) / bins,
        coverage=coverage,
        removed_by=removed_by,
    )


def postprocess(
    masks,
    slot_ok,
    sem_prob,
    valid,
    superpoint=None,
    *,
    num_superpoints: int = 0,
    bins: int = 100,
    min_score: float = 0.1,
    min_points: int = 100,
    ignore_classes: tuple[int, ...] = (),
) -> Instances:
    """Soft instance masks of one scene -> filtered hard instances (module docstring).

    Args:
      masks: f32[K, N] soft masks M in [0, 1] (sigmoid outputs).
      slot_ok: bool[K] real instance slots.
      sem_prob: f32[N, S] semantic probabilities (softmax).
      valid: bool[N] points of this scene.
      superpoint: i32[N] superpoint id per point (0..num_superpoints-1; others are not
        voted), or None to skip the superpoint vote.
      num_superpoints: P, static capacity of superpoint ids (required with ``superpoint``).
      bins: Otsu histogram bins over [0, 1].
      min_score, min_points: filters (0.1 and 100 in the released code).
      ignore_classes: classes that cannot label an instance (ScanNet: wall 0, floor 1).
    Returns:
      `Instances` with K slots.
    """
    masks = jnp.asarray(masks, jnp.float32)
    if masks.ndim != 2:
        raise ValueError(f"postprocess: masks must be f32[K, N], got shape {masks.shape}")
    k, n = masks.shape
    slot_ok = jnp.asarray(slot_ok, bool)
    sem_prob = jnp.asarray(sem_prob, jnp.float32)
    valid = jnp.asarray(valid, bool)
    if slot_ok.shape != (k,):
        raise ValueError(f"postprocess: slot_ok must be [K]=[{k}], got {slot_ok.shape}")
    if sem_prob.ndim != 2 or sem_prob.shape[0] != n:
        raise ValueError(f"postprocess: sem_prob must be f32[N={n}, S], got {sem_prob.shape}")
    if valid.shape != (n,):
        raise ValueError(f"postprocess: valid must be [N]=[{n}], got {valid.shape}")
    if superpoint is None:
        num_superpoints = 0
        superpoint = jnp.full((n,), -1, jnp.int32)
    else:
        superpoint = jnp.asarray(superpoint, jnp.int32)
        if superpoint.shape != (n,):
            raise ValueError(
                f"postprocess: superpoint must be i32[N]=[{n}], got {superpoint.shape}"
            )
        if int(num_superpoints) < 1:
            raise ValueError(
                "postprocess: pass num_superpoints (the static capacity of superpoint ids, "
                "e.g. max id + 1 rounded up to a bucket) together with superpoint"
            )
    s = sem_prob.shape[1]
    bad = [c for c in ignore_classes if not 0 <= int(c) < s]
    if bad:
        raise ValueError(f"postprocess: ignore_classes {bad} are outside 0..{s - 1}")
    if int(bins) < 2:
        raise ValueError(f"postprocess: bins must be >= 2, got {bins}")
    class_ok = np.ones((s,), bool)
    class_ok[[int(c) for c in ignore_classes]] = False
    return _postprocess_jit(
        masks,
        slot_ok,
        sem_prob,
        valid,
        superpoint,
        jnp.asarray(class_ok),
        jnp.float32(min_score),
        jnp.int32(min_points),
        bins=int(bins),
        num_superpoints=int(num_superpoints),
    )


# --------------------------------------------------------------------------- released rules

RULES = ("ours", "released")  # config.test.postprocess


@functools.partial(jax.jit, static_argnames=("bins", "num_superpoints", "first_instance_class"))
def _released_jit(
    masks,
    slot_ok,
    sem_prob,
    valid,
    superpoint,
    min_score,
    min_points,
    *,
    bins,
    num_superpoints,
    first_instance_class,
):
    k, n = masks.shape
    s = sem_prob.shape[1]
    slots = jnp.arange(k, dtype=jnp.int32)
    masks = jnp.where(slot_ok[:, None] & valid[None, :], masks, 0.0)
    # Otsu over the scene's points; a split with no positive variance gives 0
    b = _bin(masks, bins)
    t = _otsu_from_bins(b, valid, bins, degenerate=0)
    thres = jnp.where(slot_ok, t.astype(jnp.float32) / bins, 0.0)
    sem_pred = jnp.argmax(sem_prob, axis=1).astype(jnp.int32)
    fg = valid & (sem_pred >= first_instance_class)

    def segment(thre, thres, alive):
        """seg_result: argmax over the alive slots (first on ties); -100 (here -1) where
        the best value is below the smallest non-zero alive threshold."""
        score, seg, _ = _argmax_over_slots(
            k, n, lambda i: (alive[i], jnp.where(alive[i], thre[i], -jnp.inf))
        )
        nz = alive & (thres != 0)
        low = jnp.where(nz.any(), jnp.min(jnp.where(nz, thres, jnp.inf)), 0.0)
        return jnp.where(valid & alive.any() & (score >= low), seg, -1)

    def instance_class(seg):
        """torch.mode of the predicted classes of each instance's foreground points
        (smallest class on ties); S when it has none."""
        member = (seg[None, :] == slots[:, None]) & fg[None, :]
        onehot = (sem_pred[:, None] == jnp.arange(s)[None, :]).astype(jnp.float32)
        votes = jnp.matmul(member.astype(jnp.float32), onehot, precision=jax.lax.Precision.HIGHEST)
        return jnp.where(votes.max(1) > 0, jnp.argmax(votes, axis=1), s).astype(jnp.int32)

    alive = slot_ok
    thre = jnp.where(masks >= thres[:, None], masks, 0.0)
    seg = segment(thre, thres, alive)
    cls = instance_class(seg)  # the decoding step's classes (used by the score)
    own = seg[None, :] == slots[:, None]
    # cover score: the raw masks over the instance's points, truncated to an integer (the
    # released code stores it in a long tensor), over the thresholded mask's sum
    inter = jnp.floor(jnp.sum(jnp.where(own, masks, 0.0), axis=1))
    cover = jnp.minimum(inter / (thre.sum(1) + 1e-6), 1.0)
    thre = jnp.sqrt(thre * cover[:, None])
    thres = jnp.sqrt(thres * cover)
    seg = segment(thre, thres, alive)
    n_size = (seg[None, :] == slots[:, None]).sum(1)
    alive = alive & (n_size > min_points)
    seg = segment(thre, thres, alive)
    own = (seg[None, :] == slots[:, None]).astype(jnp.float32)
    pts = own.sum(1) + 1e-6
    mask_mean = (own * thre).sum(1) / pts
    cls_prob = sem_prob[:, jnp.clip(cls, 0, s - 1)]  # [N, K]
    sem_mean = (own * cls_prob.T).sum(1) / pts
    score = jnp.sqrt(jnp.where(cls == s, 0.0, mask_mean * sem_mean))
    size_ok = alive
    alive = alive & (score > min_score)
    seg = segment(thre, thres, alive)
    count_pre = (seg[None, :] == slots[:, None]).sum(1)
    if num_superpoints > 0:  # majority vote; background (index K) loses ties
        p = num_superpoints
        has_sp = valid & (superpoint >= 0) & (superpoint < p)
        lab = jnp.where(seg >= 0, seg, k)
        key = jnp.where(has_sp, superpoint * (k + 1) + lab, p * (k + 1))
        votes = jax.ops.segment_sum(jnp.ones((n,), jnp.int32), key, num_segments=p * (k + 1) + 1)
        winner = jnp.argmax(votes[:-1].reshape(p, k + 1), axis=1).astype(jnp.int32)
        winner = jnp.where(winner == k, -1, winner)
        seg = jnp.where(has_sp, winner[jnp.clip(superpoint, 0, p - 1)], seg)
    seg = jnp.where(valid, seg, -1)
    final_cls = instance_class(seg)
    keep = alive & (final_cls < s)
    final = seg[None, :] == slots[:, None]
    count = final.sum(1)
    reason = jnp.select(
        [n_size == 0, ~size_ok, ~alive, (count_pre > 0) & (count == 0)],
        [REMOVED_OTSU, REMOVED_SIZE, REMOVED_SCORE, REMOVED_SUPERPOINT],
        REMOVED_CLASS,
    )
    return Instances(
        masks=final & keep[:, None],
        labels=jnp.where(final_cls < s, final_cls, -1),
        scores=score,
        keep=keep,
        point_instance=seg,
        thresholds=thres,
        coverage=cover,
        removed_by=jnp.where(slot_ok & ~keep, reason, 0).astype(jnp.int32),
    )


def postprocess_released(
    masks,
    slot_ok,
    sem_prob,
    valid,
    superpoint=None,
    *,
    num_superpoints: int = 0,
    bins: int = 100,
    min_score: float = 0.1,
    min_points: int = 100,
    first_instance_class: int = 2,
) -> Instances:
    """The released DKNet post-processing (R:model/DKNet.py:368-376, R:test.py:78-153;
    docs/released_model.md section 4, step 10-11) on one scene, same arguments and result
    as :func:`postprocess` (``config.test.postprocess="released"``):

    Otsu per instance (a split without positive variance gives 0); ``thre = M`` where
    ``M >= T`` else 0; ``seg`` = argmax over the alive slots, background where the best
    value is below the smallest non-zero threshold; class per instance = the most frequent
    predicted class of its foreground points (smallest on ties; none -> no class);
    cover = ``floor(sum of M over seg == k) / sum(thre_k)``, at most 1; ``thre`` and ``T``
    become ``sqrt(. x cover)``; re-segment; drop instances with ``<= min_points`` points;
    re-segment; score = ``sqrt(mean thre x mean class probability)`` over its points (0
    without a class); drop ``score <= min_score``; re-segment; superpoint majority vote
    (background loses ties); the final class as above, and instances without one are
    dropped. The released code takes the Otsu histogram over every point of the batch and
    the thresholds' minimum over every instance of the batch: at its test batch size 1
    this is the scene, as here.
    """
    masks = jnp.asarray(masks, jnp.float32)
    k, n = masks.shape
    sem_prob = jnp.asarray(sem_prob, jnp.float32)
    if superpoint is None:
        num_superpoints = 0
        superpoint = jnp.full((n,), -1, jnp.int32)
    return _released_jit(
        masks,
        jnp.asarray(slot_ok, bool),
        sem_prob,
        jnp.asarray(valid, bool),
        jnp.asarray(superpoint, jnp.int32),
        jnp.float32(min_score),
        jnp.int32(min_points),
        bins=int(bins),
        num_superpoints=int(num_superpoints),
        first_instance_class=int(first_instance_class),
    )
