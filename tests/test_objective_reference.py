"""objective.compute_losses, every term of Eq. 8 against a plain numpy reference.

A handcrafted batch of two scenes (26 rows, two padding) and model outputs built by hand
(no network), chosen so that each term has a case that a plausible mistake would get
wrong:

- semantic: an ignored label (-100) and padding rows that must not count;
- offset: background, ignored and padding rows that must not count;
- heatmap (Eq. 1): a background point predicted foreground with heat > 0 (must not
  count: the loss is over instance points only) and an instance point predicted
  background (must not count: H is 0 there);
- aggregation (Eq. 2): two candidates on two different instances of the *same* class
  (target 0), two on one instance (target 1), one on background (target 0 with all);
- mask (Eq. 5-6): a matching where the class term of the cost changes the assignment, a
  scene with more predictions than GT and one with fewer, and matched IoUs 0.6, 1/7,
  0.8, 2/3 so that the 0.25 gate drops one pair (and a gate no pair passes exercises the
  fallback).

The numpy reference follows docs/method.md section 8 and ``losses``' docstring
formulas; the assignment is brute force over all injective maps (no scipy, no library
code). A second test decodes random kernels in numpy and runs the chunked mask path
(``DKNet(..., decode_masks=False)``) against the same reference.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dknet_jax.config import base_config
from dknet_jax.model.dknet import DKNetOutputs
from dknet_jax.model.heads import PointHeadOutputs
from dknet_jax.model.mask_decoder import num_kernel_params
from dknet_jax.objective import compute_losses, loss_weights
from dknet_jax.objective import terms as L
from dknet_jax.types import PointBatch

B, N, G, S, K = 2, 26, 6, 5, 4  # scenes, rows, GT slots, classes, candidate slots/scene
M = B * K
FIRST_INSTANCE_CLASS = 2
IGN = -100
FILL = -1e9  # mask logit outside an instance's scene (masks.MASK_FILL)

# rows: (scene, semantic, instance); rows 24-25 are padding
ROWS = (
    [(0, 2, 0)] * 4
    + [(0, 2, 1)] * 4
    + [(0, 3, 2)] * 3
    + [(0, 0, IGN), (0, 1, IGN), (0, 0, IGN)]
    + [(1, 4, 3)] * 4
    + [(1, 2, 4)] * 3
    + [(1, 0, IGN), (1, 1, IGN), (1, IGN, IGN)]
)
INSTANCE_CLASS = np.array([2, 2, 3, 4, 2, IGN], np.int32)
INSTANCE_BATCH = np.array([0, 0, 0, 1, 1, B], np.int32)
CENTERS = np.array(
    [[0.0, 0.0, 0.0], [1.0, 0.0, 0.2], [0.0, 1.5, 0.0], [4.0, 4.0, 0.0], [5.5, 3.5, 0.5]],
    np.float32,
)
# predicted class overrides (row -> class): background predicted foreground, an instance
# point predicted background, an instance point of class 3 predicted 2
SEM_OVERRIDE = {11: 2, 3: 0, 9: 2, 21: 4, 22: 1, 23: 1}
CAND_IDX = np.array([0, 2, 5, N, 14, 18, 21, N], np.int32)
CAND_OK = CAND_IDX < N
INST_OK = np.array([1, 0, 1, 0, 1, 1, 1, 0], bool)
# the same instances moved into I = 2 x 3 instance slots (``model.max_instances``, I != M):
# source candidate slot of each instance slot, -1 empty
COMPACT_SOURCE = np.array([0, 2, -1, 4, 5, 6])
# rows where each valid instance slot's mask logit is positive (elsewhere in its scene
# negative); matched IoUs: slot 0 - inst 0: 3/5, slot 2 - inst 1: 1/7, slot 4 - inst 3:
# 4/5, slot 5 - inst 4: 2/3; slot 6 is the unmatched third prediction of scene 1
MASK_ON = {
    0: [0, 1, 2, 11],
    2: [4, 8, 9, 12],
    4: [14, 15, 16, 17, 21],
    5: [18, 19],
    6: [21, 22, 23],
}


def _batch() -> PointBatch:
    rng = np.random.default_rng(0)
    n_real = len(ROWS)
    scene = np.full(N, B, np.int32)
    semantic = np.full(N, IGN, np.int32)
    instance = np.full(N, IGN, np.int32)
    for i, (b, s, g) in enumerate(ROWS):
        scene[i], semantic[i], instance[i] = b, s, g
    valid = np.arange(N) < n_real
    xyz = np.zeros((N, 3), np.float32)
    for i in range(n_real):
        g = instance[i]
        base = CENTERS[g] if g >= 0 else np.array([2.0, -1.0, 0.0]) + 4.0 * scene[i]
        xyz[i] = base + rng.normal(size=3) * 0.25
    return PointBatch(
        xyz=jnp.asarray(xyz),
        feats=jnp.zeros((N, 6)),
        vox=jnp.zeros((N, 3), jnp.int32),
        batch_id=jnp.asarray(scene),
        valid=jnp.asarray(valid),
        semantic=jnp.asarray(semantic),
        instance=jnp.asarray(instance),
        superpoint=jnp.zeros(N, jnp.int32),
        instance_class=jnp.asarray(INSTANCE_CLASS),
        instance_batch=jnp.asarray(INSTANCE_BATCH),
        instance_valid=jnp.asarray(INSTANCE_BATCH < B),
        scene_valid=jnp.ones(B, bool),
    )


def _np_centroids(batch):
    xyz, inst = np.asarray(batch.xyz, np.float64), np.asarray(batch.instance)
    return np.stack([xyz[inst == g].mean(0) for g in range(5)])


def _outputs(
    batch,
    *,
    mask_logits=None,
    kernels=None,
    mask_feats=None,
    inst_pos=None,
    seed=1,
    compact=False,
) -> DKNetOutputs:
    """Hand-built outputs: semantic logits with the overrides above, per-scene softmax
    heat over the predicted foreground, random offsets and merge logits. ``mask_logits``
    [M, N] and ``kernels`` [M, L] are given per candidate slot; ``compact`` moves the
    instances into the ``COMPACT_SOURCE`` instance slots (as ``DKNet`` does with
    ``max_instances``)."""
    rng = np.random.default_rng(seed)
    sem = np.asarray(batch.semantic)
    valid = np.asarray(batch.valid)
    scene = np.asarray(batch.batch_id)
    logits = rng.normal(size=(N, S)).astype(np.float32)
    for i in range(N):
        c = SEM_OVERRIDE.get(i, sem[i] if sem[i] >= 0 else None)
        if c is not None:
            logits[i, c] += 4.0
    fg = valid & (logits.argmax(1) >= FIRST_INSTANCE_CLASS)
    heat_logit = rng.normal(size=N)
    heat = np.zeros(N)
    for b in range(B):
        on = fg & (scene == b)
        e = np.exp(heat_logit[on])
        heat[on] = e / e.sum()
    # make the heat of a few points large enough to matter against their targets
    heat[fg] = np.clip(heat[fg] * 3.0, 0.0, 1.0)
    if inst_pos is None:
        c = _np_centroids(batch)
        toward = (c[1] - c[2]) / np.linalg.norm(c[1] - c[2])
        inst_pos = np.zeros((M, 3))
        inst_pos[0] = c[0] + [0.1, -0.05, 0.0]
        # 0.6 from inst 2 (class 3), 1.2 from inst 1 (class 2): the class term decides
        inst_pos[2] = c[2] + 0.6 * toward
        inst_pos[4] = c[3] + [0.0, 0.2, 0.1]
        inst_pos[5] = c[4] + [-0.2, 0.0, 0.0]
        inst_pos[6] = [30.0, 30.0, 0.0]
    if kernels is None:
        kernels = np.zeros((M, num_kernel_params(7, 2)), np.float32)
    if mask_feats is None:
        mask_feats = np.zeros((N, 4), np.float32)
    heads = PointHeadOutputs(
        semantic_logits=jnp.asarray(logits),
        offset=jnp.asarray(rng.normal(size=(N, 3)) * 0.4, jnp.float32),
        heat_logits=jnp.asarray(heat_logit, jnp.float32),
        reduce_feats=jnp.zeros((N, 2)),
        mask_feats=jnp.asarray(mask_feats, jnp.float32),
        foreground=jnp.asarray(fg),
    )
    cand_batch = np.repeat(np.arange(B, dtype=np.int32), K)
    pair = (
        CAND_OK[:, None]
        & CAND_OK[None, :]
        & (cand_batch[:, None] == cand_batch[None, :])
        & ~np.eye(M, dtype=bool)
    )
    merge = rng.normal(size=(M, M)) * 2.0
    # confident scores where the target matters: candidates 0, 1 (instance 0) "same",
    # 0 / 1 vs 2 (instance 1, the same class as instance 0) "different"
    merge[0, 1] = merge[1, 0] = 2.0
    merge[[0, 1, 2, 2], [2, 2, 0, 1]] = -2.5
    inst_ok, inst_batch, source = INST_OK, cand_batch, np.arange(M)
    if compact:
        inst_ok, source = COMPACT_SOURCE >= 0, np.where(COMPACT_SOURCE >= 0, COMPACT_SOURCE, M)
        inst_batch = np.repeat(np.arange(B, dtype=np.int32), len(COMPACT_SOURCE) // B)
        rows = np.where(inst_ok, COMPACT_SOURCE, 0)
        inst_pos = inst_pos[rows]
        kernels = np.where(inst_ok[:, None], kernels[rows], 0.0)
        if mask_logits is not None:
            mask_logits = np.where(inst_ok[:, None], mask_logits[rows], FILL)
    extra = {}
    if compact:
        extra = dict(
            inst_batch=jnp.asarray(inst_batch, jnp.int32),
            inst_source=jnp.asarray(source, jnp.int32),
            instance_overflow=jnp.zeros(B, bool),
        )
    return DKNetOutputs(
        heads=heads,
        heat=jnp.asarray(heat, jnp.float32),
        cand_idx=jnp.asarray(CAND_IDX),
        cand_ok=jnp.asarray(CAND_OK),
        cand_batch=jnp.asarray(cand_batch),
        merge_logits=jnp.asarray(merge, jnp.float32),
        pair_mask=jnp.asarray(pair),
        lead=jnp.asarray(np.where(INST_OK, np.arange(M), -1), jnp.int32),
        inst_ok=jnp.asarray(inst_ok),
        inst_pos=jnp.asarray(np.where(inst_ok[:, None], inst_pos, 0.0), jnp.float32),
        kernels=jnp.asarray(kernels, jnp.float32),
        mask_logits=None if mask_logits is None else jnp.asarray(mask_logits, jnp.float32),
        pool_exhausted=jnp.zeros(B, bool),
        voxel_overflow=jnp.zeros((), bool),
        **extra,
    )


def _hand_mask_logits(batch):
    rng = np.random.default_rng(2)
    scene = np.asarray(batch.batch_id)
    valid = np.asarray(batch.valid)
    cand_batch = np.repeat(np.arange(B), K)
    logits = np.full((M, N), FILL, np.float32)
    for k in np.flatnonzero(INST_OK):
        rows = np.flatnonzero(valid & (scene == cand_batch[k]))
        logits[k, rows] = -rng.uniform(0.5, 3.0, rows.size)
        logits[k, MASK_ON[k]] = rng.uniform(0.5, 3.0, len(MASK_ON[k]))
    return logits


# ---------------------------------------------------------------------------------------
# numpy reference (float64)


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _bce(z, t):
    z = np.asarray(z, np.float64)
    return np.maximum(z, 0) - z * t + np.log1p(np.exp(-np.abs(z)))


def _assign(cost):
    """Brute-force min-cost assignment of rows to columns (min(#rows, #cols) pairs);
    returns {row: col}; asserts the optimum is unique by a clear margin."""
    r, c = cost.shape
    totals = []
    if r <= c:
        for cols in itertools.permutations(range(c), r):
            totals.append((sum(cost[i, j] for i, j in enumerate(cols)), dict(enumerate(cols))))
    else:
        for rows in itertools.permutations(range(r), c):
            totals.append(
                (sum(cost[i, j] for j, i in enumerate(rows)), {i: j for j, i in enumerate(rows)})
            )
    totals.sort(key=lambda t: t[0])
    if len(totals) > 1:
        assert totals[1][0] > totals[0][0] + 1e-3, "ambiguous assignment in the test data"
    return totals[0][1]


def reference(batch, out, mask_logits, *, iou_threshold=0.25, fallback=True, direction=False):
    xyz = np.asarray(batch.xyz, np.float64)
    valid = np.asarray(batch.valid)
    scene = np.asarray(batch.batch_id)
    sem = np.asarray(batch.semantic)
    inst = np.asarray(batch.instance)
    logits = np.asarray(out.heads.semantic_logits, np.float64)
    r = {}

    # semantic: CE over labelled valid rows + V-Net dice averaged over the S classes
    lab = valid & (sem != IGN)
    logp = _log_softmax(logits)
    ce = np.mean([-logp[i, sem[i]] for i in np.flatnonzero(lab)])
    p = np.exp(logp)[lab]
    y = np.eye(S)[sem[lab]]
    dice = np.mean(
        [
            1
            - (2 * (p[:, c] * y[:, c]).sum() + 1e-5)
            / ((p[:, c] ** 2).sum() + (y[:, c] ** 2).sum() + 1e-5)
            for c in range(S)
        ]
    )
    r["semantic"] = ce + dice

    # instance statistics (valid instance points only)
    on = valid & (inst >= 0)
    gts = sorted(set(inst[on].tolist()))
    cent = {g: xyz[inst == g].mean(0) for g in gts}
    radius = {g: (xyz[inst == g].max(0) - xyz[inst == g].min(0)).max() for g in gts}

    # offset: mean over instance points of the L1 norm (+ optional -cos direction term)
    off = np.asarray(out.heads.offset, np.float64)
    terms, cos = [], []
    for i in np.flatnonzero(on):
        target = cent[inst[i]] - xyz[i]
        terms.append(np.abs(off[i] - target).sum())
        cos.append(-off[i] @ target / (np.linalg.norm(off[i]) * np.linalg.norm(target)))
    r["offset"] = np.mean(terms) + (np.mean(cos) if direction else 0.0)

    # heatmap: |H - exp(-25 d^2 / (r + 1e-4)^2)| over instance points predicted foreground
    fg = valid & (logits.argmax(1) >= FIRST_INSTANCE_CLASS)
    heat = np.asarray(out.heat, np.float64)
    terms = []
    for i in np.flatnonzero(on & fg):
        d2 = ((xyz[i] - cent[inst[i]]) ** 2).sum()
        terms.append(abs(heat[i] - np.exp(-25.0 * d2 / (radius[inst[i]] + 1e-4) ** 2)))
    r["center"] = np.mean(terms)

    # aggregation: BCE over valid pairs of one scene, target "same GT instance"
    cand_batch = np.repeat(np.arange(B), K)
    merge = np.asarray(out.merge_logits, np.float64)
    terms = []
    for i, j in itertools.product(range(M), range(M)):
        if i == j or not (CAND_OK[i] and CAND_OK[j]) or cand_batch[i] != cand_batch[j]:
            continue
        gi, gj = inst[CAND_IDX[i]], inst[CAND_IDX[j]]
        terms.append(_bce(merge[i, j], float(gi >= 0 and gi == gj)))
    r["aggregation"] = np.mean(terms)

    # mask: majority predicted class inside each predicted mask, per-scene assignment on
    # ||C_pred - C_gt|| + 1[class differs], BCE + dice over the scene's points, IoU gate
    sem_pred = logits.argmax(1)
    pos = np.asarray(out.inst_pos, np.float64)
    inst_ok = np.asarray(out.inst_ok)
    inst_batch = cand_batch if out.inst_batch is None else np.asarray(out.inst_batch)
    mask_logits = np.asarray(mask_logits)
    assert mask_logits.shape == (len(inst_ok), N)
    pairs = []
    for b in range(B):
        preds = [k for k in range(len(inst_ok)) if inst_ok[k] and inst_batch[k] == b]
        gs = [g for g in gts if INSTANCE_BATCH[g] == b]
        pts = valid & (scene == b)
        cls = {}
        for k in preds:
            counts = np.bincount(sem_pred[pts & (mask_logits[k] > 0)], minlength=S)
            cls[k] = int(np.argmax(counts)) if counts.sum() else -1
        cost = np.array(
            [
                [np.linalg.norm(pos[k] - cent[g]) + float(cls[k] != INSTANCE_CLASS[g]) for g in gs]
                for k in preds
            ]
        )
        for ki, gi in _assign(cost).items():
            pairs.append((preds[ki], gs[gi], pts))
    ious, values = [], []
    for k, g, pts in pairs:
        z = np.asarray(mask_logits[k], np.float64)[pts]
        t = (inst[pts] == g).astype(np.float64)
        prob = 1 / (1 + np.exp(-z))
        hard = z > 0
        ious.append((hard & (t > 0)).sum() / max((hard | (t > 0)).sum(), 1))
        values.append(_bce(z, t).mean() + 1 - 2 * (prob * t).sum() / (prob.sum() + t.sum() + 1e-6))
    ious, values = np.array(ious), np.array(values)
    counted = ious > iou_threshold
    if fallback and not counted.any():
        counted[:] = True
    r["mask"] = values[counted].mean() if counted.any() else 0.0
    r["matched"] = float(counted.sum())
    r["ious"] = np.sort(ious)
    r["pairs"] = sorted((k, g) for k, g, _ in pairs)
    r["instances"] = float(inst_ok.sum())
    r["loss"] = sum(r[t] for t in ("semantic", "offset", "center", "aggregation", "mask"))
    return r


# ---------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _jitted(threshold: float, fallback: bool, direction: bool, chunk: int):
    weights = loss_weights(base_config().loss)

    @jax.jit
    def run(out, batch, epoch):
        gates = L.stage_gates(epoch, heatmap_epoch=1, mask_epoch=2)
        return compute_losses(
            out,
            batch,
            weights=weights,
            gates=gates,
            num_classes=S,
            offset_direction=direction,
            mask_iou_threshold=threshold,
            mask_iou_fallback=fallback,
            mask_chunk=chunk,
        )

    return run


TERMS = ("semantic", "offset", "center", "aggregation", "mask")


def _check(metrics, ref, rtol=1e-5, names=TERMS + ("loss",)):
    for name in names:
        np.testing.assert_allclose(
            float(metrics[name]), ref[name], rtol=rtol, atol=1e-6, err_msg=name
        )
    assert float(metrics["matched"]) == ref["matched"]


def test_handcrafted_case_is_what_the_docstring_says():
    """Guards the test data: the cases each term needs are really there."""
    batch = _batch()
    out = _outputs(batch, mask_logits=_hand_mask_logits(batch))
    ref = reference(batch, out, _hand_mask_logits(batch))
    np.testing.assert_allclose(ref["ious"], np.sort([3 / 5, 1 / 7, 4 / 5, 2 / 3]))
    # slot 2 goes to instance 1 (same class, farther) rather than instance 2 (nearer)
    assert ref["pairs"] == [(0, 0), (2, 1), (4, 3), (5, 4)]
    fg = np.asarray(out.heads.foreground)
    heat = np.asarray(out.heat)
    assert fg[11] and heat[11] > 0.05  # background predicted foreground, heat > 0
    assert fg[21] and heat[21] > 0.05
    assert not fg[3]  # an instance point predicted background


@pytest.mark.parametrize(
    "threshold,fallback,direction,compact",
    [
        (0.25, True, False, False),  # the gate drops the 1/7 pair
        (0.25, True, True, False),  # + the offset direction term
        (0.9, True, False, False),  # no pair passes: every matched pair counts (fallback)
        (0.9, False, False, False),  # no pair passes, no fallback: mask loss 0
        (0.25, True, False, True),  # instance slots apart from candidate slots
    ],
)
def test_compute_losses_equals_numpy_reference(threshold, fallback, direction, compact):
    batch = _batch()
    out = _outputs(batch, mask_logits=_hand_mask_logits(batch), compact=compact)
    total, metrics = _jitted(threshold, fallback, direction, 8)(out, batch, jnp.int32(5))
    ref = reference(
        batch,
        out,
        out.mask_logits,
        iou_threshold=threshold,
        fallback=fallback,
        direction=direction,
    )
    _check(metrics, ref)
    np.testing.assert_allclose(float(total), ref["loss"], rtol=1e-5)
    assert float(metrics["candidates"]) == CAND_OK.sum()
    assert float(metrics["instances"]) == ref["instances"] == INST_OK.sum()
    assert float(metrics["gt_instances"]) == 5
    expected_matched = {(0.25, True): 3, (0.9, True): 4, (0.9, False): 0}[threshold, fallback]
    assert ref["matched"] == expected_matched


def test_stage_gates_leave_semantic_and_offset_only():
    batch = _batch()
    logits = _hand_mask_logits(batch)
    out = _outputs(batch, mask_logits=logits)
    total, metrics = _jitted(0.25, True, False, 8)(out, batch, jnp.int32(0))
    ref = reference(batch, out, logits)
    _check(metrics, ref, names=TERMS)  # terms are reported whether gated or not
    np.testing.assert_allclose(float(total), ref["semantic"] + ref["offset"], rtol=1e-5)
    np.testing.assert_allclose(float(metrics["loss"]), float(total))
    total, _ = _jitted(0.25, True, False, 8)(out, batch, jnp.int32(1))
    np.testing.assert_allclose(float(total), ref["loss"] - ref["mask"], rtol=1e-5)


def _np_decode(out, mask_feats, xyz, scene, valid, hidden):
    """numpy decoder from the layout in ``masks``' docstring:
    m[k, i] = W2 . relu(W1^T [F_m,i, C_k - x_i] + b1) + b2, FILL outside k's scene."""
    kernels = np.asarray(out.kernels, np.float64)
    pos = np.asarray(out.inst_pos, np.float64)
    inst_ok = np.asarray(out.inst_ok)
    inst_batch = np.asarray(out.instance_batch)
    cm = mask_feats.shape[1]
    ci = cm + 3
    logits = np.full((len(inst_ok), N), FILL)
    for k in np.flatnonzero(inst_ok):
        kk = kernels[k].astype(np.float64)
        w1 = kk[: ci * hidden].reshape(ci, hidden)
        b1 = kk[ci * hidden : ci * hidden + hidden]
        w2 = kk[ci * hidden + hidden : ci * hidden + 2 * hidden]
        b2 = kk[ci * hidden + 2 * hidden]
        for i in np.flatnonzero(valid & (scene == inst_batch[k])):
            x = np.concatenate([mask_feats[i], pos[k] - xyz[i]])
            logits[k, i] = w2 @ np.maximum(x @ w1 + b1, 0.0) + b2
    return logits


@pytest.mark.parametrize("compact", [False, True])
def test_chunked_mask_path_equals_numpy_reference(compact):
    """Outputs without mask logits (the training default): the objective decodes the
    kernels itself, chunk by chunk; a numpy decoder + the same reference agree."""
    batch = _batch()
    rng = np.random.default_rng(5)
    cm, hidden = 4, 3
    mask_feats = rng.normal(size=(N, cm)).astype(np.float32)
    kernels = (rng.normal(size=(M, num_kernel_params(cm + 3, hidden))) * 0.8).astype(np.float32)
    out = _outputs(batch, kernels=kernels, mask_feats=mask_feats, compact=compact)
    logits = _np_decode(
        out,
        mask_feats,
        np.asarray(batch.xyz, np.float64),
        np.asarray(batch.batch_id),
        np.asarray(batch.valid),
        hidden,
    )
    live = logits[logits > FILL / 2]
    assert np.abs(live).min() > 1e-3  # no logit so close to 0 that f32 could flip its sign
    ref = reference(batch, out, logits)
    assert len(ref["pairs"]) == 4 and ref["matched"] >= 1
    _, metrics = _jitted(0.25, True, False, 7)(out, batch, jnp.int32(5))
    _check(metrics, ref, rtol=2e-5)
