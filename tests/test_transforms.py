"""Properties of the per-scene augmentations (dknet_jax/data/transforms.py)."""

import numpy as np
import pytest
from scipy.interpolate import RegularGridInterpolator
from scipy.spatial.distance import pdist

from dknet_jax.data import transforms as T


def make_sample(n=2000, seed=0, k=6):
    rng = np.random.default_rng(seed)
    xyz = rng.uniform([0, 0, 0], [6.0, 4.0, 2.5], size=(n, 3)).astype(np.float32) + 10.0
    inst = rng.integers(0, k, size=n).astype(np.int32) * 3 + 1  # sparse ids 1, 4, 7, ...
    inst[rng.random(n) < 0.2] = -100
    return {
        "xyz": xyz,
        "rgb": rng.integers(0, 256, size=(n, 3)).astype(np.uint8),
        "semantic": rng.integers(0, 20, size=n).astype(np.int32),
        "instance": inst,
        "superpoint": np.arange(n, dtype=np.int32),  # unique per point: a row id
        "name": "scene_t",
    }


def test_centre_zero_mean_and_translation_only():
    s = make_sample()
    c = T.centre(s)
    np.testing.assert_allclose(c["xyz"].mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(c["xyz"] - c["xyz"][0], s["xyz"] - s["xyz"][0], atol=1e-4)
    assert s["xyz"].mean() > 5  # input untouched


def test_rotation_z_hand_example_and_distances():
    np.testing.assert_allclose(
        np.array([1.0, 0, 0]) @ T.rotation_z(np.pi / 2), [0, 1, 0], atol=1e-12
    )
    s = T.centre(make_sample(n=300))
    r = T.random_rotate_z(s, np.random.default_rng(3))
    np.testing.assert_allclose(pdist(r["xyz"]), pdist(s["xyz"]), atol=1e-4)
    np.testing.assert_allclose(r["xyz"][:, 2], s["xyz"][:, 2], atol=1e-6)
    assert np.abs(r["xyz"][:, :2] - s["xyz"][:, :2]).max() > 0.1  # actually rotated
    angles = [
        np.arctan2(*T.random_rotation_matrix(np.random.default_rng(i))[0, 1::-1])
        for i in range(400)
    ]
    assert np.ptp(angles) > 5.5  # covers the circle


def test_flip_x():
    s = T.centre(make_sample(n=100))
    f = T.random_flip_x(s, np.random.default_rng(0), p=1.0)
    np.testing.assert_array_equal(f["xyz"][:, 0], -s["xyz"][:, 0])
    np.testing.assert_array_equal(f["xyz"][:, 1:], s["xyz"][:, 1:])
    same = T.random_flip_x(s, np.random.default_rng(0), p=0.0)
    np.testing.assert_array_equal(same["xyz"], s["xyz"])
    flips = [T.flip_matrix(np.random.default_rng(i))[0, 0] < 0 for i in range(400)]
    assert 0.4 < np.mean(flips) < 0.6


def test_jitter_is_identity_plus_gaussian():
    s = T.centre(make_sample(n=50))
    dev = []
    for i in range(200):
        j = T.random_jitter(s, np.random.default_rng(i), std=0.1)
        m, *_ = np.linalg.lstsq(s["xyz"].astype(np.float64), j["xyz"], rcond=None)
        dev.append(m - np.eye(3))
    dev = np.array(dev)
    assert abs(dev.mean()) < 0.02
    assert 0.08 < dev.std() < 0.12


def test_trilinear_matches_scipy():
    rng = np.random.default_rng(0)
    grid = rng.standard_normal((5, 6, 7, 3)).astype(np.float32)
    origin, h = np.array([-1.0, 0.5, 2.0]), 0.3
    pts = origin + rng.uniform(0, 1, (500, 3)) * h * (np.array(grid.shape[:3]) - 1)
    axes = [origin[a] + h * np.arange(grid.shape[a]) for a in range(3)]
    ref = RegularGridInterpolator(axes, grid)(pts)
    np.testing.assert_allclose(T.trilinear(grid, origin, h, pts), ref, atol=1e-5)


def test_elastic_smooth_bounded_deterministic():
    g, mag = 0.2, 1.0
    # dense segments through the room, 1 mm spacing: the field must be continuous
    t = np.arange(0, 4.0, 0.001)
    line = np.stack([t, 0.37 * t + 0.1, 0.2 * t + 0.3], 1).astype(np.float32)
    cloud = np.random.default_rng(1).uniform(0, 4, (20000, 3)).astype(np.float32)
    pts = np.concatenate([line, cloud])
    d = T.elastic_field(pts, np.random.default_rng(5), granularity=g, magnitude=mag)
    dl = d[: len(line)]
    assert np.abs(np.diff(dl, axis=0)).max() < 0.02 * mag  # no jumps between 1 mm steps
    assert np.ptp(dl, axis=0).min() > 0.1 * mag  # but it does vary across cells
    # grid noise std after two box-3 passes per axis is (19/81)^1.5 = 0.114; trilinear
    # interpolation only averages it down
    assert 0.04 * mag < d[len(line) :].std() < 0.114 * mag
    assert np.abs(d).max() < 0.7 * mag
    assert abs(d.mean()) < 0.02 * mag
    again = T.elastic_field(pts, np.random.default_rng(5), granularity=g, magnitude=mag)
    np.testing.assert_array_equal(d, again)
    other = T.elastic_field(pts, np.random.default_rng(6), granularity=g, magnitude=mag)
    assert np.abs(d - other).max() > 0.05
    s = {"xyz": pts, "semantic": np.zeros(len(pts), np.int32)}
    out = T.elastic_distortion(s, np.random.default_rng(5), granularity=g, magnitude=mag)
    np.testing.assert_allclose(out["xyz"], pts + d, atol=1e-6)


def test_crop_keeps_at_most_max_points_and_labels():
    s = T.centre(make_sample(n=5000, k=30))
    s["instance"] = np.where(
        s["instance"] >= 0,
        (s["xyz"][:, 0] > 0) * 100 + np.floor(s["xyz"][:, 1]).astype(np.int32) + 50,
        -100,
    )
    s["instance"] = s["instance"].astype(np.int32)
    c = T.crop_to_max_points(s, np.random.default_rng(2), max_points=1200, box_size=5.0, shrink=0.5)
    n = len(c["xyz"])
    assert 0 < n <= 1200
    rows = c["superpoint"]  # superpoint = original row id
    assert len(np.unique(rows)) == n
    for key in ("xyz", "rgb", "semantic"):
        np.testing.assert_array_equal(c[key], s[key][rows])
    # kept points lie in an x-y box of side <= box_size, z untouched
    assert np.ptp(c["xyz"][:, :2], axis=0).max() <= 5.0 + 1e-6
    # instances: compact 0..K'-1, same partition as the old ids, order preserved
    old, new = s["instance"][rows], c["instance"]
    np.testing.assert_array_equal(old < 0, new < 0)
    assert set(np.unique(new[new >= 0])) == set(range(len(np.unique(old[old >= 0]))))
    pairs = np.unique(np.stack([old[old >= 0], new[new >= 0]], 1), axis=0)
    assert len(pairs) == len(np.unique(pairs[:, 0])) == len(np.unique(pairs[:, 1]))
    assert (np.diff(pairs[:, 1]) > 0).all()
    again = T.crop_to_max_points(
        s, np.random.default_rng(2), max_points=1200, box_size=5.0, shrink=0.5
    )
    np.testing.assert_array_equal(again["superpoint"], rows)
    small = T.crop_to_max_points(
        s, np.random.default_rng(2), max_points=5000, box_size=5.0, shrink=0.5
    )
    np.testing.assert_array_equal(small["xyz"], s["xyz"])


def test_crop_degenerate_dense_scene_falls_back_to_subsample():
    s = make_sample(n=500)
    s["xyz"][:] = 1.0  # every point in the same place: no box can split them
    c = T.crop_to_max_points(s, np.random.default_rng(0), max_points=100, box_size=1.0, shrink=0.4)
    assert len(c["xyz"]) == 100 and len(np.unique(c["superpoint"])) == 100


def test_color_noise_is_one_shift_per_scene():
    s = make_sample(n=100)
    shifts = []
    for i in range(300):
        c = T.color_noise(s, np.random.default_rng(i), scene_std=0.1)
        d = c["rgb"] - s["rgb"].astype(np.float32)
        np.testing.assert_allclose(d, np.broadcast_to(d[0], d.shape), atol=1e-3)
        shifts.append(d[0])
    assert 0.085 * 127.5 < np.std(shifts) < 0.115 * 127.5


def test_augment_chain_deterministic_and_composed_in_order():
    s = make_sample(n=3000)
    cfg = T.AugmentConfig(max_points=2000, crop_box=3.0, crop_shrink=0.3)
    a = T.augment(s, np.random.default_rng(7), cfg)
    b = T.augment(s, np.random.default_rng(7), cfg)
    for key in T.POINT_KEYS:
        np.testing.assert_array_equal(a[key], b[key])
    c = T.augment(s, np.random.default_rng(8), cfg)
    assert not np.array_equal(a["xyz"][:100], c["xyz"][:100])
    # the composed matrix equals applying the steps one after another
    rng = np.random.default_rng(7)
    x = T.centre(s)
    x = T.random_jitter(x, rng, std=cfg.jitter_std)
    x = T.random_flip_x(x, rng)
    x = T.random_rotate_z(x, rng)
    for gran, mag in cfg.elastic:
        x = T.elastic_distortion(x, rng, granularity=gran, magnitude=mag)
    x = T.crop_to_max_points(x, rng, max_points=2000, box_size=3.0, shrink=0.3)
    np.testing.assert_array_equal(x["superpoint"], a["superpoint"])
    np.testing.assert_allclose(x["xyz"], a["xyz"], atol=1e-4)
    assert len(a["xyz"]) <= 2000


def test_eval_transform_is_centring_only():
    s = make_sample(n=200)
    e = T.prepare_eval(s)
    np.testing.assert_allclose(e["xyz"], s["xyz"] - s["xyz"].astype(np.float64).mean(0), atol=1e-5)
    np.testing.assert_array_equal(e["rgb"], s["rgb"])


def test_voxel_coords_and_features_hand_example():
    xyz = np.array([[0.01, -0.03, 0.0], [0.05, 0.0, 0.019], [-0.015, 0.021, 0.045]], np.float32)
    # floor(x / 0.02): x: 0, 2, -1; y: -2, 0, 1; z: 0, 0, 2 -> shift by (-1, -2, 0)
    np.testing.assert_array_equal(T.voxel_coords(xyz, 0.02), [[1, 0, 0], [3, 2, 0], [0, 3, 2]])
    assert T.voxel_coords(xyz, 0.02).dtype == np.int32
    rgb = np.array([[0, 255, 127.5], [255, 0, 0], [0, 0, 0]])
    f = T.point_features(rgb, xyz)
    assert f.shape == (3, 6) and f.dtype == np.float32
    np.testing.assert_allclose(f[0, :3], [-1, 1, 0])
    np.testing.assert_array_equal(f[:, 3:], xyz)


def released_voxel_locs(xyz_middle, scale):
    """The released voxel coordinates of one scene, line for line (R:data/scannetv2_inst.py
    testMerge, float64 numpy): ``xyz = xyz_middle * scale; xyz -= xyz.min(0)``, then
    ``torch.from_numpy(xyz).long()`` (truncation toward 0; every value is >= 0)."""
    xyz = np.asarray(xyz_middle, np.float64) * scale
    xyz -= xyz.min(0)
    return np.trunc(xyz).astype(np.int64)


def test_voxel_origin_scene_min_hand_example():
    # exact binary fractions, voxel 0.25 m: the scene minimum is (-0.375, 0, 2)
    xyz = np.array(
        [[-0.375, 0.125, 2.0], [-0.125, 0.375, 2.0], [0.0625, 0.0, 2.25], [0.25, 0.5, 2.5]],
        np.float32,
    )
    # scene_min: floor((p - min) / 0.25): x 0/0.25/0.4375/0.625 -> 0, 1, 1, 2;
    # y 0.125/0.375/0/0.5 -> 0, 1, 0, 2; z 0/0/0.25/0.5 -> 0, 0, 1, 2
    want_min = [[0, 0, 0], [1, 1, 0], [1, 0, 1], [2, 2, 2]]
    # centre: floor(p / 0.25) = x -2, -1, 0, 1; y 0, 1, 0, 2; z 8, 8, 9, 10, minus the min
    want_centre = [[0, 0, 0], [1, 1, 0], [2, 0, 1], [3, 2, 2]]
    got = T.voxel_coords(xyz, 0.25, "scene_min")
    np.testing.assert_array_equal(got, want_min)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(T.voxel_coords(xyz, 0.25, "centre"), want_centre)
    np.testing.assert_array_equal(T.voxel_coords(xyz, 0.25), want_centre)  # default: ours
    # the released grid moves with the scene, ours stays on the coordinate origin
    moved = xyz + np.float32(0.125)
    np.testing.assert_array_equal(T.voxel_coords(moved, 0.25, "scene_min"), want_min)
    assert not np.array_equal(T.voxel_coords(moved, 0.25, "centre"), want_centre)
    assert T.voxel_coords(np.zeros((0, 3), np.float32), 0.25, "scene_min").shape == (0, 3)
    with pytest.raises(ValueError, match="origin 'min'.*data.voxel_origin"):
        T.voxel_coords(xyz, 0.25, "min")
    with pytest.raises(ValueError, match="voxel_size"):
        T.voxel_coords(xyz, 0.0, "scene_min")


@pytest.mark.parametrize("voxel_size, scale", [(0.02, 50), (0.05, 20)])
def test_voxel_origin_scene_min_is_the_released_arithmetic(voxel_size, scale):
    rng = np.random.default_rng(3)
    for seed in range(4):
        xyz = T.centre(make_sample(n=3000, seed=seed))["xyz"]
        xyz = xyz @ T.random_rotation_matrix(rng).astype(np.float32)
        got = T.voxel_coords(xyz, voxel_size, "scene_min")
        np.testing.assert_array_equal(got, released_voxel_locs(xyz, scale))  # bit for bit
        # = floor((p - min) / voxel) away from rounding at a voxel face
        u = (xyz.astype(np.float64) - xyz.min(0)) / voxel_size
        clear = np.all(np.abs(u - np.round(u)) > 1e-6, axis=1)
        assert clear.mean() > 0.99
        np.testing.assert_array_equal(got[clear], np.floor(u[clear]))
        # ours: floor(p / voxel) shifted by its minimum; the two grids differ (sub-voxel)
        c = np.floor(xyz.astype(np.float64) / voxel_size)
        ours = T.voxel_coords(xyz, voxel_size, "centre")
        np.testing.assert_array_equal(ours, c - c.min(0))
        assert (ours != got).any(axis=1).mean() > 0.05


def test_bad_arguments():
    s = make_sample(n=10)
    with pytest.raises(ValueError, match="max_points"):
        T.crop_to_max_points(s, np.random.default_rng(0), max_points=0, box_size=1, shrink=1)
    with pytest.raises(ValueError, match="granularity"):
        T.elastic_field(s["xyz"], np.random.default_rng(0), granularity=0, magnitude=1)
