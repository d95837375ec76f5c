"""ScanNet / S3DIS preparation on hand-built raw scenes whose expected arrays are worked
out by hand: label-mapping edge cases, decoy files, splits, idempotence, errors, and
malformed S3DIS rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

from dknet_jax.data.ply import write_ply
from dknet_jax.data.readers import DataWarning
from dknet_jax.data.s3dis import prepare_s3dis, prepare_s3dis_room
from dknet_jax.data.scannet import prepare_scannet, prepare_scannet_scene, read_label_table

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
X = -100  # ignore

# ----------------------------------------------------------------------------------------
# A hand-built ScanNet scene: 18 vertices, 9 segments of 2 vertices (ids = root vertex).
TSV_HEADER = (
    "id\traw_category\tcategory\tcount\tnyu40id\teigen13id\tnyuClass\tnyu40class\t"
    "eigen13class\tModelNet40\tModelNet10\tShapeNetCore55\tsynsetoffset\t"
    "wnsynsetid\twnsynsetkey\tmpcat40\tmpcat40index"
)
TSV_ROWS = [  # (id, raw_category, nyu40id)  -- ids are not unique, as in the real file
    (1, "chair", 5),
    (2, "wall", 1),
    (2, "floor", 2),
    (3, "lamp", 35),
    (4, "fridge", 24),
    (5, "table", 7),
    (6, "office chair", 5),
]
SEG = np.repeat(np.arange(0, 18, 2), 2)  # [0 0 2 2 4 4 ... 16 16]
# fmt: off
NYU = np.array([5, 5, 5, 5,  # seg 0, 2: chair (one object over two segments)
                1, 1,        # seg 4: wall object
                35, 35,      # seg 6: lamp (not a benchmark class)
                0, 0,        # seg 8: object with an unmapped raw category
                24, 24,      # seg 10: fridge (listed twice in segGroups)
                7, 7,        # seg 12: table vertices in no object
                2, 149,      # seg 14: floor object, one stray nyu40 id
                5, 7])       # seg 16: office chair; vertex 17 disagrees (table)
# fmt: on
GROUPS = [
    {"id": 0, "objectId": 0, "segments": [0, 2], "label": "chair"},
    {"id": 1, "objectId": 1, "segments": [4], "label": "wall"},
    {"id": 2, "objectId": 2, "segments": [6], "label": "lamp"},
    {"id": 3, "objectId": 3, "segments": [8], "label": "mystery thing"},
    {"id": 4, "objectId": 4, "segments": [10], "label": "fridge"},
    {"id": 5, "objectId": 5, "segments": [14], "label": "floor"},
    {"id": 6, "objectId": 6, "segments": [16], "label": "office chair"},
    {"id": 4, "objectId": 4, "segments": [10], "label": "fridge"},  # duplicate
]
# semantic: nyu40 -> index (chair 4, wall 0, table 6, floor 1, refrigerator 14)
WANT_SEM = [4, 4, 4, 4, 0, 0, X, X, X, X, 14, 14, 6, 6, 1, X, 4, 6]
WANT_INST = [0, 0, 0, 0, X, X, X, X, X, X, 1, 1, X, X, X, X, 2, X]


def _xyz(n, seed):
    return np.random.default_rng(seed).uniform(-2, 5, (n, 3)).astype(np.float32)


def _write_scene(root, scene, *, labels=True, agg=True, decoys=True, seed=0):
    d = os.path.join(root, "scans", scene)
    os.makedirs(d, exist_ok=True)
    n = len(SEG)
    xyz = _xyz(n, seed)
    rgb = np.random.default_rng(seed + 1).integers(0, 256, (n, 3)).astype(np.uint8)
    faces = np.array([[i, i + 1, i + 2] for i in range(0, n - 2, 2)], np.int32)
    base = {
        "x": xyz[:, 0],
        "y": xyz[:, 1],
        "z": xyz[:, 2],
        "red": rgb[:, 0],
        "green": rgb[:, 1],
        "blue": rgb[:, 2],
        "alpha": np.full(n, 255, np.uint8),
    }
    write_ply(os.path.join(d, f"{scene}_vh_clean_2.ply"), base, faces)
    with open(os.path.join(d, f"{scene}_vh_clean_2.0.010000.segs.json"), "w") as fh:
        json.dump(
            {
                "params": {"kThresh": 0.01, "segMinVerts": 20},
                "sceneId": scene,
                "segIndices": SEG.tolist(),
            },
            fh,
        )
    if labels:
        lab = dict(base, red=np.zeros(n, np.uint8), label=NYU.astype(np.uint16))
        write_ply(os.path.join(d, f"{scene}_vh_clean_2.labels.ply"), lab, faces)
    if agg:
        with open(os.path.join(d, f"{scene}.aggregation.json"), "w") as fh:
            json.dump(
                {
                    "sceneId": scene,
                    "appId": "x",
                    "segGroups": GROUPS,
                    "segmentsFile": f"{scene}_vh_clean_2.0.010000.segs.json",
                },
                fh,
            )
    if decoys:  # unreadable garbage: preparation fails if it ever opens them
        for name in (
            f"{scene}_vh_clean.ply",
            f"{scene}_vh_clean.segs.json",
            f"{scene}_vh_clean.aggregation.json",
        ):
            with open(os.path.join(d, name), "wb") as fh:
                fh.write(b"\x00decoy\x01")
        with open(os.path.join(d, f"{scene}.txt"), "w") as fh:
            fh.write("axisAlignment = 0 1 0 3 -1 0 0 2 0 0 1 1 0 0 0 1\n")
    return xyz, rgb


def _write_root(root):
    rows = [TSV_HEADER] + [f"{i}\t{raw}\t{raw}\t1\t{nyu}" + "\tx" * 12 for i, raw, nyu in TSV_ROWS]
    rows.insert(3, "9\tbroken row")  # malformed: too few columns (file line 4)
    with open(os.path.join(root, "scannetv2-labels.combined.tsv"), "wb") as fh:
        fh.write(("\r\n".join(rows) + "\r\n").encode())


@pytest.fixture()
def scannet_root(tmp_path):
    root = str(tmp_path / "scannet")
    os.makedirs(root)
    _write_root(root)
    return root


def _messages(rec):
    return [str(w.message) for w in rec if issubclass(w.category, DataWarning)]


def test_label_table_crlf_ids_and_malformed_row(scannet_root):
    path = os.path.join(scannet_root, "scannetv2-labels.combined.tsv")
    with pytest.warns(DataWarning, match=r"labels\.combined\.tsv:4: skipped malformed row"):
        table = read_label_table(path)
    assert table == {raw: nyu for _, raw, nyu in TSV_ROWS}


def test_scene_label_rules_by_hand(scannet_root):
    xyz, rgb = _write_scene(scannet_root, "scene0000_00")
    table = read_label_table(
        os.path.join(scannet_root, "scannetv2-labels.combined.tsv"), warn=lambda m: None
    )
    msgs = []
    arrays, stats = prepare_scannet_scene(
        os.path.join(scannet_root, "scans", "scene0000_00"), "scene0000_00", table, warn=msgs.append
    )
    assert arrays["xyz"].dtype == np.float32 and np.array_equal(arrays["xyz"], xyz)  # raw
    assert arrays["rgb"].dtype == np.uint8 and np.array_equal(arrays["rgb"], rgb)
    assert arrays["semantic"].tolist() == WANT_SEM
    assert arrays["instance"].tolist() == WANT_INST
    assert np.array_equal(arrays["superpoint"], SEG)  # shipped ids kept as given
    assert stats["duplicate_groups"] == 1 and stats["objects_unmapped"] == 1
    assert stats["points_semantic_disagrees"] == 1 and stats["instances"] == 3
    assert stats["stray_label_points"] == 1
    joined = "\n".join(msgs)
    assert "'mystery thing'" in joined and "[149]" in joined and "objectId" in joined


def test_prepare_cli_splits_idempotence_decoys(scannet_root, tmp_path):
    _write_scene(scannet_root, "scene0000_00", seed=0)
    _write_scene(scannet_root, "scene0001_00", seed=5)
    xyz_test, _ = _write_scene(scannet_root, "scene0002_00", labels=False, agg=False, seed=9)
    with open(os.path.join(scannet_root, "scannetv2_train.txt"), "w") as fh:
        fh.write("scene0000_00\nscene0099_00\n")  # second one is absent
    with open(os.path.join(scannet_root, "scannetv2_val.txt"), "w") as fh:
        fh.write("scene0001_00\n")
    with open(os.path.join(scannet_root, "scannetv2_test.txt"), "w") as fh:
        fh.write("scene0002_00\n")
    out = str(tmp_path / "out")
    cmd = [
        sys.executable,
        os.path.join(REPO, "scripts", "prepare_scannet.py"),
        "--scannet_root",
        scannet_root,
        "--out",
        out,
        "--workers",
        "2",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "'mystery thing'" in res.stderr and res.stderr.count("'mystery thing'") == 1
    for s in ("scene0000_00", "scene0001_00"):
        with np.load(os.path.join(out, f"{s}.npz")) as z:
            assert z["semantic"].tolist() == WANT_SEM and z["instance"].tolist() == WANT_INST
    with np.load(os.path.join(out, "scene0002_00.npz")) as z:  # test scene
        assert np.all(z["semantic"] == X) and np.all(z["instance"] == X)
        assert np.array_equal(z["xyz"], xyz_test)
    assert open(os.path.join(out, "train.txt")).read() == "scene0000_00\n"
    assert open(os.path.join(out, "val.txt")).read() == "scene0001_00\n"
    assert open(os.path.join(out, "test.txt")).read() == "scene0002_00\n"
    report = json.load(open(os.path.join(out, "prepare_report.json")))
    assert report["prepared"] == 3 and report["stats"]["test_scenes"] == 1
    assert any("scannetv2_train.txt are not prepared" in w for w in report["warnings"])
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]

    # idempotent: a rerun skips everything; --overwrite redoes it
    path = os.path.join(out, "scene0000_00.npz")
    os.utime(path, (1, 1))
    s = prepare_scannet(scannet_root, out, progress=False)
    assert len(s.existing) == 3 and not s.prepared and os.path.getmtime(path) == 1
    s = prepare_scannet(scannet_root, out, progress=False, overwrite=True, scenes=["scene0000_00"])
    assert s.prepared == ["scene0000_00"] and os.path.getmtime(path) > 1
    assert open(os.path.join(out, "val.txt")).read() == "scene0001_00\n"  # kept


def test_missing_file_names_scene_and_file(scannet_root, tmp_path):
    _write_scene(scannet_root, "scene0005_00", agg=False)  # labels present, agg missing
    d = os.path.join(scannet_root, "scans", "scene0005_00")
    with pytest.raises(FileNotFoundError, match=r"scene0005_00.*scene0005_00\.aggregation"):
        prepare_scannet_scene(d, "scene0005_00", {})
    s = prepare_scannet(scannet_root, str(tmp_path / "o"), progress=False)
    assert list(s.failed) == ["scene0005_00"]
    assert "aggregation.json" in s.failed["scene0005_00"]
    assert not os.path.exists(tmp_path / "o" / "scene0005_00.npz")
    os.remove(os.path.join(d, "scene0005_00_vh_clean_2.ply"))
    with pytest.raises(FileNotFoundError, match=r"scene0005_00: missing mesh file .*_2\.ply"):
        prepare_scannet_scene(d, "scene0005_00", {})


# ----------------------------------------------------------------------------------------
# S3DIS
def _plane_rows(rng, n, z0, colour):
    xyz = np.c_[rng.uniform(0, 1, (n, 2)), np.full(n, z0) + 0.001 * rng.standard_normal(n)]
    return [f"{x:.3f} {y:.3f} {z:.3f} {colour[0]} {colour[1]} {colour[2]}" for x, y, z in xyz]


def _write_room(root, area=1, room="office_1"):
    rng = np.random.default_rng(area)
    ann = os.path.join(root, f"Area_{area}", room, "Annotations")
    os.makedirs(ann)
    objects = {
        "ceiling_1.txt": (3.0, (200, 200, 200)),
        "chair_1.txt": (0.5, (10, 20, 30)),
        "chair_2.txt": (0.6, (11, 21, 31)),
        "stairs_1.txt": (0.2, (5, 5, 5)),
        "table_1.txt": (0.8, (90, 60, 30)),
        "table_1 (1).txt": (0.9, (91, 61, 31)),
    }
    rows = {name: _plane_rows(rng, 60, z, c) for name, (z, c) in objects.items()}
    rows["ceiling_1.txt"][9] = rows["ceiling_1.txt"][9].replace(" ", "\x00", 4)  # line 10
    r = rows["ceiling_1.txt"][19]
    rows["ceiling_1.txt"][19] = r[:2] + "\x1f" + r[2:]  # line 20: control byte in a number
    rows["ceiling_1.txt"][29] = "1.0 2.0 3.0"  # line 30: missing columns
    for name, lines in rows.items():
        with open(os.path.join(ann, name), "w", newline="") as fh:
            fh.write("\r\n".join(lines) + "\r\n")
    with open(os.path.join(ann, "chair_1.txt"), "rb") as src:  # identical copy
        data = src.read()
    with open(os.path.join(ann, "chair_1 (1).txt"), "wb") as fh:
        fh.write(data)
    with open(os.path.join(root, f"Area_{area}", room, f"{room}.txt"), "wb") as fh:
        fh.write(b"decoy \x00 not read\n")
    return rows


def test_s3dis_room_rows_classes_duplicates(tmp_path):
    root = str(tmp_path / "s3dis")
    rows = _write_room(root)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        arrays, stats = prepare_s3dis_room(
            os.path.join(root, "Area_1", "office_1"), voxel_size=None, k=8
        )
    msgs = _messages(rec)
    for line in (10, 20, 30):
        assert any(f"ceiling_1.txt:{line}: skipped malformed row" in m for m in msgs), msgs
    assert any("chair_1 (1).txt: identical copy" in m for m in msgs)
    assert any("table_1 (1).txt: duplicate-looking name" in m for m in msgs)
    assert stats["rows_skipped"] == 3
    # sorted file order: ceiling_1, chair_1, chair_2, stairs_1, "table_1 (1)", table_1
    sizes = [57, 60, 60, 60, 60, 60]
    cls = [0, 8, 8, 12, 7, 7]  # ceiling chair chair clutter(stairs) table table
    assert arrays["semantic"].tolist() == np.repeat(cls, sizes).tolist()
    assert arrays["instance"].tolist() == np.repeat(np.arange(6), sizes).tolist()
    good = [r for i, r in enumerate(rows["ceiling_1.txt"]) if i not in (9, 19, 29)]
    want = np.array([[float(t) for t in r.split()] for r in good])
    np.testing.assert_array_equal(arrays["xyz"][:57], want[:, :3].astype(np.float32))
    np.testing.assert_array_equal(arrays["rgb"][57], [10, 20, 30])
    sp = arrays["superpoint"]
    assert sp.dtype == np.int32 and np.array_equal(sp[sp], sp)


def test_s3dis_cli(tmp_path):
    root = str(tmp_path / "s3dis")
    _write_room(root, 1, "office_1")
    _write_room(root, 5, "hallway_6")
    out = str(tmp_path / "out")
    res = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "scripts", "prepare_s3dis.py"),
            "--s3dis_root",
            root,
            "--out",
            out,
            "--workers",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "ceiling_1.txt:10: skipped malformed row" in res.stderr
    assert sorted(f for f in os.listdir(out) if f.endswith(".npz")) == [
        "Area_1_office_1.npz",
        "Area_5_hallway_6.npz",
    ]
    assert open(os.path.join(out, "val.txt")).read() == "Area_5_hallway_6\n"
    assert open(os.path.join(out, "train.txt")).read() == "Area_1_office_1\n"
    with np.load(os.path.join(out, "Area_5_hallway_6.npz")) as z:
        assert z["xyz"].dtype == np.float32 and z["instance"].max() == 5
    s = prepare_s3dis(root, out, progress=False)
    assert len(s.existing) == 2 and not s.prepared


def test_s3dis_missing_annotations(tmp_path):
    os.makedirs(tmp_path / "Area_2" / "WC_1")
    with pytest.raises(FileNotFoundError, match="WC_1.*Annotations"):
        prepare_s3dis_room(str(tmp_path / "Area_2" / "WC_1"))


# ----------------------------------------------------------------------------------------
# Round trip: synthetic generator -> preparation -> arrays equal to what was placed.
def _same_partition(x, y):
    pairs = np.unique(np.stack([x, y], 1), axis=0)
    return len(pairs) == len(np.unique(x)) == len(np.unique(y))


def test_round_trip_synthetic_scannet_and_s3dis(tmp_path):
    from dknet_jax.data.labels import SCANNET_FIRST_INSTANCE_CLASS, map_nyu40, s3dis_class_index
    from dknet_jax.data.superpoints import segment_mesh
    from dknet_jax.synthetic import RAW_CATEGORIES, generate_scene, make_dataset

    make_dataset(tmp_path / "sc", 1, 3, "scannet", "tiny", progress=False)
    s = prepare_scannet(str(tmp_path / "sc"), str(tmp_path / "sc_out"), progress=False)
    assert s.prepared == ["scene0000_00"] and not s.failed
    scene = generate_scene(np.random.default_rng([3, 0]), "tiny", "scannet")
    with np.load(tmp_path / "sc_out" / "scene0000_00.npz") as z:
        got = {k: z[k] for k in z.files}
    np.testing.assert_array_equal(got["xyz"], scene.vertices)
    np.testing.assert_array_equal(got["rgb"], scene.colors)
    np.testing.assert_array_equal(got["semantic"], map_nyu40(scene.nyu40))
    np.testing.assert_array_equal(got["superpoint"], segment_mesh(scene.vertices, scene.faces))
    obj_cls = map_nyu40(scene.object_nyu40)
    is_inst = scene.annotated[scene.object_id] & (
        obj_cls[scene.object_id] >= SCANNET_FIRST_INSTANCE_CLASS
    )
    assert is_inst.any() and (~is_inst).any()
    assert np.all((got["instance"] >= 0) == is_inst)
    assert _same_partition(got["instance"][is_inst], scene.object_id[is_inst])
    assert got["instance"].max() + 1 == len(np.unique(scene.object_id[is_inst]))

    make_dataset(tmp_path / "s3", 1, 4, "s3dis", "tiny", progress=False)
    s = prepare_s3dis(str(tmp_path / "s3"), str(tmp_path / "s3_out"), progress=False)
    assert len(s.prepared) == 1 and not s.failed
    scene = generate_scene(np.random.default_rng([4, 0]), "tiny", "s3dis")
    with np.load(tmp_path / "s3_out" / f"{s.prepared[0]}.npz") as z:
        got = {k: z[k] for k in z.files}
    # the annotation files hold the points object by object in sorted file order, so
    # compare as multisets via sorting on rounded coordinates + object class
    cls = np.array([s3dis_class_index(RAW_CATEGORIES[c][1]) for c in scene.categories])
    want = np.c_[np.round(scene.vertices.astype(np.float64), 3), cls[scene.object_id]]
    have = np.c_[got["xyz"].astype(np.float64), got["semantic"]]
    want, have = want[np.lexsort(want.T[::-1])], have[np.lexsort(have.T[::-1])]
    np.testing.assert_allclose(have, want, atol=1e-6)
    assert got["instance"].min() == 0
    assert got["instance"].max() + 1 == len(np.unique(scene.object_id))
    for i in np.unique(got["instance"]):  # each instance one class
        assert len(np.unique(got["semantic"][got["instance"] == i])) == 1


# ----------------------------------------------------------------------------------------
# Reruns with other settings, report totals over reruns, failed scenes in split lists.
def test_s3dis_rerun_other_settings_stops_same_settings_keep_totals(tmp_path, capsys):
    import importlib.util

    root, out = str(tmp_path / "s3dis"), str(tmp_path / "out")
    _write_room(root, 1, "office_1")
    first = prepare_s3dis(root, out, progress=False, k=8)
    assert first.prepared == ["Area_1_office_1"]
    totals = json.load(open(os.path.join(out, "prepare_report.json")))["stats"]
    assert totals["scenes"] == 1 and totals["points"] > 0

    # same settings: skipped, and the report keeps the totals of the scenes in O
    again = prepare_s3dis(root, out, progress=False, k=8)
    assert again.existing == ["Area_1_office_1"] and not again.prepared
    report = json.load(open(os.path.join(out, "prepare_report.json")))
    assert report["stats"] == totals and report["existing"] == 1
    assert again.report(out) == 0 and f"'points': {totals['points']}" in capsys.readouterr().out
    settings = json.load(open(os.path.join(out, "prepare_settings.json")))
    assert settings == {
        "dataset": "s3dis",
        "k": 8,
        "voxel_size": 0.02,
        "k_thresh": 0.01,
        "seg_min_verts": 20,
    }

    # other settings: a clear stop naming them and --overwrite, nothing touched
    npz = os.path.join(out, "Area_1_office_1.npz")
    os.utime(npz, (1, 1))
    with pytest.raises(
        ValueError,
        match=r"k: 8 there, 6 now.*voxel_size: 0\.02 there, "
        r"0\.05 now.*--overwrite",
    ):
        prepare_s3dis(root, out, progress=False, k=6, voxel_size=0.05)
    assert os.path.getmtime(npz) == 1
    spec = importlib.util.spec_from_file_location(
        "prepare_s3dis_cli", os.path.join(REPO, "scripts", "prepare_s3dis.py")
    )
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main(["--s3dis_root", root, "--out", out, "--workers", "1", "--k", "6"]) == 2
    err = capsys.readouterr().err
    assert "k: 8 there, 6 now" in err and "--overwrite" in err

    # --overwrite redoes the scenes and records the new settings
    redo = prepare_s3dis(root, out, progress=False, k=6, overwrite=True)
    assert redo.prepared == ["Area_1_office_1"] and os.path.getmtime(npz) > 1
    assert json.load(open(os.path.join(out, "prepare_settings.json")))["k"] == 6
    assert json.load(open(os.path.join(out, "prepare_report.json")))["stats"]["scenes"] == 1
    assert prepare_s3dis(root, out, progress=False, k=6).existing == ["Area_1_office_1"]


def test_scannet_rerun_with_other_label_table_stops(scannet_root, tmp_path):
    _write_scene(scannet_root, "scene0000_00")
    out = str(tmp_path / "out")
    assert prepare_scannet(scannet_root, out, progress=False).prepared == ["scene0000_00"]
    with open(os.path.join(scannet_root, "scannetv2-labels.combined.tsv"), "a") as fh:
        fh.write("7\tsofa chair\tsofa chair\t1\t5" + "\tx" * 12 + "\r\n")
    with pytest.raises(
        ValueError,
        match=r"label_table_sha256: .* there, .* now.*"
        r"--overwrite",
    ):
        prepare_scannet(scannet_root, out, progress=False)
    s = prepare_scannet(scannet_root, out, progress=False, overwrite=True)
    assert s.prepared == ["scene0000_00"]
    assert prepare_scannet(scannet_root, out, progress=False).existing == ["scene0000_00"]


def test_failed_val_scene_is_reported_never_an_empty_list(scannet_root, tmp_path, capsys):
    _write_scene(scannet_root, "scene0000_00", seed=0)
    _write_scene(scannet_root, "scene0001_00", seed=1, agg=False)  # fails: no aggregation
    _write_scene(scannet_root, "scene0002_00", seed=2)
    with open(os.path.join(scannet_root, "scannetv2_train.txt"), "w") as fh:
        fh.write("scene0000_00\nscene0002_00\n")
    with open(os.path.join(scannet_root, "scannetv2_val.txt"), "w") as fh:
        fh.write("scene0001_00\n")
    out = str(tmp_path / "out")
    s = prepare_scannet(scannet_root, out, progress=False)
    assert list(s.failed) == ["scene0001_00"] and s.report(out) == 1
    # the only val scene failed: no val.txt at all (not a 0-byte list), a loud warning
    assert not os.path.exists(os.path.join(out, "val.txt"))
    assert open(os.path.join(out, "train.txt")).read() == "scene0000_00\nscene0002_00\n"
    err = capsys.readouterr().err
    assert "split val: 1 scene(s) failed and are not in val.txt: scene0001_00" in err
    assert "split val: no scene prepared" in err
    report = json.load(open(os.path.join(out, "prepare_report.json")))
    assert report["split_failed"] == {"val": ["scene0001_00"]}
    assert "aggregation" in report["failed"]["scene0001_00"]

    # a val split where one of two scenes fails: the list holds the prepared one
    with open(os.path.join(scannet_root, "scannetv2_val.txt"), "w") as fh:
        fh.write("scene0001_00\nscene0002_00\n")
    s = prepare_scannet(scannet_root, out, progress=False)
    assert open(os.path.join(out, "val.txt")).read() == "scene0002_00\n"
    report = json.load(open(os.path.join(out, "prepare_report.json")))
    assert report["split_failed"] == {"val": ["scene0001_00"]}
    assert report["stats"]["scenes"] == 2  # both prepared scenes, over the two runs


def test_s3dis_failed_val_room_named(tmp_path, capsys):
    root, out = str(tmp_path / "s3dis"), str(tmp_path / "out")
    _write_room(root, 1, "office_1")
    os.makedirs(os.path.join(root, "Area_5", "hallway_1", "Annotations"))  # no points: fails
    s = prepare_s3dis(root, out, progress=False)
    assert list(s.failed) == ["Area_5_hallway_1"]
    assert not os.path.exists(os.path.join(out, "val.txt"))
    assert open(os.path.join(out, "train.txt")).read() == "Area_1_office_1\n"
    report = json.load(open(os.path.join(out, "prepare_report.json")))
    assert report["split_failed"] == {"Area_5": ["Area_5_hallway_1"], "val": ["Area_5_hallway_1"]}
    assert "Area_5_hallway_1" in capsys.readouterr().err


def test_split_list_bom_and_binary_label_table(tmp_path):
    """A BOM is not part of the first scene id (it was skipped as malformed); a binary
    label table is an error naming it (it was an anonymous UnicodeDecodeError)."""
    from dknet_jax.data.scannet import read_split

    p = tmp_path / "scannetv2_train.txt"
    p.write_bytes(b"\xef\xbb\xbfscene0000_00\r\nscene0001_00\n")
    seen = []
    assert read_split(str(p), warn=seen.append) == ["scene0000_00", "scene0001_00"]
    assert not seen
    table = tmp_path / "scannetv2-labels.combined.tsv"
    table.write_bytes(bytes(range(128, 256)))
    with pytest.raises(
        ValueError, match="scannetv2-labels.combined.tsv: the label table is not a text file"
    ):
        read_label_table(str(table))
