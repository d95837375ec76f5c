"""Tests for dknet_jax.objective.terms against formulas written out in numpy."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dknet_jax.objective import terms as losses

RNG = np.random.default_rng(0)


def _np_log_softmax(x):
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _np_bce(z, t):
    p = 1.0 / (1.0 + np.exp(-z.astype(np.float64)))
    return -(t * np.log(p) + (1 - t) * np.log(1 - p))


def test_cross_entropy_ignores_label_and_padding():
    n, s = 30, 5
    logits = RNG.normal(size=(n, s)).astype(np.float32) * 3
    labels = RNG.integers(0, s, n).astype(np.int32)
    labels[:7] = -100
    valid = np.ones(n, bool)
    valid[-4:] = False
    got = float(losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(valid)))
    lp = _np_log_softmax(logits.astype(np.float64))
    terms = [-lp[i, labels[i]] for i in range(n) if labels[i] != -100 and valid[i]]
    np.testing.assert_allclose(got, np.mean(terms), rtol=1e-5)
    # all ignored -> 0, not NaN
    z = losses.cross_entropy(jnp.asarray(logits), jnp.full(n, -100, jnp.int32))
    assert float(z) == 0.0


def test_multiclass_dice_by_formula():
    n, s = 25, 4
    logits = RNG.normal(size=(n, s)).astype(np.float32)
    labels = RNG.integers(0, s, n).astype(np.int32)
    labels[3] = -100
    got = float(losses.multiclass_dice(jnp.asarray(logits), jnp.asarray(labels)))
    p = np.exp(_np_log_softmax(logits.astype(np.float64)))
    keep = labels != -100
    per_class = []
    for c in range(s):
        pc = p[keep, c]
        yc = (labels[keep] == c).astype(np.float64)
        per_class.append(1 - (2 * (pc * yc).sum() + 1e-5) / ((pc**2).sum() + (yc**2).sum() + 1e-5))
    np.testing.assert_allclose(got, np.mean(per_class), rtol=1e-5)
    # perfect one-hot prediction -> dice loss ~ 0
    perfect = np.eye(s)[labels.clip(0)] * 50.0
    assert float(losses.multiclass_dice(jnp.asarray(perfect), jnp.asarray(labels))) < 1e-4


def test_offset_loss_l1_and_direction():
    n = 20
    pred = RNG.normal(size=(n, 3)).astype(np.float32)
    tgt = RNG.normal(size=(n, 3)).astype(np.float32)
    mask = RNG.random(n) < 0.6
    got = float(losses.offset_loss(jnp.asarray(pred), jnp.asarray(tgt), jnp.asarray(mask)))
    ref = np.abs(pred - tgt).sum(1)[mask].mean()
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    got_d = float(
        losses.offset_loss(jnp.asarray(pred), jnp.asarray(tgt), jnp.asarray(mask), direction=True)
    )
    cos = [
        -(pred[i] @ tgt[i]) / np.linalg.norm(pred[i]) / np.linalg.norm(tgt[i])
        for i in range(n)
        if mask[i]
    ]
    np.testing.assert_allclose(got_d, ref + np.mean(cos), rtol=1e-5)
    assert float(losses.offset_loss(jnp.asarray(pred), jnp.asarray(tgt), jnp.zeros(n, bool))) == 0.0
    # a zero predicted (or target) offset must not give NaN gradients
    zero = jnp.asarray(pred).at[0].set(0.0)
    tz = jnp.asarray(tgt).at[1].set(0.0)
    g = jax.jit(jax.grad(lambda p: losses.offset_loss(p, tz, jnp.ones(n, bool), direction=True)))(
        zero
    )
    assert np.all(np.isfinite(np.asarray(g)))


def test_heatmap_loss_eq1():
    h = RNG.random(15).astype(np.float32)
    t = RNG.random(15).astype(np.float32)
    m = RNG.random(15) < 0.5
    got = float(losses.heatmap_loss(jnp.asarray(h), jnp.asarray(t), jnp.asarray(m)))
    np.testing.assert_allclose(got, np.abs(h - t)[m].sum() / m.sum(), rtol=1e-6)


def test_merge_loss_bce_over_valid_pairs():
    k = 6
    z = RNG.normal(size=(k, k)).astype(np.float32) * 4
    t = (RNG.random((k, k)) < 0.4).astype(np.float32)
    ok = np.array([1, 1, 1, 0, 1, 0], bool)
    pair = ok[:, None] & ok[None, :]
    got = float(losses.merge_loss(jnp.asarray(z), jnp.asarray(t), jnp.asarray(pair)))
    np.testing.assert_allclose(got, _np_bce(z, t)[pair].mean(), rtol=1e-5)
    # stable for huge logits
    big = float(
        losses.merge_loss(jnp.full((2, 2), 200.0), jnp.zeros((2, 2)), jnp.ones((2, 2), bool))
    )
    np.testing.assert_allclose(big, 200.0, rtol=1e-6)


def _np_mask_loss(z, inst, gt_for_pred, point_mask, thr=0.25, fallback=True):
    """Loop reference of Eq. 6; with ``fallback`` (the released code) every matched pair
    counts when none passes the IoU gate."""
    pairs = []
    for k in range(z.shape[0]):
        g = gt_for_pred[k]
        if g < 0:
            continue
        pts = point_mask[k]
        t = (inst[pts] == g).astype(np.float64)
        zk = z[k, pts].astype(np.float64)
        p = 1 / (1 + np.exp(-zk))
        hard = zk > 0
        inter = (hard & (t > 0)).sum()
        union = (hard | (t > 0)).sum()
        iou = inter / max(union, 1)
        bce = _np_bce(zk, t).mean()
        dice = 1 - 2 * (p * t).sum() / (p.sum() + t.sum() + 1e-6)
        pairs.append((iou, bce + dice))
    counted = [v for iou, v in pairs if iou > thr]
    if not counted and fallback:
        counted = [v for _, v in pairs]
    return (sum(counted) / len(counted) if counted else 0.0), len(counted)


def test_mask_loss_vs_numpy():
    k, n, g = 5, 40, 4
    inst = RNG.integers(-1, g, n).astype(np.int32)
    inst[inst < 0] = -100
    # predictions: noisy copies of GT masks so some pass IoU > 0.25 and some do not
    gt_for_pred = np.array([0, 1, -1, 3, 2], np.int32)
    z = RNG.normal(size=(k, n)).astype(np.float32)
    z[0] += np.where(inst == 0, 4.0, -4.0)
    z[1] += np.where(inst == 1, 3.0, -3.0)
    z[3] += np.where(inst == 2, 4.0, -4.0)  # matched to 3 but shaped like 2: low IoU
    point_mask = np.ones((k, n), bool)
    point_mask[:, -6:] = False
    point_mask[4, :10] = False
    loss, num, iou = jax.jit(losses.mask_loss)(
        jnp.asarray(z), jnp.asarray(inst), jnp.asarray(gt_for_pred), jnp.asarray(point_mask)
    )
    ref, ref_num = _np_mask_loss(z, inst, gt_for_pred, point_mask)
    assert int(num) == ref_num and 1 <= ref_num < 4
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
    assert float(iou[3]) <= 0.25 < float(iou[0])


def test_mask_loss_zero_without_counted_pairs_and_finite_grad():
    k, n = 3, 12
    z = jnp.full((k, n), -5.0)  # empty predictions: IoU 0 everywhere
    inst = jnp.asarray(np.arange(n) % 3, jnp.int32)
    gfp = jnp.asarray([0, 1, -1], jnp.int32)
    pm = jnp.ones((k, n), bool)
    loss_fn = jax.jit(functools.partial(losses.mask_loss, iou_fallback=False))
    loss, num, _ = loss_fn(z, inst, gfp, pm)
    assert float(loss) == 0.0 and int(num) == 0
    grad = jax.jit(jax.grad(lambda zz: loss_fn(zz, inst, gfp, pm)[0]))(z)
    assert np.all(np.isfinite(np.asarray(grad)))
    # nothing matched at all: 0 with or without the fallback
    for fallback in (False, True):
        loss2, num2, _ = jax.jit(functools.partial(losses.mask_loss, iou_fallback=fallback))(
            z, inst, jnp.full(k, -1, jnp.int32), pm
        )
        assert float(loss2) == 0.0 and int(num2) == 0


def test_mask_loss_fallback_counts_every_matched_pair_when_none_passes():
    # Untrained decoder: no matched pair reaches IoU 0.25. The gate alone gives no
    # gradient; the fallback (released code) scores every matched pair.
    k, n = 4, 30
    inst = jnp.asarray(np.arange(n) % 3, jnp.int32)
    z = jnp.asarray(RNG.normal(size=(k, n)) - 3.0, jnp.float32)  # mostly empty masks
    gfp = jnp.asarray([0, -1, 2, 1], jnp.int32)
    pm = jnp.ones((k, n), bool)
    loss, num, iou = jax.jit(losses.mask_loss)(z, inst, gfp, pm)
    assert float(jnp.max(iou)) <= 0.25
    ref, ref_num = _np_mask_loss(
        np.asarray(z), np.asarray(inst), np.asarray(gfp), np.asarray(pm), fallback=True
    )
    assert int(num) == ref_num == 3
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
    grad = jax.grad(lambda zz: losses.mask_loss(zz, inst, gfp, pm)[0])(z)
    g = np.asarray(grad)
    assert np.all(np.abs(g[[0, 2, 3]]).sum(1) > 0) and np.all(g[1] == 0)
    # once one pair passes the gate, only that pair counts again
    z2 = z.at[3].set(jnp.where(inst == 1, 4.0, -4.0))
    loss2, num2, _ = jax.jit(losses.mask_loss)(z2, inst, gfp, pm)
    ref2, ref_num2 = _np_mask_loss(
        np.asarray(z2), np.asarray(inst), np.asarray(gfp), np.asarray(pm), fallback=True
    )
    assert int(num2) == ref_num2 == 1
    np.testing.assert_allclose(float(loss2), ref2, rtol=1e-5)


def test_mask_gate_threshold_counts_every_matched_pair_before_the_gate_epoch():
    # One matched pair overlaps its GT (IoU 1), two do not: with the gate in force only
    # the overlapping pair trains (the starvation the overfit check showed); before
    # loss.mask_iou_gate_epoch every matched pair counts, whatever its IoU.
    k, n = 4, 30
    inst = jnp.asarray(np.arange(n) % 3, jnp.int32)
    z = jnp.asarray(RNG.normal(size=(k, n)) - 3.0, jnp.float32)
    z = z.at[3].set(jnp.where(inst == 1, 4.0, -4.0))
    gfp = jnp.asarray([0, -1, 2, 1], jnp.int32)
    pm = jnp.ones((k, n), bool)
    for epoch, want in ((4, 3), (5, 1), (9, 1)):
        thr = losses.mask_gate_threshold(jnp.int32(epoch), 0.25, 5)
        loss, num, _ = jax.jit(losses.mask_loss)(z, inst, gfp, pm, iou_threshold=thr)
        ref, ref_num = _np_mask_loss(
            np.asarray(z),
            np.asarray(inst),
            np.asarray(gfp),
            np.asarray(pm),
            fallback=True,
            thr=-1.0 if epoch < 5 else 0.25,
        )
        assert int(num) == ref_num == want, epoch
        np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
    never = losses.mask_gate_threshold(jnp.int32(10**6), 0.25, -1)
    assert int(jax.jit(losses.mask_loss)(z, inst, gfp, pm, iou_threshold=never)[1]) == 3


def test_mask_loss_with_fill_logits_outside_scene_has_finite_grad():
    # decode_masks puts -1e9 outside an instance's scene; loss and grad must stay finite.
    z = jnp.asarray([[3.0, 2.0, -1e9, -1e9], [-1e9, -1e9, 2.0, -3.0]])
    inst = jnp.asarray([0, 0, 1, 1], jnp.int32)
    pm = jnp.asarray([[1, 1, 0, 0], [0, 0, 1, 1]], bool)
    gfp = jnp.asarray([0, 1], jnp.int32)
    f = lambda zz: losses.mask_loss(zz, inst, gfp, pm)[0]
    val, grad = jax.jit(jax.value_and_grad(f))(z)
    ref, ref_num = _np_mask_loss(np.asarray(z), np.asarray(inst), np.asarray(gfp), np.asarray(pm))
    assert ref_num == 2
    np.testing.assert_allclose(float(val), ref, rtol=1e-5)
    assert np.all(np.isfinite(np.asarray(grad)))


def test_stage_gates_and_total():
    terms = losses.LossTerms(
        semantic=jnp.float32(1.0),
        offset=jnp.float32(2.0),
        center=jnp.float32(3.0),
        aggregation=jnp.float32(4.0),
        mask=jnp.float32(jnp.nan),
    )
    weights = losses.LossTerms(*(jnp.float32(w) for w in (1.0, 0.5, 2.0, 1.0, 1.0)))

    @jax.jit
    def total(epoch):
        return losses.total_loss(
            terms, weights, losses.stage_gates(epoch, heatmap_epoch=80, mask_epoch=96)
        )

    assert float(total(0)) == 1.0 + 1.0
    assert float(total(79)) == 2.0
    assert float(total(80)) == 2.0 + 6.0 + 4.0  # mask still off: its NaN never leaks in
    assert np.isnan(float(total(96)))  # on from 96: the (here NaN) mask term counts
    assert total._cache_size() == 1  # one compilation for every stage
