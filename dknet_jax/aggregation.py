"""Candidate aggregation (paper Sec. 3.4): context features, merge targets and grouping.

Sits between candidate mining (`dknet_jax.candidates`, K candidate slots + ``ok``) and the
instance kernels. The learned part (the merge-score MLP over ``|F_a,i - F_a,j|``) lives in
the model heads; this module holds the parameter-free, jit-able pieces:

- `context_features`: fg / bg mean features around each candidate (and fg counts).
- `same_instance`: the K x K target of the merge BCE.
- `merge_groups` (public contract): connected components of ``scores >= threshold``
  (``strict=True``: ``scores > threshold``, the released rule), lead = highest-heat member.
  Equal to the paper's / released greedy merge (it joins the two whole groups with the
  highest remaining score above the threshold until none is left, which ends exactly in
  the connected components of that graph, whatever the order).
- `group_features`: per-group kernel input (neighbour-count-weighted mean of members' fg)
  and position (that of the lead, the highest-heat member).
- `compact_groups`: the groups of each scene moved into fewer instance slots (the mask
  decoder's cost is linear in the slot count, and most candidate slots are duplicates
  that merging folded into a lead).

Groups are represented by their lead slot: slot i holds group data iff ``lead[i] == i``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


@functools.partial(jax.jit, static_argnames=("threshold", "strict"))
def _merge_groups_jit(scores, ok, heat, *, threshold, strict):
    m = scores.shape[0]
    eye = jnp.eye(m, dtype=bool)
    pair_ok = ok[:, None] & ok[None, :]
    above = scores > threshold if strict else scores >= threshold
    reach = ((above | above.T) & pair_ok) | (eye & ok[:, None])
    # Transitive closure by repeated squaring: after s steps paths of length 2^s are in.
    steps = max(1, math.ceil(math.log2(max(m, 2))))

    def square(_, r):
        rf = r.astype(jnp.float32)
        return jnp.matmul(rf, rf, precision=jax.lax.Precision.HIGHEST) > 0.5

    reach = jax.lax.fori_loop(0, steps, square, reach)
    # Lead: member with the highest heat; argmax takes the first (lowest slot) on ties.
    key = jnp.where(reach, heat[None, :], -jnp.inf)
    lead = jnp.argmax(key, axis=1).astype(jnp.int32)
    return jnp.where(ok, lead, -1)


def merge_groups(scores, ok, heat, *, threshold=0.5, strict=False) -> Array:
    """Group duplicate candidates (public contract, docs/contracts.md section 2).

    Groups are the connected components of the graph with an edge i-j when
    ``scores[i, j] >= threshold`` or ``scores[j, i] >= threshold``, among valid slots.
    With ``strict`` the edge needs ``> threshold``: the released ``candidate_merge``
    (R:model/DKNet.py:219-238) repeatedly takes the highest remaining score, stops when it
    is not ``> merge_thre``, merges the two *whole* groups and zeroes the scores inside the
    merged group only; every cross-group score above the threshold is taken eventually, so
    its groups are these components (config ``model.merge_rule="released"``).

    Args:
      scores: f32[M, M] merge probabilities (the diagonal is ignored).
      ok: bool[M] valid candidate slots.
      heat: f32[M] candidate heatmap scores.
      threshold: edge threshold (0.5 in the paper).
      strict: ``>`` instead of ``>=`` (differs only for scores exactly at the threshold).
    Returns:
      lead: i32[M] slot of the member with the highest ``heat`` in each slot's group
      (ties: lower slot); -1 for invalid slots.
    """
    scores = jnp.asarray(scores, jnp.float32)
    ok = jnp.asarray(ok, bool)
    heat = jnp.asarray(heat, jnp.float32)
    if scores.ndim != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"merge_groups: scores must be f32[M, M], got shape {scores.shape}")
    m = scores.shape[0]
    if ok.shape != (m,) or heat.shape != (m,):
        raise ValueError(
            f"merge_groups: ok and heat must be [M] with M = {m}; got {ok.shape}, {heat.shape}"
        )
    return _merge_groups_jit(scores, ok, heat, threshold=float(threshold), strict=bool(strict))


def same_instance(cand_instance, ok) -> Array:
    """Merge-BCE target: 1 where candidates i and j lie in the same GT instance.

    Args:
      cand_instance: i32[K] GT instance id at each candidate point (< 0: none).
      ok: bool[K] valid candidate slots.
    Returns:
      f32[K, K]; 0 for pairs with an invalid slot or a candidate outside every instance.
      The BCE is to be averaged over ``ok[:, None] & ok[None, :]`` pairs.
    """
    inst = jnp.asarray(cand_instance, jnp.int32)
    ok = jnp.asarray(ok, bool) & (inst >= 0)
    same = (inst[:, None] == inst[None, :]) & ok[:, None] & ok[None, :]
    return same.astype(jnp.float32)


def _chunk_masks(cand, pts, counts, *, r2, r2_bg, cap):
    """Fg / bg membership bool[K, chunk] of one chunk of points for every candidate, and
    the running list lengths after it. ``cand = (xyz f32[K, 3], sem i32[K], scene i32[K],
    ok bool[K])``, ``pts = (xyz f32[chunk, 3], sem, valid, scene)``, ``counts`` = the
    lengths f32[K] before the chunk (the ``cap`` rule keeps a point while fewer than
    ``cap`` earlier points are in the list). Without a cap the lengths decide nothing and
    are returned unchanged (the forward pass counts the members with its matmul)."""
    c_xyz, c_sem, c_scene, c_ok = cand
    p_xyz, p_sem, p_valid, p_scene = pts
    fg_n, bg_n = counts
    d2 = sum((c_xyz[:, a][:, None] - p_xyz[:, a][None, :]) ** 2 for a in range(3))
    base = p_valid[None, :] & (p_scene[None, :] == c_scene[:, None]) & c_ok[:, None]
    same = p_sem[None, :] == c_sem[:, None]
    fg = base & same & (d2 <= r2)
    bg = base & ~same & (d2 <= r2_bg)
    if cap == 0:
        return fg, bg, counts

    def cut(masks):
        fg, bg = masks
        fg = fg & (fg_n[:, None] + jnp.cumsum(fg.astype(jnp.int32), axis=1) <= cap)
        bg = bg & (bg_n[:, None] + jnp.cumsum(bg.astype(jnp.int32), axis=1) <= cap)
        return fg, bg

    # the running sums only where a list reaches the cap in this chunk
    full = jnp.any(fg_n + fg.sum(1) > cap) | jnp.any(bg_n + bg.sum(1) > cap)
    fg, bg = jax.lax.cond(full, cut, lambda masks: masks, (fg, bg))
    return fg, bg, (fg_n + fg.sum(1), bg_n + bg.sum(1))


def scene_chunk_spans(c_scene, c_ok, p_valid, p_scene, blocks: int):
    """First chunk i32[blocks] and chunk count i32[blocks] each block of slots visits.

    ``c_scene i32[K]``, ``c_ok bool[K]``: scene and validity of each slot (candidate or
    instance); block s holds slots ``[s K/B, (s+1) K/B)``. ``p_valid``, ``p_scene``:
    the rows' validity and scene id, chunked ``[n_chunks, chunk]``. Block s needs the
    rows of the scenes of its valid slots: for a scene id in ``[0, blocks)`` the span from
    that scene's first to its last valid row (one segment min / max over the rows), for
    any other id every row. Blocks without a valid slot visit nothing. Exact for any
    input; small when each block's slots lie in one scene whose rows are contiguous
    (``pack_batch``). Used by :func:`context_features` and the mask decoder."""
    n_chunks, chunk = p_valid.shape
    rows = jnp.arange(n_chunks * chunk, dtype=jnp.int32)
    sid = p_scene.reshape(-1)
    sid = jnp.where(p_valid.reshape(-1) & (sid >= 0) & (sid < blocks), sid, blocks)
    first = jax.ops.segment_min(rows, sid, num_segments=blocks + 1)[:blocks]
    last = jax.ops.segment_max(rows, sid, num_segments=blocks + 1)[:blocks]
    known = (c_scene >= 0) & (c_scene < blocks)
    cs = jnp.clip(c_scene, 0, blocks - 1)
    lo = jnp.where(c_ok, jnp.where(known, first[cs], 0), n_chunks * chunk)
    hi = jnp.where(c_ok, jnp.where(known, last[cs], n_chunks * chunk - 1), -1)
    lo = lo.reshape(blocks, -1).min(1) // chunk
    hi = hi.reshape(blocks, -1).max(1)
    return lo, jnp.maximum(hi // chunk - lo + 1, 0) * (hi >= 0)


def _by_block(tree, blocks: int):
    return jax.tree.map(lambda a: a.reshape(blocks, -1, *a.shape[1:]), tree)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _context_sums(geom, feats, cand, pts):
    """Fg / bg feature sums f32[K, D] and list lengths f32[K] over the chunked points
    (``feats: f[n_chunks, chunk, D]``, ``pts`` the chunked point arrays of
    :func:`_chunk_masks`; ``geom = (r2, r2_bg, cap, blocks)``, static).

    The candidates are taken in ``blocks`` consecutive blocks, each over the chunks of
    :func:`scene_chunk_spans` only (for a packed batch of B scenes: its own scene's rows
    instead of all rows and the padding).

    Differentiable in ``feats`` only. The backward pass recomputes each chunk's masks
    instead of keeping them: autodiff of the scan kept both f32[K, chunk] masks of every
    chunk as residuals, 8 bytes per candidate and point (3.8 GB for the paper's batch of
    4 rooms: 600 candidates x 786k rows), written in the forward pass and read back.
    """
    return _context_sums_fwd(geom, feats, cand, pts)[0]


def _context_sums_fwd(geom, feats, cand, pts):
    r2, r2_bg, cap, blocks = geom
    d = feats.shape[-1]
    hi = jax.lax.Precision.HIGHEST
    start, count = scene_chunk_spans(cand[2], cand[3], pts[2], pts[3], blocks)
    ones = jnp.ones((feats.shape[1],), feats.dtype)

    def block(_, xs):
        cand_b, c0, cnt = xs
        kb = cand_b[0].shape[0]

        def step(i, carry):
            fg_sum, bg_sum, counts = carry
            p_f, p = jax.tree.map(lambda a: a[c0 + i], (feats, pts))
            fg, bg, counts = _chunk_masks(cand_b, p, counts, r2=r2, r2_bg=r2_bg, cap=cap)
            # fg and bg rows in one matmul (one pass over the chunk's features); without
            # a cap the member counts are a matrix-vector product of the same f32 mask
            # (exact: integers), not two more passes that rebuild the masks
            both = jnp.concatenate([fg, bg]).astype(feats.dtype)
            s = jnp.matmul(both, p_f, precision=hi)
            if cap == 0:
                n = jnp.matmul(both, ones, precision=hi)
                counts = (counts[0] + n[:kb], counts[1] + n[kb:])
            return fg_sum + s[:kb], bg_sum + s[kb:], counts

        zk = jnp.zeros((kb,), feats.dtype)
        zkd = jnp.zeros((kb, d), feats.dtype)
        fg_sum, bg_sum, (fg_n, bg_n) = jax.lax.fori_loop(0, cnt, step, (zkd, zkd, (zk, zk)))
        return None, (fg_sum, bg_sum, fg_n, bg_n)

    _, sums = jax.lax.scan(block, None, (_by_block(cand, blocks), start, count))
    sums = jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), sums)
    return sums, (cand, pts, start, count)


def _context_sums_bwd(geom, res, cts):
    r2, r2_bg, cap, blocks = geom
    cand, pts, start, count = res
    g_fg, g_bg = cts[0], cts[1]  # the counts are piecewise constant in feats
    hi = jax.lax.Precision.HIGHEST
    n_chunks, chunk = pts[2].shape

    def block(d_feats, xs):
        cand_b, g_fg_b, g_bg_b, c0, cnt = xs
        kb = cand_b[0].shape[0]
        g_both = jnp.concatenate([g_fg_b, g_bg_b])

        def step(i, carry):
            d_feats, counts = carry
            p = jax.tree.map(lambda a: a[c0 + i], pts)
            fg, bg, counts = _chunk_masks(cand_b, p, counts, r2=r2, r2_bg=r2_bg, cap=cap)
            both = jnp.concatenate([fg, bg]).astype(g_fg.dtype)
            d_f = jnp.matmul(both.T, g_both, precision=hi)
            return d_feats.at[c0 + i].add(d_f), counts

        zk = jnp.zeros((kb,), g_fg.dtype)
        d_feats, _ = jax.lax.fori_loop(0, cnt, step, (d_feats, (zk, zk)))
        return d_feats, None

    d0 = jnp.zeros((n_chunks, chunk, g_fg.shape[-1]), g_fg.dtype)
    xs = (_by_block(cand, blocks), *_by_block((g_fg, g_bg), blocks), start, count)
    d_feats, _ = jax.lax.scan(block, d0, xs)
    return d_feats, None, None


_context_sums.defvjp(_context_sums_fwd, _context_sums_bwd)


@functools.partial(jax.jit, static_argnames=("radius", "chunk", "empty", "cap", "blocks"))
def _context_jit(
    xyz, feats, sem_pred, valid, scene_id, cand_idx, cand_ok, *, radius, chunk, empty, cap, blocks
):
    n, d = feats.shape
    safe = jnp.clip(cand_idx, 0, n - 1)
    cand = (xyz[safe], sem_pred[safe], scene_id[safe], cand_ok)
    n_chunks = -(-n // chunk)
    pad = n_chunks * chunk - n
    padf = lambda a, v: jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1), constant_values=v)
    pts = (
        padf(xyz, 0.0).reshape(n_chunks, chunk, 3),
        padf(sem_pred, 0).reshape(n_chunks, chunk),
        padf(valid, False).reshape(n_chunks, chunk),
        padf(scene_id, 0).reshape(n_chunks, chunk),
    )
    # f32 squares, as the distances are f32 (hashable static numbers)
    geom = (np.float32(radius) ** 2, np.float32(2.0 * radius) ** 2, cap, blocks)
    p_feats = padf(feats, 0.0).reshape(n_chunks, chunk, d)
    fg_sum, bg_sum, fg_n, bg_n = _context_sums(geom, p_feats, cand, pts)
    fg_n, bg_n = jax.lax.stop_gradient((fg_n, bg_n))
    fg = fg_sum / jnp.maximum(fg_n, 1.0)[:, None]
    bg = bg_sum / jnp.maximum(bg_n, 1.0)[:, None]
    if empty == "foreground_mean":  # released utils.neighboors_pooling: an empty set
        # takes the mean feature of all valid points (the predicted foreground) of the
        # scene: one segment sum per scene id present (no K x N weights, none kept for the
        # backward pass either)
        _, scene_of = jnp.unique(scene_id, return_inverse=True, size=n, fill_value=0)
        scene_of = scene_of.reshape(n)
        sums = jax.ops.segment_sum(jnp.where(valid[:, None], feats, 0), scene_of, n)
        count = jax.ops.segment_sum(valid.astype(feats.dtype), scene_of, n)
        c = scene_of[safe]
        mean = sums[c] / jnp.maximum(count[c], 1.0)[:, None]
        fg = jnp.where((fg_n > 0)[:, None], fg, mean)
        bg = jnp.where((bg_n > 0)[:, None], bg, mean)
        fg = jnp.where(cand_ok[:, None], fg, 0.0)
        bg = jnp.where(cand_ok[:, None], bg, 0.0)
    return fg, bg, fg_n


def context_features(
    xyz,
    feats,
    sem_pred,
    valid,
    scene_id,
    cand_idx,
    cand_ok,
    *,
    radius=0.3,
    chunk=8192,
    empty="zeros",
    neighbour_cap=0,
    scene_blocks=1,
) -> tuple[Array, Array, Array]:
    """Foreground / background context of each candidate (paper Sec. 3.4).

    For candidate c at point ``p = cand_idx[c]`` (class ``s = sem_pred[p]``, scene
    ``scene_id[p]``), over valid points q of the same scene:
      fg[c] = mean of feats[q] with ``sem_pred[q] == s`` and ``|x_q - x_p|^2 <= R^2``;
      bg[c] = mean of feats[q] with ``sem_pred[q] != s`` and ``|x_q - x_p|^2 <= (2R)^2``.
    Empty sets give zeros (``empty="zeros"``) or, with ``empty="foreground_mean"`` (the
    released ``neighboors_pooling``), the mean of ``feats`` over the valid points of the
    candidate's scene (the released code takes it over the batch: the same at batch size
    1). The released code uses the predicted-foreground points only;
    pass that as ``valid``. Memory is bounded by chunking the points: O(K * chunk), in
    reverse mode too (the backward pass recomputes each chunk's membership masks).
    ``neighbour_cap`` > 0 keeps only the first ``neighbour_cap`` points of each set in
    point order (the released ``topk_nms`` lists of 2000 slots; config
    ``model.neighbour_cap``): the means, and the fg count (then at most the cap).

    Cost: each candidate visits only the point chunks between the first and last valid
    row of its scene (``scene_blocks`` consecutive, equal blocks of candidate slots share
    one span: the union over their valid candidates' scenes). Scene ids in
    ``[0, scene_blocks)`` give tight spans; any other id, all rows. The results are the
    same for any input; a packed batch of B scenes (contiguous rows, scene s's candidates
    in block s, as ``DKNet`` lays them out) costs ~1/B of all candidate-point pairs, and
    the padding rows after the last scene cost nothing.

    Args:
      xyz: f32[N, 3]; feats: f32[N, D'] reduced point features; sem_pred: i32[N].
      valid: bool[N] points that may contribute; scene_id: i32[N] scene of each point.
      cand_idx: i32[K] candidate point indices (any value in invalid slots);
      cand_ok: bool[K] valid slots.
      radius: R; chunk: points per step (static); empty: "zeros" | "foreground_mean";
      neighbour_cap: 0 (no cap) or the list length.
      scene_blocks: B >= 1 dividing K (above; static).
    Returns:
      fg f32[K, D'], bg f32[K, D'], fg_count f32[K] (the neighbour count used as the
      weight in `group_features`); zeros in invalid slots. Differentiable in ``feats``.
    """
    xyz = jnp.asarray(xyz, jnp.float32)
    feats = jnp.asarray(feats)
    n = xyz.shape[0]
    if xyz.shape != (n, 3) or feats.ndim != 2 or feats.shape[0] != n:
        raise ValueError(
            f"context_features: xyz must be f32[N, 3] and feats f32[N, D'] with the same N; "
            f"got {xyz.shape}, {feats.shape}"
        )
    sem_pred = jnp.asarray(sem_pred, jnp.int32)
    valid = jnp.asarray(valid, bool)
    scene_id = jnp.asarray(scene_id, jnp.int32)
    for name, a in (("sem_pred", sem_pred), ("valid", valid), ("scene_id", scene_id)):
        if a.shape != (n,):
            raise ValueError(f"context_features: {name} must be [N] = [{n}], got {a.shape}")
    cand_idx = jnp.asarray(cand_idx, jnp.int32)
    cand_ok = jnp.asarray(cand_ok, bool)
    if cand_idx.ndim != 1 or cand_ok.shape != cand_idx.shape:
        raise ValueError(
            f"context_features: cand_idx and cand_ok must be [K]; got {cand_idx.shape}, "
            f"{cand_ok.shape}"
        )
    chunk = int(max(1, min(int(chunk), n)))
    if empty not in ("zeros", "foreground_mean"):
        raise ValueError(
            f"context_features: empty={empty!r} is not one of ('zeros', 'foreground_mean')"
        )
    if int(neighbour_cap) < 0:
        raise ValueError(
            f"context_features: neighbour_cap must be >= 0 (0 = no cap), got {neighbour_cap}"
        )
    blocks = int(scene_blocks)
    if blocks < 1 or cand_idx.shape[0] % blocks:
        raise ValueError(
            f"context_features: scene_blocks must be >= 1 and divide the {cand_idx.shape[0]} "
            f"candidate slots, got {scene_blocks}"
        )
    return _context_jit(
        xyz,
        feats,
        sem_pred,
        valid,
        scene_id,
        cand_idx,
        cand_ok,
        radius=float(radius),
        chunk=chunk,
        empty=empty,
        cap=int(neighbour_cap),
        blocks=blocks,
    )


def group_features(lead, fg, fg_count, cand_pos) -> tuple[Array, Array, Array]:
    """Per-group kernel input and position, stored at the group's lead slot.

    Args:
      lead: i32[M] from `merge_groups` (-1 invalid).
      fg: f32[M, D'] candidates' fg features; fg_count: f32[M] their neighbour counts.
      cand_pos: f32[M, 3] candidate positions (xyz, or xyz + predicted offset).
    Returns:
      feat: f32[M, D'] at lead slots, the mean of the group members' fg weighted by
        fg_count (unweighted when all counts are 0); zeros elsewhere.
      pos: f32[M, 3] the lead's position (the highest-heat member); zeros elsewhere.
      group_ok: bool[M] slots that lead a group (``lead[i] == i``).
    """
    lead = jnp.asarray(lead, jnp.int32)
    fg = jnp.asarray(fg)
    fg_count = jnp.asarray(fg_count, fg.dtype)
    cand_pos = jnp.asarray(cand_pos)
    m = lead.shape[0]
    if fg.shape[0] != m or fg_count.shape != (m,) or cand_pos.shape != (m, 3):
        raise ValueError(
            f"group_features: expected fg [M, D'], fg_count [M], cand_pos [M, 3] with M = {m}; "
            f"got {fg.shape}, {fg_count.shape}, {cand_pos.shape}"
        )
    slots = jnp.arange(m, dtype=jnp.int32)
    group_ok = lead == slots
    member = lead[None, :] == slots[:, None]  # [group slot g, candidate j]
    w = jnp.where(member, fg_count[None, :], 0.0)
    w_sum = w.sum(1, keepdims=True)
    w = jnp.where(w_sum > 0, w, member.astype(fg.dtype))
    w = w / jnp.maximum(w.sum(1, keepdims=True), 1e-12)
    feat = jnp.matmul(w, fg, precision=jax.lax.Precision.HIGHEST)
    feat = jnp.where(group_ok[:, None], feat, 0.0)
    pos = jnp.where(group_ok[:, None], cand_pos, 0.0)
    return feat, pos, group_ok


def compact_groups(group_ok, arrays, *, scenes: int, slots: int):
    """Move each scene's groups into ``slots`` instance slots, in lead-slot order.

    Candidate slots come per scene in pick order (highest heatmap first), so the first
    ``slots`` groups of a scene are those whose lead has the highest heat. A scene with more
    groups than ``slots`` keeps the first ``slots`` of them and is flagged in ``overflow``
    (the caller counts it; ``slots`` equal to the candidate budget never overflows).

    Args:
      group_ok: bool[B*K] group leads (``group_features``), K candidate slots per scene.
      arrays: arrays with leading dim B*K (features, positions ...), moved alike.
      scenes: B; slots: instance slots per scene (<= K).
    Returns:
      (moved arrays with leading dim B*slots (zeros in empty slots), inst_ok bool[B*slots],
      source i32[B*slots] the candidate slot each instance came from (B*K when empty),
      overflow bool[B]).
    """
    m = group_ok.shape[0]
    k = m // scenes
    if k * scenes != m or not 0 < slots <= k:
        raise ValueError(
            f"compact_groups: {m} slots are not {scenes} scenes of K slots, or "
            f"slots={slots} is not in [1, K]"
        )
    ok = group_ok.reshape(scenes, k)
    rank = jnp.cumsum(ok, axis=1) - 1
    keep = ok & (rank < slots)
    base = (jnp.arange(scenes, dtype=jnp.int32) * slots)[:, None]
    dest = jnp.where(keep, base + rank, scenes * slots).reshape(-1)  # out of range: dropped
    source = (
        jnp.full((scenes * slots,), m, jnp.int32)
        .at[dest]
        .set(jnp.arange(m, dtype=jnp.int32), mode="drop")
    )
    inst_ok = source < m
    safe = jnp.clip(source, 0, m - 1)
    moved = [jnp.where(inst_ok.reshape((-1,) + (1,) * (a.ndim - 1)), a[safe], 0) for a in arrays]
    overflow = jnp.sum(ok, axis=1) > slots
    return moved, inst_ok, source, overflow
