"""Tests for dknet_jax.model.heads: shapes, hand-counted parameter numbers, masked BN,
and forward passes against numpy.

Modules are built abstractly (``nnx.eval_shape``) and filled with numpy random values, so
the tests do not spend CI time compiling JAX random initialisers.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dknet_jax.model.heads import MLP, PointHeads
from dknet_jax.model.mask_decoder import num_kernel_params


def _count(module):
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def _concrete(factory, seed=0):
    """Build ``factory()`` abstractly, then fill params with numpy randoms (BN stats 0/1)."""
    module = nnx.eval_shape(factory)
    rng = np.random.default_rng(seed)

    params = nnx.state(module, nnx.Param)
    stats = nnx.state(module, nnx.BatchStat)

    def fill_stat(path, x):
        one = "var" in jax.tree_util.keystr(path)
        return (jnp.ones if one else jnp.zeros)(x.shape, x.dtype)

    nnx.update(
        module, jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.5, x.dtype), params)
    )
    nnx.update(module, jax.tree_util.tree_map_with_path(fill_stat, stats))
    return module


def _lin(a, b):
    return a * b + b  # weight + bias


BN = 2  # BatchNorm scale + bias per channel


def test_num_kernel_params_eq4():
    # Eq. 4 of the paper: (16 + 3) * 16 + 16 + 16 * 1 + 1 = 337
    assert num_kernel_params(19, 16) == 337


@pytest.fixture(scope="module")
def heads():
    # first_instance_class=10 so that random weights give both fg and bg rows
    return _concrete(lambda: PointHeads(32, 20, first_instance_class=10, rngs=nnx.Rngs(0)))


def test_parameter_counts(heads):
    # Hand count from the layer sizes (Linear w+b; BN scale+bias per hidden channel):
    sem = _lin(32, 32) + 32 * BN + _lin(32, 32) + 32 * BN + _lin(32, 20)  # 2900
    off = _lin(32, 32) + 32 * BN + _lin(32, 3)  # 1219
    heat = _lin(35, 32) + 32 * BN + _lin(32, 32) + 32 * BN + _lin(32, 1)  # 2369
    red = 3 * (_lin(32, 32) + 32 * BN) + _lin(32, 16)  # 3888
    mfeat = red  # 3888
    merge = 3 * (_lin(35, 35) + 35 * BN) + _lin(35, 1)  # 4026
    kern = _lin(16, 16) + _lin(16, 337)  # 6001
    assert (sem, off, heat, red, merge, kern) == (2900, 1219, 2369, 3888, 4026, 6001)
    assert _count(heads.semantic) == sem
    assert _count(heads.offset) == off
    assert _count(heads.heatmap) == heat
    assert _count(heads.reduce) == red
    assert _count(heads.mask_feat) == mfeat
    assert _count(heads.merge) == merge
    assert _count(heads.kernel) == kern
    assert _count(heads) == sem + off + heat + red + mfeat + merge + kern == 24291
    assert heads.kernel_len == 337 and heads.dynamic_hidden == 16
    wide = nnx.eval_shape(lambda: PointHeads(32, 20, dynamic_hidden=8, rngs=nnx.Rngs(0)))
    assert wide.kernel_len == 19 * 8 + 8 + 8 + 1
    assert _count(wide.kernel) == _lin(16, 16) + _lin(16, 169)


def test_norm_variants_counts():
    none = nnx.eval_shape(lambda: MLP(8, [4], 2, norm="none", rngs=nnx.Rngs(0)))
    layer = nnx.eval_shape(lambda: MLP(8, [4], 2, norm="layer", rngs=nnx.Rngs(0)))
    assert _count(none) == _lin(8, 4) + _lin(4, 2)
    assert _count(layer) == _lin(8, 4) + 4 * 2 + _lin(4, 2)
    with pytest.raises(ValueError, match="norm"):
        MLP(8, [4], 2, norm="group", rngs=nnx.Rngs(0))


def _np_mlp(mlp, x, mask=None):
    """numpy forward of an MLP with norm='batch' in training mode (masked batch stats)."""
    h = np.asarray(x, np.float64)
    m = np.ones(h.shape[0], bool) if mask is None else np.asarray(mask)
    for lin, bn in zip(mlp.linears, mlp.norms, strict=True):
        h = h @ np.asarray(lin.kernel[...]) + np.asarray(lin.bias[...])
        mu, var = h[m].mean(0), h[m].var(0)
        h = (h - mu) / np.sqrt(var + 1e-4) * np.asarray(bn.scale[...]) + np.asarray(bn.bias[...])
        h = np.maximum(h, 0.0)
    return h @ np.asarray(mlp.out.kernel[...]) + np.asarray(mlp.out.bias[...])


def test_point_heads_forward_vs_numpy(heads):
    n = 37
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(n, 32)).astype(np.float32)
    valid = np.arange(n) < 30
    feats[30:] = 1e3  # padding rows must not influence anything on valid rows
    k = 7
    fa = rng.normal(size=(k, 35)).astype(np.float32)
    pair = np.ones((k, k), bool)
    pair[:, -1] = pair[-1, :] = False

    @nnx.jit
    def run(m, f, v, a, p):
        return m(f, v), m.merge_logits(a, p), m.kernels(a[:, :16])

    out, merge, kern = run(
        heads, jnp.asarray(feats), jnp.asarray(valid), jnp.asarray(fa), jnp.asarray(pair)
    )
    assert out.semantic_logits.shape == (n, 20) and out.offset.shape == (n, 3)
    assert out.heat_logits.shape == (n,) and out.reduce_feats.shape == (n, 16)
    assert out.mask_feats.shape == (n, 16) and out.foreground.shape == (n,)
    assert merge.shape == (k, k) and kern.shape == (k, 337)

    tol = dict(rtol=2e-3, atol=2e-3)
    v = valid
    sem = _np_mlp(heads.semantic, feats, v)
    np.testing.assert_allclose(np.asarray(out.semantic_logits)[v], sem[v], **tol)
    off = _np_mlp(heads.offset, feats, v)
    np.testing.assert_allclose(np.asarray(out.offset)[v], off[v], **tol)
    np.testing.assert_allclose(
        np.asarray(out.reduce_feats)[v], _np_mlp(heads.reduce, feats, v)[v], **tol
    )
    np.testing.assert_allclose(
        np.asarray(out.mask_feats)[v], _np_mlp(heads.mask_feat, feats, v)[v], **tol
    )
    fg = v & (sem.argmax(1) >= 10)
    np.testing.assert_array_equal(np.asarray(out.foreground), fg)
    assert 5 <= fg.sum() < v.sum()  # both foreground and background rows exercised
    heat = _np_mlp(heads.heatmap, np.concatenate([feats, off], 1), fg)[:, 0]
    np.testing.assert_allclose(np.asarray(out.heat_logits)[fg], heat[fg], **tol)
    diff = np.abs(fa[:, None] - fa[None]).reshape(k * k, 35)
    ref_merge = _np_mlp(heads.merge, diff, pair.reshape(-1)).reshape(k, k)
    np.testing.assert_allclose(np.asarray(merge)[pair], ref_merge[pair], **tol)
    np.testing.assert_allclose(np.asarray(merge), np.asarray(merge).T, rtol=1e-5, atol=1e-5)
    kl = heads.kernel
    ref_k = np.maximum(
        fa[:, :16] @ np.asarray(kl.linears[0].kernel[...]) + np.asarray(kl.linears[0].bias[...]), 0
    ) @ np.asarray(kl.out.kernel[...]) + np.asarray(kl.out.bias[...])
    np.testing.assert_allclose(np.asarray(kern), ref_k, **tol)


def test_eval_mode_uses_running_averages():
    mlp = _concrete(lambda: MLP(4, [3], 2, norm="batch", rngs=nnx.Rngs(2)), seed=3)
    x = jnp.asarray(np.random.default_rng(4).normal(size=(6, 4)) + 3.0, jnp.float32)
    step = nnx.jit(lambda m, a: m(a))
    step(mlp, x)  # one training call updates the running statistics
    h = np.asarray(x) @ np.asarray(mlp.linears[0].kernel[...]) + np.asarray(
        mlp.linears[0].bias[...]
    )
    # PyTorch momentum 0.1 from a zero start
    np.testing.assert_allclose(
        np.asarray(mlp.norms[0].mean[...]), 0.1 * h.mean(0), rtol=1e-4, atol=1e-5
    )
    mlp.eval()  # now rows are normalised independently of the batch composition
    a = step(mlp, x)[:3]
    b = step(mlp, x[:3])
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_running_stat_updates_like_flax_batchstat_under_jit():
    # The heads' BatchNorm keeps its running statistics in RunningStat (whole-array
    # updates through set_value); against flax's own BatchStat: bitwise the same outputs
    # and updated statistics, masked and unmasked, traced under jit.
    from dknet_jax.model.heads import RunningStat

    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(1.0, 2.0, size=(40, 6)), jnp.float32)
    mask = jnp.asarray(rng.random((40, 1)) < 0.7)
    for m in (None, mask):
        ours = nnx.BatchNorm(6, momentum=0.9, epsilon=1e-4, rngs=nnx.Rngs(0))
        ours.mean = RunningStat(ours.mean.get_value() + 0.5)
        ours.var = RunningStat(ours.var.get_value() * 2.0)
        plain = nnx.BatchNorm(6, momentum=0.9, epsilon=1e-4, rngs=nnx.Rngs(0))
        plain.mean.set_value(plain.mean.get_value() + 0.5)
        plain.var.set_value(plain.var.get_value() * 2.0)

        step = nnx.jit(lambda bn, x, m: bn(x, mask=m))
        y_ours, y_plain = step(ours, x, m), step(plain, x, m)
        np.testing.assert_array_equal(y_ours, y_plain)
        np.testing.assert_array_equal(ours.mean.get_value(), plain.mean.get_value())
        np.testing.assert_array_equal(ours.var.get_value(), plain.var.get_value())
        assert not np.array_equal(ours.mean.get_value(), np.full(6, 0.5, np.float32))
        assert isinstance(ours.mean, nnx.BatchStat)  # filters by BatchStat still find it


def test_scene_merge_logits_blocks_equal_the_full_merge(heads):
    """Per-scene merge MLP (``DKNet``'s path) against numpy on the within-scene pairs and
    against the all-pairs MLP: equal on ``pair_mask`` (the BatchNorm statistics cover the
    same pairs), 0 between scenes; the running statistics move alike."""
    b, k = 3, 6
    rng = np.random.default_rng(5)
    fa = rng.normal(size=(b * k, 35)).astype(np.float32)
    ok = rng.random(b * k) < 0.8
    ok[[0, 6, 7]] = True
    scene = np.repeat(np.arange(b), k)
    pair = (
        ok[:, None] & ok[None, :] & (scene[:, None] == scene[None, :]) & ~np.eye(b * k, dtype=bool)
    )
    blocks = nnx.jit(lambda m, a, p: m.scene_merge_logits(a, p, b))
    full = nnx.jit(lambda m, a, p: m.merge_logits(a, p))
    h1, h2 = nnx.clone(heads), nnx.clone(heads)
    got = np.asarray(blocks(h1, jnp.asarray(fa), jnp.asarray(pair)))
    want = np.asarray(full(h2, jnp.asarray(fa), jnp.asarray(pair)))
    assert got.shape == (b * k, b * k)
    np.testing.assert_allclose(got[pair], want[pair], rtol=1e-5, atol=1e-5)
    same = scene[:, None] == scene[None, :]
    assert np.all(got[~same] == 0)
    # numpy: the MLP over each scene's pairs, BatchNorm statistics over the valid pairs
    diff = np.concatenate(
        [
            np.abs(fa[s * k : (s + 1) * k, None] - fa[None, s * k : (s + 1) * k]).reshape(k * k, 35)
            for s in range(b)
        ]
    )
    mask = np.concatenate(
        [pair[s * k : (s + 1) * k, s * k : (s + 1) * k].reshape(-1) for s in range(b)]
    )
    ref = _np_mlp(heads.merge, diff, mask)[:, 0]
    got_blocks = np.concatenate(
        [got[s * k : (s + 1) * k, s * k : (s + 1) * k].reshape(-1) for s in range(b)]
    )
    np.testing.assert_allclose(got_blocks[mask], ref[mask], rtol=2e-3, atol=2e-3)
    for n1, n2 in zip(h1.merge.norms, h2.merge.norms, strict=True):
        np.testing.assert_allclose(n1.mean[...], n2.mean[...], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(n1.var[...], n2.var[...], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="scenes must divide"):
        heads.scene_merge_logits(jnp.asarray(fa), jnp.asarray(pair), 4)
