"""Synthetic rooms written as raw ScanNet v2 and S3DIS files.

The files are what the real datasets ship, so `scripts/prepare_scannet.py` and
`prepare_s3dis.py` read them with the code that reads real scans:

- ScanNet (`write_scannet_scene`), under ``scans/<scene>/``: the mesh
  ``_vh_clean_2.ply`` (x y z as float, red green blue alpha as uchar), the label mesh
  ``_vh_clean_2.labels.ply`` (the same plus a ushort nyu40 label, coloured with ScanNet's
  nyu40 palette), the over-segmentation ``_vh_clean_2.0.010000.segs.json`` (our
  `segment_mesh`, a re-implementation of ScanNet's segmentator) and the instance
  annotation ``.aggregation.json``. A dataset also gets the label table
  ``scannetv2-labels.combined.tsv`` (`write_label_table`) and the split lists
  ``scannetv2_{train,val}.txt``.
- S3DIS (`write_s3dis_room`), under ``Area_<n>/<room>/``: one ``Annotations/<class>_<k>.txt``
  per object and the whole room ``<room>.txt``, rows ``x y z r g b``.

Because every object is a separate mesh component, each segment lies inside one object,
and an object's segGroup lists exactly the segments of its vertices
(`scannet_seg_groups` checks this). `make_dataset` writes a whole dataset: scene i comes
from ``default_rng([seed, i])``, so it does not depend on the number of scenes and the
same seed gives byte-identical files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from dknet_jax.data.labels import NYU40_NAMES, NYU40_PALETTE, S3DIS_CLASSES
from dknet_jax.data.ply import write_ply
from dknet_jax.data.scannet import LABEL_TABLE, scene_files
from dknet_jax.data.superpoints import SCANNET_K_THRESH, SCANNET_SEG_MIN_VERTS, segment_mesh
from dknet_jax.synthetic.categories import RAW_CATEGORIES
from dknet_jax.synthetic.scene import SceneMesh, generate_scene


# ---------------------------------------------------------------------------------------
# ScanNet layout
def scannet_seg_groups(scene: SceneMesh, segments: np.ndarray) -> list[dict]:
    """The aggregation's segGroups: per annotated object (in object order), the sorted
    ids of the segments of its vertices.

    Raises:
      RuntimeError: a segment spans two objects (objects must be separate mesh
        components).
    """
    segments = np.asarray(segments)
    pairs = np.unique(np.stack([segments, scene.object_id.astype(segments.dtype)], 1), axis=0)
    if len(pairs) != len(np.unique(segments)):
        bad = pairs[np.flatnonzero(np.diff(pairs[:, 0]) == 0)[0], 0]
        raise RuntimeError(
            f"segment {bad} spans several objects; objects must be separate mesh components"
        )
    groups = []
    for oi in np.unique(scene.object_id):
        if not scene.annotated[oi]:
            continue
        k = len(groups)
        groups.append(
            {
                "id": k,
                "objectId": k,
                "segments": pairs[pairs[:, 1] == oi, 0].tolist(),
                "label": scene.categories[oi],
            }
        )
    return groups


def _write_mesh_ply(
    path: str, scene: SceneMesh, colors: np.ndarray, label: np.ndarray | None = None
) -> None:
    """The scene mesh with the given u8[V, 3] colours (and a u16 label), as ScanNet
    writes its ``_vh_clean_2`` files."""
    xyz = np.asarray(scene.vertices, np.float32)
    colors = np.asarray(colors, np.uint8)
    vertex = {
        "x": xyz[:, 0],
        "y": xyz[:, 1],
        "z": xyz[:, 2],
        "red": colors[:, 0],
        "green": colors[:, 1],
        "blue": colors[:, 2],
        "alpha": np.full(len(xyz), 255, np.uint8),
    }
    if label is not None:
        vertex["label"] = np.asarray(label, "<u2")
    write_ply(path, vertex, scene.faces)


def write_scannet_scene(scene: SceneMesh, root, scene_id: str, segment_fn=None) -> Path:
    """Write one scene as root/scans/<scene_id>/ raw ScanNet v2 files; returns the folder.

    segment_fn(vertices f32[V,3], faces i32[F,3], k_thresh, seg_min_verts) -> i64[V]
    defaults to `dknet_jax.data.superpoints.segment_mesh`.
    """
    segment_fn = segment_fn or segment_mesh
    out = Path(root) / "scans" / scene_id
    out.mkdir(parents=True, exist_ok=True)
    files = scene_files(str(out), scene_id)
    seg = np.asarray(
        segment_fn(scene.vertices, scene.faces, SCANNET_K_THRESH, SCANNET_SEG_MIN_VERTS)
    )
    groups = scannet_seg_groups(scene, seg)
    _write_mesh_ply(files["mesh"], scene, scene.colors)
    label = scene.nyu40.astype(np.uint16)
    _write_mesh_ply(files["labels"], scene, NYU40_PALETTE[label], label)
    with open(files["segs"], "w") as fh:
        json.dump(
            {
                "params": {
                    "kThresh": str(SCANNET_K_THRESH),
                    "segMinVerts": str(SCANNET_SEG_MIN_VERTS),
                },
                "sceneId": scene_id,
                "segIndices": seg.astype(np.int64).tolist(),
            },
            fh,
        )
    with open(files["aggregation"], "w") as fh:
        json.dump(
            {
                "sceneId": f"scannet.{scene_id}",
                "appId": "Aggregator.v2",
                "segGroups": groups,
                "segmentsFile": f"scannet.{os.path.basename(files['segs'])}",
            },
            fh,
        )
    return out


# The label table's columns: ScanNet's 17-column header.
LABEL_TABLE_HEADER = (
    "id",
    "raw_category",
    "category",
    "count",
    "nyu40id",
    "eigen13id",
    "nyuClass",
    "nyu40class",
    "eigen13class",
    "ModelNet40",
    "ModelNet10",
    "ShapeNetCore55",
    "synsetoffset",
    "wnsynsetid",
    "wnsynsetkey",
    "mpcat40",
    "mpcat40index",
)
# nyu40 id -> (eigen13 id, eigen13 class) where it is not "Furniture" (6) or "Objects" (7)
_EIGEN13 = {
    4: (1, "Bed"),
    23: (2, "Books"),
    22: (3, "Ceiling"),
    5: (4, "Chair"),
    2: (5, "Floor"),
    6: (9, "Sofa"),
    7: (10, "Table"),
    11: (8, "Picture"),
    25: (11, "TV"),
    1: (12, "Wall"),
    9: (13, "Window"),
}
_EIGEN13_FURNITURE = (3, 10, 12, 14, 15, 17, 32, 39)  # nyu40 ids in eigen13 "Furniture"
# raw categories in the table that the generator never places (like most of the real file)
_EXTRA_ROWS = {
    "clothes": 21,
    "paper": 26,
    "bag": 37,
    "blinds": 13,
    "dresser": 17,
    "shelf": 15,
    "person": 31,
    "floor mat": 20,
}


def write_label_table(path) -> None:
    """``scannetv2-labels.combined.tsv`` for the generator's raw categories (plus a few
    it never places): the real 17-column header, CRLF line endings."""
    rows = list({k: v[0] for k, v in RAW_CATEGORIES.items()}.items()) + list(_EXTRA_ROWS.items())
    lines = ["\t".join(LABEL_TABLE_HEADER)]
    for i, (raw, nyu) in enumerate(rows):
        e13 = _EIGEN13.get(nyu, (6, "Furniture") if nyu in _EIGEN13_FURNITURE else (7, "Objects"))
        name = NYU40_NAMES[nyu]
        lines.append(
            "\t".join(
                [
                    str(i + 1),
                    raw,
                    raw,
                    str(1000 - 7 * i),
                    str(nyu),
                    str(e13[0]),
                    name,
                    name,
                    e13[1],
                    "",
                    "",
                    "",
                    "",
                    "",
                    "",
                    name.replace(" ", "_"),
                    str(nyu),
                ]
            )
        )
    Path(path).write_bytes(("\r\n".join(lines) + "\r\n").encode())


# ---------------------------------------------------------------------------------------
# S3DIS layout
def write_s3dis_room(scene: SceneMesh, root, area: int, room: str) -> Path:
    """Write root/Area_<area>/<room>/<room>.txt and Annotations/<class>_<k>.txt (one file
    per object, rows ``x y z r g b``, millimetre precision); returns the room folder."""
    out = Path(root) / f"Area_{area}" / room
    (out / "Annotations").mkdir(parents=True, exist_ok=True)
    rows = np.concatenate([scene.vertices.astype(np.float64), scene.colors], 1)
    fmt = "%.3f %.3f %.3f %d %d %d"
    counts: dict[str, int] = {}
    order = []
    for oi in np.unique(scene.object_id):
        cls = RAW_CATEGORIES[scene.categories[oi]][1]
        if cls not in S3DIS_CLASSES:
            raise ValueError(
                f"write_s3dis_room: {scene.categories[oi]!r} maps to unknown "
                f"S3DIS class {cls!r}; fix synthetic.categories.RAW_CATEGORIES"
            )
        counts[cls] = counts.get(cls, 0) + 1
        idx = np.flatnonzero(scene.object_id == oi)
        order.append(idx)
        np.savetxt(out / "Annotations" / f"{cls}_{counts[cls]}.txt", rows[idx], fmt=fmt)
    np.savetxt(out / f"{room}.txt", rows[np.concatenate(order)], fmt=fmt)
    return out


# ---------------------------------------------------------------------------------------
# Whole datasets
def split_scenes(n: int, val_fraction: float, seed: int) -> np.ndarray:
    """bool[n]: which scene indices go to validation (a seeded random subset; at least
    one scene on each side when n >= 2 and 0 < val_fraction < 1)."""
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction must be in [0, 1], got {val_fraction}")
    n_val = int(round(val_fraction * n))
    if n >= 2 and 0 < val_fraction < 1:
        n_val = min(max(n_val, 1), n - 1)
    is_val = np.zeros(n, bool)
    is_val[np.random.default_rng([seed, 1 << 20]).permutation(n)[:n_val]] = True
    return is_val


def make_dataset(
    out,
    scenes: int,
    seed: int,
    format: str = "scannet",
    size: str = "small",
    val_fraction: float = 0.2,
    progress: bool = True,
    segment_fn=None,
) -> dict[str, list[str]]:
    """Write ``scenes`` synthetic rooms under ``out`` in the raw ScanNet or S3DIS layout.

    Scene i is drawn from numpy Generator([seed, i]), so it does not depend on ``scenes``
    and the same seed gives byte-identical files. ScanNet: scans/scene<NNNN>_00/ files, the
    label table and scannetv2_{train,val}.txt. S3DIS: validation rooms go to Area_5, the
    others round-robin to Areas 1-4 and 6.

    Returns:
      {"train": [...], "val": [...]} scene ids (ScanNet) or "Area_N/<room>" (S3DIS).
    """
    from tqdm import tqdm

    if format not in ("scannet", "s3dis"):
        raise ValueError(f"make_dataset: format must be 'scannet' or 's3dis', got {format!r}")
    if scenes < 1:
        raise ValueError(f"make_dataset: scenes must be >= 1, got {scenes}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    is_val = split_scenes(scenes, val_fraction, seed)
    split: dict[str, list[str]] = {"train": [], "val": []}
    if format == "scannet":
        write_label_table(out / LABEL_TABLE)
        segment_fn = segment_fn or segment_mesh
    rooms_seen: dict[tuple[int, str], int] = {}
    train_areas = (1, 2, 3, 4, 6)
    for i in tqdm(range(scenes), desc=f"synthetic {format}", disable=not progress):
        scene = generate_scene(np.random.default_rng([seed, i]), size, format)
        if format == "scannet":
            name = f"scene{i:04d}_00"
            write_scannet_scene(scene, out, name, segment_fn)
        else:
            area = 5 if is_val[i] else train_areas[int((~is_val[:i]).sum()) % 5]
            area_room = (area, scene.room_type)
            k = rooms_seen[area_room] = rooms_seen.get(area_room, 0) + 1
            room = f"{scene.room_type}_{k}"
            write_s3dis_room(scene, out, area, room)
            name = f"Area_{area}/{room}"
        split["val" if is_val[i] else "train"].append(name)
    if format == "scannet":
        for key in ("train", "val"):
            (out / f"scannetv2_{key}.txt").write_text("".join(s + "\n" for s in split[key]))
    return split
