"""Tests for dknet_jax.model.mask_decoder: numpy loop reference, chunking invariance, gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dknet_jax.model.mask_decoder import (
    MASK_FILL,
    decode_masks,
    scene_point_mask,
    split_kernels,
)
from dknet_jax.objective import matching
from dknet_jax.objective import terms as losses
from dknet_jax.objective.mask_loss import decoded_class_counts, decoded_mask_loss

K, N, CM, H = 5, 23, 16, 16
L = (CM + 3) * H + H + H + 1


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    kernels = rng.normal(size=(K, L)).astype(np.float32) * 0.3
    cent = rng.normal(size=(K, 3)).astype(np.float32)
    inst_batch = np.array([0, 1, 1, 0, 2], np.int32)
    inst_ok = np.array([1, 1, 1, 1, 0], bool)
    feats = rng.normal(size=(N, CM)).astype(np.float32)
    xyz = rng.normal(size=(N, 3)).astype(np.float32)
    batch_id = rng.integers(0, 2, N).astype(np.int32)
    valid = np.ones(N, bool)
    valid[-3:] = False
    batch_id[-3:] = 2  # padding rows carry batch id B = 2
    return kernels, cent, inst_batch, inst_ok, feats, xyz, batch_id, valid


def _numpy_reference(kernels, cent, inst_batch, inst_ok, feats, xyz, batch_id, valid):
    """Straight loop over (instance, point) with the documented kernel layout."""
    ci = CM + 3
    k_, n_ = kernels.shape[0], feats.shape[0]
    out = np.full((k_, n_), MASK_FILL, np.float64)
    for k in range(k_):
        w = kernels[k].astype(np.float64)
        w1 = w[: ci * H].reshape(ci, H)
        b1 = w[ci * H : ci * H + H]
        w2 = w[ci * H + H : ci * H + 2 * H]
        b2 = w[ci * H + 2 * H]
        for i in range(n_):
            if not (inst_ok[k] and valid[i] and batch_id[i] == inst_batch[k]):
                continue
            x = np.concatenate([feats[i], cent[k] - xyz[i]])
            h = np.maximum(x @ w1 + b1, 0.0)
            out[k, i] = h @ w2 + b2
    return out


def test_kernel_layout_and_length_check():
    kern = jnp.arange(2 * L, dtype=jnp.float32).reshape(2, L)
    w1, b1, w2, b2 = split_kernels(kern, CM + 3, H)
    assert w1.shape == (2, 19, 16) and b1.shape == (2, 16) and w2.shape == (2, 16)
    assert float(w1[1, 2, 3]) == L + 2 * 16 + 3
    assert float(b1[0, 0]) == 304 and float(w2[0, 0]) == 320 and float(b2[0]) == 336
    with pytest.raises(ValueError, match="length"):
        split_kernels(kern[:, :-1], CM + 3, H)


def test_decode_matches_numpy_loop_and_chunking():
    args = _inputs()
    ref = _numpy_reference(*args)
    jargs = [jnp.asarray(a) for a in args]
    full = jax.jit(functools.partial(decode_masks, chunk_size=N))(*jargs)
    chunked = jax.jit(functools.partial(decode_masks, chunk_size=4))(*jargs)  # 23 = 5*4 + 3
    assert full.shape == chunked.shape == (K, N)
    np.testing.assert_allclose(np.asarray(full), ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(full), rtol=1e-6, atol=1e-6)
    # other scenes, padding rows and the invalid slot are filled
    pm = np.asarray(scene_point_mask(*jargs[2:4], *jargs[6:8]))
    assert np.all(np.asarray(full)[~pm] == MASK_FILL)
    assert not pm[4].any() and pm[0].sum() > 0


def test_gradients_flow_and_chunked_grads_equal():
    args = [jnp.asarray(a) for a in _inputs(1)]
    rng = np.random.default_rng(5)
    t = jnp.asarray(rng.random((K, N)) < 0.5, jnp.float32)
    pm = scene_point_mask(args[2], args[3], args[6], args[7])

    def loss(kernels, cent, feats, chunk):
        z = decode_masks(
            kernels, cent, args[2], args[3], feats, args[5], args[6], args[7], chunk_size=chunk
        )
        p = jax.nn.sigmoid(z)
        return jnp.sum(jnp.where(pm, (p - t) ** 2, 0.0))

    g_full = jax.jit(jax.grad(functools.partial(loss, chunk=N), argnums=(0, 1, 2)))(
        args[0], args[1], args[4]
    )
    g_chunk = jax.jit(jax.grad(functools.partial(loss, chunk=6), argnums=(0, 1, 2)))(
        args[0], args[1], args[4]
    )
    for a, b in zip(g_full, g_chunk, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
        assert np.all(np.isfinite(np.asarray(a)))
    gk, gc, gf = (np.asarray(x) for x in g_full)
    assert np.abs(gk[:4]).sum() > 0 and np.abs(gf).sum() > 0 and np.abs(gc[:4]).sum() > 0
    assert np.all(gk[4] == 0)  # invalid slot: no gradient
    # finite-difference check of one kernel entry (the b2 of instance 0)
    eps = 1e-2
    kp = args[0].at[0, L - 1].add(eps)
    km = args[0].at[0, L - 1].add(-eps)
    loss_j = jax.jit(loss, static_argnums=3)
    fd = (loss_j(kp, args[1], args[4], N) - loss_j(km, args[1], args[4], N)) / (2 * eps)
    np.testing.assert_allclose(gk[0, L - 1], float(fd), rtol=2e-2, atol=1e-3)


def test_bad_shapes_raise_clear_errors():
    args = [jnp.asarray(a) for a in _inputs()]
    with pytest.raises(ValueError, match="disagree on N"):
        decode_masks(args[0], args[1], args[2], args[3], args[4], args[5][:-1], args[6], args[7])
    with pytest.raises(ValueError, match="length"):
        decode_masks(
            args[0], args[1], args[2], args[3], args[4], args[5], args[6], args[7], hidden=8
        )


def test_decoded_mask_loss_equals_dense_loss_and_grads():
    args = [jnp.asarray(a) for a in _inputs(2)]
    rng = np.random.default_rng(7)
    instance = rng.integers(-1, 4, N).astype(np.int32)
    instance[instance < 0] = -100
    # bias instance 0 toward GT 1 so at least one pair passes IoU > 0.25
    instance = jnp.asarray(instance)
    gt_for_pred = jnp.asarray([1, 0, 2, -1, 3], jnp.int32)
    kern = args[0].at[:, L - 1].set(0.5)  # b2 > 0: non-empty hard masks

    def dense(kernels, feats):
        z = decode_masks(kernels, args[1], args[2], args[3], feats, *args[5:8], chunk_size=N)
        pm = scene_point_mask(args[2], args[3], args[6], args[7])
        return losses.mask_loss(z, instance, gt_for_pred, pm, iou_threshold=0.1)

    def chunked(kernels, feats):
        return decoded_mask_loss(
            kernels,
            args[1],
            args[2],
            args[3],
            feats,
            *args[5:8],
            instance,
            gt_for_pred,
            chunk_size=4,
            iou_threshold=0.1,
        )

    d = jax.jit(dense)(kern, args[4])
    c = jax.jit(chunked)(kern, args[4])
    assert int(d[1]) >= 1 and int(d[1]) == int(c[1])
    np.testing.assert_allclose(float(c[0]), float(d[0]), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(c[2]), np.asarray(d[2]), rtol=1e-5, atol=1e-6)
    gd = jax.jit(jax.grad(lambda k, f: dense(k, f)[0], argnums=(0, 1)))(kern, args[4])
    gc = jax.jit(jax.grad(lambda k, f: chunked(k, f)[0], argnums=(0, 1)))(kern, args[4])
    for a, b in zip(gd, gc, strict=True):
        assert np.abs(np.asarray(a)).sum() > 0
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)


def test_decoded_class_counts_vs_dense_majority():
    args = [jnp.asarray(a) for a in _inputs(3)]
    kern = args[0].at[:, L - 1].set(0.3)
    sem = jnp.asarray(np.random.default_rng(8).integers(0, 4, N), jnp.int32)
    counts = jax.jit(functools.partial(decoded_class_counts, num_classes=4, chunk_size=5))(
        kern, *args[1:8], sem
    )
    z = np.asarray(decode_masks(kern, *args[1:8], chunk_size=N))
    hard = z > 0  # fill value is negative, so other scenes are never counted
    ref = np.stack([np.bincount(np.asarray(sem)[hard[k]], minlength=4) for k in range(K)])
    np.testing.assert_array_equal(np.asarray(counts), ref)
    np.testing.assert_array_equal(
        np.asarray(matching.class_from_counts(counts)),
        np.asarray(matching.majority_class(jnp.asarray(hard), sem, 4)),
    )


# ----------------------------------------------------------- slots in scene blocks

KB, NB = 6, 41


def _blocked_inputs(layout, seed=11):
    """Three scenes and padding. "packed": rows of scene 0, 1, 2 in turn, then padding;
    slots [2s, 2s+2) of scene s (DKNet's layout; slot 3 invalid). "any": rows of the
    scenes interleaved, slots of any scene in any order, ids outside [0, B)."""
    rng = np.random.default_rng(seed)
    kernels = (rng.normal(size=(KB, L)) * 0.3).astype(np.float32)
    kernels[:, L - 1] = 0.4  # b2 > 0: non-empty hard masks
    cent = rng.normal(size=(KB, 3)).astype(np.float32)
    feats = rng.normal(size=(NB, CM)).astype(np.float32)
    xyz = rng.normal(size=(NB, 3)).astype(np.float32)
    batch_id = np.array([0] * 14 + [1] * 14 + [2] * 10 + [3] * 3, np.int32)
    valid = batch_id < 3
    inst_ok = np.array([1, 1, 1, 0, 1, 1], bool)
    if layout == "packed":
        inst_batch = np.array([0, 0, 1, 1, 2, 2], np.int32)
    else:
        perm = rng.permutation(NB)
        batch_id, valid = batch_id[perm], valid[perm]
        inst_batch = np.array([2, 0, 1, 7, -1, 0], np.int32)
    return kernels, cent, inst_batch, inst_ok, feats, xyz, batch_id, valid


@pytest.mark.parametrize("layout", ["packed", "any"])
def test_scene_blocks_decode_equals_numpy_loop(layout):
    args = _blocked_inputs(layout)
    ref = _numpy_reference(*args)
    jargs = [jnp.asarray(a) for a in args]
    for blocks in (1, 2, 3, 6):
        fn = functools.partial(decode_masks, chunk_size=4, scene_blocks=blocks)
        got = np.asarray(jax.jit(fn)(*jargs))
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4, err_msg=f"blocks {blocks}")


@pytest.mark.parametrize("layout", ["packed", "any"])
def test_scene_blocks_chunked_loss_counts_and_grads_unchanged(layout):
    args = [jnp.asarray(a) for a in _blocked_inputs(layout, seed=12)]
    rng = np.random.default_rng(13)
    instance = jnp.asarray(np.where(rng.random(NB) < 0.2, -100, rng.integers(0, 3, NB)), jnp.int32)
    gt_for_pred = jnp.asarray([1, 0, 2, -1, 0, 1], jnp.int32)
    sem = jnp.asarray(rng.integers(0, 4, NB), jnp.int32)

    def run(blocks):
        def loss(kernels, cent, feats):
            return decoded_mask_loss(
                kernels,
                cent,
                *args[2:4],
                feats,
                *args[5:8],
                instance,
                gt_for_pred,
                chunk_size=4,
                iou_threshold=0.1,
                scene_blocks=blocks,
            )

        def dense(kernels, feats):
            z = decode_masks(
                kernels, args[1], *args[2:4], feats, *args[5:8], chunk_size=4, scene_blocks=blocks
            )
            return jnp.sum(jnp.tanh(z / 10.0) * jnp.arange(NB))

        val = jax.jit(loss)(args[0], args[1], args[4])
        grads = jax.jit(jax.grad(lambda *a: loss(*a)[0], argnums=(0, 1, 2)))(
            args[0], args[1], args[4]
        )
        dgrads = jax.jit(jax.grad(dense, argnums=(0, 1)))(args[0], args[4])
        counts = jax.jit(
            functools.partial(
                decoded_class_counts, num_classes=4, chunk_size=4, scene_blocks=blocks
            )
        )(*args[:8], sem)
        return val, grads, dgrads, counts

    want = run(1)
    assert int(want[0][1]) >= 1 and np.abs(np.asarray(want[1][0])).sum() > 0
    for blocks in (2, 3, 6):
        got = run(blocks)
        np.testing.assert_array_equal(np.asarray(got[3]), np.asarray(want[3]))
        for a, b in zip(jax.tree.leaves(got[:3]), jax.tree.leaves(want[:3]), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_scene_blocks_never_touch_other_scenes():
    # Scene 2's rows are NaN. Decoded one block per scene, the slots of scenes 0 and 1
    # never read them: their kernels' gradients stay finite. Decoded as one block, every
    # slot runs over every chunk, and the NaN reaches them through the masked-out terms.
    args = [jnp.asarray(a) for a in _blocked_inputs("packed", seed=14)]
    feats = args[4].at[28:38].set(jnp.nan)

    def grad_kernels(blocks):
        def loss(kernels):
            z = decode_masks(
                kernels, args[1], *args[2:4], feats, *args[5:8], chunk_size=4, scene_blocks=blocks
            )
            return jnp.sum(jnp.where(z > MASK_FILL, jax.nn.sigmoid(z), 0.0)[:4])

        return np.asarray(jax.jit(jax.grad(loss))(args[0]))

    assert np.isfinite(grad_kernels(3)[:4]).all()
    assert not np.isfinite(grad_kernels(1)[:4]).all()


def test_scene_blocks_must_divide_the_slots():
    args = [jnp.asarray(a) for a in _blocked_inputs("packed")]
    with pytest.raises(ValueError, match="scene_blocks=4"):
        decode_masks(*args, scene_blocks=4)
    with pytest.raises(ValueError, match="scene_blocks=0"):
        decoded_class_counts(*args, jnp.zeros(NB, jnp.int32), 4, scene_blocks=0)


def test_dynamic_mlp_gradients_equal_autodiff_of_the_formula():
    """The hand-written backward of the two dynamic layers (``[P, K*H]`` layout) against
    JAX's autodiff of the plain formula, with some hidden units exactly at 0 (relu's
    kink: both give 0 there) and the forward pass bit for bit."""
    from dknet_jax.model.mask_decoder import _dynamic_mlp_apply, dynamic_mlp

    rng = np.random.default_rng(7)
    p, ci, k, h = 257, 19, 5, 16
    x = rng.normal(size=(p, ci)).astype(np.float32)
    w1 = rng.normal(size=(k, ci, h)).astype(np.float32)
    bias1 = rng.normal(size=(k, h)).astype(np.float32)
    w1[:, :, 3] = 0.0
    bias1[:, 3] = 0.0  # unit 3: pre-activation exactly 0 on every point
    w2 = rng.normal(size=(k, h)).astype(np.float32)
    b2 = rng.normal(size=(k,)).astype(np.float32)
    cot = rng.normal(size=(k, p)).astype(np.float32)
    args = (x, w1, bias1, w2, b2)
    np.testing.assert_array_equal(jax.jit(dynamic_mlp)(*args), jax.jit(_dynamic_mlp_apply)(*args))
    mine = jax.grad(lambda *a: jnp.sum(dynamic_mlp(*a) * cot), argnums=range(5))(*args)
    ref = jax.grad(lambda *a: jnp.sum(_dynamic_mlp_apply(*a) * cot), argnums=range(5))(*args)
    for name, a, b in zip(("x", "w1", "bias1", "w2", "b2"), mine, ref, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4, err_msg=name)
    assert np.all(np.asarray(mine[1])[:, :, 3] == 0) and np.all(np.asarray(mine[2])[:, 3] == 0)
