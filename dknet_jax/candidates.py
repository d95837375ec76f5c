"""Candidate mining: heatmap -> a fixed budget of instance-centroid candidates.

Sits between the centroid-heatmap head (``H`` per point) and candidate aggregation
(`dknet_jax.aggregation`). Three miners, all pure, jit-able and static-shape:

- `ln_nms` (default; paper Sec. 3.3): the greedy loop with local normalisation.
- `nms`: the same greedy loop without normalisation (GICN-style NMS; Table 4 ablation).
- `random_candidates`: random foreground points above a heatmap threshold (Table 4).

`mine_candidates` dispatches on a method name (static).

**Exactness: a pool, and the whole scene when the pool runs out.** The greedy loop always
processes the highest remaining point (ties: lower index first). Sort the valid points by
(score desc, index asc) and keep the first ``K = min(pool_size, N)``: this pool is closed
upward, so (a) while any pool point remains, the loop over *all* points processes a pool
point, identically to the loop run inside the pool, and (b) for a pool point ``p`` the max
of valid scores within R equals the max over pool points within R (a point outside the pool
scores at most ``H_p``). So the pool's result equals the full loop's result unless the pool
empties before ``max_candidates`` candidates are found while valid points outside the pool
exist (``exhausted``). In that case the loop is run again over every point of the scene
(`_scene_loop`: one pick per step, O(N) work per pick, no N x N matrix), so the result is
**always** the full loop's result; the pool is a speed device, never an approximation.
``exhausted`` is returned so callers can count how often the slower path ran (it is
conservative: also set when the outside points were all suppressed already). A budget far
above the number of instances (the released 150 per scene) empties the pool of any scene
with more foreground points than ``pool_size``, so the full-scene loop is the common path
there; it costs (picks x N), about the pool loop's (picks x K) plus one pass over N per pick.

**Inside the pool** the picks form the lexicographically-first maximal independent set of
the within-R graph in pool order. ``algorithm="sequential"`` finds it one pick per
``while_loop`` step; ``"rounds"`` decides every row whose earlier neighbours are decided in
one K x K masked reduction per round (about 10 rounds on heatmap-like scenes, K at worst).
Same result; ``"auto"`` picks sequential on CPU and rounds elsewhere, the faster of the two
on each (timings: ``docs/benchmarks.md``, "LN-NMS algorithms").

Batched use: pass the flat packed arrays of B scenes and vmap over per-scene ``valid``
masks (points of other scenes invalid): ``jax.vmap(ln_nms, in_axes=(None, None, 0))``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array

METHODS = ("ln_nms", "nms", "random")
ALGORITHMS = ("sequential", "rounds")  # same result; see _lfmis_sequential / _lfmis_rounds


def _check_inputs(xyz, score, valid) -> tuple[Array, Array, Array]:
    xyz = jnp.asarray(xyz, jnp.float32)
    score = jnp.asarray(score, jnp.float32)
    valid = jnp.asarray(valid, bool)
    if xyz.ndim != 2 or xyz.shape[-1] != 3:
        raise ValueError(f"candidate mining: xyz must be f32[N, 3], got shape {xyz.shape}")
    n = xyz.shape[0]
    if score.shape != (n,) or valid.shape != (n,):
        raise ValueError(
            "candidate mining: score and valid must be [N] with N = xyz.shape[0] = "
            f"{n}; got score {score.shape}, valid {valid.shape} (vmap over scenes for a batch)"
        )
    if n == 0:
        raise ValueError("candidate mining: the scene has no points (N = 0); pad it to >= 1 row")
    return xyz, score, valid


def _check_sizes(max_candidates: int, pool_size: int) -> None:
    if int(max_candidates) < 1:
        raise ValueError(f"candidate mining: max_candidates must be >= 1, got {max_candidates}")
    if int(pool_size) < 1:
        raise ValueError(f"candidate mining: pool_size must be >= 1, got {pool_size}")


def _resolve_algorithm(algorithm: str) -> str:
    if algorithm == "auto":
        return "sequential" if jax.default_backend() == "cpu" else "rounds"
    if algorithm not in ALGORITHMS:
        raise ValueError(
            f"candidate mining: algorithm must be 'auto' or one of {ALGORITHMS}, got {algorithm!r}"
        )
    return algorithm


def _greedy_pool(
    xyz,
    score,
    valid,
    *,
    radius,
    threshold,
    normalise,
    max_candidates,
    pool_size,
    algorithm,
    classes=None,
    released=False,
    cap=0,
):
    """The greedy suppression loop run inside the top-K pool.

    ``released`` (with ``classes`` i32[N]): the released ``topk_nms`` rule (see
    `ln_nms_with_info`); with ``cap`` > 0 its normaliser sees only the first ``cap``
    same-class points within R in point order, which depends on points outside any pool,
    so the whole-scene loop runs directly (``exhausted`` is then True: the slow path ran).
    Returns (idx i32[max_candidates], ok bool[max_candidates], exhausted bool[]).
    """
    n = xyz.shape[0]
    k = min(int(pool_size), n)
    m = int(max_candidates)
    if released and cap > 0:
        idx, ok = _scene_loop(
            xyz,
            score,
            valid,
            jnp.bool_(True),
            radius=radius,
            threshold=threshold,
            normalise=normalise,
            max_candidates=m,
            classes=classes,
            released=True,
            cap=cap,
        )
        return idx, ok, jnp.bool_(True)
    masked = jnp.where(valid, score, -jnp.inf)
    # lax.top_k is stable: equal scores come out lower index first.
    _, pool = jax.lax.top_k(masked, k)
    pool_ok = valid[pool]
    ps = score[pool]
    px = xyz[pool]
    # K x K "within R" (squared distance <= R^2), written per axis so XLA fuses it.
    d2 = sum((px[:, a][:, None] - px[:, a][None, :]) ** 2 for a in range(3))
    if released:  # strict radius; the normaliser over same-class neighbours; ratio >= T
        adj = (d2 < jnp.float32(radius) ** 2) & pool_ok[None, :]
        pc = classes[pool]
        nb_max = jnp.max(jnp.where(adj & (pc[:, None] == pc[None, :]), ps[None, :], -jnp.inf), 1)
        norm = jnp.where(nb_max > 0, ps / jnp.where(nb_max > 0, nb_max, 1.0), 0.0)
        accept = norm >= threshold
    elif normalise:
        adj = (d2 <= jnp.float32(radius) ** 2) & pool_ok[None, :]
        # Max of valid scores within R (suppressed or not); includes the point itself.
        nb_max = jnp.max(jnp.where(adj, ps[None, :], -jnp.inf), axis=1)
        norm = jnp.where(nb_max > 0, ps / jnp.where(nb_max > 0, nb_max, 1.0), 0.0)
        accept = norm > threshold
    else:
        adj = (d2 <= jnp.float32(radius) ** 2) & pool_ok[None, :]
        accept = jnp.ones((k,), bool)
    accept = accept & pool_ok

    if algorithm == "sequential":
        picked, decided = _lfmis_sequential(adj, accept, pool_ok, m)
    else:
        picked, decided = _lfmis_rounds(adj, accept, pool_ok, m)
    cand = picked & accept
    n_found = jnp.sum(cand)
    slot = jnp.where(cand, jnp.cumsum(cand) - 1, m)  # pool order = pick order
    idx = jnp.full((m,), n, jnp.int32).at[slot].set(pool.astype(jnp.int32), mode="drop")
    ok = jnp.zeros((m,), bool).at[slot].set(True, mode="drop")
    outside = jnp.sum(valid) > jnp.sum(pool_ok)
    exhausted = decided & (n_found < m) & outside
    # Exact fallback: rerun the loop over the whole scene where the pool ran out. The loop
    # does no step where ``exhausted`` is False (and under vmap only those scenes step).
    full_idx, full_ok = _scene_loop(
        xyz,
        score,
        valid,
        exhausted,
        radius=radius,
        threshold=threshold,
        normalise=normalise,
        max_candidates=m,
        classes=classes,
        released=released,
    )
    idx = jnp.where(exhausted, full_idx, idx)
    ok = jnp.where(exhausted, full_ok, ok)
    return idx, ok, exhausted


def first_argmax(v: Array) -> Array:
    """``jnp.argmax`` of ``v: f32[N]`` (the first maximum; the first NaN if any) as a max
    and a min-index: two vectorised reductions, ~4x faster than XLA:CPU's argmax, which
    the scene loop below calls once per pick (~1 ms per call at N 197k)."""
    top = jnp.max(v)
    hit = (v == top) | jnp.isnan(v)
    return jnp.min(jnp.where(hit, jnp.arange(v.shape[0], dtype=jnp.int32), v.shape[0]))


def _scene_loop(
    xyz,
    score,
    valid,
    active,
    *,
    radius,
    threshold,
    normalise,
    max_candidates,
    classes=None,
    released=False,
    cap=0,
):
    """The greedy loop over every point of the scene, one pick per step (O(N) per pick).

    Runs only while ``active`` (bool[]); returns (idx i32[max_candidates], N in empty
    slots; ok bool[max_candidates], a prefix). Same tie rule as the pool (the highest
    remaining score, lower index first: ``argmax`` returns the first maximum). ``cap``
    (released rule only): the normaliser is the max of ``score[p]`` and the scores of the
    first ``cap`` valid same-class points within R in point order.
    """
    n = xyz.shape[0]
    m = int(max_candidates)
    r2 = jnp.float32(radius) ** 2
    masked = jnp.where(valid, score, -jnp.inf)

    def cond(state):
        removed, _, n_cand = state
        return active & (n_cand < m) & jnp.any(~removed)

    def body(state):
        removed, idx, n_cand = state
        p = first_argmax(jnp.where(removed, -jnp.inf, score))
        d2 = sum((xyz[:, a] - xyz[p, a]) ** 2 for a in range(3))
        if released:
            near = d2 < r2
            same = near & (classes == classes[p])
            if cap > 0:  # the released fg list keeps its first `cap` entries
                listed = same & valid
                same = listed & (jnp.cumsum(listed.astype(jnp.int32)) <= cap)
                same = same.at[p].set(True)  # max_conf starts at the point's own heat
            nb_max = jnp.max(jnp.where(same, masked, -jnp.inf))
            norm = jnp.where(nb_max > 0, score[p] / jnp.where(nb_max > 0, nb_max, 1.0), 0.0)
            take = norm >= threshold
        elif normalise:
            near = d2 <= r2
            nb_max = jnp.max(jnp.where(near, masked, -jnp.inf))
            norm = jnp.where(nb_max > 0, score[p] / jnp.where(nb_max > 0, nb_max, 1.0), 0.0)
            take = norm > threshold
        else:
            near = d2 <= r2
            take = jnp.bool_(True)
        idx = jnp.where(take, idx.at[n_cand].set(p.astype(jnp.int32)), idx)
        removed = (removed | near).at[p].set(True)
        return removed, idx, n_cand + take.astype(jnp.int32)

    init = (~valid, jnp.full((m,), n, jnp.int32), jnp.int32(0))
    _, idx, n_cand = jax.lax.while_loop(cond, body, init)
    return idx, jnp.arange(m) < n_cand


def _lfmis_sequential(adj, accept, pool_ok, m):
    """The greedy loop, one pick per iteration (cheap per step; best on CPU).

    adj: bool[K, K] within-R among pool rows (sorted by pick priority); accept: bool[K];
    pool_ok: bool[K]. Returns (picked bool[K]: rows the loop processed, in the lexicographic
    maximal independent set; decided bool[]: the loop ran out of rows).
    """
    k = adj.shape[0]

    def cond(state):
        removed, _, n_cand = state
        return (n_cand < m) & jnp.any(~removed)

    def body(state):
        removed, picked, n_cand = state
        p = jnp.argmin(removed)  # first remaining row = highest remaining point
        picked = picked.at[p].set(True)
        removed = (removed | adj[p]).at[p].set(True)
        return removed, picked, n_cand + accept[p].astype(jnp.int32)

    init = (~pool_ok, jnp.zeros((k,), bool), jnp.int32(0))
    removed, picked, _ = jax.lax.while_loop(cond, body, init)
    return picked, jnp.all(removed)


def _lfmis_rounds(adj, accept, pool_ok, m):
    """The same set, decided in parallel rounds (best on accelerators).

    A row is picked iff no earlier picked row is within R (the greedy loop's invariant).
    Each round decides every undecided row whose earlier neighbours are decided: "out" if
    one of them is picked, else "in". The first undecided row is always decided, so at
    most K rounds; heatmap-like scenes take ~10. Stops early once the decided prefix holds
    ``m`` accepted picks (later rows cannot change them). Returns as `_lfmis_sequential`.
    """
    k = adj.shape[0]
    pos = jnp.arange(k)
    earlier = adj & (pos[None, :] < pos[:, None])  # [row, earlier neighbour]
    undecided, picked_, out = 0, 1, 2

    def prefix_full(st):
        first_open = jnp.min(jnp.where(st == undecided, pos, k))
        return jnp.sum((st == picked_) & accept & (pos < first_open)) >= m

    def cond(st):
        return jnp.any(st == undecided) & ~prefix_full(st)

    def body(st):
        has_in = jnp.any(earlier & (st == picked_)[None, :], axis=1)
        pending = jnp.any(earlier & (st == undecided)[None, :], axis=1)
        open_ = st == undecided
        st = jnp.where(open_ & has_in, out, st)
        return jnp.where(open_ & ~has_in & ~pending, picked_, st)

    init = jnp.where(pool_ok, undecided, out).astype(jnp.int8)
    st = jax.lax.while_loop(cond, body, init)
    return st == picked_, ~jnp.any(st == undecided)


@functools.partial(
    jax.jit,
    static_argnames=("radius", "threshold", "max_candidates", "pool_size", "algorithm", "cap"),
)
def _ln_nms_jit(
    xyz, score, valid, classes, *, radius, threshold, max_candidates, pool_size, algorithm, cap
):
    # classes None: the paper's rule; i32[N]: the released rule (``ln_nms_with_info``)
    return _greedy_pool(
        xyz,
        score,
        valid,
        radius=radius,
        threshold=threshold,
        normalise=True,
        max_candidates=max_candidates,
        pool_size=pool_size,
        algorithm=algorithm,
        classes=classes,
        released=classes is not None,
        cap=cap if classes is not None else 0,
    )


def ln_nms_with_info(
    xyz,
    score,
    valid,
    *,
    radius=0.3,
    threshold=0.5,
    max_candidates=200,
    pool_size=4096,
    algorithm="auto",
    classes=None,
    neighbour_cap=0,
) -> tuple[Array, Array, Array]:
    """LN-NMS (paper Sec. 3.3) plus the pool-exhaustion flag.

    Greedy loop over valid points: take the highest remaining point p (ties: lower index);
    its normalised score is ``H_p / max{H_q : q valid, |x_q - x_p| <= radius}`` (suppressed
    or not; 0 when that max is <= 0); if it is > ``threshold`` p becomes a candidate; in
    both cases p and every remaining point within ``radius`` of it are removed. Stops when
    ``max_candidates`` candidates exist or no point remains. "Within R" is tested as
    squared distance <= radius**2 in float32.

    Args:
      xyz: f32[N, 3] point coordinates (metres).
      score: f32[N] heatmap H (non-negative for the normalisation to be meaningful).
      valid: bool[N] points that take part (foreground of this scene).
      radius, threshold: R and T of the paper.
      max_candidates: N_max, the number of output slots.
      pool_size: K, the static pool of top-scoring points (see the module docstring).
      algorithm: "sequential" (one pick per step), "rounds" (parallel rounds over the
        K x K mask) or "auto" (sequential on CPU, rounds elsewhere); identical results.
      classes: None (the rule above) or i32[N] predicted classes: the released
        ``topk_nms`` rule instead, "within R" is ``d^2 < R^2`` (strict), the normaliser is
        the max over p's *same-class* points within R, and p is kept iff the ratio is
        ``>= threshold`` (config ``model.cand_rule="released"``).
      neighbour_cap: with ``classes``, > 0 limits that normaliser to p itself and the
        first ``neighbour_cap`` valid same-class points within R in point order (the
        released fg list of 2000 slots; config ``model.neighbour_cap``); the whole-scene
        loop then always runs. 0 = no cap. Ignored without ``classes``.

    Returns:
      idx: i32[max_candidates] point indices in pick order; N (the sentinel) in empty slots.
      ok: bool[max_candidates] filled slots (a prefix of the slots).
      exhausted: bool[] the pool emptied before ``max_candidates`` candidates were found
        while valid points outside the pool exist; the loop then ran again over the whole
        scene (same result, slower). A raised ``pool_size`` makes it rarer.
    """
    _check_sizes(max_candidates, pool_size)
    xyz, score, valid = _check_inputs(xyz, score, valid)
    if int(neighbour_cap) < 0:
        raise ValueError(f"ln_nms: neighbour_cap must be >= 0 (0 = no cap), got {neighbour_cap}")
    if classes is not None:
        classes = jnp.asarray(classes, jnp.int32)
        if classes.shape != score.shape:
            raise ValueError(f"ln_nms: classes must be [N] = {score.shape}, got {classes.shape}")
    return _ln_nms_jit(
        xyz,
        score,
        valid,
        classes,
        radius=float(radius),
        threshold=float(threshold),
        max_candidates=int(max_candidates),
        pool_size=int(pool_size),
        algorithm=_resolve_algorithm(algorithm),
        cap=int(neighbour_cap) if classes is not None else 0,
    )


def ln_nms(
    xyz,
    score,
    valid,
    *,
    radius=0.3,
    threshold=0.5,
    max_candidates=200,
    pool_size=4096,
    algorithm="auto",
) -> tuple[Array, Array]:
    """LN-NMS candidate mining (public contract, docs/contracts.md section 2).

    Same as `ln_nms_with_info` without the exhaustion flag.

    Args:
      xyz: f32[N, 3]; score: f32[N] heatmap; valid: bool[N] foreground.
    Returns:
      idx: i32[max_candidates] point indices in pick order (N in empty slots);
      ok: bool[max_candidates] filled slots.
    """
    idx, ok, _ = ln_nms_with_info(
        xyz,
        score,
        valid,
        radius=radius,
        threshold=threshold,
        max_candidates=max_candidates,
        pool_size=pool_size,
        algorithm=algorithm,
    )
    return idx, ok


@functools.partial(jax.jit, static_argnames=("radius", "max_candidates", "pool_size", "algorithm"))
def _nms_jit(xyz, score, valid, *, radius, max_candidates, pool_size, algorithm):
    return _greedy_pool(
        xyz,
        score,
        valid,
        radius=radius,
        threshold=0.0,
        normalise=False,
        max_candidates=max_candidates,
        pool_size=pool_size,
        algorithm=algorithm,
    )


def nms_with_info(
    xyz,
    score,
    valid,
    *,
    radius=0.3,
    score_threshold=None,
    max_candidates=200,
    pool_size=4096,
    algorithm="auto",
) -> tuple[Array, Array, Array]:
    """Plain NMS (no local normalisation) plus the pool-exhaustion flag.

    Greedy loop over valid points with ``score > score_threshold`` (all valid points when
    ``score_threshold`` is None): the highest remaining point (ties: lower index) becomes
    a candidate and removes every remaining point within ``radius`` (squared distance <=
    radius**2). Stops at ``max_candidates`` candidates or when no point remains.

    Args:
      xyz: f32[N, 3]; score: f32[N]; valid: bool[N].
    Returns:
      idx i32[max_candidates] (N in empty slots), ok bool[max_candidates], exhausted bool[]
      (the pool ran out and the whole-scene loop ran; as in `ln_nms_with_info`).
    """
    _check_sizes(max_candidates, pool_size)
    xyz, score, valid = _check_inputs(xyz, score, valid)
    if score_threshold is not None:
        valid = valid & (score > jnp.float32(score_threshold))
    return _nms_jit(
        xyz,
        score,
        valid,
        radius=float(radius),
        max_candidates=int(max_candidates),
        pool_size=int(pool_size),
        algorithm=_resolve_algorithm(algorithm),
    )


def nms(
    xyz,
    score,
    valid,
    *,
    radius=0.3,
    score_threshold=None,
    max_candidates=200,
    pool_size=4096,
    algorithm="auto",
) -> tuple[Array, Array]:
    """Plain NMS candidate mining; `nms_with_info` without the flag.

    Returns idx i32[max_candidates] (N in empty slots), ok bool[max_candidates].
    """
    idx, ok, _ = nms_with_info(
        xyz,
        score,
        valid,
        radius=radius,
        score_threshold=score_threshold,
        max_candidates=max_candidates,
        pool_size=pool_size,
        algorithm=algorithm,
    )
    return idx, ok


@functools.partial(jax.jit, static_argnames=("max_candidates", "relative"))
def _random_jit(key, score, valid, threshold, *, max_candidates, relative):
    n = score.shape[0]
    if relative:
        top = jnp.max(jnp.where(valid, score, -jnp.inf))
        threshold = threshold * top
    eligible = valid & (score > threshold)
    u = jax.random.uniform(key, (n,))
    m = min(int(max_candidates), n)
    _, idx = jax.lax.top_k(jnp.where(eligible, u, -1.0), m)
    ok = eligible[idx]
    idx = jnp.where(ok, idx, n).astype(jnp.int32)
    pad = int(max_candidates) - m
    if pad:
        idx = jnp.concatenate([idx, jnp.full((pad,), n, jnp.int32)])
        ok = jnp.concatenate([ok, jnp.zeros((pad,), bool)])
    # Filled slots first (eligible points got u >= 0 > -1, so they already are).
    return idx, ok


def random_candidates(
    key, score, valid, *, threshold, max_candidates=200, relative=False
) -> tuple[Array, Array]:
    """Random candidates (Table 4 "Random"): up to N_max distinct random valid points
    whose heatmap is above ``threshold``, uniformly without replacement.

    Args:
      key: a `jax.random` key.
      score: f32[N] heatmap; valid: bool[N] foreground.
      threshold: points need ``score > threshold`` (``> threshold * max valid score`` when
        ``relative``; useful since a per-scene softmax heatmap scales like 1/N).
      max_candidates: N_max slots.
    Returns:
      idx i32[max_candidates] (N in empty slots), ok bool[max_candidates] (filled first).
    """
    if int(max_candidates) < 1:
        raise ValueError(f"random_candidates: max_candidates must be >= 1, got {max_candidates}")
    score = jnp.asarray(score, jnp.float32)
    valid = jnp.asarray(valid, bool)
    if score.ndim != 1 or valid.shape != score.shape or score.shape[0] == 0:
        raise ValueError(
            f"random_candidates: score and valid must be [N] with N >= 1, got {score.shape}, "
            f"{valid.shape}"
        )
    return _random_jit(
        key,
        score,
        valid,
        jnp.float32(threshold),
        max_candidates=int(max_candidates),
        relative=bool(relative),
    )


def mine_candidates(
    method: str,
    xyz,
    score,
    valid,
    *,
    key=None,
    radius: float = 0.3,
    threshold: float = 0.5,
    score_threshold: float | None = None,
    max_candidates: int = 200,
    pool_size: int = 4096,
    relative: bool = False,
    algorithm: str = "auto",
    classes=None,
    neighbour_cap: int = 0,
) -> tuple[Array, Array, Array]:
    """Dispatch to a candidate miner by name (``method`` is static).

    - ``"ln_nms"``: `ln_nms_with_info` with ``radius``, ``threshold``, ``algorithm``,
      ``classes`` (None, or the predicted classes for the released rule) and
      ``neighbour_cap``.
    - ``"nms"``: `nms_with_info` with ``radius``, ``score_threshold``, ``algorithm``.
    - ``"random"``: `random_candidates` with ``key`` (required), ``score_threshold`` as its
      threshold (0 when None) and ``relative``.

    Args:
      xyz: f32[N, 3]; score: f32[N]; valid: bool[N].
    Returns:
      idx i32[max_candidates], ok bool[max_candidates], exhausted bool[] (always False for
      ``"random"``).
    """
    if method == "ln_nms":
        return ln_nms_with_info(
            xyz,
            score,
            valid,
            radius=radius,
            threshold=threshold,
            max_candidates=max_candidates,
            pool_size=pool_size,
            algorithm=algorithm,
            classes=classes,
            neighbour_cap=neighbour_cap,
        )
    if method == "nms":
        return nms_with_info(
            xyz,
            score,
            valid,
            radius=radius,
            score_threshold=score_threshold,
            max_candidates=max_candidates,
            pool_size=pool_size,
            algorithm=algorithm,
        )
    if method == "random":
        if key is None:
            raise ValueError("mine_candidates('random', ...) needs key=jax.random.key(...)")
        idx, ok = random_candidates(
            key,
            score,
            valid,
            threshold=0.0 if score_threshold is None else score_threshold,
            max_candidates=max_candidates,
            relative=relative,
        )
        return idx, ok, jnp.zeros((), bool)
    raise ValueError(f"mine_candidates: unknown method {method!r}; choose one of {METHODS}")
