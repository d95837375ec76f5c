"""Sparse UNet backbone: masked BatchNorm, parameter count, and the padded forward /
backward against a reference built from the public functional ops on unpadded arrays."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dknet_jax.model.backbone import (
    MaskedBatchNorm,
    SparseUNet,
    count_params,
    count_unet_params,
    masked_batch_norm,
)
from dknet_jax.sparse import inverse_conv3d, strided_conv3d, subm_conv3d
from dknet_jax.sparse.voxelize import voxelize

WIDTHS = (4, 8)  # two levels: down, up, skip concat (3+ levels: the slow room test, bench)


def test_masked_batchnorm_ignores_padded_rows():
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, size=(50, 3)).astype(np.float32)
    junk = 1e3 * rng.normal(size=(30, 3)).astype(np.float32)
    xp = np.concatenate([x, junk])
    valid = np.arange(80) < 50
    perm = rng.permutation(80)
    bn_a, bn_b = MaskedBatchNorm(3, momentum=0.5), MaskedBatchNorm(3, momentum=0.5)
    ya = bn_a(jnp.asarray(x), jnp.ones(50, bool), train=True)
    yb = bn_b(jnp.asarray(xp[perm]), jnp.asarray(valid[perm]), train=True)
    want = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-4)  # numpy reference, biased variance
    np.testing.assert_allclose(ya, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(yb)[np.argsort(perm)[:50]], want, rtol=1e-4, atol=1e-4)
    assert (np.asarray(yb)[~valid[perm]] == 0).all()
    np.testing.assert_allclose(bn_b.mean[...], 0.5 * x.mean(0), rtol=1e-5)
    np.testing.assert_allclose(bn_b.var[...], 0.5 + 0.5 * x.var(0, ddof=1), rtol=1e-5)
    # eval mode uses the running statistics
    bn_b.eval()
    y_eval = bn_b(jnp.asarray(x), jnp.ones(50, bool))
    np.testing.assert_allclose(
        y_eval, (x - 0.5 * x.mean(0)) / np.sqrt(0.5 + 0.5 * x.var(0, ddof=1) + 1e-4), rtol=1e-4
    )


def _plain_bn_relu(x, valid, scale, bias, relu):
    """The formula written plainly (autodiff gives its gradient): the reference."""
    xf, m = x.astype(jnp.float32), valid[:, None]
    n = jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)
    mean = jnp.sum(jnp.where(m, xf, 0), 0) / n
    var = jnp.sum(jnp.where(m, (xf - mean) ** 2, 0), 0) / n
    y = jnp.where(m, (xf - mean) / jnp.sqrt(var + 1e-4) * scale + bias, 0)
    return jnp.maximum(y, 0) if relu else y


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("n_valid", [37, 1, 0])
def test_masked_batch_norm_gradient_equals_autodiff_of_the_formula(relu, n_valid):
    rng = np.random.default_rng(n_valid)
    x = jnp.asarray(rng.normal(1.0, 2.0, size=(48, 5)), jnp.float32)
    valid = jnp.asarray(rng.permutation(48) < n_valid)
    scale = jnp.asarray(rng.uniform(0.5, 1.5, 5), jnp.float32)
    bias = jnp.asarray(rng.normal(size=5), jnp.float32)
    w = jnp.asarray(rng.normal(size=(48, 5)), jnp.float32)  # a loss that weighs every output
    ours = lambda x, s, b: jnp.sum(w * masked_batch_norm(x, valid, s, b, 1e-4, relu)[0])
    plain = lambda x, s, b: jnp.sum(w * _plain_bn_relu(x, valid, s, b, relu))
    np.testing.assert_allclose(ours(x, scale, bias), plain(x, scale, bias), rtol=1e-5, atol=1e-5)
    got = jax.grad(ours, argnums=(0, 1, 2))(x, scale, bias)
    want = jax.grad(plain, argnums=(0, 1, 2))(x, scale, bias)
    for g, r in zip(got, want, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)
    assert not np.asarray(got[0])[~np.asarray(valid)].any()  # padded rows get no gradient
    if n_valid > 1:
        assert float(jnp.abs(got[0]).max()) > 0


def test_masked_batch_norm_keeps_only_its_input_and_channel_statistics():
    x = jnp.ones((1000, 16), jnp.bfloat16)
    valid, c = jnp.ones(1000, bool), jnp.ones(16, jnp.float32)
    f = lambda x, s, b: masked_batch_norm(x, valid, s, b, 1e-4, True)[0]
    vjp_fn = jax.eval_shape(lambda *a: jax.vjp(f, *a)[1], x, c, c)
    kept = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(vjp_fn))
    # x (bf16) and the valid mask, plus a few f32[16]: no f32 [V, C] intermediate
    assert kept <= x.size * 2 + valid.size + 8 * 16 * 4


def test_count_params_default_unet():
    w, nb = (32, 64, 96, 128, 160, 192, 224), 2
    bn = lambda c: 2 * c
    block = lambda a, b: bn(a) + 27 * a * b + bn(b) + 27 * b * b + (a * b if a != b else 0)
    total = 27 * 6 * 32 + bn(32)  # input conv, output BN
    for i, c in enumerate(w):
        total += nb * block(c, c)
        if i + 1 < len(w):
            d = w[i + 1]
            total += bn(c) + 8 * c * d + bn(d) + 8 * d * c  # down, up
            total += block(2 * c, c) + (nb - 1) * block(c, c)  # decoder
    assert count_unet_params(6, w, nb) == total
    small = SparseUNet(6, (4, 6), 1, rngs=nnx.Rngs(0))
    assert count_params(small) == count_unet_params(6, (4, 6), 1)


def _scene(seed, n_points=400):
    """Points on a floor and a wall of two scenes (negative coordinates included)."""
    rng = np.random.default_rng(seed)
    b = rng.integers(0, 2, n_points)
    floor = rng.random(n_points) < 0.6
    vox = np.stack(
        [rng.integers(-6, 6, n_points), rng.integers(-6, 6, n_points), np.zeros(n_points, int)], 1
    )
    vox[~floor] = np.stack(
        [
            np.full((~floor).sum(), -7),
            rng.integers(-6, 6, (~floor).sum()),
            rng.integers(0, 8, (~floor).sum()),
        ],
        1,
    )
    feats = rng.normal(size=(n_points, 6)).astype(np.float32)
    return vox.astype(np.int32), b.astype(np.int32), np.ones(n_points, bool), feats


def _bn_ref(x, p):
    mean, var = x.mean(0), x.var(0)
    return (x - mean) / jnp.sqrt(var + 1e-4) * p.scale[...] + p.bias[...]


def _reference_forward(net, coords, feats):
    """The same UNet on unpadded arrays with the public functional ops (train-mode BN)."""
    relu = jax.nn.relu

    def block(blk, c, x):
        h = subm_conv3d(
            c,
            relu(_bn_ref(x, blk.bn1)),
            blk.conv1.weight[...].reshape(3, 3, 3, *blk.conv1.weight.shape[1:]),
        )
        h = subm_conv3d(
            c,
            relu(_bn_ref(h, blk.bn2)),
            blk.conv2.weight[...].reshape(3, 3, 3, *blk.conv2.weight.shape[1:]),
        )
        return h + (x if blk.proj is None else x @ blk.proj[...])

    w0 = net.input_conv.weight[...]
    x = subm_conv3d(coords, feats, w0.reshape(3, 3, 3, *w0.shape[1:]))
    cs, skips = [coords], []
    for _ in WIDTHS[1:]:  # coarse sets from numpy: unique (b, x//2, y//2, z//2), sorted
        c = cs[-1]
        cs.append(np.unique(np.concatenate([c[:, :1], c[:, 1:] // 2], 1), axis=0))
    for lvl in range(len(WIDTHS)):
        for blk in net.encoders[lvl]:
            x = block(blk, cs[lvl], x)
        if lvl + 1 < len(WIDTHS):
            skips.append(x)
            wd = net.downs[lvl].weight[...]
            _, x = strided_conv3d(
                cs[lvl],
                relu(_bn_ref(x, net.down_bns[lvl])),
                wd.reshape(2, 2, 2, *wd.shape[1:]),
                capacity=len(cs[lvl + 1]),
            )
    for lvl in range(len(WIDTHS) - 2, -1, -1):
        wu = net.ups[lvl].weight[...]
        x = inverse_conv3d(
            cs[lvl],
            cs[lvl + 1],
            relu(_bn_ref(x, net.up_bns[lvl])),
            wu.reshape(2, 2, 2, *wu.shape[1:]),
        )
        x = jnp.concatenate([skips[lvl], x], -1)
        for blk in net.decoders[lvl]:
            x = block(blk, cs[lvl], x)
    return relu(_bn_ref(x, net.output_bn)), cs


_NET = SparseUNet(6, WIDTHS, 1, impl="xla", level_capacity_ratio=0.75, rngs=nnx.Rngs(0))
_GRAPH, _PARAMS, _REST = nnx.split(_NET, nnx.Param, ...)


@jax.jit
def _run(params, vox, b, valid, f):
    """Voxelize (capacity 512; levels 512 / 384) + UNet forward + gradient."""

    def loss(params):
        m = nnx.merge(_GRAPH, params, _REST, copy=True)
        v = voxelize(vox, b, valid, f, capacity=512)
        out = m(v, train=True)
        return jnp.sum(jnp.where(v.valid[:, None], out, 0) ** 2), (out, v)

    return jax.value_and_grad(loss, has_aux=True)(params)


def test_unet_padded_forward_backward_equals_functional_reference():
    (lval, (out, v)), grads = _run(_PARAMS, *_scene(1))
    m = int(v.num)
    coords = np.asarray(v.coords)[:m]

    def ref_loss(params):
        ref, cs = _reference_forward(
            nnx.merge(_GRAPH, params, _REST, copy=True), coords, np.asarray(v.feats)[:m]
        )
        return jnp.sum(ref**2), (ref, cs)

    (rval, (ref, cs)), rgrads = jax.jit(jax.value_and_grad(ref_loss, has_aux=True))(_PARAMS)
    assert len(cs[-1]) < m  # the U really went down
    np.testing.assert_allclose(np.asarray(out)[:m], ref, rtol=1e-3, atol=1e-3)
    assert (np.asarray(out)[m:] == 0).all()
    np.testing.assert_allclose(lval, rval, rtol=1e-4)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(rgrads), strict=True):
        np.testing.assert_allclose(g, r, rtol=2e-3, atol=2e-3 * float(np.abs(r).max()))
    assert any(float(np.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


def test_unet_level_overflow_gives_nan_not_silent_truncation():
    # 400 isolated voxels: level 1 needs 400 rows but has 384 -> overflow -> NaN.
    rng = np.random.default_rng(2)
    vox = (rng.permutation(20**3)[:400, None] // np.array([400, 20, 1]) % 20 * 3).astype(np.int32)
    b, valid = np.zeros(400, np.int32), np.ones(400, bool)
    f = rng.normal(size=(400, 6)).astype(np.float32)
    (lval, (out, v)), _ = _run(_PARAMS, vox, b, valid, f)
    assert int(v.num) == 400 and not bool(v.overflow)
    assert np.isnan(np.asarray(out)).all() and np.isnan(float(lval))


@pytest.mark.slow
def test_unet_room_sized_forward_backward():
    """>= 100k voxels at 2 cm (floor + 4 walls of a 6 m x 5 m room); full-size UNet."""
    xs, ys = np.meshgrid(np.arange(300), np.arange(250), indexing="ij")
    floor = np.stack([xs.ravel(), ys.ravel(), np.zeros(xs.size, int)], 1)
    zs = np.arange(1, 120)
    wx = np.stack(np.meshgrid(np.arange(300), [0, 249], zs, indexing="ij"), -1).reshape(-1, 3)
    wy = np.stack(np.meshgrid([0, 299], np.arange(250), zs, indexing="ij"), -1).reshape(-1, 3)
    vox = np.concatenate([floor, wx, wy]).astype(np.int32)
    n = len(vox)
    assert n >= 100_000
    f = np.random.default_rng(0).normal(size=(n, 6)).astype(np.float32)
    net = SparseUNet(rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(net, nnx.Param, ...)

    @jax.jit
    def step(params, vox, f):  # arrays as arguments: XLA would constant-fold the maps
        def loss(params):
            v = voxelize(vox, jnp.zeros(n, jnp.int32), jnp.ones(n, bool), f, capacity=n)
            return jnp.mean(nnx.merge(graphdef, params, rest, copy=True)(v, train=True) ** 2)

        return jax.value_and_grad(loss)(params)

    val, grads = step(params, vox, f)
    assert np.isfinite(float(val))
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_pairs_per_voxel_per_level_changes_speed_not_result():
    # Level 0 with tiles for 1 pair per voxel cannot hold a room's ~6-12: it takes the
    # per-offset fallback, the other levels get roomy tiles. Same output and gradients.
    ppv = (1.0,) + (27.0,) * (len(WIDTHS) - 1)
    net = SparseUNet(
        6, WIDTHS, 1, impl="xla", level_capacity_ratio=0.75, pairs_per_voxel=ppv, rngs=nnx.Rngs(0)
    )
    graph, params, rest = nnx.split(net, nnx.Param, ...)
    args = _scene(1)

    @jax.jit
    def run(params, vox, b, valid, f):
        def loss(params):
            m = nnx.merge(graph, params, rest, copy=True)
            v = voxelize(vox, b, valid, f, capacity=512)
            maps = m.kernel_maps(v)
            out = m(v, train=True)
            return jnp.sum(jnp.where(v.valid[:, None], out, 0) ** 2), (out, maps[0].subm.tiles.ok)

        return jax.value_and_grad(loss, has_aux=True)(params)

    (lval, (out, ok0)), grads = run(params, *args)
    (rval, (ref, _)), rgrads = _run(_PARAMS, *args)
    assert not bool(ok0)  # level 0 really overflowed its tiles
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(lval, rval, rtol=1e-5)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(rgrads), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-3, atol=1e-4 * float(np.abs(r).max()))
    with pytest.raises(ValueError, match="pairs_per_voxel"):
        SparseUNet(6, WIDTHS, 1, pairs_per_voxel=(8.0, 8.0, 8.0), rngs=nnx.Rngs(0))


def test_no_tile_fallback_same_result_or_flagged_overflow():
    # tile_fallback=False compiles no per-offset path: with tiles that hold every pair
    # (level 0 at 14 per voxel, level 1 complete) the output and gradients equal the
    # default net's (up to float rounding: XLA fuses the two programs differently); with
    # level 0's tiles for 1 pair per voxel the net reports
    # the overflow (NaN output, as for a voxel overflow) instead of a wrong convolution.
    args = _scene(1)

    def run(ppv, fallback, late=False):
        net = SparseUNet(
            6,
            WIDTHS,
            1,
            impl="xla",
            level_capacity_ratio=0.75,
            pairs_per_voxel=ppv,
            tile_fallback=fallback if not late else True,
            rngs=nnx.Rngs(0),
        )
        if late:  # one source of truth: the attribute, read when the maps are built
            net.tile_fallback = fallback
        graph, params, rest = nnx.split(net, nnx.Param, ...)

        @jax.jit
        def go(params, vox, b, valid, f):
            def loss(params):
                v = voxelize(vox, b, valid, f, capacity=512)
                out = nnx.merge(graph, params, rest, copy=True)(v, train=True)
                return jnp.sum(jnp.where(v.valid[:, None], out, 0) ** 2), out

            return jax.value_and_grad(loss, has_aux=True)(params)

        hlo = go.lower(params, *args).as_text()
        return go(params, *args), hlo

    roomy = (14.0, 27.0)
    ((val_t, out_t), g_t), hlo_t = run(roomy, True)
    ((val_f, out_f), g_f), hlo_f = run(roomy, False)
    assert np.isfinite(float(val_f))
    np.testing.assert_allclose(np.asarray(out_f), np.asarray(out_t), rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(g_f), jax.tree.leaves(g_t), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()))
    # the fallback (a cond between tiles and the per-offset scan) is not in the program
    branch = re.compile(r"stablehlo\.(case|if)\b")
    assert branch.search(hlo_t) and not branch.search(hlo_f)
    ((val_o, out_o), _), _ = run((1.0, 27.0), False)
    assert np.isnan(np.asarray(out_o)).all() and np.isnan(float(val_o))
    ((_, out_late), _), hlo_late = run((1.0, 27.0), False, late=True)
    assert np.isnan(np.asarray(out_late)).all() and not branch.search(hlo_late)


def test_no_tile_fallback_never_flags_the_pallas_path():
    # impl="pallas" reads the neighbour table, not the tiles: tiles that overflow are no
    # overflow there (no rerun); same output as the XLA net with the fallback compiled.
    pytest.importorskip("pallas_kernels.sparse_conv")
    vox, b, valid, f = _scene(1)
    outs = []
    for impl, fallback in (("xla", True), ("pallas", False)):
        net = SparseUNet(
            6,
            WIDTHS,
            1,
            impl=impl,
            level_capacity_ratio=0.75,
            pairs_per_voxel=(1.0, 27.0),
            tile_fallback=fallback,
            rngs=nnx.Rngs(0),
        )
        v = voxelize(vox, b, valid, f, capacity=512)
        outs.append(np.asarray(net(v, train=True)))
    assert np.isfinite(outs[1]).all()
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- memory levers


@functools.cache
def _lever_run(remat, precision, seed=4, blocks=2, widths=(4, 8, 12)):
    """Forward + gradient of a 3-level, 2-block UNet (every block kind: projection skip,
    decoder concat) with the given levers on ``_scene(seed)``; same initial parameters for
    every lever. Cached: the no-lever run is the reference of three tests."""
    args = _scene(seed)
    net = SparseUNet(
        6, widths, blocks, impl="xla", level_capacity_ratio=0.75, remat=remat, rngs=nnx.Rngs(3)
    )
    net.precision = precision  # set on a built module, as the training step does
    graph, params, rest = nnx.split(net, nnx.Param, ...)

    @jax.jit
    def run(params, vox, b, valid, f):
        def loss(params):
            m = nnx.merge(graph, params, rest, copy=True)
            v = voxelize(vox, b, valid, f, capacity=512)
            out = m(v, train=True)
            new_rest = nnx.split(m, nnx.Param, ...)[2]
            return jnp.sum(jnp.where(v.valid[:, None], out, 0) ** 2), (out, new_rest)

        return jax.value_and_grad(loss, has_aux=True)(params)

    return run, params, args, run(params, *args)


@pytest.mark.parametrize("remat", ["block", "level"])
def test_unet_remat_gives_the_gradients_of_no_remat(remat):
    _, _, _, ((lval, (out, rest)), grads) = _lever_run("none", "f32")
    _, _, _, ((rval, (rout, rrest)), rgrads) = _lever_run(remat, "f32")
    np.testing.assert_allclose(rout, out, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(rval, lval, rtol=1e-6)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(rgrads), strict=True):
        np.testing.assert_allclose(r, g, rtol=1e-5, atol=1e-6 * float(np.abs(g).max()))
    assert any(float(np.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
    # BatchNorm running statistics are updated once, as without remat
    for a, b in zip(jax.tree.leaves(rest), jax.tree.leaves(rrest), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)


def _residual_bytes(remat):
    """Bytes of activations the UNet's reverse pass keeps from its forward pass: the
    floating ``[rows, C]`` leaves of the VJP that ``jax.vjp`` returns (the saved
    residuals; the integer kernel maps, the same in every mode, and the weights are left
    out)."""
    vox, b, valid, f = _scene(4)
    net = SparseUNet(6, (4, 8, 12), 2, impl="xla", level_capacity_ratio=0.75, remat=remat,
                     rngs=nnx.Rngs(3))  # fmt: skip
    graph, params, rest = nnx.split(net, nnx.Param, ...)

    def loss(params):
        v = voxelize(vox, b, valid, f, capacity=512)
        return jnp.sum(nnx.merge(graph, params, rest, copy=True)(v, train=True) ** 2)

    # shapes only (nothing runs): the residuals are the array leaves of the VJP closure
    vjp_fn = jax.eval_shape(lambda p: jax.vjp(loss, p)[1], params)
    rows = [
        x
        for x in jax.tree.leaves(vjp_fn)
        if jnp.issubdtype(x.dtype, jnp.floating) and x.ndim == 2 and x.shape[0] >= 64
    ]
    return sum(x.size * x.dtype.itemsize for x in rows)


def test_unet_remat_keeps_fewer_residuals():
    none, block, level = (_residual_bytes(r) for r in ("none", "block", "level"))
    # Without remat a block keeps its input, both conv inputs (the BN+ReLU outputs) and
    # both conv outputs; "block" keeps the input and the conv outputs and recomputes the
    # BN+ReLU outputs (measured 0.61; BatchNorm itself keeps no [V, C] intermediate, see
    # test_masked_batch_norm_keeps_only_its_input_and_channel_statistics); "level" keeps
    # the levels' inputs only (measured 0.32 of "block").
    assert block < 0.7 * none and level < 0.5 * block


def test_unet_bf16_close_to_f32_and_params_stay_f32():
    _, params, args, ((lval, (out, rest)), grads) = _lever_run("none", "f32")
    run, _, _, ((bval, (bout, brest)), bgrads) = _lever_run("none", "bf16")
    # bf16 keeps 8 significant bits: outputs within a few % of their scale, loss within 2%
    assert bout.dtype == jnp.float32
    scale = float(np.abs(out).max())
    np.testing.assert_allclose(bout, out, atol=0.05 * scale)
    np.testing.assert_allclose(bval, lval, rtol=0.02)
    leaves = (jax.tree.leaves(grads), jax.tree.leaves(bgrads), jax.tree.leaves(params))
    cosine = lambda a, b: float(jnp.vdot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))
    for _g, b, p in zip(*leaves, strict=True):
        assert b.dtype == p.dtype == jnp.float32  # gradients reach the f32 master weights
    flat = lambda tree: jnp.concatenate([x.ravel() for x in jax.tree.leaves(tree)])
    # the whole gradient: cosine 0.979 measured (bf16 rounding of the backward cotangents;
    # single small tensors such as a 4-channel BatchNorm bias can differ far more)
    assert cosine(flat(grads), flat(bgrads)) > 0.97
    for a, b in zip(jax.tree.leaves(rest), jax.tree.leaves(brest), strict=True):
        assert b.dtype == jnp.float32  # running statistics stay f32
        np.testing.assert_allclose(b, a, rtol=0.03, atol=0.03 * float(np.abs(a).max()))
    # the convolutions really run on bf16 inputs (f32 accumulation)
    jaxpr = str(jax.make_jaxpr(run)(params, *args))
    assert "bf16" in jaxpr and "preferred_element_type=float32" in jaxpr


def test_unet_levers_bad_names():
    with pytest.raises(ValueError, match="remat must be one of"):
        SparseUNet(6, WIDTHS, 1, remat="blocks", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="precision must be one of"):
        SparseUNet(6, WIDTHS, 1, precision="fp16", rngs=nnx.Rngs(0))
