"""Candidate aggregation vs the paper's greedy merge, scipy components and brute force."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.sparse.csgraph import connected_components

from dknet_jax import aggregation


def greedy_merge_reference(scores, ok, heat, threshold):
    """Paper Sec. 3.4: repeatedly join the two groups with the highest remaining score
    (>= threshold), then zero the scores inside the new group; lead = highest heat."""
    m = len(ok)
    s = np.array(scores, np.float64)
    s[~ok, :] = -1
    s[:, ~ok] = -1
    np.fill_diagonal(s, -1)
    group = np.arange(m)
    while s.max() >= threshold:
        i, j = np.unravel_index(np.argmax(s), s.shape)
        members = np.nonzero((group == group[i]) | (group == group[j]))[0]
        group[members] = min(group[i], group[j])
        s[np.ix_(members, members)] = -1
    lead = np.full(m, -1)
    for g in np.unique(group[ok]):
        members = [c for c in range(m) if ok[c] and group[c] == g]
        best = members[0]
        for c in members:  # highest heat, lower slot on ties
            if heat[c] > heat[best]:
                best = c
        for c in members:
            lead[c] = best
    return lead


def random_scores(rng, m, density, quantised):
    s = rng.uniform(size=(m, m))
    s = np.where(rng.uniform(size=(m, m)) < density, 0.5 + 0.5 * s, 0.5 * s)
    if quantised:
        s = np.round(s * 4) / 4  # hits the threshold 0.5 exactly
    return s.astype(np.float32)


@pytest.mark.parametrize("m", [1, 7, 40])
def test_merge_groups_equals_greedy_merge_and_scipy(m):
    rng = np.random.default_rng(m)
    for trial in range(30):
        density = rng.choice([0.0, 0.01, 0.03, 0.1, 0.5])
        scores = random_scores(rng, m, density / max(1, m / 10), quantised=trial % 2 == 0)
        if trial % 3 == 0:
            scores = np.maximum(scores, scores.T)  # symmetric, like an MLP on |Fi - Fj|
        ok = rng.uniform(size=m) < 0.8
        heat = (rng.integers(0, 4, m) if trial % 2 else rng.uniform(size=m)).astype(np.float32)
        lead = np.asarray(aggregation.merge_groups(scores, ok, heat, threshold=0.5))
        ref = greedy_merge_reference(scores, ok, heat, 0.5)
        np.testing.assert_array_equal(lead, ref)
        # Same partition as scipy's components of the symmetrised graph.
        adj = ((scores >= 0.5) | (scores.T >= 0.5)) & ok[:, None] & ok[None, :]
        _, comp = connected_components(adj, directed=False)
        v = np.nonzero(ok)[0]
        same_ours = lead[v][:, None] == lead[v][None, :]
        same_scipy = comp[v][:, None] == comp[v][None, :]
        np.testing.assert_array_equal(same_ours, same_scipy)


def test_merge_groups_chain_needs_all_squaring_steps():
    # A path 0-1-2-...-63 (only i, i+1 edges): one component, lead = max heat.
    m = 64
    scores = np.zeros((m, m), np.float32)
    scores[np.arange(m - 1), np.arange(1, m)] = 0.9  # one direction only
    heat = np.zeros(m, np.float32)
    heat[37] = 1.0
    lead = np.asarray(aggregation.merge_groups(scores, np.ones(m, bool), heat))
    np.testing.assert_array_equal(lead, np.full(m, 37))
    # Invalid slot 30 cuts the path in two.
    ok = np.ones(m, bool)
    ok[30] = False
    lead = np.asarray(aggregation.merge_groups(scores, ok, heat))
    assert lead[30] == -1 and (lead[:30] == 0).all() and (lead[31:] == 37).all()
    with pytest.raises(ValueError, match="scores must be"):
        aggregation.merge_groups(scores[:3], ok, heat)


def test_same_instance():
    inst = np.array([3, 3, -100, 5, 3, -100])
    ok = np.array([1, 1, 1, 1, 0, 1], bool)
    got = np.asarray(aggregation.same_instance(inst, ok))
    want = np.zeros((6, 6))
    for i in range(6):
        for j in range(6):
            want[i, j] = float(ok[i] and ok[j] and inst[i] >= 0 and inst[i] == inst[j])
    np.testing.assert_array_equal(got, want)
    assert got[0, 1] == 1 and got[0, 4] == 0 and got[2, 5] == 0


def test_context_features_vs_brute_force():
    rng = np.random.default_rng(4)
    k, r = 12, 0.3
    xyz, feats, sem, scene, valid, cand = _random_points(rng, 333, 5, k, 1.2, 3, 200, 0.85)
    cand_ok = rng.uniform(size=k) < 0.8
    # values, counts and the gradient (differentiable in feats through fg and bg)
    _, want = _check_context(xyz, feats, sem, valid, scene, cand, cand_ok, r, chunk=64)
    filled = np.sum((want["fg_count"] > 0) & (want["bg_count"] > 0))
    assert filled >= 5, "the setting should fill fg and bg of several slots"


def test_group_features_vs_loops():
    rng = np.random.default_rng(9)
    m, d = 10, 4
    lead = np.array([0, 0, 2, -1, 2, 5, 0, 7, 7, -1])
    fg = rng.normal(size=(m, d)).astype(np.float32)
    cnt = rng.integers(0, 5, m).astype(np.float32)
    cnt[[7, 8]] = 0  # group 7: all counts zero -> plain mean
    pos = rng.normal(size=(m, 3)).astype(np.float32)
    feat, gpos, gok = map(np.asarray, aggregation.group_features(lead, fg, cnt, pos))
    for g in range(m):
        members = [j for j in range(m) if lead[j] == g]
        assert gok[g] == (lead[g] == g)
        if not gok[g]:
            assert not feat[g].any() and not gpos[g].any()
            continue
        w = np.array([cnt[j] for j in members])
        if w.sum() == 0:
            w = np.ones(len(members))
        want = sum(wj * fg[j] for wj, j in zip(w, members, strict=True)) / w.sum()
        np.testing.assert_allclose(feat[g], want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(gpos[g], pos[g])


def test_compact_groups_against_a_loop():
    rng = np.random.default_rng(7)
    scenes, k, slots = 3, 9, 4
    group_ok = rng.uniform(size=scenes * k) < 0.5
    group_ok[2 * k :] = False  # scene 2 has no group
    group_ok[:k] = True  # scene 0 has more groups than slots
    feat = rng.normal(size=(scenes * k, 5)).astype(np.float32)
    pos = rng.normal(size=(scenes * k, 3)).astype(np.float32)
    (f, p), ok, source, overflow = aggregation.compact_groups(
        np.asarray(group_ok), (np.asarray(feat), np.asarray(pos)), scenes=scenes, slots=slots
    )
    want_f = np.zeros((scenes * slots, 5), np.float32)
    want_p = np.zeros((scenes * slots, 3), np.float32)
    want_src = np.full(scenes * slots, scenes * k)
    for s in range(scenes):
        leads = [j for j in range(s * k, (s + 1) * k) if group_ok[j]]
        for r, j in enumerate(leads[:slots]):  # first slots in lead (= heat) order
            want_f[s * slots + r], want_p[s * slots + r] = feat[j], pos[j]
            want_src[s * slots + r] = j
    np.testing.assert_array_equal(np.asarray(source), want_src)
    np.testing.assert_array_equal(np.asarray(ok), want_src < scenes * k)
    np.testing.assert_array_equal(np.asarray(f), want_f)
    np.testing.assert_array_equal(np.asarray(p), want_p)
    want_over = [sum(group_ok[s * k : (s + 1) * k]) > slots for s in range(scenes)]
    assert np.asarray(overflow).tolist() == want_over and want_over[0]
    with pytest.raises(ValueError, match="slots"):
        aggregation.compact_groups(
            np.asarray(group_ok), (np.asarray(feat),), scenes=scenes, slots=k + 1
        )


def _random_points(rng, n, d, k, extent, classes, split, keep):
    """Points uniform in a cube of side ``extent``, ``classes`` random classes, scene 0
    for rows < ``split`` and 1 after, ``keep`` of them valid, ``k`` distinct candidates."""
    xyz = rng.uniform(0, extent, (n, 3)).astype(np.float32)
    feats = rng.normal(size=(n, d)).astype(np.float32)
    sem = rng.integers(0, classes, n).astype(np.int32)
    scene = (np.arange(n) >= split).astype(np.int32)
    valid = rng.uniform(size=n) < keep
    cand = rng.choice(n, k, replace=False).astype(np.int32)
    return xyz, feats, sem, scene, valid, cand


def _brute_context(xyz, feats, sem, valid, scene, cand, cand_ok, r, cap, u, v):
    """fg, bg, their counts and the gradient of sum_c <u_c, fg[c]> + <v_c, bg[c]> w.r.t.
    feats (at point q: u_c / #fg rows of c over the slots c with q among their fg rows,
    likewise for bg), by a loop over the slots (each list: its first `cap` points in point
    order when cap > 0); ``cut`` counts the lists the cap shortened."""
    k, (n, d) = len(cand), feats.shape
    fg, bg, grad = np.zeros((k, d)), np.zeros((k, d)), np.zeros((n, d))
    cnt, bg_cnt, cut = np.zeros(k), np.zeros(k), 0
    for c in range(k):
        if not cand_ok[c]:
            continue
        p = cand[c]
        d2 = ((xyz - xyz[p]) ** 2).sum(1)
        base = valid & (scene == scene[p])
        f_rows = np.flatnonzero(base & (sem == sem[p]) & (d2 <= r * r))
        b_rows = np.flatnonzero(base & (sem != sem[p]) & (d2 <= 4 * r * r))
        if cap:
            cut += (len(f_rows) > cap) + (len(b_rows) > cap)
            f_rows, b_rows = f_rows[:cap], b_rows[:cap]
        cnt[c], bg_cnt[c] = len(f_rows), len(b_rows)
        if len(f_rows):
            fg[c] = feats[f_rows].mean(0)
            grad[f_rows] += u[c] / len(f_rows)
        if len(b_rows):
            bg[c] = feats[b_rows].mean(0)
            grad[b_rows] += v[c] / len(b_rows)
    return dict(fg=fg, bg=bg, fg_count=cnt, bg_count=bg_cnt, grad=grad, cut=cut)


def _check_context(xyz, feats, sem, valid, scene, cand, cand_ok, r, cap=0, **kw):
    rng = np.random.default_rng(0)
    k, d = len(cand), feats.shape[1]
    u = rng.normal(size=(k, d)).astype(np.float32)
    v = rng.normal(size=(k, d)).astype(np.float32)

    def run(f):
        return aggregation.context_features(
            xyz, f, sem, valid, scene, cand, cand_ok, radius=r, neighbour_cap=cap, **kw
        )

    def weighted(f):
        fg_, bg_, _ = run(f)
        return (fg_ * u).sum() + (bg_ * v).sum()

    fg, bg, cnt = map(np.asarray, run(feats))
    want = _brute_context(xyz, feats, sem, valid, scene, cand, cand_ok, r, cap, u, v)
    np.testing.assert_allclose(fg, want["fg"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bg, want["bg"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(cnt, want["fg_count"])
    assert np.abs(want["grad"]).sum() > 1.0
    g = np.asarray(jax.grad(weighted)(feats))
    np.testing.assert_allclose(g, want["grad"], rtol=1e-4, atol=1e-6)
    return weighted, want


def test_context_features_capped_gradient_vs_brute_force_and_no_mask_residuals():
    # neighbour_cap keeps each list's first `cap` points in point order; the chunk size
    # (16) makes lists reach the cap inside a chunk and across chunk boundaries.
    rng = np.random.default_rng(11)
    n, k, r, cap = 200, 10, 0.35, 6
    xyz, feats, sem, scene, valid, cand = _random_points(rng, n, 3, k, 1.0, 2, 120, 0.9)
    cand_ok = np.ones(k, bool)
    cand_ok[3] = False
    _, want = _check_context(xyz, feats, sem, valid, scene, cand, cand_ok, r, cap=cap, chunk=16)
    assert want["cut"] >= 5, "the setting should cut several lists"
    # The backward pass recomputes the chunk masks: nothing of size K x N is saved, with
    # either rule for empty sets (the released scene mean is a segment sum per scene).
    for empty in ("zeros", "foreground_mean"):

        def loss(f, empty=empty):
            fg_, bg_, _ = aggregation.context_features(
                xyz, f, sem, valid, scene, cand, cand_ok, radius=r, chunk=16, empty=empty
            )
            return fg_.sum() + bg_.sum()

        vjp_fn = jax.eval_shape(lambda f, loss=loss: jax.vjp(loss, f)[1], feats)
        largest = max(x.size for x in jax.tree.leaves(vjp_fn) if hasattr(x, "size"))
        assert largest < k * n, (empty, largest)


@pytest.mark.parametrize("cap", [0, 5])
def test_context_features_scene_blocks_any_layout(cap):
    # Three packed scenes (rows 0-69, 70-139, 140-199) plus 40 padding rows (invalid,
    # scene id 3), 4 candidate slots per scene, chunks of 16 rows: block s visits only
    # the chunks of scene s. The layout also breaks the blocks' promise in every way
    # the results must survive: a slot of block 0 whose candidate lies in scene 2, a
    # few points with out-of-range scene ids and candidates of them in blocks 0 and 1, a
    # block with no valid candidate, and rows of scene 0 interleaved late (rows 150-154).
    # Out-of-range ids before and after every scene: rows 0-19 have id -1 (slot 0's
    # candidate), rows 224-231 (in the padding) id 7 (slot 5's).
    rng = np.random.default_rng(5)
    n, d, r = 240, 3, 0.3
    xyz = rng.uniform(0, 1.0, (n, 3)).astype(np.float32)
    feats = rng.normal(size=(n, d)).astype(np.float32)
    sem = rng.integers(0, 2, n).astype(np.int32)
    scene = np.repeat([0, 1, 2, 3], [70, 70, 60, 40]).astype(np.int32)
    scene[150:155] = 0
    scene[224:232] = 7
    scene[:20] = -1
    valid = (rng.uniform(size=n) < 0.9) & (scene != 3)
    valid[[5, 20, 150, 228, 160]] = True
    cand = np.array([5, 20, 150, 160,  # block 0: scene -1, scene 0, late scene 0, scene 2
                     75, 228, 90, 120,  # block 1: scene 1, out-of-range id 7, ...
                     141, 170, 199, 145,  # block 2: scene 2
                     210, 220, 230, 235])  # fmt: skip
    cand_ok = valid[cand].copy()
    cand_ok[[6, 12, 13, 14, 15]] = False  # block 3: no valid candidate
    assert cand_ok[[2, 3, 5]].all()
    for blocks in (1, 4):
        _check_context(
            xyz, feats, sem, valid, scene, cand, cand_ok, r, cap=cap, chunk=16,
            scene_blocks=blocks,
        )  # fmt: skip
    with pytest.raises(ValueError, match="scene_blocks"):
        aggregation.context_features(xyz, feats, sem, valid, scene, cand, cand_ok, scene_blocks=3)


def test_context_features_scene_blocks_visit_only_their_scene():
    # The spans themselves: packed scenes, each block visits its own scene's chunks.
    n_chunks, chunk = 10, 8
    scene = np.repeat([0, 1, 2], [20, 36, 24]).astype(np.int32).reshape(n_chunks, chunk)
    valid = np.ones((n_chunks, chunk), bool)
    valid[-1, 4:] = False  # trailing padding of scene 2 (rows 76-79)
    c_scene = jnp.asarray([0, 0, 1, 1, 2, 2, 2, 2], jnp.int32)
    c_ok = jnp.asarray([1, 1, 1, 0, 1, 0, 0, 0], bool)
    start, count = aggregation.scene_chunk_spans(
        c_scene, c_ok, jnp.asarray(valid), jnp.asarray(scene), 4
    )
    # scene 0: rows 0-19 -> chunks 0-2; scene 1: rows 20-55 -> chunks 2-6; scene 2: rows
    # 56-75 -> chunks 7-9; block 3: no valid candidate
    np.testing.assert_array_equal(np.asarray(count), [3, 5, 3, 0])
    np.testing.assert_array_equal(np.asarray(start)[:3], [0, 2, 7])
