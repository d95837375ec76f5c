"""Post-processing vs hand-worked cases and a plain loop implementation of docs/method.md
section 9."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dknet_jax.inference import postprocess as pp


def otsu_reference(values, bins=100):
    """Textbook Otsu on a bins-bin histogram over [0, 1] (bin centres, class weights);
    returns (split t, threshold t / bins); first maximiser; bins // 2 if degenerate."""
    hist = [0] * bins
    for v in values:
        b = int(np.floor(np.float32(v) * np.float32(bins)))
        hist[min(max(b, 0), bins - 1)] += 1
    total = sum(hist)
    best_t, best_var = bins // 2, 0.0
    for t in range(1, bins):
        n0, n1 = sum(hist[:t]), sum(hist[t:])
        if n0 == 0 or n1 == 0:
            continue
        mu0 = sum(h * (b + 0.5) / bins for b, h in enumerate(hist[:t])) / n0
        mu1 = sum(h * (b + 0.5) / bins for b, h in enumerate(hist[t:], start=t)) / n1
        var = (n0 / total) * (n1 / total) * (mu0 - mu1) ** 2
        if var > best_var * (1 + 1e-9):
            best_t, best_var = t, var
    return best_t, best_t / bins


def postprocess_reference(
    masks, slot_ok, sem_prob, valid, sp, num_sp, min_score, min_points, ignore, bins=100
):
    k, n = masks.shape
    s = sem_prob.shape[1]
    bin_of = lambda v: min(max(int(np.floor(np.float32(v) * np.float32(bins))), 0), bins - 1)
    t = [otsu_reference(masks[j][valid], bins)[0] for j in range(k)]
    above = np.zeros((k, n), bool)
    for j in range(k):
        for i in range(n):
            above[j, i] = slot_ok[j] and valid[i] and bin_of(masks[j, i]) >= t[j]

    def pick(i, weight):
        best = -1
        for j in range(k):
            if above[j, i] and weight[j] > 0:
                if best < 0 or weight[j] * masks[j, i] > weight[best] * masks[best, i]:
                    best = j
        return best

    raw = [pick(i, np.ones(k)) for i in range(n)]
    cov = np.array([sum(r == j for r in raw) / max(above[j].sum(), 1) for j in range(k)])
    label = np.array([pick(i, cov) for i in range(n)])
    if sp is not None:
        new = label.copy()
        for p in range(num_sp):
            pts = [i for i in range(n) if valid[i] and sp[i] == p]
            if pts:
                votes = {}
                for i in pts:
                    votes[label[i]] = votes.get(label[i], 0) + 1
                top = max(votes.values())
                winner = min(lab for lab, c in votes.items() if c == top)
                for i in pts:
                    new[i] = winner
        label = new
    label[~valid] = -1
    sem_arg = sem_prob.argmax(1)
    out = {"labels": [], "scores": [], "keep": [], "masks": []}
    for j in range(k):
        pts = np.nonzero(label == j)[0]
        counts = np.zeros(s)
        for i in pts:
            if sem_arg[i] not in ignore:
                counts[sem_arg[i]] += 1
        cls = int(np.argmax(counts)) if counts.max() > 0 else -1
        intra = np.nonzero(above[j])[0]
        if len(intra) and cls >= 0:
            score = masks[j, intra].mean() * sem_prob[intra, cls].mean()
        else:
            score = 0.0
        keep = bool(slot_ok[j] and cls >= 0 and len(pts) >= min_points and score >= min_score)
        out["labels"].append(cls)
        out["scores"].append(score)
        out["keep"].append(keep)
        out["masks"].append((label == j) & keep)
    out["point_instance"] = label
    out["t"] = np.array(t) / bins
    out["coverage"] = cov
    return out


def test_otsu_hand_worked():
    # 3 points in bin 5, 3 in bin 45, 6 in bin 95. Split below 45: n0=3, n1=9,
    # mu0=5, mu1=78.33 -> 3*9*73.33^2 = 145200; split below 95: n0=n1=6, mu0=25,
    # mu1=95 -> 6*6*70^2 = 176400 (larger): first split with that is t=46 -> T=0.46.
    v = np.array([0.055] * 3 + [0.455] * 3 + [0.955] * 6, np.float32)
    assert float(pp.otsu_threshold(v)) == pytest.approx(0.46)
    assert otsu_reference(v) == (46, 0.46)
    # Bimodal with a gap (bins 10 and 90): every split in 11..90 ties; the first wins.
    v = np.array([0.105] * 7 + [0.905] * 5, np.float32)
    assert float(pp.otsu_threshold(v)) == pytest.approx(0.11)
    # One occupied bin: no split separates anything -> the fallback 0.5.
    assert float(pp.otsu_threshold(np.full(9, 0.3, np.float32))) == pytest.approx(0.5)
    # Rows are independent; invalid points stay out of the histogram.
    rows = np.array([[0.055, 0.055, 0.955, 0.555], [0.205, 0.805, 0.805, 0.995]], np.float32)
    got = np.asarray(pp.otsu_threshold(rows, np.array([1, 1, 1, 0], bool)))
    np.testing.assert_allclose(got, [0.06, 0.21])


def test_otsu_random_vs_reference():
    rng = np.random.default_rng(1)
    vals = np.concatenate([rng.beta(2, 8, (20, 150)), rng.beta(8, 2, (20, 50))], 1)
    vals = vals.astype(np.float32)
    got = np.asarray(pp.otsu_threshold(vals))
    want = [otsu_reference(row)[1] for row in vals]
    np.testing.assert_allclose(got, want, atol=1e-7)


def _hand_scene():
    ma = [0.905] * 5 + [0.805] * 5 + [0.055] * 2
    mb = [0.055] * 5 + [0.955] * 4 + [0.705] + [0.055] * 2
    masks = np.array([ma, mb], np.float32)
    sem = np.array(
        [[0.1, 0.05, 0.8, 0.05]] * 5 + [[0.2, 0.1, 0.1, 0.6]] * 5 + [[0.7, 0.1, 0.1, 0.1]] * 2,
        np.float32,
    )
    return masks, np.ones(2, bool), sem, np.ones(12, bool)


def test_postprocess_hand_worked_coverage_flip():
    # Otsu puts both thresholds at 0.06: A is above on points 0-9, B on 5-9.
    # Raw labels: A on 0-4 and 9 (0.805 > 0.705), B on 5-8, none on 10-11.
    # Coverage: A 6/10 = 0.6, B 4/5 = 0.8. Point 9: 0.6*0.805 = 0.483 < 0.8*0.705 = 0.564,
    # so it moves to B. Scores: A mean mask 0.855 x mean P(class 2) over 0-9 = 0.45;
    # B 0.905 x 0.6.
    out = pp.postprocess(*_hand_scene(), min_points=1, min_score=0.1)
    np.testing.assert_array_equal(out.point_instance, [0] * 5 + [1] * 5 + [-1] * 2)
    np.testing.assert_allclose(out.coverage, [0.6, 0.8], rtol=1e-6)
    np.testing.assert_allclose(out.thresholds, [0.06, 0.06])
    np.testing.assert_array_equal(out.labels, [2, 3])
    np.testing.assert_allclose(out.scores, [0.855 * 0.45, 0.905 * 0.6], rtol=1e-5)
    np.testing.assert_array_equal(out.keep, [True, True])
    # Filters: min_score 0.4 drops A (0.385), min_points 6 drops both (5 points each).
    out = pp.postprocess(*_hand_scene(), min_points=1, min_score=0.4)
    np.testing.assert_array_equal(out.keep, [False, True])
    assert not np.asarray(out.masks)[0].any() and np.asarray(out.masks)[1].sum() == 5
    assert not np.asarray(pp.postprocess(*_hand_scene(), min_points=6).keep).any()
    # Ignoring class 2 leaves A without a class.
    out = pp.postprocess(*_hand_scene(), min_points=1, ignore_classes=(2,))
    np.testing.assert_array_equal(out.labels, [-1, 3])
    np.testing.assert_array_equal(out.keep, [False, True])


def test_postprocess_hand_worked_superpoints():
    # Superpoint 0 = points 3,4,5,6 (labels A,A,B,B: tie -> lower label A);
    # superpoint 1 = points 8,9,10,11 (B,B,bg,bg: tie -> background, the lowest label).
    sp = np.array([-1, -1, -1, 0, 0, 0, 0, -1, 1, 1, 1, 1], np.int32)
    out = pp.postprocess(*_hand_scene(), sp, num_superpoints=2, min_points=1)
    np.testing.assert_array_equal(out.point_instance, [0] * 7 + [1] + [-1] * 4)
    with pytest.raises(ValueError, match="num_superpoints"):
        pp.postprocess(*_hand_scene(), sp)


def random_scene(rng, k, n, s, num_sp):
    masks = rng.uniform(0, 0.3, (k, n))
    for j in range(k):
        a = rng.integers(0, n - 20)
        b = a + rng.integers(5, n // 3)
        masks[j, a:b] = rng.uniform(0.4, 1.0, min(b, n) - a)
    masks = masks.astype(np.float32)
    slot_ok = rng.uniform(size=k) < 0.85
    logits = rng.normal(size=(n, s)) * 2
    logits[np.arange(n), (np.arange(n) * s) // n] += 2  # spatially coherent classes
    sem = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    valid = np.ones(n, bool)
    valid[n - rng.integers(0, 30) :] = False
    sp = np.sort(rng.integers(0, num_sp, n)).astype(np.int32)
    sp[rng.uniform(size=n) < 0.05] = -1
    return masks, slot_ok, sem.astype(np.float32), valid, sp


@pytest.mark.parametrize("use_sp", [False, True])
def test_postprocess_random_vs_reference(use_sp):
    rng = np.random.default_rng(7 + use_sp)
    k, n, s, num_sp = 6, 240, 5, 40
    for trial in range(8):
        masks, slot_ok, sem, valid, sp = random_scene(rng, k, n, s, num_sp)
        ignore = (0,) if trial % 2 else ()
        kw = dict(min_score=0.15, min_points=12, ignore_classes=ignore)
        if use_sp:
            out = pp.postprocess(masks, slot_ok, sem, valid, sp, num_superpoints=num_sp, **kw)
        else:
            out = pp.postprocess(masks, slot_ok, sem, valid, **kw)
        ref = postprocess_reference(
            masks, slot_ok, sem, valid, sp if use_sp else None, num_sp, 0.15, 12, ignore
        )
        np.testing.assert_allclose(out.thresholds, ref["t"], atol=1e-7)
        np.testing.assert_allclose(out.coverage, ref["coverage"], rtol=1e-6)
        np.testing.assert_array_equal(out.point_instance, ref["point_instance"])
        np.testing.assert_array_equal(out.labels, ref["labels"])
        np.testing.assert_allclose(out.scores, ref["scores"], rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(out.keep, ref["keep"])
        np.testing.assert_array_equal(out.masks, np.stack(ref["masks"]))


def test_postprocess_vmap_over_scenes_and_errors():
    rng = np.random.default_rng(3)
    scenes = [random_scene(rng, 6, 240, 5, 40) for _ in range(2)]  # shapes as above
    stacked = [np.stack(x) for x in zip(*scenes, strict=True)]
    fn = jax.vmap(
        lambda m, o, p, v, sp: pp.postprocess(m, o, p, v, sp, num_superpoints=40, min_points=5)
    )
    out = fn(*stacked)
    for b, scene in enumerate(scenes):
        one = pp.postprocess(*scene, num_superpoints=40, min_points=5)
        np.testing.assert_array_equal(out.point_instance[b], one.point_instance)
        np.testing.assert_array_equal(out.keep[b], one.keep)
    m, o, p, v, sp = scenes[0]
    with pytest.raises(ValueError, match="sem_prob"):
        pp.postprocess(m, o, p[:-1], v)
    with pytest.raises(ValueError, match="ignore_classes"):
        pp.postprocess(m, o, p, v, ignore_classes=(7,))


def test_argmax_over_slots_equals_numpy_column_argmax():
    """The slot loop gives numpy's column max / argmax / any, with ties (the first slot
    wins), ineligible entries, columns with no eligible slot, -inf and NaN (numpy's
    argmax and max both pick the first NaN)."""
    rng = np.random.default_rng(0)
    k, n = 7, 300
    vals = rng.integers(0, 4, size=(k, n)).astype(np.float32)  # many ties
    vals[rng.random((k, n)) < 0.05] = -np.inf
    vals[2, :20] = np.nan
    vals[5, 10:30] = np.nan
    elig = rng.random((k, n)) < 0.6
    elig[:, 40:50] = False  # no eligible slot

    def run(vals, elig):
        return pp._argmax_over_slots(
            k, n, lambda i: (elig[i], jnp.where(elig[i], vals[i], -jnp.inf))
        )

    top, best, seen = jax.jit(run)(jnp.asarray(vals), jnp.asarray(elig))
    masked = np.where(elig, vals, -np.inf)
    np.testing.assert_array_equal(np.asarray(best), np.argmax(masked, axis=0))
    np.testing.assert_array_equal(np.asarray(top), np.max(masked, axis=0))
    np.testing.assert_array_equal(np.asarray(seen), elig.any(0))
