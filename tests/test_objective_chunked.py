"""objective.compute_losses: the chunked mask path (outputs without ``mask_logits``) gives
the dense path's loss, metrics and gradients, and never builds an [M, N] array.

The "model" is a small differentiable function of a few parameter arrays that fills every
field of ``DKNetOutputs`` that the objective reads (the full DKNet takes ~30 s per compile
on a CPU; ``tests/test_train.py`` runs the real training step on the default path).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dknet_jax.config import base_config
from dknet_jax.model import mask_decoder as masks
from dknet_jax.model.dknet import DKNetOutputs
from dknet_jax.model.heads import PointHeadOutputs, predicted_foreground, scene_softmax
from dknet_jax.model.mask_decoder import num_kernel_params
from dknet_jax.objective import compute_losses, loss_weights, mask_loss
from dknet_jax.objective import terms as L
from dknet_jax.types import IGNORE_LABEL, PointBatch

# sizes chosen pairwise distinct where the [M, N] check below could confuse them
B, K, N, G, S = 2, 5, 61, 8, 5  # scenes, slots per scene, points, GT slots, classes
M = B * K  # 10 instance slots
F, CM, H = 3, 4, 6  # point feature width, mask feature width, dynamic hidden
LK = num_kernel_params(CM + 3, H)  # 55
CHUNK = 9  # 61 points -> 7 chunks, 63 padded rows


def _batch(seed=0):
    """Two scenes (3 and 2 GT instances, some background), 4 padding rows, 3 empty GT
    slots."""
    rng = np.random.default_rng(seed)
    valid = np.ones(N, bool)
    valid[-4:] = False
    batch_id = np.where(np.arange(N) < 30, 0, 1).astype(np.int32)
    batch_id[~valid] = B
    inst_batch = np.array([0, 0, 0, 1, 1, B, B, B], np.int32)
    centers = rng.normal(size=(G, 3)).astype(np.float32) * 2.0
    instance = np.full(N, IGNORE_LABEL, np.int32)
    for i in np.flatnonzero(valid):
        if rng.random() < 0.85:
            instance[i] = rng.choice(np.flatnonzero(inst_batch == batch_id[i]))
    xyz = rng.normal(size=(N, 3)).astype(np.float32) * 0.4
    xyz[instance >= 0] += centers[instance[instance >= 0]]
    xyz[~valid] = 0.0
    inst_class = np.array([2, 3, 4, 2, 3] + [IGNORE_LABEL] * 3, np.int32)
    semantic = np.where(instance >= 0, inst_class[np.maximum(instance, 0)], 0)
    semantic = np.where(rng.random(N) < 0.2, rng.integers(0, S, N), semantic)
    semantic = np.where(valid, semantic, IGNORE_LABEL).astype(np.int32)
    feats = rng.normal(size=(N, F)).astype(np.float32)
    feats[~valid] = 0.0
    return PointBatch(
        xyz=jnp.asarray(xyz),
        feats=jnp.asarray(feats),
        vox=jnp.zeros((N, 3), jnp.int32),
        batch_id=jnp.asarray(batch_id),
        valid=jnp.asarray(valid),
        semantic=jnp.asarray(semantic),
        instance=jnp.asarray(instance),
        superpoint=jnp.zeros(N, jnp.int32),
        instance_class=jnp.asarray(inst_class),
        instance_batch=jnp.asarray(inst_batch),
        instance_valid=jnp.asarray(inst_batch < B),
        scene_valid=jnp.ones(B, bool),
    )


def _params(batch, seed=1):
    rng = np.random.default_rng(seed)
    kernels = rng.normal(size=(M, LK)).astype(np.float32) * 0.4
    kernels[:, -1] = rng.uniform(-0.5, 1.5, M)  # b2: masks of varied size
    # instance centroids near the GT centroids of their scene (matching by proximity,
    # class term deciding the close calls)
    cent = np.array([[0, 1, 2, 0, 1], [3, 4, 3, 4, 3]]).reshape(-1)
    inst = np.asarray(batch.instance)
    gt_c = np.stack([np.asarray(batch.xyz)[inst == g].mean(0) for g in range(5)])
    pos = gt_c[cent] + rng.normal(size=(M, 3)) * 0.5
    p = {
        "kernels": kernels,
        "pos": pos,
        "mask_w": rng.normal(size=(F, CM)),
        "sem_w": rng.normal(size=(F, S)),
        "sem_b": np.array([0, 0, 1.5, 1.5, 1.5]),
        "off_w": rng.normal(size=(F, 3)) * 0.3,
        "heat_w": rng.normal(size=F),
        "merge": rng.normal(size=(M, M)),
    }
    return {k: jnp.asarray(v, jnp.float32) for k, v in p.items()}


# fixed (non-parameter) outputs: candidate slots and which of them hold instances
CAND_OK = jnp.asarray([1, 1, 1, 1, 0, 1, 1, 1, 1, 1], bool)
INST_OK = jnp.asarray([1, 1, 1, 0, 0, 1, 0, 1, 1, 1], bool)
CAND_BATCH = jnp.repeat(jnp.arange(B, dtype=jnp.int32), K)


def _outputs(p, batch, *, decode: bool) -> DKNetOutputs:
    """DKNetOutputs from the parameters; ``decode`` = what ``DKNet(..., decode_masks=)``
    does: mask logits f32[M, N] decoded (dense path) or None (chunked path)."""
    x = batch.feats
    sem_logits = x @ p["sem_w"] + p["sem_b"]
    fg = predicted_foreground(sem_logits, batch.valid, 2)
    heads = PointHeadOutputs(
        semantic_logits=sem_logits,
        offset=x @ p["off_w"],
        heat_logits=x @ p["heat_w"],
        reduce_feats=jnp.zeros((N, 2)),
        mask_feats=jnp.tanh(x @ p["mask_w"]),
        foreground=fg,
    )
    heat = scene_softmax(heads.heat_logits, batch.batch_id, fg, B)
    cand_idx = jnp.asarray(np.r_[np.arange(0, 25, 5), np.arange(30, 55, 5)], jnp.int32)
    cand_idx = jnp.where(CAND_OK, cand_idx, N)
    pair_mask = (
        CAND_OK[:, None]
        & CAND_OK[None, :]
        & (CAND_BATCH[:, None] == CAND_BATCH[None, :])
        & ~jnp.eye(M, dtype=bool)
    )
    inst_pos = jnp.where(INST_OK[:, None], p["pos"], 0.0)
    mask_logits = None
    if decode:
        mask_logits = masks.decode_masks(
            p["kernels"],
            inst_pos,
            CAND_BATCH,
            INST_OK,
            heads.mask_feats,
            batch.xyz,
            batch.batch_id,
            batch.valid,
            hidden=H,
            chunk_size=CHUNK,
        )
    return DKNetOutputs(
        heads=heads,
        heat=heat,
        cand_idx=cand_idx,
        cand_ok=CAND_OK,
        cand_batch=CAND_BATCH,
        merge_logits=p["merge"],
        pair_mask=pair_mask,
        lead=jnp.where(INST_OK, jnp.arange(M), -1),
        inst_ok=INST_OK,
        inst_pos=inst_pos,
        kernels=p["kernels"],
        mask_logits=mask_logits,
        pool_exhausted=jnp.zeros(B, bool),
        voxel_overflow=jnp.zeros((), bool),
    )


def _loss_fn(batch, *, decode, threshold, fallback, chunk=CHUNK):
    weights = loss_weights(base_config().loss)
    gates = L.stage_gates(jnp.int32(10), heatmap_epoch=0, mask_epoch=1)  # every term on

    def fn(p):
        out = _outputs(p, batch, decode=decode)
        return compute_losses(
            out,
            batch,
            weights=weights,
            gates=gates,
            num_classes=S,
            mask_iou_threshold=threshold,
            mask_iou_fallback=fallback,
            mask_chunk=chunk,
        )

    return fn


@functools.lru_cache(maxsize=None)
def _setup():
    batch = _batch()
    return batch, _params(batch)


@functools.lru_cache(maxsize=None)
def _dense_ious():
    """Sorted IoUs of the matched pairs (dense path, as compute_losses matches them)."""
    from dknet_jax.objective.matching import majority_class, match_instances
    from dknet_jax.objective.targets import compute_targets

    batch, params = _setup()

    @jax.jit
    def ious(p):
        out = _outputs(p, batch, decode=True)
        t = compute_targets(batch)
        pm = masks.scene_point_mask(CAND_BATCH, INST_OK, batch.batch_id, batch.valid)
        sem_pred = jnp.argmax(out.heads.semantic_logits, axis=-1)
        cls = majority_class((out.mask_logits > 0) & pm, sem_pred, S)
        _, gt_for_pred = match_instances(
            out.inst_pos, cls, CAND_BATCH, INST_OK, t.centroid, t.gt_class, t.gt_batch, t.gt_ok
        )
        _, _, iou = L.mask_loss(out.mask_logits, batch.instance, gt_for_pred, pm)
        return iou, gt_for_pred

    iou, gt_for_pred = ious(params)
    return np.sort(np.asarray(iou)[np.asarray(gt_for_pred) >= 0])


# (threshold, fallback): every pair counted; the gate splitting the pairs; no pair passing
# with the fallback (all matched counted) and without it (mask loss 0, nothing counted)
CASES = ("all", "split", "none_fallback", "none_no_fallback")
FALLBACK = {"all": True, "split": True, "none_fallback": True, "none_no_fallback": False}


def _thresholds():
    iou = _dense_ious()
    mid = 0.5 * (iou[len(iou) // 2 - 1] + iou[len(iou) // 2])
    return jnp.asarray([-1.0, mid, 2.0, 2.0], jnp.float32)


@functools.lru_cache(maxsize=None)
def _results(decode: bool):
    """{case: (total, metrics, grads)} for one path: one compile for all four cases (the
    threshold is traced, the fallback flag is static)."""
    batch, params = _setup()

    @jax.jit
    def run(p, thresholds):
        res = {}
        for i, case in enumerate(CASES):
            fn = _loss_fn(batch, decode=decode, threshold=thresholds[i], fallback=FALLBACK[case])
            res[case] = jax.value_and_grad(fn, has_aux=True)(p)
        return res

    res = jax.device_get(run(params, _thresholds()))
    return {
        case: (float(total), {k: float(v) for k, v in met.items()}, grads)
        for case, ((total, met), grads) in res.items()
    }


def test_matched_pairs_have_spread_ious():
    """The setting exercises the gate: several matched pairs, IoUs not all equal."""
    iou = _dense_ious()
    assert len(iou) >= 4 and iou[-1] > iou[0] + 0.05, iou
    mid = float(_thresholds()[1])
    assert np.sum(iou > mid) == len(iou) - len(iou) // 2


@pytest.mark.parametrize("case", CASES)
def test_chunked_equals_dense_loss_metrics_and_grads(case):
    d_total, d_met, d_grad = _results(True)[case]
    c_total, c_met, c_grad = _results(False)[case]
    n_matched = len(_dense_ious())
    expected = {
        "all": n_matched,
        "split": n_matched - n_matched // 2,
        "none_fallback": n_matched,
        "none_no_fallback": 0,
    }[case]
    assert d_met["matched"] == c_met["matched"] == expected, (d_met, c_met)
    if case == "none_no_fallback":
        assert d_met["mask"] == c_met["mask"] == 0.0
    else:
        assert d_met["mask"] > 0
    np.testing.assert_allclose(c_total, d_total, rtol=1e-5)
    assert d_met.keys() == c_met.keys()
    for k in d_met:
        np.testing.assert_allclose(c_met[k], d_met[k], rtol=1e-5, atol=1e-6, err_msg=k)
    for k in d_grad:
        a, b = np.asarray(d_grad[k]), np.asarray(c_grad[k])
        assert np.all(np.isfinite(b)), k
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6, err_msg=k)
    # the mask loss reaches the kernels and the mask features through both paths
    if case != "none_no_fallback":
        assert np.abs(np.asarray(c_grad["kernels"])).sum() > 0
        assert np.abs(np.asarray(c_grad["mask_w"])).sum() > 0


def test_chunked_path_passes_chunk_size_gate_and_hidden(monkeypatch):
    """compute_losses hands mask_chunk, the IoU gate and H to both chunked functions."""
    seen = []

    def spy(fn):
        def wrapped(*args, **kw):
            seen.append((fn.__name__, kw))
            return fn(*args, **kw)

        return wrapped

    monkeypatch.setattr(mask_loss, "decoded_mask_loss", spy(mask_loss.decoded_mask_loss))
    monkeypatch.setattr(mask_loss, "decoded_class_counts", spy(mask_loss.decoded_class_counts))
    batch, params = _setup()
    # tracing is enough to see the calls
    jax.make_jaxpr(_loss_fn(batch, decode=False, threshold=0.4, fallback=False, chunk=13))(params)
    assert [name for name, _ in seen] == ["decoded_class_counts", "decoded_mask_loss"]
    for _, kw in seen:
        assert kw["chunk_size"] == 13 and kw["hidden"] == H
    assert seen[1][1]["iou_threshold"] == 0.4 and seen[1][1]["iou_fallback"] is False
    seen.clear()
    jax.make_jaxpr(_loss_fn(batch, decode=True, threshold=0.4, fallback=False))(params)
    assert seen == []  # the dense path when the outputs carry mask logits


def _mn_shapes(jaxpr, n_pad):
    """Shapes of intermediates that hold (a stack of chunks of) an [M, N] array."""
    found = []

    def bad(shape):
        return M in shape and (
            N in shape or n_pad in shape or (CHUNK in shape and n_pad // CHUNK in shape)
        )

    def walk(jx):
        for eqn in jx.eqns:
            for v in eqn.outvars:
                shape = getattr(v.aval, "shape", ())
                if bad(shape):
                    found.append((eqn.primitive.name, shape))
            for param in eqn.params.values():
                for j in param if isinstance(param, (tuple, list)) else (param,):
                    inner = getattr(j, "jaxpr", None)
                    if inner is not None and hasattr(inner, "eqns"):
                        walk(inner)
                    elif hasattr(j, "eqns"):
                        walk(j)

    walk(jaxpr.jaxpr)
    return found


def test_chunked_gradient_never_builds_m_by_n():
    batch, params = _setup()
    n_pad = -(-N // CHUNK) * CHUNK
    # sizes the check tells apart (no false hits from, e.g., the kernels f32[M, LK])
    assert len({M, N, n_pad, CHUNK, n_pad // CHUNK}) == 5 and LK not in (N, n_pad)
    shapes = {}
    for decode in (True, False):
        fn = _loss_fn(batch, decode=decode, threshold=0.25, fallback=True)
        jaxpr = jax.make_jaxpr(jax.value_and_grad(fn, has_aux=True))(params)
        shapes[decode] = _mn_shapes(jaxpr, n_pad)
    assert shapes[True], "the check should see the dense path's [M, N] logits"
    assert shapes[False] == [], shapes[False][:5]


def test_kernel_length_must_fit_mask_features():
    batch, params = _setup()
    out = _outputs(params, batch, decode=False)
    out = out.replace(kernels=out.kernels[:, :-1])
    fn = functools.partial(
        compute_losses,
        weights=loss_weights(base_config().loss),
        gates=L.stage_gates(jnp.int32(10), heatmap_epoch=0, mask_epoch=1),
        num_classes=S,
    )
    with pytest.raises(ValueError, match="kernel length"):
        jax.eval_shape(fn, out, batch)
