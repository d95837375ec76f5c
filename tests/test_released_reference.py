"""The float64 numpy reference of the released forward (dknet_jax.released.reference)."""

import numpy as np
import pytest

from dknet_jax.released import reference as R
from dknet_jax.released import spec as S


def _coords(rows):
    return np.asarray(rows, np.int64)


def test_subm_single_voxel_uses_the_centre_weight():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(5, 3, 3, 3, 4))
    x = rng.normal(size=(1, 4))
    c = _coords([[0, 7, 7, 7]])
    out = R.subm_conv3(x, R.neighbour_table(c), w)
    np.testing.assert_allclose(out[0], w[:, 1, 1, 1, :] @ x[0], rtol=1e-14)


def test_subm_offset_indexing_by_hand():
    """Voxel B at A + (1, 0, -1): A receives W[:, 2, 1, 0] @ x_B (input at out + (k - 1)),
    B receives W[:, 0, 1, 2] @ x_A; a voxel of another batch item at the same place
    contributes nothing."""
    rng = np.random.default_rng(1)
    w = rng.normal(size=(3, 3, 3, 3, 2))
    c = _coords([[0, 4, 4, 4], [0, 5, 4, 3], [1, 5, 4, 3]])
    x = rng.normal(size=(3, 2))
    out = R.subm_conv3(x, R.neighbour_table(c), w)
    centre = w[:, 1, 1, 1, :]
    np.testing.assert_allclose(out[0], centre @ x[0] + w[:, 2, 1, 0, :] @ x[1], rtol=1e-13)
    np.testing.assert_allclose(out[1], centre @ x[1] + w[:, 0, 1, 2, :] @ x[0], rtol=1e-13)
    np.testing.assert_allclose(out[2], centre @ x[2], rtol=1e-13)


def test_subm_identity_kernel_and_dense_correlation():
    rng = np.random.default_rng(2)
    # identity-like: only the centre tap, the identity matrix -> out == x
    w = np.zeros((3, 3, 3, 3, 3))
    w[:, 1, 1, 1, :] = np.eye(3)
    c = _coords([[0, x, y, z] for x in range(3) for y in range(2) for z in range(4)])
    x = rng.normal(size=(len(c), 3))
    nbr = R.neighbour_table(c)
    np.testing.assert_array_equal(R.subm_conv3(x, nbr, w), x)
    # a fully occupied grid: subm conv == dense zero-padded correlation (brute force)
    w = rng.normal(size=(2, 3, 3, 3, 3))
    out = R.subm_conv3(x, nbr, w)
    dense = np.zeros((3 + 2, 2 + 2, 4 + 2, 3))
    for i, (_, a, b, cc) in enumerate(c.tolist()):
        dense[a + 1, b + 1, cc + 1] = x[i]
    for i, (_, a, b, cc) in enumerate(c.tolist()):
        acc = np.zeros(2)
        for kx in range(3):
            for ky in range(3):
                for kz in range(3):
                    acc += w[:, kx, ky, kz, :] @ dense[a + kx, b + ky, cc + kz]
        np.testing.assert_allclose(out[i], acc, rtol=1e-12, atol=1e-12)


def test_down_and_inverse_by_hand():
    rng = np.random.default_rng(3)
    c = _coords([[0, 3, 4, 5], [0, 2, 4, 4], [0, 6, 0, 1]])
    ccoords, parent, child = R.down_map(c)
    np.testing.assert_array_equal(ccoords, [[0, 1, 2, 2], [0, 3, 0, 0]])
    np.testing.assert_array_equal(parent, [0, 0, 1])
    np.testing.assert_array_equal(child, [4 + 0 + 1, 0, 1])
    w = rng.normal(size=(4, 2, 2, 2, 3))
    x = rng.normal(size=(3, 3))
    down = R.down_conv2(x, parent, child, 2, w)
    np.testing.assert_allclose(down[0], w[:, 1, 0, 1, :] @ x[0] + w[:, 0, 0, 0, :] @ x[1])
    np.testing.assert_allclose(down[1], w[:, 0, 0, 1, :] @ x[2])
    wi = rng.normal(size=(3, 2, 2, 2, 4))
    xc = rng.normal(size=(2, 4))
    up = R.inverse_conv2(xc, parent, child, wi)
    np.testing.assert_allclose(up[0], wi[:, 1, 0, 1, :] @ xc[0])
    np.testing.assert_allclose(up[1], wi[:, 0, 0, 0, :] @ xc[0])
    np.testing.assert_allclose(up[2], wi[:, 0, 0, 1, :] @ xc[1])


def _random_scene(rng, n=120, extent=12, batch=0):
    pts = rng.integers(0, extent, size=(n, 3))
    c = np.unique(np.concatenate([np.full((n, 1), batch), pts], axis=1), axis=0)
    return c


def test_adjoint_relations():
    """<down(x; W), y> = <x, inverse(y; W^T)> and <subm(x; W), y> = <x, subm(y; W*)> with
    W* the mirrored, transposed kernel: the pair / offset bookkeeping is consistent."""
    rng = np.random.default_rng(4)
    c = _random_scene(rng)
    ccoords, parent, child = R.down_map(c)
    w = rng.normal(size=(5, 2, 2, 2, 3))
    x = rng.normal(size=(len(c), 3))
    y = rng.normal(size=(len(ccoords), 5))
    lhs = np.sum(R.down_conv2(x, parent, child, len(ccoords), w) * y)
    rhs = np.sum(x * R.inverse_conv2(y, parent, child, np.transpose(w, (4, 1, 2, 3, 0))))
    np.testing.assert_allclose(lhs, rhs, rtol=1e-12)
    nbr = R.neighbour_table(c)
    w3 = rng.normal(size=(4, 3, 3, 3, 3))
    y3 = rng.normal(size=(len(c), 4))
    mirrored = np.transpose(w3, (4, 1, 2, 3, 0))[:, ::-1, ::-1, ::-1, :]
    lhs = np.sum(R.subm_conv3(x, nbr, w3) * y3)
    rhs = np.sum(x * R.subm_conv3(y3, nbr, mirrored))
    np.testing.assert_allclose(lhs, rhs, rtol=1e-12)


def test_batch_norm_and_towers_by_hand():
    sd = S.random_state_dict(0)
    x = np.random.default_rng(5).normal(size=(4, 32))
    p = "mask_branch.0.1."
    want = (x - sd[p + "running_mean"].astype(np.float64)) / np.sqrt(
        sd[p + "running_var"].astype(np.float64) + 1e-5
    ) * sd[p + "weight"] + sd[p + "bias"]
    np.testing.assert_allclose(R.batch_norm(x, sd, p), want, rtol=1e-12)
    p = "linear.1."
    want = (x - sd[p + "running_mean"].astype(np.float64)) / np.sqrt(
        sd[p + "running_var"].astype(np.float64) + 1e-4
    ) * sd[p + "weight"] + sd[p + "bias"]
    np.testing.assert_allclose(R.batch_norm(x, sd, p), want, rtol=1e-12)
    # one tower row by explicit loops
    h = x[0].astype(np.float64)
    for i in range(3):
        w = sd[f"kernel_branch.{i}.0.weight"][:, :, 0].astype(np.float64)
        h = np.maximum(R.batch_norm((w @ h)[None], sd, f"kernel_branch.{i}.1.")[0], 0)
    h = sd["kernel_branch.3.weight"][:, :, 0] @ h + sd["kernel_branch.3.bias"]
    np.testing.assert_allclose(R.tower(x, sd, "kernel_branch.")[0], h, rtol=1e-6)


def test_decode_masks_kernel_layout_by_hand():
    """W1 is output-major in the 337-vector: w[19 o + c] connects input c to hidden o."""
    rng = np.random.default_rng(6)
    feats = rng.normal(size=(10, 16))
    coords = rng.normal(size=(10, 3))
    centre = np.array([[0.5, -1.0, 2.0]])
    w = np.zeros((1, 337))
    o, c = 3, 17  # hidden 3 reads input channel 17 = y of (coords - centre)
    w[0, 19 * o + c] = 2.0
    w[0, 304 + o] = 0.25  # b1[o]
    w[0, 320 + o] = -1.5  # W2[o]
    w[0, 336] = 0.1  # b2
    got = R.decode_masks(w, feats, centre, coords)[0]
    h = np.maximum(2.0 * (coords[:, 1] - centre[0, 1]) + 0.25, 0)
    np.testing.assert_allclose(got, 1 / (1 + np.exp(-(-1.5 * h + 0.1))), rtol=1e-13)


def test_merge_scores_symmetric_and_clamped():
    sd = S.random_state_dict(0)
    a = np.random.default_rng(7).normal(size=(5, 35))
    m = R.merge_scores(sd, a)
    np.testing.assert_allclose(m, m.T, rtol=1e-13)
    # the diagonal sees clamp(|0|, 1e-6) = 1e-6 in every channel
    d = R.tower(np.full((1, 35), 1e-6), sd, "merge_branch.")[0, 0]
    np.testing.assert_allclose(np.diag(m), 1 / (1 + np.exp(-d)), rtol=1e-13)


def test_scene_heatmap_softmax_per_scene_foreground():
    logits = np.array([1.0, 2.0, 3.0, 0.5, 9.0])
    batch = np.array([0, 0, 1, 1, 1])
    fg = np.array([True, True, True, True, False])
    h = R.scene_heatmap(logits, batch, fg)
    np.testing.assert_allclose(h[:2], np.exp([1, 2]) / np.exp([1, 2]).sum())
    np.testing.assert_allclose(h[2:4], np.exp([3, 0.5]) / np.exp([3, 0.5]).sum())
    assert h[4] == 0


@pytest.fixture(scope="module")
def scene():
    rng = np.random.default_rng(8)
    pts = rng.uniform(0, 10, size=(300, 3))
    pts = pts[pts[:, 2] < 3 + 0.5 * pts[:, 0]]  # a slab-like occupied set
    vox = np.floor(pts).astype(np.int64)
    c = np.concatenate([np.zeros((len(vox), 1), np.int64), vox], axis=1)
    feats = np.concatenate([rng.uniform(-1, 1, size=(len(pts), 3)), pts], axis=1)
    vc, vf, p2v = R.voxelize_mean(c, feats)
    return {"coords": vc, "feats": vf, "p2v": p2v, "sd": S.random_state_dict(11)}


def test_point_forward_shapes_and_consistency(scene):
    sd = scene["sd"]
    out = R.point_forward(sd, scene["coords"], scene["feats"], scene["p2v"])
    n = len(scene["p2v"])
    shapes = {
        "voxel_feats": (len(scene["coords"]), 32),
        "point_feats": (n, 32),
        "semantic_logits": (n, 20),
        "offsets": (n, 3),
        "heat_logits": (n,),
        "mask_feats": (n, 16),
        "kernel_feats": (n, 16),
    }
    for k, s in shapes.items():
        assert out[k].shape == s and out[k].dtype == np.float64 and np.all(np.isfinite(out[k]))
    assert np.all(out["voxel_feats"] >= 0) and np.std(out["semantic_logits"]) > 1e-3
    # points of one voxel share features
    np.testing.assert_array_equal(out["point_feats"], out["voxel_feats"][scene["p2v"]])

    # translation by 64 = 2^6 voxels keeps every level's grid -> identical outputs
    shifted = scene["coords"] + np.array([0, 64, 128, 64])
    out_s = R.point_forward(sd, shifted, scene["feats"], scene["p2v"])
    for k in shapes:
        np.testing.assert_allclose(out_s[k], out[k], rtol=1e-12, atol=1e-12)

    # a permutation of the voxel rows permutes nothing in the point outputs
    perm = np.random.default_rng(0).permutation(len(scene["coords"]))
    inv = np.argsort(perm)
    out_p = R.point_forward(sd, scene["coords"][perm], scene["feats"][perm], inv[scene["p2v"]])
    np.testing.assert_allclose(out_p["semantic_logits"], out["semantic_logits"], rtol=1e-11)

    # a second scene in the batch does not change the first (inference BatchNorm)
    other = scene["coords"][: len(scene["coords"]) // 2] + np.array([1, 0, 0, 0])
    both_c = np.concatenate([scene["coords"], other])
    both_f = np.concatenate([scene["feats"], scene["feats"][: len(other)] * 2])
    out_b = R.point_forward(sd, both_c, both_f, scene["p2v"])
    np.testing.assert_allclose(out_b["mask_feats"], out["mask_feats"], rtol=1e-12, atol=1e-12)


def test_point_forward_uses_every_used_entry(scene):
    """Perturbing any used weight family changes the outputs; the unused modules don't."""
    sd = scene["sd"]
    base = R.point_forward(sd, scene["coords"], scene["feats"], scene["p2v"])
    probes = [
        "unet.u.u.u.u.u.u.blocks.block1.conv_branch.5.weight",  # the coarsest level
        "unet.blocks_tail.block0.i_branch.0.weight",
        "unet.u.deconv.0.running_mean",
        "candidate_linear.4.running_var",
    ]
    for name in probes:
        sd2 = dict(sd)
        sd2[name] = sd[name] * 1.5 + 0.1
        out = R.point_forward(sd2, scene["coords"], scene["feats"], scene["p2v"])
        key = "heat_logits" if name.startswith("candidate") else "point_feats"
        assert np.max(np.abs(out[key] - base[key])) > 1e-6, name
    sd2 = {k: (v * 0 + 7 if S.is_unused(k) else v) for k, v in sd.items()}
    out = R.point_forward(sd2, scene["coords"], scene["feats"], scene["p2v"])
    for k in base:
        np.testing.assert_array_equal(out[k], base[k])
