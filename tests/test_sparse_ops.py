"""Sparse convolutions: the public functional ops and the padded engine vs brute force.

References are independent of the engine: dictionary loops in numpy
(``tests/sparse_reference.py``) and, for gradients, ``jax.grad`` of a plain jnp
formulation built on the numpy neighbour / parent tables.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dknet_jax.sparse import conv, hashing, inverse_conv3d, strided_conv3d, subm_conv3d
from tests.test_sparse_reference import (
    KINDS,
    inverse_ref,
    neighbour_table_ref,
    random_coords,
    strided_ref,
    subm_ref,
)

CIN, COUT = 5, 3
TOL = dict(rtol=2e-4, atol=2e-4)


@pytest.fixture(autouse=True)
def _cpu_loop_everywhere(monkeypatch):
    """These small sets would take the batched pass (below ``conv.LOOP_MIN_ELEMS``); here
    they take the CPU loop that large sets take, so every numpy comparison below checks
    it (``test_batched_pass_equals_cpu_loop`` checks the batched pass against it). The
    threshold is read when a function is traced: caches are cleared around each test."""
    monkeypatch.setattr(conv, "LOOP_MIN_ELEMS", 0)
    jax.clear_caches()
    yield
    jax.clear_caches()


def _data(seed, kind):
    rng = np.random.default_rng(seed)
    c = random_coords(rng, kind)
    f = rng.normal(size=(len(c), CIN)).astype(np.float32)
    w3 = rng.normal(size=(3, 3, 3, CIN, COUT)).astype(np.float32)
    w2 = rng.normal(size=(2, 2, 2, CIN, COUT)).astype(np.float32)
    return rng, c, f, w3, w2


# ------------------------------------------------------------------ functional vs numpy


@pytest.mark.parametrize("kind", KINDS)
def test_functional_ops_match_bruteforce(kind):
    rng, c, f, w3, w2 = _data(10, kind)
    np.testing.assert_allclose(subm_conv3d(c, f, w3), subm_ref(c, f, w3), **TOL)
    oc, of = strided_conv3d(c, f, w2)
    rc, rf = strided_ref(c, f, w2)
    np.testing.assert_array_equal(oc, rc)
    np.testing.assert_allclose(of, rf, **TOL)
    # inverse: coarse set in another order, with extra coarse rows and some missing ones
    keep = rng.random(len(rc)) < 0.8
    extra = rc[:3] + np.array([0, 1000, 0, 0], np.int32)
    cc = np.concatenate([rc[keep], extra])[::-1].copy()
    cf = rng.normal(size=(len(cc), CIN)).astype(np.float32)
    np.testing.assert_allclose(inverse_conv3d(c, cc, cf, w2), inverse_ref(c, cc, cf, w2), **TOL)


def test_functional_invariant_to_row_order():
    rng, c, f, w3, w2 = _data(11, "clustered")
    perm = rng.permutation(len(c))
    np.testing.assert_allclose(
        subm_conv3d(c[perm], f[perm], w3), subm_conv3d(c, f, w3)[perm], **TOL
    )
    oc, of = strided_conv3d(c, f, w2)
    pc, pf = strided_conv3d(c[perm], f[perm], w2)
    np.testing.assert_array_equal(oc, pc)
    np.testing.assert_allclose(of, pf, **TOL)


def test_functional_under_jit():
    _, c, f, w3, w2 = _data(12, "surface")
    out = jax.jit(subm_conv3d)(c, f, w3)
    np.testing.assert_allclose(out, subm_ref(c, f, w3), **TOL)
    rc, rf = strided_ref(c, f, w2)
    oc, of = jax.jit(functools.partial(strided_conv3d, capacity=len(c)))(c, f, w2)
    m = len(rc)
    np.testing.assert_array_equal(np.asarray(oc)[:m], rc)
    np.testing.assert_allclose(np.asarray(of)[:m], rf, **TOL)
    assert (np.asarray(of)[m:] == 0).all()
    with pytest.raises(ValueError, match="capacity"):
        jax.jit(strided_conv3d)(c, f, w2)


# ------------------------------------------------------------------------- gradients


def _dense_refs(c, cc):
    """jnp references on numpy-built tables (independent of dknet_jax.sparse.hashing)."""
    n = len(c)
    nbr = neighbour_table_ref(c)
    nbr = np.where(nbr < 0, n, nbr)
    par_d = {tuple(r): o for o, r in enumerate(cc.tolist())}
    up = np.concatenate([c[:, :1], c[:, 1:] // 2], 1)
    parent = np.array([par_d.get(tuple(r), len(cc)) for r in up.tolist()])
    child = (c[:, 1] % 2) * 4 + (c[:, 2] % 2) * 2 + c[:, 3] % 2

    def subm(f, w):
        fp = jnp.concatenate([f, jnp.zeros((1, f.shape[1]), f.dtype)])
        return jnp.einsum("nkc,kcd->nd", fp[nbr], w.reshape(27, CIN, COUT))

    def strided(f, w):
        per = jnp.einsum("nc,ncd->nd", f, w.reshape(8, CIN, COUT)[child])
        return jax.ops.segment_sum(per, parent, num_segments=len(cc))

    def inverse(cf, w):
        cfp = jnp.concatenate([cf, jnp.zeros((1, cf.shape[1]), cf.dtype)])
        return jnp.einsum("nc,ncd->nd", cfp[parent], w.reshape(8, CIN, COUT)[child])

    return subm, strided, inverse


def _grads(fn, x, w, g):
    return jax.grad(lambda x, w: jnp.sum(fn(x, w) * g), argnums=(0, 1))(x, w)


@pytest.mark.parametrize("kind", ["clustered", "surface"])
def test_functional_gradients_match_dense_reference(kind):
    rng, c, f, w3, w2 = _data(13, kind)
    rc, _ = strided_ref(c, f, w2)
    subm_d, strided_d, inverse_d = _dense_refs(c, rc)
    g = rng.normal(size=(len(c), COUT)).astype(np.float32)
    gc = rng.normal(size=(len(rc), COUT)).astype(np.float32)
    cf = rng.normal(size=(len(rc), CIN)).astype(np.float32)
    pairs = [
        (_grads(lambda x, w: subm_conv3d(c, x, w), f, w3, g), _grads(subm_d, f, w3, g)),
        (_grads(lambda x, w: strided_conv3d(c, x, w)[1], f, w2, gc), _grads(strided_d, f, w2, gc)),
        (_grads(lambda x, w: inverse_conv3d(c, rc, x, w), cf, w2, g), _grads(inverse_d, cf, w2, g)),
    ]
    for got, want in pairs:
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(a, b, **TOL)


# ------------------------------------------------------------------ padded engine


CAP = 240


def _padded(rng, c, f):
    """Pad with garbage rows (some duplicating real coords) and shuffle."""
    extra = CAP - len(c)
    junk_c = np.concatenate([c[: extra // 2], rng.integers(-3, 3, (extra - extra // 2, 4))])
    cp = np.concatenate([c, junk_c]).astype(np.int32)
    fp = np.concatenate([f, 100 * rng.normal(size=(extra, f.shape[1]))]).astype(np.float32)
    valid = np.arange(CAP) < len(c)
    perm = rng.permutation(CAP)
    return cp[perm], fp[perm], valid[perm], perm


@functools.partial(jax.jit, static_argnames=("ppv",))
def _engine_subm(cp, valid, fp, w, g, ppv):
    smap = hashing.subm_map(cp, valid, pairs_per_voxel=ppv, tile_rows=8)
    fn = lambda x, w: conv.subm_conv(x, w, smap, impl="xla")
    out, vjp = jax.vjp(fn, fp, w)
    return (out,) + vjp(g), smap.tiles.ok


@pytest.mark.parametrize("ppv", [27, 1], ids=["tiled", "dense-fallback"])
def test_engine_subm_padded_equals_functional(ppv):
    rng, c, f, w3, _ = _data(14, "clustered")
    cp, fp, valid, perm = _padded(rng, c, f)
    inv = np.argsort(perm)[: len(c)]
    g = rng.normal(size=(CAP, COUT)).astype(np.float32)
    (out, dx, dw), ok = _engine_subm(cp, valid, fp, w3, g, ppv)
    assert bool(ok) == (ppv == 27)
    want_out, (want_dx, want_dw) = (
        subm_conv3d(c, f, w3),
        _grads(lambda x, w: subm_conv3d(c, x, w), f, w3, g[inv]),
    )
    np.testing.assert_allclose(np.asarray(out)[inv], want_out, **TOL)
    np.testing.assert_allclose(np.asarray(out)[~valid], 0)
    np.testing.assert_allclose(np.asarray(dx)[inv], want_dx, **TOL)
    np.testing.assert_allclose(np.asarray(dx)[~valid], 0)
    np.testing.assert_allclose(dw, want_dw, **TOL)


def test_one_tile_per_loop_step(monkeypatch):
    """Tiles as tall as a loop step (the default for maps of >= 2M pair slots, T =
    ``conv.STEP_ROWS``) take the loop's plain 2-D matmul branch: forward and both
    gradients of the engine's subm, strided and inverse convs against the dense jnp
    references on numpy-built tables (not the public ops, which would take the same
    branch)."""
    monkeypatch.setattr(conv, "STEP_ROWS", 8)  # = these tests' tile_rows: one tile per step
    rng, c, f, w3, w2 = _data(14, "clustered")
    cp, fp, valid, perm = _padded(rng, c, f)
    inv = np.argsort(perm)[: len(c)]
    g = rng.normal(size=(CAP, COUT)).astype(np.float32)
    (out, dx, dw), ok = _engine_subm(cp, valid, fp, w3, g, 27)
    assert bool(ok)
    cc = np.unique(np.concatenate([c[:, :1], c[:, 1:] // 2], 1), axis=0)
    subm_d, strided_d, inverse_d = _dense_refs(c, cc)
    f_, w3_ = jnp.asarray(f), jnp.asarray(w3)
    np.testing.assert_allclose(np.asarray(out)[inv], subm_d(f_, w3_), **TOL)
    want_dx, want_dw = _grads(subm_d, f_, w3_, jnp.asarray(g[inv]))
    np.testing.assert_allclose(np.asarray(dx)[inv], want_dx, **TOL)
    np.testing.assert_allclose(dw, want_dw, **TOL)

    w_up = rng.normal(size=(2, 2, 2, CIN, CIN)).astype(np.float32)
    w_down = np.concatenate([w2, w2[..., :2]], axis=-1)  # Cout 5 so that coarse feeds up
    coords, count, coarse, fine = _engine_down_up(cp, valid, fp, w_down, w_up)
    m = int(count)
    np.testing.assert_array_equal(np.asarray(coords)[:m], cc)
    rf = strided_d(f_, jnp.asarray(w_down).reshape(2, 2, 2, CIN, CIN)[..., :COUT])
    np.testing.assert_allclose(np.asarray(coarse)[:m, :COUT], rf, **TOL)
    want_fine = inverse_d(jnp.asarray(coarse)[:m, :CIN], jnp.asarray(w_up)[..., :COUT])
    np.testing.assert_allclose(np.asarray(fine)[inv][:, :COUT], want_fine, **TOL)


@jax.jit
def _engine_down_up(cp, valid, fp, w_down, w_up):
    dmap = hashing.down_map(cp, valid, capacity=3 * CAP // 4, tile_rows=8)
    coarse = conv.strided_conv(fp, w_down, dmap)
    return dmap.coords, dmap.count, coarse, conv.inverse_conv(coarse[:, :CIN], w_up, dmap)


def test_engine_down_up_padded_equals_functional():
    rng, c, f, _, w2 = _data(15, "surface")
    cp, fp, valid, perm = _padded(rng, c, f)
    inv = np.argsort(perm)[: len(c)]
    w_up = rng.normal(size=(2, 2, 2, CIN, CIN)).astype(np.float32)
    w_down = np.concatenate([w2, w2[..., :2]], axis=-1)  # Cout 5 so that coarse feeds up
    cc, count, coarse, fine = _engine_down_up(cp, valid, fp, w_down, w_up)
    rc, rf = strided_conv3d(c, f, w_down)
    m = int(count)
    np.testing.assert_array_equal(np.asarray(cc)[:m], rc)
    np.testing.assert_allclose(np.asarray(coarse)[:m], rf, **TOL)
    np.testing.assert_allclose(np.asarray(coarse)[m:], 0)
    want = inverse_conv3d(c, rc, rf[:, :CIN], w_up)
    np.testing.assert_allclose(np.asarray(fine)[inv], want, **TOL)


# ------------------------------------------------------------------- errors, pallas


def test_key_overflow_raises_or_poisons():
    rng = np.random.default_rng(16)
    c = np.array([[0, 0, 0, 0], [3, 2000, 2000, 300]], np.int32)
    f = rng.normal(size=(2, CIN)).astype(np.float32)
    w3 = np.ones((3, 3, 3, CIN, COUT), np.float32)
    with pytest.raises(ValueError, match="32-bit voxel keys"):
        subm_conv3d(c, f, w3)
    with pytest.raises(ValueError, match="32-bit voxel keys"):
        strided_conv3d(c, f, w3[:2, :2, :2])
    assert np.isnan(np.asarray(jax.jit(subm_conv3d)(c, f, w3))).all()


def test_bad_inputs_have_clear_errors():
    _, c, f, w3, w2 = _data(17, "surface")
    with pytest.raises(ValueError, match="coords must be"):
        subm_conv3d(c[:, :3], f, w3)
    with pytest.raises(ValueError, match="feats must be"):
        subm_conv3d(c, f[:-1], w3)
    with pytest.raises(ValueError, match="impl"):
        subm_conv3d(c, f, w3, impl="cuda")


def test_pallas_path_equals_xla():
    pytest.importorskip("pallas_kernels.sparse_conv")
    rng, c, f, w3, _ = _data(18, "clustered")
    c, f = c[:64], f[:64]
    g = rng.normal(size=(len(c), COUT)).astype(np.float32)

    def loss(x, w, impl):
        return jnp.sum(subm_conv3d(c, x, w, impl=impl) * g)

    got = jax.value_and_grad(loss, argnums=(0, 1))(f, w3, "pallas")
    want = jax.value_and_grad(loss, argnums=(0, 1))(f, w3, "xla")
    np.testing.assert_allclose(got[0], want[0], **TOL)
    for a, b in zip(got[1], want[1], strict=True):
        np.testing.assert_allclose(a, b, **TOL)


def test_batched_pass_equals_cpu_loop(monkeypatch):
    # Non-CPU backends and small convs run all tiles in one batched pass instead of the
    # CPU's loop of cache-sized steps: same outputs and gradients (subm, down, up).
    rng, c, f, w3, w2 = _data(19, "clustered")
    cp, fp, valid, perm = _padded(rng, c, f)
    inv = np.argsort(perm)[: len(c)]
    g = rng.normal(size=(CAP, COUT)).astype(np.float32)
    w_up = rng.normal(size=(2, 2, 2, COUT, CIN)).astype(np.float32)

    def run():
        smap = hashing.subm_map(cp, valid, pairs_per_voxel=8, tile_rows=8)
        dmap = hashing.down_map(cp, valid, capacity=3 * CAP // 4, tile_rows=8)

        def fn(x, w, wd, wu):
            up = conv.inverse_conv(conv.strided_conv(x, wd, dmap), wu, dmap)
            return conv.subm_conv(x, w, smap, impl="xla"), up

        out, vjp = jax.vjp(fn, *map(jnp.asarray, (fp, w3, w2, w_up)))
        return out, vjp((jnp.asarray(g), jnp.asarray(fp)))

    (out, up), grads = run()
    np.testing.assert_allclose(np.asarray(out)[inv], subm_ref(c, f, w3), **TOL)
    monkeypatch.setattr(conv, "_loop_on_backend", lambda: False)
    (out_b, up_b), grads_b = run()
    np.testing.assert_allclose(out_b, out, **TOL)
    np.testing.assert_allclose(up_b, up, **TOL)
    for a, b in zip(grads_b, grads, strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4 * float(np.abs(b).max()))


def test_row_buckets_pad_at_most_a_quarter():
    from dknet_jax.sparse.functional import _bucket

    assert [_bucket(n) for n in (1, 16, 17, 21, 33, 158_550, 262_144, 262_145)] == [
        16,
        16,
        20,
        24,
        40,
        163_840,
        262_144,
        327_680,
    ]
    sizes = np.unique(np.geomspace(16, 1 << 20, 4000).astype(int))
    b = np.array([_bucket(int(n)) for n in sizes])
    assert np.all(b >= sizes) and np.all(b <= np.ceil(1.25 * sizes))
    assert len(np.unique(b)) <= 4 * 16 + 1  # four shapes per octave: compilations bounded
