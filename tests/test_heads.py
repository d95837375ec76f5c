"""Tests for dknet_jax.model.heads: shapes, hand-counted parameter numbers, masked BN."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dknet_jax.model.heads import MLP, PointHeads, num_kernel_params


def _count(module):
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def _lin(a, b):
    return a * b + b  # weight + bias


BN = 2  # BatchNorm scale + bias per channel


def test_num_kernel_params_eq4():
    # Eq. 4 of the paper: (16 + 3) * 16 + 16 + 16 * 1 + 1 = 337
    assert num_kernel_params(19, 16) == 337


def test_shapes_and_parameter_counts():
    s = 20
    heads = PointHeads(32, s, rngs=nnx.Rngs(0))
    n = 37
    feats = jax.random.normal(jax.random.key(0), (n, 32))
    valid = jnp.arange(n) < 30
    out = heads(feats, valid)
    assert out.semantic_logits.shape == (n, s)
    assert out.offset.shape == (n, 3)
    assert out.heat_logits.shape == (n,)
    assert out.reduce_feats.shape == (n, 16)
    assert out.mask_feats.shape == (n, 16)
    assert out.foreground.shape == (n,) and out.foreground.dtype == jnp.bool_
    k = 7
    fa = jax.random.normal(jax.random.key(1), (k, 35))
    assert heads.merge_logits(fa, jnp.ones((k, k), bool)).shape == (k, k)
    assert heads.kernels(jnp.ones((k, 16))).shape == (k, 337)

    # Hand count from the layer sizes (Linear w+b; BN scale+bias per hidden channel):
    sem = _lin(32, 32) + 32 * BN + _lin(32, 32) + 32 * BN + _lin(32, 20)    # 2900
    off = _lin(32, 32) + 32 * BN + _lin(32, 3)                               # 1219
    heat = _lin(35, 32) + 32 * BN + _lin(32, 32) + 32 * BN + _lin(32, 1)     # 2369
    red = 3 * (_lin(32, 32) + 32 * BN) + _lin(32, 16)                         # 3888
    mfeat = red                                                              # 3888
    merge = 3 * (_lin(35, 35) + 35 * BN) + _lin(35, 1)                       # 4026
    kern = _lin(16, 16) + _lin(16, 337)                                      # 6001
    assert (sem, off, heat, red, merge, kern) == (2900, 1219, 2369, 3888, 4026, 6001)
    assert _count(heads.semantic) == sem
    assert _count(heads.offset) == off
    assert _count(heads.heatmap) == heat
    assert _count(heads.reduce) == red
    assert _count(heads.mask_feat) == mfeat
    assert _count(heads.merge) == merge
    assert _count(heads.kernel) == kern
    assert _count(heads) == sem + off + heat + red + mfeat + merge + kern == 24291


def test_norm_variants_counts():
    assert _count(MLP(8, [4], 2, norm="none", rngs=nnx.Rngs(0))) == _lin(8, 4) + _lin(4, 2)
    assert _count(MLP(8, [4], 2, norm="layer", rngs=nnx.Rngs(0))) == _lin(8, 4) + 8 + _lin(4, 2)
    with pytest.raises(ValueError, match="norm"):
        MLP(8, [4], 2, norm="group", rngs=nnx.Rngs(0))


def test_masked_batchnorm_ignores_padding_rows():
    # Outputs on valid rows must not depend on what the padding rows contain.
    mlp = MLP(5, [6], 3, norm="batch", rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (10, 5))
    mask = jnp.arange(10) < 6
    y1 = mlp(x, mask)
    x2 = x.at[6:].set(1e3)
    y2 = mlp(x2, mask)
    np.testing.assert_allclose(np.asarray(y1[:6]), np.asarray(y2[:6]), rtol=1e-5, atol=1e-5)
    # ... and equals running the MLP on the valid rows alone (unmasked).
    y3 = mlp(x[:6])
    np.testing.assert_allclose(np.asarray(y1[:6]), np.asarray(y3), rtol=1e-5, atol=1e-5)


def test_hidden_layer_matches_manual_batchnorm():
    # One hidden layer, training mode: relu(BN(x W1 + b1)) W2 + b2 with batch stats.
    mlp = MLP(4, [3], 2, norm="batch", rngs=nnx.Rngs(1))
    x = np.asarray(jax.random.normal(jax.random.key(2), (9, 4)))
    w1 = np.asarray(mlp.linears[0].kernel[...])
    b1 = np.asarray(mlp.linears[0].bias[...])
    w2, b2 = np.asarray(mlp.out.kernel[...]), np.asarray(mlp.out.bias[...])
    h = x @ w1 + b1
    h = (h - h.mean(0)) / np.sqrt(h.var(0) + 1e-4)
    ref = np.maximum(h, 0) @ w2 + b2
    np.testing.assert_allclose(np.asarray(mlp(jnp.asarray(x))), ref, rtol=1e-4, atol=1e-5)


def test_merge_logits_symmetric_and_eval_mode():
    heads = PointHeads(32, 20, rngs=nnx.Rngs(0))
    fa = jax.random.normal(jax.random.key(3), (5, 35))
    z = heads.merge_logits(fa, jnp.ones((5, 5), bool))
    np.testing.assert_allclose(np.asarray(z), np.asarray(z.T), rtol=1e-5, atol=1e-6)
    heads.eval()  # running averages: output independent of the batch composition
    feats = jax.random.normal(jax.random.key(4), (6, 32))
    a = heads(feats, jnp.ones(6, bool)).offset[:3]
    b = heads(feats[:3], jnp.ones(3, bool)).offset
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
