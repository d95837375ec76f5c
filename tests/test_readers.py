"""Readers of users' scans (PLY binary/ASCII, npz, txt) and the robust row parser:
contents compared with the arrays written, and every error names the file."""

from __future__ import annotations

import os
import warnings

import numpy as np
import plyfile
import pytest

from dknet_jax.data.ply import read_ply, write_ply
from dknet_jax.data.readers import DataWarning, read_rows, read_scan

RNG = np.random.default_rng(0)
XYZ = RNG.uniform(-3, 3, (40, 3)).astype(np.float32)
RGB = RNG.integers(0, 256, (40, 3)).astype(np.uint8)
FACES = np.array([[0, 1, 2], [2, 3, 4], [5, 6, 7]], np.int32)


def _vertex(colour=True, normals=False, xyz=XYZ):
    v = {"x": xyz[:, 0], "y": xyz[:, 1], "z": xyz[:, 2]}
    if normals:
        v.update(
            nx=np.zeros(len(xyz), np.float32),
            ny=np.zeros(len(xyz), np.float32),
            nz=np.ones(len(xyz), np.float32),
        )
    if colour:
        v.update(red=RGB[:, 0], green=RGB[:, 1], blue=RGB[:, 2])
    return v


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("faces", [None, FACES])
def test_ply_with_colour(tmp_path, binary, faces):
    p = str(tmp_path / "scan.ply")
    write_ply(p, _vertex(normals=True), faces, binary=binary)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # colour present: no warning
        out = read_scan(p)
    assert out["xyz"].dtype == np.float32 and out["rgb"].dtype == np.uint8
    np.testing.assert_array_equal(out["xyz"], XYZ)
    np.testing.assert_array_equal(out["rgb"], RGB)
    if faces is None:
        assert out["faces"] is None
    else:
        np.testing.assert_array_equal(out["faces"], FACES)
    if not binary:
        assert open(p, "rb").read().startswith(b"ply\nformat ascii")


@pytest.mark.parametrize("binary", [True, False])
def test_ply_without_colour_is_grey_with_warning(tmp_path, binary):
    p = str(tmp_path / "bare.ply")
    write_ply(p, _vertex(colour=False), binary=binary)
    with pytest.warns(DataWarning, match=r"bare\.ply: no colours; using neutral grey"):
        out = read_scan(p)
    assert np.all(out["rgb"] == 128) and out["rgb"].shape == (40, 3)


def test_ply_float_colours_and_polygons(tmp_path):
    p = str(tmp_path / "quad.ply")
    vert = np.zeros(
        4,
        dtype=[
            ("x", "f4"),
            ("y", "f4"),
            ("z", "f4"),
            ("red", "f4"),
            ("green", "f4"),
            ("blue", "f4"),
        ],
    )
    vert["x"] = [0, 1, 1, 0]
    vert["y"] = [0, 0, 1, 1]
    vert["red"], vert["green"], vert["blue"] = 1.0, 0.5, 0.0
    face = np.empty(1, dtype=[("vertex_indices", object)])
    face[0] = (np.array([0, 1, 2, 3], np.int32),)
    plyfile.PlyData(
        [plyfile.PlyElement.describe(vert, "vertex"), plyfile.PlyElement.describe(face, "face")]
    ).write(p)
    out = read_scan(p)
    np.testing.assert_array_equal(out["rgb"], [[255, 128, 0]] * 4)  # rint(127.5) = 128
    np.testing.assert_array_equal(out["faces"], [[0, 1, 2], [0, 2, 3]])  # fan


def test_npz(tmp_path):
    p = str(tmp_path / "a.npz")
    np.savez(p, xyz=XYZ.astype(np.float64), rgb=RGB)
    out = read_scan(p)
    np.testing.assert_array_equal(out["xyz"], XYZ)
    np.testing.assert_array_equal(out["rgb"], RGB)
    p2 = str(tmp_path / "b.npz")
    np.savez(p2, xyz=XYZ)
    with pytest.warns(DataWarning, match="b.npz: no colours"):
        assert np.all(read_scan(p2)["rgb"] == 128)


def test_txt_with_and_without_colour(tmp_path):
    p = str(tmp_path / "c.txt")
    np.savetxt(p, np.c_[XYZ, RGB], fmt="%.6f %.6f %.6f %d %d %d")
    out = read_scan(p)
    np.testing.assert_allclose(out["xyz"], XYZ, atol=1e-6)
    np.testing.assert_array_equal(out["rgb"], RGB)
    p3 = str(tmp_path / "d.txt")
    np.savetxt(p3, XYZ, fmt="%.6f")
    with pytest.warns(DataWarning, match="d.txt: no colours"):
        out = read_scan(p3)
    np.testing.assert_allclose(out["xyz"], XYZ, atol=1e-6)


def test_errors_name_the_file(tmp_path):
    bad = XYZ.copy()
    bad[7, 1] = np.nan
    p = str(tmp_path / "nan.ply")
    write_ply(p, _vertex(xyz=bad))
    with pytest.raises(ValueError, match=r"nan\.ply: 1 points have NaN or inf.*row 7"):
        read_scan(p)
    p = str(tmp_path / "inf.npz")
    np.savez(p, xyz=np.array([[0, 0, np.inf]]))
    with pytest.raises(ValueError, match=r"inf\.npz: 1 points have NaN or inf"):
        read_scan(p)
    p = str(tmp_path / "empty.ply")
    write_ply(p, _vertex(xyz=np.zeros((0, 3), np.float32), colour=False))
    with pytest.raises(ValueError, match=r"empty\.ply: the point cloud is empty"):
        read_scan(p)
    p = str(tmp_path / "empty.txt")
    open(p, "w").write("\n\n")
    with pytest.raises(ValueError, match=r"empty\.txt: the point cloud is empty"):
        read_scan(p)
    p = str(tmp_path / "noz.ply")
    write_ply(p, {"x": XYZ[:, 0], "y": XYZ[:, 1]})
    with pytest.raises(ValueError, match=r"noz\.ply: PLY vertices lack .*\['z'\]"):
        read_scan(p)
    p = str(tmp_path / "two.txt")
    np.savetxt(p, XYZ[:, :2])
    with pytest.raises(ValueError, match=r"two\.txt: rows have 2 columns"):
        read_scan(p)
    p = str(tmp_path / "noxyz.npz")
    np.savez(p, points=XYZ)
    with pytest.raises(ValueError, match=r"noxyz\.npz: .npz needs an 'xyz'"):
        read_scan(p)
    p = str(tmp_path / "garbage.ply")
    open(p, "wb").write(b"not a ply at all")
    with pytest.raises(ValueError, match=r"garbage\.ply: not a readable PLY"):
        read_scan(p)
    with pytest.raises(FileNotFoundError, match="missing.ply"):
        read_scan(str(tmp_path / "missing.ply"))
    with pytest.raises(ValueError, match=r"scan\.obj: unsupported scan format"):
        read_scan(str(tmp_path / "scan.obj"))


def test_read_rows_skips_corrupt_rows(tmp_path):
    good = [[1.5, -2.25, 3.0, 10, 20, 30], [4.0, 5.0, 6.0, 1, 2, 3], [7.0, 8.0, 9.0, 4, 5, 6]]
    lines = [
        "1.5 -2.25 3.0 10 20 30",
        "4.000 5.000\x006.000 7 8 9",  # NUL instead of a space
        "4.0 5.0 6.0 1 2 3",
        "",  # blank: ignored, not a warning
        "7.\x0312 8 9 1 1 1",  # control byte inside a number
        "1 2 3 4 5",  # missing column
        "1.2.3 1 1 1 1 1",  # not a number
        "1e999 1 1 1 1 1",  # overflows to inf
        "nan 1 1 1 1 1",
        "7.0 8.0 9.0 4 5 6",
    ]
    p = str(tmp_path / "rows.txt")
    with open(p, "wb") as fh:
        fh.write("\r\n".join(lines).encode("latin-1"))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        rows = read_rows(p, 6)
    msgs = [str(w.message) for w in rec if w.category is DataWarning]
    assert sorted(int(m.split(":")[1]) for m in msgs) == [2, 5, 6, 7, 8, 9]
    assert all(m.startswith(p + ":") and "skipped malformed row" in m for m in msgs)
    np.testing.assert_array_equal(rows.values, good)
    np.testing.assert_array_equal(rows.lines, [1, 3, 10])
    assert rows.skipped == 6


def test_read_rows_clean_fast_path_matches_python(tmp_path):
    vals = np.c_[RNG.uniform(-50, 50, (500, 3)).round(3), RNG.integers(0, 256, (500, 3))]
    p = str(tmp_path / "clean.txt")
    np.savetxt(p, vals, fmt="%.3f %.3f %.3f %d %d %d", newline="\r\n")
    rows = read_rows(p)
    want = np.array([[float(t) for t in line.split()] for line in open(p)])
    np.testing.assert_array_equal(rows.values, want)
    np.testing.assert_array_equal(rows.lines, np.arange(1, 501))
    assert rows.skipped == 0


def test_read_rows_many_bad_rows_summarised(tmp_path):
    p = str(tmp_path / "bad.txt")
    open(p, "w").write("1 2 3\n" + "x y z\n" * 25)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        rows = read_rows(p)
    msgs = [str(w.message) for w in rec]
    assert len(msgs) == 11 and "skipped 25 malformed rows in all" in msgs[-1]
    assert rows.values.shape == (1, 3)


def test_read_ply_missing_and_labels_property(tmp_path):
    p = str(tmp_path / "l.ply")
    write_ply(
        p, {"x": XYZ[:, 0], "y": XYZ[:, 1], "z": XYZ[:, 2], "label": np.arange(40, dtype=np.uint16)}
    )
    c = read_ply(p)
    assert c.vertex["label"].dtype == np.uint16 and c.vertex["label"][5] == 5
    with pytest.raises(FileNotFoundError, match="nope.ply"):
        read_ply(os.path.join(tmp_path, "nope.ply"))


GEO = np.array([5e5, 4e6, 100.0])  # map coordinates (e.g. UTM easting/northing, height)


def _geo_cloud(n=3000, seed=0):
    """f64[n, 3] room-sized cloud (4 x 4 x 2.5 m) on a 1 cm lattice at map offsets."""
    rng = np.random.default_rng(seed)
    steps = np.stack([rng.integers(0, 400, n), np.arange(n) % 400, rng.integers(0, 250, n)], 1)
    return GEO + 0.01 * steps


@pytest.mark.parametrize("ext", ["ply", "npz", "txt"])
def test_georeferenced_scan_keeps_centimetres(tmp_path, ext):
    """Issue 11.2: float64 map coordinates (5e5 / 4e6 m) cast straight to float32 keep a
    0.25 m step in y (16 values across 4 m); the reader subtracts a whole-metre origin in
    float64 first and keeps the coordinates as read for the outputs."""
    xyz = _geo_cloud()
    p = str(tmp_path / f"geo.{ext}")
    if ext == "ply":
        write_ply(p, {"x": xyz[:, 0], "y": xyz[:, 1], "z": xyz[:, 2]})
        assert plyfile.PlyData.read(p)["vertex"].data["y"].dtype == np.float64
    elif ext == "npz":
        np.savez(p, xyz=xyz)
    else:
        np.savetxt(p, xyz, fmt="%.2f")
    notes = []
    out = read_scan(p, warn=notes.append)
    assert notes == [f"{p}: no colours; using neutral grey (128, 128, 128)"]  # no extent
    local = out["xyz"]
    assert local.dtype == np.float32
    assert len(np.unique(local[:, 1])) == len(np.unique(xyz[:, 1])) == 400
    np.testing.assert_array_equal(out["origin"], GEO)  # floor of the bbox minimum
    assert out["origin"].dtype == np.float64
    np.testing.assert_allclose(local + out["origin"], xyz, rtol=0, atol=1e-6)
    assert out["xyz_input"].dtype == np.float64
    np.testing.assert_array_equal(out["xyz_input"], xyz)


def test_small_coordinates_keep_origin_zero(tmp_path):
    p = str(tmp_path / "room.ply")
    write_ply(p, _vertex())
    out = read_scan(p)
    np.testing.assert_array_equal(out["origin"], 0.0)
    np.testing.assert_array_equal(out["xyz"], XYZ)
    assert out["xyz_input"].dtype == np.float32


@pytest.mark.parametrize(
    "scale,axis", [((150, 4, 3), "x"), ((4, 4, 30), "z"), ((4000, 3000, 2500), "x")]
)
def test_implausible_extent_warns(tmp_path, scale, axis):
    """A scan much larger than a room (> 100 m in x/y or > 20 m in z: millimetres, a whole
    site) is read, with one warning naming the extent and the bounds."""
    p = str(tmp_path / "big.npz")
    np.savez(p, xyz=RNG.uniform(0, 1, (50, 3)) * np.array(scale), rgb=RGB[:1].repeat(50, 0))
    with pytest.warns(
        DataWarning,
        match=r"big\.npz: the scan spans .* m, more than a room "
        r"\(x/y up to 100 m, z up to 20 m\).*metres",
    ):
        out = read_scan(p)
    assert out["xyz"].shape == (50, 3)


@pytest.mark.parametrize("faces", [None, np.zeros((0, 3), np.int32), "mesh"])
def test_write_ply_binary_is_plyfiles_bytes(tmp_path, faces):
    """The one-block binary writer gives exactly the bytes plyfile writes row by row,
    also for big-endian input columns, a comment and a file object."""
    rng = np.random.default_rng(1)
    n = 500
    if isinstance(faces, str):
        faces = rng.integers(0, n, (900, 3)).astype(np.int64)
    xyz = rng.normal(size=(n, 3)).astype(np.float32)
    vertex = {
        "x": xyz[:, 0],
        "y": xyz[:, 1].astype(">f4"),
        "z": xyz[:, 2],
        "red": rng.integers(0, 256, n).astype(np.uint8),
        "alpha": np.full(n, 255, np.uint8),
        "label": rng.integers(0, 41, n).astype(np.uint16),
    }
    arr = np.empty(
        n,
        [
            ("x", "<f4"),
            ("y", "<f4"),
            ("z", "<f4"),
            ("red", "u1"),
            ("alpha", "u1"),
            ("label", "<u2"),
        ],
    )
    for k, v in vertex.items():
        arr[k] = v
    elements = [plyfile.PlyElement.describe(arr, "vertex")]
    if faces is not None:
        farr = np.empty(len(faces), [("vertex_indices", "i4", (3,))])
        farr["vertex_indices"] = faces
        elements.append(
            plyfile.PlyElement.describe(farr, "face", len_types={"vertex_indices": "u1"})
        )
    plyfile.PlyData(elements, text=False, byte_order="<", comments=["made by a test"]).write(
        str(tmp_path / "ref.ply")
    )
    write_ply(tmp_path / "ours.ply", vertex, faces, comments=("made by a test",))
    ref = (tmp_path / "ref.ply").read_bytes()
    assert (tmp_path / "ours.ply").read_bytes() == ref
    with open(tmp_path / "fh.ply", "wb") as fh:
        write_ply(fh, vertex, faces, comments=("made by a test",))
    assert (tmp_path / "fh.ply").read_bytes() == ref


def test_scan_path_that_is_a_folder(tmp_path):
    (tmp_path / "scan.ply").mkdir()
    with pytest.raises(ValueError, match=r"scan.ply is a folder; pass a scan file"):
        read_scan(tmp_path / "scan.ply")
