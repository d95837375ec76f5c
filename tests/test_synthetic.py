"""Synthetic rooms: raw ScanNet / S3DIS files, determinism, annotation consistency, and
the round trip through the preparation code that also reads real scans."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from plyfile import PlyData, PlyElement
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from dknet_jax import synthetic as syn
from dknet_jax.data import labels as L
from dknet_jax.data.superpoints import segment_mesh
from dknet_jax.synthetic import appearance, groups

N_SCENES = 3


@pytest.fixture(scope="module")
def scannet_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("scannet")
    split = syn.make_dataset(root, N_SCENES, seed=7, size="tiny", val_fraction=0.34, progress=False)
    return root, split


@pytest.fixture(scope="module")
def tiny_scenes():
    return [syn.generate_scene(np.random.default_rng([11, i]), "tiny") for i in range(8)]


def _read_scene(root, sid):
    d = Path(root) / "scans" / sid
    mesh = PlyData.read(str(d / f"{sid}_vh_clean_2.ply"))
    lab = PlyData.read(str(d / f"{sid}_vh_clean_2.labels.ply"))
    segs = json.loads((d / f"{sid}_vh_clean_2.0.010000.segs.json").read_text())
    agg = json.loads((d / f"{sid}.aggregation.json").read_text())
    return mesh, lab, segs, agg


def _label_table(root):
    with open(Path(root) / "scannetv2-labels.combined.tsv", newline="") as fh:
        rows = list(csv.reader(fh, delimiter="\t"))
    return rows


def test_scannet_files_and_formats(scannet_root):
    root, split = scannet_root
    ids = sorted(split["train"] + split["val"])
    assert ids == [f"scene{i:04d}_00" for i in range(N_SCENES)]
    assert len(split["val"]) == 1
    for key in ("train", "val"):
        assert (root / f"scannetv2_{key}.txt").read_text().split() == split[key]
    for sid in ids:
        mesh, lab, segs, agg = _read_scene(root, sid)
        assert mesh.text is False and mesh.byte_order == "<"
        v = mesh["vertex"].data
        assert [p.name for p in mesh["vertex"].properties] == [
            "x",
            "y",
            "z",
            "red",
            "green",
            "blue",
            "alpha",
        ]
        assert v.dtype["x"] == np.float32 and v.dtype["red"] == np.uint8
        fprop = mesh["face"].properties[0]
        assert (fprop.name, fprop.len_dtype, fprop.val_dtype) == ("vertex_indices", "u1", "i4")
        faces = np.stack(mesh["face"]["vertex_indices"])
        assert faces.shape[1] == 3 and faces.min() >= 0 and faces.max() < len(v)
        # labels ply: same vertices, ushort nyu40 ids, palette colours
        lv = lab["vertex"].data
        assert len(lv) == len(v) and lv.dtype["label"] == np.uint16
        assert np.array_equal(lv["x"], v["x"]) and np.array_equal(lv["z"], v["z"])
        label = lv["label"].astype(int)
        assert label.max() <= 40
        assert np.array_equal(
            np.stack([lv["red"], lv["green"], lv["blue"]], 1), L.NYU40_PALETTE[label]
        )
        # segments: one per vertex, ids are union-find roots (a root is in its own segment)
        seg = np.asarray(segs["segIndices"])
        assert segs["sceneId"] == sid and len(seg) == len(v)
        assert np.array_equal(seg[seg], seg)
        assert agg["sceneId"] == f"scannet.{sid}"
        assert agg["segmentsFile"] == f"scannet.{sid}_vh_clean_2.0.010000.segs.json"


def test_label_table_is_the_real_format(scannet_root):
    root, _ = scannet_root
    raw = (root / "scannetv2-labels.combined.tsv").read_bytes()
    assert raw.count(b"\r\n") == raw.count(b"\n") > 30  # CRLF everywhere
    rows = _label_table(root)
    assert rows[0] == list(syn.LABEL_TABLE_HEADER) and len(rows[0]) == 17
    assert all(len(r) == 17 for r in rows)
    table = {r[1]: int(r[4]) for r in rows[1:]}
    for raw_cat, (nyu, _) in syn.RAW_CATEGORIES.items():
        assert table[raw_cat] == nyu
    # non-benchmark clutter that the generator places
    for raw_cat in ("lamp", "pillow", "box", "books"):
        assert table[raw_cat] not in L.SCANNET_NYU40_IDS
    assert rows[1 + list(table).index("refrigerator")][7] == "refridgerator"


def test_annotation_consistent_with_labels(scannet_root):
    """segGroups list whole segments, one object each, whose label (via the tsv) equals
    the labels.ply id of every vertex; vertices in no group are labelled 0."""
    root, split = scannet_root
    table = {r[1]: int(r[4]) for r in _label_table(root)[1:]}
    for sid in split["train"] + split["val"]:
        mesh, lab, segs, agg = _read_scene(root, sid)
        seg = np.asarray(segs["segIndices"])
        label = lab["vertex"]["label"].astype(int)
        owner = np.full(len(seg), -1)
        names = []
        for g in agg["segGroups"]:
            assert g["id"] == g["objectId"]
            members = np.isin(seg, g["segments"])
            assert set(g["segments"]) == set(seg[members].tolist())  # all listed ids exist
            assert np.all(owner[members] == -1), "a vertex is in two groups"
            owner[members] = g["objectId"]
            assert np.all(label[members] == table[g["label"]])
            names.append(g["label"])
        assert np.all(label[owner == -1] == 0)
        # each segment carries one label
        for s in np.unique(seg):
            assert len(np.unique(label[seg == s])) == 1
        assert names.count("floor") == 1 and names.count("wall") >= 4


def test_same_seed_same_bytes_other_seed_differs(scannet_root, tmp_path):
    root, _ = scannet_root
    syn.make_dataset(tmp_path / "a", 2, seed=7, size="tiny", progress=False)
    syn.make_dataset(tmp_path / "b", 2, seed=8, size="tiny", progress=False)
    for f in sorted((tmp_path / "a").rglob("*")):
        if f.is_file() and "scannetv2_" not in f.name:  # splits depend on the scene count
            assert f.read_bytes() == (root / f.relative_to(tmp_path / "a")).read_bytes(), f
    name = "scans/scene0000_00/scene0000_00_vh_clean_2.ply"
    assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "b" / name).read_bytes()


def test_ply_files_are_plyfiles_bytes(scannet_root, tmp_path):
    """Both meshes of a written scene are byte for byte what plyfile writes (row by row)
    for the generated scene: ScanNet's vertex properties, the labels file coloured with
    the nyu40 palette."""
    root, _ = scannet_root
    scene = syn.generate_scene(np.random.default_rng([7, 0]), "tiny")
    label = scene.nyu40.astype(np.uint16)
    for name, colors, lab in (
        ("ply", scene.colors, None),
        ("labels.ply", L.NYU40_PALETTE[label], label),
    ):
        fields = [
            ("x", "<f4"),
            ("y", "<f4"),
            ("z", "<f4"),
            ("red", "u1"),
            ("green", "u1"),
            ("blue", "u1"),
            ("alpha", "u1"),
        ] + ([("label", "<u2")] if lab is not None else [])
        v = np.empty(len(scene.vertices), fields)
        v["x"], v["y"], v["z"] = scene.vertices.T
        v["red"], v["green"], v["blue"] = colors.T
        v["alpha"] = 255
        if lab is not None:
            v["label"] = lab
        f = np.empty(len(scene.faces), dtype=[("vertex_indices", "i4", (3,))])
        f["vertex_indices"] = scene.faces
        PlyData(
            [
                PlyElement.describe(v, "vertex"),
                PlyElement.describe(f, "face", len_types={"vertex_indices": "u1"}),
            ],
            text=False,
            byte_order="<",
        ).write(str(tmp_path / "ref.ply"))
        written = root / "scans" / "scene0000_00" / f"scene0000_00_vh_clean_2.{name}"
        assert written.read_bytes() == (tmp_path / "ref.ply").read_bytes(), name


def test_objects_are_whole_connected_and_segment_aligned(tiny_scenes):
    for scene in tiny_scenes[:4]:
        seg = segment_mesh(scene.vertices, scene.faces)
        for s in np.unique(seg):
            assert len(np.unique(scene.object_id[seg == s])) == 1
        groups = syn.scannet_seg_groups(scene, seg)
        for oi in np.unique(scene.object_id):
            members = np.flatnonzero(scene.object_id == oi)
            assert len(np.unique(scene.nyu40[members])) == 1
            if (
                scene.categories[oi] in syn.STRUCTURE_CATEGORIES
            ):  # walls may be cut in pieces by holes
                continue
            # parts of an object touch: connected under a radius of a few edge lengths
            pts = scene.vertices[members]
            pairs = cKDTree(pts).query_pairs(2.5 * scene.spacing, output_type="ndarray")
            adj = coo_matrix(
                (np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(len(pts), len(pts))
            )
            n_comp = connected_components(adj, directed=False)[0]
            assert n_comp == 1, (scene.categories[oi], n_comp)
        annotated = [oi for oi in np.unique(scene.object_id) if scene.annotated[oi]]
        assert [g["label"] for g in groups] == [scene.categories[oi] for oi in annotated]
        for g, oi in zip(groups, annotated, strict=True):
            assert sorted(g["segments"]) == np.unique(seg[scene.object_id == oi]).tolist()


def test_plausible_content(tiny_scenes):
    inst_classes = set()
    for scene in tiny_scenes:
        nyu = scene.object_nyu40[np.unique(scene.object_id)]
        assert (nyu == 1).sum() >= 4 and (nyu == 2).sum() == 1
        inst = [n for n in nyu if n in L.SCANNET_INSTANCE_NYU40_IDS]
        assert 3 <= len(inst) <= 80
        inst_classes |= set(inst)
        z = scene.vertices[:, 2]
        assert 2.3 < z.max() - z.min() < 3.3  # 2.5-3 m high (+ noise), no ceiling
        assert np.all(scene.vertices[:, :2] > 0)
        assert np.all(np.isin(scene.nyu40, np.arange(41)))
        assert len(np.unique(scene.colors, axis=0)) > 100
    assert len(inst_classes) >= 10, sorted(inst_classes)


def test_sizes_roughly_as_specified(tiny_scenes):
    counts = [len(s.vertices) for s in tiny_scenes]
    assert 1500 <= min(counts) and max(counts) <= 9000, counts
    small = syn.generate_scene(np.random.default_rng(3), "small")
    assert 15000 <= len(small.vertices) <= 50000
    assert 0.04 <= small.spacing <= 0.15


@pytest.mark.slow
def test_scannet_size():
    for i in range(2):
        s = syn.generate_scene(np.random.default_rng(i), "scannet")
        assert 80000 <= len(s.vertices) <= 230000 and 0.02 <= s.spacing <= 0.045


def test_s3dis_layout(tmp_path):
    split = syn.make_dataset(
        tmp_path, 3, seed=5, format="s3dis", size="tiny", val_fraction=0.34, progress=False
    )
    assert len(split["val"]) == 1 and split["val"][0].startswith("Area_5/")
    for name in split["train"] + split["val"]:
        room = tmp_path / name
        ann = sorted((room / "Annotations").glob("*.txt"))
        total = 0
        classes = []
        for f in ann:
            cls, k = f.stem.rsplit("_", 1)
            assert cls in L.S3DIS_CLASSES and int(k) >= 1
            classes.append(cls)
            lines = f.read_text().splitlines()
            for line in lines[:50]:
                parts = line.split(" ")
                assert len(parts) == 6 and all(len(p.split(".")[1]) == 3 for p in parts[:3])
                assert all(p.isdigit() and int(p) <= 255 for p in parts[3:])
            total += len(lines)
        for cls in set(classes):  # k runs 1..count per class
            ks = sorted(
                int(f.stem.rsplit("_", 1)[1]) for f in ann if f.stem.rsplit("_", 1)[0] == cls
            )
            assert ks == list(range(1, len(ks) + 1))
        assert {"ceiling", "floor", "wall"} <= set(classes)
        whole = np.loadtxt(room / f"{room.name}.txt")
        assert whole.shape == (total, 6)


def test_round_trip_through_scannet_preparation(scannet_root):
    """prepare_scannet_scene on the generator's files gives back what it placed."""
    from dknet_jax.data.scannet import prepare_scannet_scene, read_label_table

    root, split = scannet_root
    table = read_label_table(str(root / "scannetv2-labels.combined.tsv"))
    for i, sid in enumerate(sorted(split["train"] + split["val"])):
        scene = syn.generate_scene(np.random.default_rng([7, i]), "tiny")
        arrays, _ = prepare_scannet_scene(str(root / "scans" / sid), sid, table)
        np.testing.assert_array_equal(arrays["xyz"], scene.vertices)
        np.testing.assert_array_equal(arrays["rgb"], scene.colors)
        np.testing.assert_array_equal(arrays["semantic"], L.map_nyu40(scene.nyu40))
        inst = arrays["instance"]
        is_inst = np.isin(scene.nyu40, L.SCANNET_INSTANCE_NYU40_IDS)
        assert np.all(inst[~is_inst] == -100) and np.all(inst[is_inst] >= 0)
        # same partition: prepared id <-> generator object id is a bijection
        pairs = np.unique(np.stack([inst[is_inst], scene.object_id[is_inst]], 1), axis=0)
        assert len(pairs) == len(np.unique(pairs[:, 0])) == len(np.unique(pairs[:, 1]))
        seg = segment_mesh(scene.vertices, scene.faces)
        sp = arrays["superpoint"]
        pairs = np.unique(np.stack([sp, seg], 1), axis=0)
        assert len(pairs) == len(np.unique(sp)) == len(np.unique(seg))


def test_round_trip_through_s3dis_preparation(tmp_path):
    from dknet_jax.data.s3dis import prepare_s3dis_room

    split = syn.make_dataset(
        tmp_path, 1, seed=2, format="s3dis", size="tiny", val_fraction=0.0, progress=False
    )
    scene = syn.generate_scene(np.random.default_rng([2, 0]), "tiny", "s3dis")
    arrays, _ = prepare_s3dis_room(str(tmp_path / split["train"][0]))
    # every object comes back as one instance with its class and point count
    placed = sorted(
        (
            L.S3DIS_CLASSES.index(syn.RAW_CATEGORIES[scene.categories[o]][1]),
            int((scene.object_id == o).sum()),
        )
        for o in np.unique(scene.object_id)
    )
    got = []
    for k in np.unique(arrays["instance"]):
        m = arrays["instance"] == k
        assert len(np.unique(arrays["semantic"][m])) == 1
        got.append((int(arrays["semantic"][m][0]), int(m.sum())))
    assert sorted(got) == placed
    assert np.abs(np.sort(arrays["xyz"][:, 2]) - np.sort(scene.vertices[:, 2])).max() < 6e-4


# ---------------------------------------------------------------------------------------
# Appearance: colour follows class (as in real scans) without giving it away.
@pytest.fixture(scope="module")
def object_colours():
    """raw category -> f64[n, 3] mean RGB of each annotated object in 32 tiny rooms."""
    out: dict[str, list] = {}
    for i in range(32):
        s = syn.generate_scene(np.random.default_rng([26, i]), "tiny")
        for oi in np.unique(s.object_id):
            if s.annotated[oi] and s.categories[oi] not in syn.STRUCTURE_CATEGORIES:
                out.setdefault(s.categories[oi], []).append(
                    s.colors[s.object_id == oi].astype(float).mean(0)
                )
    return {k: np.array(v) for k, v in out.items()}


def _colours(table, *raw):
    return np.concatenate([table.get(r, np.zeros((0, 3))) for r in raw])


def test_colour_follows_class(object_colours):
    """What real rooms look like: white sanitary ware, upholstered sofas far from it,
    windows brighter and bluer than doors, mostly dark office chairs."""
    ceramic = _colours(object_colours, "toilet", "bathtub")
    couch = _colours(object_colours, "couch")
    window, door = _colours(object_colours, "window"), _colours(object_colours, "door")
    office = _colours(object_colours, "office chair")
    assert len(ceramic) >= 4 and len(couch) >= 4 and len(window) >= 10 and len(door) >= 10
    assert ceramic.mean(1).min() > 160  # every toilet and tub is bright ...
    assert np.median(np.ptp(ceramic, 1)) < 25  # ... and near neutral
    assert np.linalg.norm(ceramic.mean(0) - couch.mean(0)) > 100
    assert window[:, 2].mean() > door[:, 2].mean() + 40
    assert window.mean() > door.mean()
    assert np.median(office.mean(1)) < 100


def test_colour_varies_within_class_and_overlaps_between(object_colours):
    """Colour is a cue, not a label: a class has many looks, and wooden chairs look like
    wooden tables, doors like cabinets."""
    chairs = _colours(object_colours, "chair", "office chair")
    tables = _colours(object_colours, "table", "coffee table", "desk")
    cabinets = _colours(object_colours, "cabinet", "kitchen cabinets", "file cabinet")
    door, couch = _colours(object_colours, "door"), _colours(object_colours, "couch")
    assert chairs.mean(1).std() > 20
    assert np.linalg.norm(couch[:, None] - couch[None], axis=-1).max() > 50
    for a, b in ((chairs, tables), (door, cabinets)):
        assert np.linalg.norm(a[:, None] - b[None], axis=-1).min() < 20


def test_colour_model_does_not_move_geometry(monkeypatch):
    """Colours come from a fixed number of draws per object, so a different colour model
    (here: everything grey) leaves every vertex, face and label where it was."""
    ref = [
        syn.generate_scene(np.random.default_rng([4, i]), "tiny", style)
        for i, style in ((0, "scannet"), (1, "s3dis"))
    ]
    monkeypatch.setattr(
        appearance, "APPEARANCE", {k: (("grey", 1.0),) for k in appearance.APPEARANCE}
    )
    for (i, style), a in zip(((0, "scannet"), (1, "s3dis")), ref, strict=True):
        b = syn.generate_scene(np.random.default_rng([4, i]), "tiny", style)
        for k in ("vertices", "faces", "nyu40", "object_id"):
            assert np.array_equal(getattr(a, k), getattr(b, k)), k
        assert not np.array_equal(a.colors, b.colors)


def test_sets_share_a_finish():
    chairs = [
        o
        for o in groups.table_with_chairs(np.random.default_rng(3), conference=True)
        if o.category in ("chair", "office chair")
    ]
    cabinets = [
        o
        for o in groups.kitchen_counter(np.random.default_rng(3))
        if o.category == "kitchen cabinets"
    ]
    for group in (chairs, cabinets):
        assert len(group) >= 2
        for o in group[1:]:
            for p, q in zip(o.parts, group[0].parts, strict=True):
                assert np.array_equal(p.color, q.color)


# ---------------------------------------------------------------------------------------
# Primitives and poses
def _signed_volume(v, f):
    """Divergence theorem: sum of tetrahedra (origin, triangle); the enclosed volume when
    every triangle faces outwards, its negative when every one faces inwards."""
    a, b, c = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
    return float(np.einsum("ij,ij->i", a, np.cross(b, c)).sum() / 6)


def _closed_and_connected(v, f):
    edges = np.sort(np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]), axis=1)
    _, counts = np.unique(edges, axis=0, return_counts=True)
    adj = coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(len(v),) * 2)
    return bool(np.all(counts == 2)), connected_components(adj, directed=False)[0]


@pytest.mark.parametrize("spacing", [0.05, 0.13, 2.0])
def test_closed_primitives_face_outwards(spacing):
    from dknet_jax.synthetic.primitives import Box, Cylinder, tessellate

    v, f = tessellate(Box((0.1, -0.2, 0.0), (0.9, 0.4, 0.7)), spacing)
    assert _signed_volume(v, f) == pytest.approx(0.8 * 0.6 * 0.7, rel=1e-9)
    assert _closed_and_connected(v, f) == (True, 1)
    r, x, y = 0.3, 0.2, -0.1
    v, f = tessellate(Cylinder(x, y, 0.1, 1.1, r, top=True, bottom=True), spacing)
    n = max(6, int(round(2 * np.pi * r / spacing)))  # a prism over a regular n-gon
    assert _signed_volume(v, f) == pytest.approx(n / 2 * r**2 * np.sin(2 * np.pi / n), rel=1e-9)
    assert _closed_and_connected(v, f) == (True, 1)
    assert np.allclose(np.hypot(v[:, 0] - x, v[:, 1] - y).max(), r)


def test_sheet_faces_along_u_cross_v_and_drops_holes():
    from dknet_jax.synthetic.primitives import Sheet, tessellate

    sheet = Sheet((1.0, 2.0, 0.0), (0.0, 2.0, 0.0), (0.0, 0.0, 1.5), holes=((0.5, 1.2, 0.3, 1.0),))
    v, f = tessellate(sheet, 0.1)
    normals = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
    assert np.all(normals[:, 0] > 0) and np.allclose(normals[:, 1:], 0)  # u x v = +x
    centre = v[f].mean(1)
    s, t = centre[:, 1] - 2.0, centre[:, 2]
    assert not np.any((s > 0.5) & (s < 1.2) & (t > 0.3) & (t < 1.0))
    # the grid is 20 x 15 cells; the hole covers 7 x 7 of them
    assert len(f) == 2 * (20 * 15 - 7 * 7)


def test_poses_compose_and_invert():
    from dknet_jax.synthetic.primitives import compose_poses, to_local, to_parent

    rng = np.random.default_rng(0)
    p = rng.normal(size=(20, 3))
    outer, inner = (0.7, 1.0, -2.0, 0.5), (-2.1, 0.3, 0.4, 0.1)
    np.testing.assert_allclose(to_local(outer, to_parent(outer, p)), p, atol=1e-12)
    np.testing.assert_allclose(
        to_parent(compose_poses(outer, inner), p), to_parent(outer, to_parent(inner, p)), atol=1e-12
    )
    # yaw turns counter-clockwise: local +x at yaw 90 degrees points along parent +y
    np.testing.assert_allclose(
        to_parent((np.pi / 2, 0, 0, 0), np.array([[1.0, 0, 0]])), [[0, 1, 0]], atol=1e-12
    )


def test_unknown_surface_kind_is_named():
    with pytest.raises(KeyError, match="'marble'.*APPEARANCE"):
        appearance.draw_color(np.random.default_rng(0), "marble")


def test_data_package_never_imports_the_generator():
    """Imports point one way: synthetic/ uses data/ (labels, PLY, ScanNet layout), the
    pipeline's data/ never needs the generator."""
    import ast

    import dknet_jax.data

    offenders = []
    for path in sorted(Path(dknet_jax.data.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            offenders += [
                f"{path.name}: {n}"
                for n in names
                if n == "dknet_jax.synthetic" or n.startswith("dknet_jax.synthetic.")
            ]
    assert not offenders, offenders
