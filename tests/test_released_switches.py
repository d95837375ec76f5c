"""The released-model switches (issue 14, docs/released_model.md section 5) against numpy
brute force: the released candidate rule (``model.cand_rule="released"``, the released
``topk_nms``), the empty-context fallback (``model.empty_context="foreground_mean"``), the
merge clamp, and the config values."""

import numpy as np
import pytest

from dknet_jax import aggregation as agg
from dknet_jax.candidates import ln_nms_with_info
from dknet_jax.config import ConfigError, base_config, released_settings, validate


def released_topk_nms(xyz, heat, valid, cls, radius, thres, k):
    """The released topk_nms loop (R:lib/.../topk_nms.cpp), numpy float64: points by heat
    descending (ties: lower index); an unvisited point p marks every point with
    d^2 < R^2 visited; kept iff heat_p / max(heat over p's same-class points with
    d^2 < R^2) >= thres."""
    order = sorted(np.flatnonzero(valid), key=lambda i: (-heat[i], i))
    visited = ~valid.copy()
    out = []
    for p in order:
        if visited[p] or len(out) >= k:
            continue
        d2 = ((xyz - xyz[p]) ** 2).sum(1)
        near = (d2 < radius**2) & valid
        same = near & (cls == cls[p])
        if heat[p] / heat[same].max() >= thres:
            out.append(p)
        visited |= near
        visited[p] = True
    return out


@pytest.mark.parametrize("pool", [8, 400])  # pool exhausted (whole-scene loop) / enough
def test_released_candidate_rule_matches_brute_force(pool):
    rng = np.random.default_rng(0)
    n = 300
    xyz = rng.uniform(0, 1.5, (n, 3)).astype(np.float32)
    heat = rng.uniform(0, 1, n).astype(np.float32)
    valid = rng.uniform(size=n) < 0.9
    cls = rng.integers(2, 5, n).astype(np.int32)
    idx, ok, _ = ln_nms_with_info(
        xyz,
        heat,
        valid,
        radius=0.3,
        threshold=0.5,
        max_candidates=40,
        pool_size=pool,
        classes=cls,
    )
    got = list(np.asarray(idx)[np.asarray(ok)])
    want = released_topk_nms(xyz, heat, valid, cls, 0.3, 0.5, 40)
    assert got == want


def test_released_rule_same_class_normaliser():
    # b (class 3) is suppressed by a; c (class 4) lies within R of b only: ours normalises
    # c by b's heat (0.3 / 0.9 < 0.5, dropped), the released rule by class 4 only (kept)
    xyz = np.array([[0, 0, 0], [0.3, 0, 0], [0.6, 0, 0]], np.float32)
    heat = np.array([1.0, 0.9, 0.3], np.float32)
    cls = np.array([3, 3, 4], np.int32)
    kw = dict(radius=0.5, threshold=0.5, max_candidates=3, pool_size=3)
    idx, ok, _ = ln_nms_with_info(xyz, heat, np.ones(3, bool), classes=cls, **kw)
    assert list(np.asarray(idx)[np.asarray(ok)]) == [0, 2]
    idx, ok, _ = ln_nms_with_info(xyz, heat, np.ones(3, bool), **kw)
    assert list(np.asarray(idx)[np.asarray(ok)]) == [0]


def test_released_rule_ties_strict_radius_and_inclusive_ratio():
    # q at exactly R from p: the released rule does not suppress it (d^2 < R^2); a ratio
    # of exactly 0.5 is kept (>=)
    xyz = np.array([[0, 0, 0], [0.5, 0, 0], [2, 0, 0], [2.1, 0, 0]], np.float32)
    heat = np.array([1.0, 0.9, 0.25, 0.5], np.float32)
    cls = np.array([3, 3, 4, 4], np.int32)
    valid = np.ones(4, bool)
    idx, ok, _ = ln_nms_with_info(
        xyz,
        heat,
        valid,
        radius=0.5,
        threshold=0.5,
        max_candidates=4,
        pool_size=4,
        classes=cls,
    )
    assert list(np.asarray(idx)[np.asarray(ok)]) == [0, 1, 3]
    idx, ok, _ = ln_nms_with_info(
        xyz, heat, valid, radius=0.5, threshold=0.5, max_candidates=4, pool_size=4
    )
    assert list(np.asarray(idx)[np.asarray(ok)]) == [0, 3]


def test_empty_context_foreground_mean_matches_brute_force():
    rng = np.random.default_rng(1)
    n = 80
    xyz = rng.uniform(0, 2, (n, 3)).astype(np.float32)
    feats = rng.normal(0, 1, (n, 4)).astype(np.float32)
    sem = rng.integers(0, 3, n).astype(np.int32)
    valid = rng.uniform(size=n) < 0.8
    scene = (np.arange(n) >= 40).astype(np.int32)
    cand = np.array([int(np.flatnonzero(valid & (scene == b))[0]) for b in (0, 1)] + [5])
    ok = np.array([True, True, False])
    r = 0.2  # small: most bg sets are empty
    fg, bg, cnt = agg.context_features(
        xyz, feats, sem, valid, scene, cand, ok, radius=r, empty="foreground_mean"
    )
    fg0, bg0, _ = agg.context_features(xyz, feats, sem, valid, scene, cand, ok, radius=r)
    empties = 0
    for c in range(2):
        p = cand[c]
        d2 = ((xyz - xyz[p]) ** 2).sum(1)
        base = valid & (scene == scene[p])
        fg_set = base & (sem == sem[p]) & (d2 <= r * r)
        bg_set = base & (sem != sem[p]) & (d2 <= 4 * r * r)
        mean = feats[base].mean(0)
        np.testing.assert_allclose(fg[c], feats[fg_set].mean(0), rtol=1e-5, atol=1e-6)
        want_bg = feats[bg_set].mean(0) if bg_set.any() else mean
        np.testing.assert_allclose(bg[c], want_bg, rtol=1e-5, atol=1e-6)
        if not bg_set.any():
            empties += 1
            np.testing.assert_array_equal(np.asarray(bg0[c]), 0.0)  # default: zeros
    assert empties >= 1
    assert np.all(np.asarray(fg[2]) == 0) and np.all(np.asarray(bg[2]) == 0)
    np.testing.assert_array_equal(np.asarray(fg), np.asarray(fg0))
    with pytest.raises(ValueError, match="empty="):
        agg.context_features(xyz, feats, sem, valid, scene, cand, ok, empty="mean")


def test_released_settings_and_validation():
    c = released_settings(base_config())
    validate(c)
    m = c.model
    assert (m.tower_bn_eps, m.kernel_norm, m.mask_center, m.merge_clamp) == (
        1e-5,
        "batch",
        "point",
        1e-6,
    )
    assert (m.empty_context, m.cand_rule, m.max_candidates) == ("foreground_mean", "released", 150)
    d = base_config().model
    assert (d.tower_bn_eps, d.kernel_norm, d.mask_center, d.merge_clamp) == (
        1e-4,
        "none",
        "shifted",
        0.0,
    )
    assert (d.empty_context, d.cand_rule) == ("zeros", "ours")
    assert (m.merge_rule, m.neighbour_cap) == ("released", 2000)
    assert (d.merge_rule, d.neighbour_cap) == ("components", 0)
    assert (c.test.released_aug, c.test.released_aug_seed) == (True, 567)
    assert base_config().test.released_aug is False
    assert (c.data.voxel_origin, base_config().data.voxel_origin) == ("scene_min", "centre")
    bad = base_config()
    bad.data.voxel_origin = "min"
    with pytest.raises(ConfigError, match=r"config.data.voxel_origin='min' is not one of"):
        validate(bad)
    for key, value in (
        ("kernel_norm", "layer"),
        ("mask_center", "centroid"),
        ("cand_rule", "topk"),
        ("tower_bn_eps", 0.0),
        ("merge_clamp", -1.0),
        ("merge_rule", "greedy"),
        ("neighbour_cap", -1),
    ):
        bad = base_config()
        bad.model[key] = value
        with pytest.raises(ConfigError, match=f"config.model.{key}"):
            validate(bad)
    for key, value in (("released_aug_seed", -5), ("released_aug_seed", 2**32)):
        bad = base_config()
        bad.test[key] = value
        with pytest.raises(ConfigError, match=f"config.test.{key}"):
            validate(bad)


def released_postprocess_numpy(masks, sem_prob, sp, min_points, min_score, fic=2):
    """A line-by-line numpy transcription of the released post-processing
    (R:model/DKNet.py:368-376 and R:test.py:78-153, batch size 1), rows really removed as
    the released code does. Returns {slot: (mask bool[N], class, score)} of the kept
    instances."""
    k, n = masks.shape
    s = sem_prob.shape[1]
    sem_pred = sem_prob.argmax(1)
    fg = sem_pred >= fic
    thres = np.zeros(k)
    for i in range(k):  # dknet_ops.otsu: int(100 m) bins, first maximum, 0 if none
        b = np.minimum((masks[i] * np.float32(100)).astype(np.int64), 99)
        hist = np.bincount(b, minlength=100).astype(np.float64)
        best, bt = 0.0, 0
        for t in range(1, 100):
            n0, n1 = hist[:t].sum(), hist[t:].sum()
            if n0 == 0 or n1 == 0:
                continue
            m0 = (hist[:t] * np.arange(t)).sum() / n0
            m1 = (hist[t:] * np.arange(t, 100)).sum() / n1
            v = n0 * n1 * (m1 - m0) ** 2
            if v > best:
                best, bt = v, t
        thres[i] = bt / 100
    masks = masks.astype(np.float64)
    thre = np.where(masks < thres[:, None], 0.0, masks)

    def segment(thre, thres):
        score, seg = thre.max(0), thre.argmax(0)
        nz = thres[thres != 0]
        return np.where(score < (nz.min() if len(nz) else 0.0), -100, seg)

    def classes(seg, count):
        out = []
        for i in range(count):
            m = (seg == i) & fg
            if not m.any():
                out.append(s)
                continue
            vals, cnt = np.unique(sem_pred[m], return_counts=True)
            out.append(int(vals[cnt.argmax()]))
        return np.array(out)

    seg = segment(thre, thres)
    ins_sem = classes(seg, k)
    org = thre.sum(1) + 1e-6
    inter = np.array([np.floor(masks[i, seg == i].sum()) for i in range(k)])
    cover = np.minimum(inter / org, 1.0)
    thre = np.sqrt(thre * cover[:, None])
    thres = np.sqrt(thres * cover)
    seg = segment(thre, thres)
    keep = np.array([(seg == i).sum() for i in range(k)]) > min_points
    slots = np.flatnonzero(keep)
    ins_sem, thres, thre = ins_sem[keep], thres[keep], thre[keep]
    seg = segment(thre, thres)
    scores = np.zeros(len(slots))
    for i in range(len(slots)):
        pts = (seg == i).sum()
        scores[i] = thre[i, seg == i].sum() / (pts + 1e-6)
        if ins_sem[i] == s:
            scores[i] = 0
        else:
            scores[i] *= sem_prob[seg == i, ins_sem[i]].sum() / (pts + 1e-6)
    scores = np.sqrt(scores)
    keep = scores > min_score
    slots, scores, thres, thre = slots[keep], scores[keep], thres[keep], thre[keep]
    seg = segment(thre, thres)
    count = len(slots)
    col = np.where(seg < 0, count, seg)
    label_map = np.zeros((sp.max() + 1, count + 1))
    np.add.at(label_map, (sp, col), 1)
    lab = label_map.argmax(1)
    seg = np.where(lab == count, -100, lab)[sp]
    final = classes(seg, count)
    return {
        int(slots[i]): (seg == i, int(final[i]), float(scores[i]))
        for i in range(count)
        if final[i] != s
    }


def test_released_postprocess_matches_the_transcription():
    from dknet_jax.inference.postprocess import postprocess_released

    rng = np.random.default_rng(3)
    k, n, s = 8, 1500, 20
    centres = rng.uniform(0, 1, (k, 2))
    xy = rng.uniform(0, 1, (n, 2))
    d = np.linalg.norm(xy[None] - centres[:, None], axis=2)
    logits = 4.0 - 25.0 * d + rng.normal(0, 0.7, (k, n))
    logits[6] -= 3.0  # a weak instance (size filter)
    masks = (1 / (1 + np.exp(-logits))).astype(np.float32)
    sem_logits = rng.normal(0, 1, (n, s))
    owner = d.argmin(0)
    sem_logits[np.arange(n), 2 + owner % 5] += 3.0
    sem_logits[owner == 3, 0] += 5.0  # instance 3 on wall: no class, dropped
    sem_prob = np.exp(sem_logits) / np.exp(sem_logits).sum(1, keepdims=True)
    sem_prob = sem_prob.astype(np.float32)
    sp = np.arange(n) // 5
    for min_points, min_score in ((100, 0.1), (30, 0.45)):
        want = released_postprocess_numpy(masks, sem_prob, sp, min_points, min_score)
        got = postprocess_released(
            masks,
            np.ones(k, bool),
            sem_prob,
            np.ones(n, bool),
            sp,
            num_superpoints=n,
            min_score=min_score,
            min_points=min_points,
        )
        keep = np.asarray(got.keep)
        assert sorted(np.flatnonzero(keep)) == sorted(want), (min_points, min_score)
        assert 0 < len(want) < k
        for slot, (mask, cls, score) in want.items():
            np.testing.assert_array_equal(np.asarray(got.masks[slot]), mask)
            assert int(got.labels[slot]) == cls
            np.testing.assert_allclose(float(got.scores[slot]), score, rtol=1e-5)
        assert not np.asarray(got.masks)[~keep].any()


def released_candidate_merge(scores, thre):
    """The released greedy merge (R:model/DKNet.py:219-238) transcribed to numpy: zero the
    diagonal; while the highest remaining score is > thre, take it (first maximum in
    row-major order, as torch.argmax), merge the two whole groups, zero every score inside
    the merged group, label it with the smaller id. Returns ins_map i64[I]."""
    s = np.array(scores, np.float32, copy=True)
    n = s.shape[0]
    np.fill_diagonal(s, 0)
    ins_map = np.arange(n)
    while s.max() > thre:
        index = int(s.argmax())
        i, j = index // n, index % n
        new = np.concatenate(
            [np.flatnonzero(ins_map == ins_map[i]), np.flatnonzero(ins_map == ins_map[j])]
        )
        s[np.ix_(new, new)] = 0
        ins_map[new] = min(ins_map[i], ins_map[j])
    return ins_map


def leads_from_ins_map(ins_map, heat):
    """Released group centre: the member with the highest heat (first on ties)."""
    lead = np.empty(len(ins_map), np.int64)
    for g in np.unique(ins_map):
        members = np.flatnonzero(ins_map == g)
        lead[members] = members[np.argmax(heat[members])]
    return lead


@pytest.mark.parametrize("symmetric", [True, False])
def test_released_merge_rule_matches_the_greedy_loop(symmetric):
    rng = np.random.default_rng(7)
    levels = np.array([0.05, 0.3, 0.49, 0.5, 0.5, 0.51, 0.7, 0.95], np.float32)
    ties_seen = differs = 0
    for trial in range(40):
        m = int(rng.integers(2, 24))
        s = levels[rng.integers(0, len(levels), (m, m))]
        s = np.where(rng.uniform(size=(m, m)) < 0.75, np.float32(0.05), s)  # sparse edges
        if symmetric:
            s = np.triu(s, 1) + np.triu(s, 1).T
        ok = rng.uniform(size=m) < 0.85
        heat = rng.choice(np.array([0.1, 0.2, 0.3], np.float32), m)  # many heat ties
        scores = np.where(ok[:, None] & ok[None, :], s, 0).astype(np.float32)
        valid = np.flatnonzero(ok)
        want = np.full(m, -1)
        if len(valid):
            sub = leads_from_ins_map(
                released_candidate_merge(scores[np.ix_(valid, valid)], 0.5), heat[valid]
            )
            want[valid] = valid[sub]
        got = np.asarray(agg.merge_groups(scores, ok, heat, threshold=0.5, strict=True))
        np.testing.assert_array_equal(got, want, err_msg=f"trial {trial}")
        ties_seen += int(np.any(scores == 0.5))
        loose = np.asarray(agg.merge_groups(scores, ok, heat, threshold=0.5))
        differs += int(np.any(loose != got))
    assert ties_seen > 10 and differs > 0  # exact-0.5 scores were there and mattered


def test_released_merge_rule_hand_cases():
    heat = np.array([0.9, 0.5, 0.7, 0.2], np.float32)
    ok = np.ones(4, bool)
    # chain 0-1 (0.8), 1-2 (0.6), 0-2 below: not transitive as scores, one group all the
    # same (the released loop merges whole groups); 3 joins only by an exact 0.5
    s = np.zeros((4, 4), np.float32)
    s[0, 1] = s[1, 0] = 0.8
    s[1, 2] = s[2, 1] = 0.6
    s[0, 2] = s[2, 0] = 0.1
    s[2, 3] = s[3, 2] = 0.5
    strict = np.asarray(agg.merge_groups(s, ok, heat, strict=True))
    assert list(strict) == [0, 0, 0, 3]
    assert list(released_candidate_merge(s, 0.5)) == [0, 0, 0, 3]
    assert list(np.asarray(agg.merge_groups(s, ok, heat))) == [0, 0, 0, 0]


def released_topk_nms_lists(xyz, heat, cls, radius, local_thres, k, cap):
    """The released topk_nms of one scene with its capped lists (R:lib/.../topk_nms.cpp,
    topk_nms.cu), numpy: the fg list of p holds the same-class points with d^2 < R^2, the
    bg list the other-class points with d^2 < 4R^2, each cut to its first ``cap`` entries
    (point order: our reading of the CUDA kernel's atomicAdd slots); max_conf = max of
    heat[p] and the heat over the *capped* fg list; size = the capped fg length.
    Returns (picks, fg lists, bg lists)."""
    n = len(heat)
    visited = np.zeros(n, bool)
    picks, fgs, bgs = [], [], []
    for p in sorted(range(n), key=lambda i: (-heat[i], i)):
        if visited[p]:
            continue
        d2 = ((xyz.astype(np.float64) - xyz[p]) ** 2).sum(1)
        near = d2 < radius**2
        fg = np.flatnonzero(near & (cls == cls[p]))[:cap]
        bg = np.flatnonzero((d2 < 4 * radius**2) & (cls != cls[p]))[:cap]
        visited |= near
        max_conf = max([heat[p]] + [heat[q] for q in fg])
        if heat[p] / max_conf >= local_thres:
            picks.append(p)
            fgs.append(fg)
            bgs.append(bg)
        if len(picks) >= k:
            break
    return picks, fgs, bgs


def test_neighbour_cap_matches_the_released_lists():
    rng = np.random.default_rng(11)
    n, cap, r = 500, 5, 0.3
    xyz = rng.uniform(0, 1.2, (n, 3)).astype(np.float32)
    # heat growing with the point index: a point's hottest neighbours come late in point
    # order, past the cap, so the capped normaliser keeps points the full one drops
    heat = (rng.uniform(0, 1, n) * np.linspace(0.1, 1, n) ** 2).astype(np.float32)
    cls = rng.integers(2, 5, n).astype(np.int32)
    feats = rng.normal(0, 1, (n, 4)).astype(np.float32)
    valid = rng.uniform(size=n) < 0.9
    obj = np.flatnonzero(valid)  # the released arrays hold the foreground points only
    picks, fgs, bgs = released_topk_nms_lists(xyz[obj], heat[obj], cls[obj], r, 0.5, 60, cap)
    picks = obj[picks]
    kw = dict(radius=r, threshold=0.5, max_candidates=60, pool_size=64, classes=cls)
    idx, ok, _ = ln_nms_with_info(xyz, heat, valid, neighbour_cap=cap, **kw)
    assert list(np.asarray(idx)[np.asarray(ok)]) == list(picks)
    idx0, ok0, _ = ln_nms_with_info(xyz, heat, valid, **kw)
    assert list(np.asarray(idx0)[np.asarray(ok0)]) != list(picks)  # the cap matters here
    # context sets over the same picks (+ 3 empty slots)
    cand = np.concatenate([picks, [0, 0, 0]]).astype(np.int32)
    cand_ok = np.arange(len(cand)) < len(picks)
    scene = np.zeros(n, np.int32)
    fg, bg, cnt = agg.context_features(
        xyz, feats, cls, valid, scene, cand, cand_ok, radius=r, neighbour_cap=cap
    )
    for c in range(len(picks)):
        np.testing.assert_allclose(fg[c], feats[obj[fgs[c]]].mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(bg[c], feats[obj[bgs[c]]].mean(0), rtol=1e-5, atol=1e-6)
        assert float(cnt[c]) == len(fgs[c])
    full = np.asarray(cnt)[: len(picks)] == cap
    assert full.mean() > 0.5  # dense: most lists are cut
    assert not np.asarray(fg)[len(picks) :].any()
    fg0, _, cnt0 = agg.context_features(xyz, feats, cls, valid, scene, cand, cand_ok, radius=r)
    cnt0 = np.asarray(cnt0)[: len(picks)]
    assert np.all(cnt0 >= np.asarray(cnt)[: len(picks)]) and (cnt0 > cap).mean() > 0.5


def test_neighbour_cap_counts_per_scene_in_point_order():
    # two scenes interleaved in the flat array: the cap counts each candidate's own scene
    # only, in flat point order; a cap above every list changes nothing
    rng = np.random.default_rng(12)
    n = 200
    xyz = rng.uniform(0, 0.5, (n, 3)).astype(np.float32)
    feats = rng.normal(0, 1, (n, 3)).astype(np.float32)
    sem = rng.integers(2, 4, n).astype(np.int32)
    scene = (np.arange(n) % 2).astype(np.int32)
    valid = np.ones(n, bool)
    cand = np.array([0, 1, 7], np.int32)
    ok = np.ones(3, bool)
    fg, bg, cnt = agg.context_features(
        xyz, feats, sem, valid, scene, cand, ok, radius=0.3, chunk=16, neighbour_cap=4
    )
    for c, p in enumerate(cand):
        d2 = ((xyz - xyz[p]) ** 2).sum(1)
        same = (scene == scene[p]) & (sem == sem[p])
        fg_list = np.flatnonzero(same & (d2 <= 0.09))[:4]
        bg_list = np.flatnonzero((scene == scene[p]) & (sem != sem[p]) & (d2 <= 0.36))[:4]
        np.testing.assert_allclose(fg[c], feats[fg_list].mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(bg[c], feats[bg_list].mean(0), rtol=1e-5, atol=1e-6)
        assert float(cnt[c]) == 4
    big = agg.context_features(xyz, feats, sem, valid, scene, cand, ok, radius=0.3, neighbour_cap=n)
    none = agg.context_features(xyz, feats, sem, valid, scene, cand, ok, radius=0.3)
    for a, b in zip(big, none, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="neighbour_cap"):
        agg.context_features(xyz, feats, sem, valid, scene, cand, ok, neighbour_cap=-1)
    with pytest.raises(ValueError, match="neighbour_cap"):
        ln_nms_with_info(xyz, feats[:, 0], valid, classes=sem, neighbour_cap=-2)
