"""Renderings: projections land on hand-computed pixels, the z-buffer keeps the nearest
point, splat radii follow the sampling, legend/PNG plumbing works."""

import numpy as np
import pytest
from PIL import Image

from dknet_jax.inference import render as R

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
WHITE = R.BACKGROUND


def _cols(*cs):
    return np.array(cs, np.uint8)


def test_top_view_corners_land_on_expected_pixels():
    # unit square: (xmin, ymax) is the top-left corner, (xmax, ymin) the bottom-right
    xyz = np.array([[0, 1, 0], [1, 0, 0], [1, 1, 0], [0, 0, 0]], np.float32)
    cols = _cols(RED, BLUE, GREEN, GREEN)
    img = R.render_top(xyz, cols, (21, 21), radius=0, margin=0)
    assert img.shape == (21, 21, 3) and img.dtype == np.uint8
    assert tuple(img[0, 0]) == RED
    assert tuple(img[20, 20]) == BLUE
    assert tuple(img[0, 20]) == GREEN and tuple(img[20, 0]) == GREEN
    assert (np.all(img == WHITE, axis=-1)).sum() == 21 * 21 - 4
    # with a margin of 3 pixels the corners move in by 3
    img = R.render_top(xyz, cols, (21, 21), radius=0, margin=3)
    assert tuple(img[3, 3]) == RED and tuple(img[17, 17]) == BLUE


def test_top_view_keeps_aspect_and_centres():
    # x extent 2, y extent 1 in a 41x41 panel: 20 px/m, content 40 x 20, centred vertically
    xyz = np.array([[0, 1, 0], [2, 0, 0], [1, 0.5, 0]], np.float32)
    img = R.render_top(xyz, _cols(RED, BLUE, GREEN), (41, 41), radius=0, margin=0)
    assert tuple(img[10, 0]) == RED  # v = (40 - 20) / 2 + (1 - 1) * 20
    assert tuple(img[30, 40]) == BLUE  # v = 10 + (1 - 0) * 20, u = 2 * 20
    assert tuple(img[20, 20]) == GREEN


def test_top_view_z_buffer_keeps_highest_point_in_any_order():
    base = np.array([[0, 0, 0], [1, 1, 0]], np.float32)
    low, high = [0.5, 0.5, 0.2], [0.5, 0.5, 1.5]
    for pts, cols in (([low, high], (RED, BLUE)), ([high, low], (BLUE, RED))):
        xyz = np.concatenate([base, np.array(pts, np.float32)])
        img = R.render_top(xyz, _cols(GREEN, GREEN, *cols), (11, 11), radius=0, margin=0)
        assert tuple(img[5, 5]) == BLUE  # the higher point, blue, is seen from above


def test_perspective_orientation_and_nearest_point():
    # camera on +x (azimuth 0, elevation 0) looking at the box centre: +y is right, +z up
    corners = [[0, -1, 1], [0, 1, 1], [0, -1, -1], [0, 1, -1]]
    far, near = [0, 0, 0], [0.5, 0, 0]  # same ray through the centre; near is closer
    xyz = np.array(corners + [far, near], np.float32)
    cols = _cols(RED, GREEN, GREEN, BLUE, (9, 9, 9), (200, 100, 0))
    img = R.render_perspective(xyz, cols, (41, 41), azimuth=0.0, elevation=0.0, radius=0, margin=2)
    assert tuple(img[20, 20]) == (200, 100, 0)  # the near point hides the far one
    assert tuple(img[2, 2]) == RED  # (y=-1, z=+1): top-left
    assert tuple(img[38, 38]) == BLUE  # (y=+1, z=-1): bottom-right
    assert tuple(img[2, 38]) == GREEN
    # same points in the other order: still the near one
    img2 = R.render_perspective(
        xyz[::-1], cols[::-1], (41, 41), azimuth=0.0, elevation=0.0, radius=0, margin=2
    )
    assert tuple(img2[20, 20]) == (200, 100, 0)


def test_splat_radius_and_ties():
    # point 0 far with radius 2, point 1 near with radius 0 one pixel away
    u = np.array([5.0, 6.0, 5.0])
    v = np.array([5.0, 5.0, 5.0])
    depth = np.array([2.0, 1.0, 2.0])  # point 2 ties point 0 at (5, 5): index 0 wins
    img = R.splat(u, v, depth, _cols(RED, BLUE, GREEN), (12, 12), radius=np.array([2, 0, 2]))
    assert tuple(img[5, 6]) == BLUE
    assert tuple(img[5, 5]) == RED
    covered = np.any(img != WHITE, axis=-1)
    expect = np.zeros((12, 12), bool)
    expect[3:8, 3:8] = True
    np.testing.assert_array_equal(covered, expect)
    # off-image and non-finite points are dropped silently
    img = R.splat(
        np.array([-5.0, np.nan]),
        np.array([0.0, 0.0]),
        np.array([1.0, 1.0]),
        _cols(RED, RED),
        (4, 4),
    )
    assert np.all(img == WHITE)


def test_surface_spacing_and_auto_radius():
    g = np.stack(np.meshgrid(np.arange(30) * 0.1, np.arange(20) * 0.15, indexing="ij"), -1)
    xyz = np.concatenate([g.reshape(-1, 2), np.zeros((600, 1))], 1)
    # anisotropic grid: neighbours at 0.1, 0.1, 0.15, 0.15 -> the 4th is the larger step
    assert R.surface_spacing(xyz) == pytest.approx(0.15, abs=1e-9)
    # a subsample is corrected back to the full density: same answer
    assert R.surface_spacing(xyz, sample=150) == pytest.approx(0.15, rel=0.35)
    assert int(R.auto_radius(0.25, 20.0)) == 3  # ceil(0.5 * 0.25 * 20) = 3
    assert int(R.auto_radius(0.25, 100.0)) == 4  # clipped to max_radius
    np.testing.assert_array_equal(R.auto_radius(0.1, np.array([0.0, 10.0, 30.0])), [0, 1, 2])


def test_render_views_halves_and_empty():
    rng = np.random.default_rng(0)
    xyz = rng.uniform(0, 3, (200, 3))
    cols = rng.integers(0, 255, (200, 3)).astype(np.uint8)
    img = R.render_views(xyz, cols, size=(101, 40))
    assert img.shape == (40, 101, 3)
    np.testing.assert_array_equal(img[:, :50], R.render_top(xyz, cols, (50, 40)))
    np.testing.assert_array_equal(img[:, 50:], R.render_perspective(xyz, cols, (51, 40)))
    empty = R.render_views(np.zeros((0, 3)), np.zeros((0, 3), np.uint8), size=(20, 10))
    assert np.all(empty == WHITE)


def test_bad_inputs_are_clear():
    with pytest.raises(ValueError, match="NaN"):
        R.render_top(np.array([[0, np.nan, 0]]), _cols(RED), (8, 8))
    with pytest.raises(ValueError, match="colors must be"):
        R.render_top(np.zeros((2, 3)), _cols(RED), (8, 8))
    with pytest.raises(ValueError, match="xyz must be"):
        R.render_views(np.zeros((2, 2)), np.zeros((2, 2)), (8, 8))
    with pytest.raises(ValueError, match="uint8"):
        R.save_png("/tmp/never.png", np.zeros((4, 4)))


def test_distinct_colors():
    c = R.distinct_colors(60)
    assert c.shape == (60, 3) and c.dtype == np.uint8
    assert len({tuple(x) for x in c}) == 60
    assert not any(tuple(x) == R.GREY for x in c)
    # neighbours in the sequence differ clearly
    assert np.abs(c[1:].astype(int) - c[:-1].astype(int)).sum(axis=1).min() > 60


def test_legend_and_png_roundtrip(tmp_path):
    img = np.full((30, 200, 3), 7, np.uint8)
    out = R.add_legend(
        img, [(f"{i} chair 0.9", (255, 0, 0)) for i in range(40)], title="scene", max_rows=3
    )
    assert out.shape[1] == 200 and out.shape[0] > 30
    np.testing.assert_array_equal(out[:30], img)
    strip = out[30:]
    assert np.any(np.all(strip == (255, 0, 0), axis=-1))  # a swatch was drawn
    assert strip.shape[0] <= 16 * 4 + 12  # title + 3 rows + padding
    path = tmp_path / "x.png"
    R.save_png(path, out)
    np.testing.assert_array_equal(np.asarray(Image.open(path).convert("RGB")), out)
