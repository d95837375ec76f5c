"""Synthetic ScanNet-style rooms written in the raw ScanNet v2 and S3DIS layouts.

Place in the data flow: **synthetic** (this module: scene meshes and raw files) ->
`scripts/prepare_scannet.py` / `prepare_s3dis.py` (the same code that reads real scans)
-> prepared npz -> training. It is the project's default dataset: a fresh install trains
and evaluates on it with no download.

`generate_scene(rng, size, style)` lays out a room (`synthetic_rooms`), tessellates every
primitive at about ScanNet's vertex spacing, removes what a scanner would not see (floor
under furniture, wall behind it, random patches), adds sensor noise, lighting, colour
noise and the scan's exposure and white balance, and returns a `SceneMesh`.
`write_scannet_scene` writes `_vh_clean_2.ply`, `_vh_clean_2.labels.ply`,
`_vh_clean_2.0.010000.segs.json` (our `segment_mesh`, ScanNet's segmentator) and
`.aggregation.json`; `write_s3dis_room` writes `Annotations/<cls>_<k>.txt` and
`<room>.txt`; `make_dataset` writes a whole dataset with the label table and splits.
Every object is a separate mesh component, so each superpoint lies inside one object and
an object's segGroup lists exactly the segments of its vertices.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from plyfile import PlyData, PlyElement

from dknet_jax.data import synthetic_objects as so
from dknet_jax.data.labels import NYU40_NAMES, S3DIS_CLASSES
from dknet_jax.data.synthetic_rooms import compose, layout_room

# size -> (min vertices, max vertices, min spacing, max spacing) in metres
SIZES = {"tiny": (2000, 5000, 0.10, 0.5), "small": (20000, 40000, 0.04, 0.15),
         "scannet": (100000, 200000, 0.02, 0.045)}
K_THRESH, SEG_MIN_VERTS = 0.01, 20

# ScanNet's nyu40 label palette (util.create_color_palette), index = nyu40 id.
NYU40_PALETTE = np.array([
    (0, 0, 0), (174, 199, 232), (152, 223, 138), (31, 119, 180), (255, 187, 120),
    (188, 189, 34), (140, 86, 75), (255, 152, 150), (214, 39, 40), (197, 176, 213),
    (148, 103, 189), (196, 156, 148), (23, 190, 207), (178, 76, 76), (247, 182, 210),
    (66, 188, 102), (219, 219, 141), (140, 57, 197), (202, 185, 52), (51, 176, 203),
    (200, 54, 131), (92, 193, 61), (78, 71, 183), (172, 114, 82), (255, 127, 14),
    (91, 163, 138), (153, 98, 156), (140, 153, 101), (158, 218, 229), (100, 125, 154),
    (178, 127, 135), (120, 185, 128), (146, 111, 194), (44, 160, 44), (112, 128, 144),
    (96, 207, 209), (227, 119, 194), (213, 92, 176), (94, 106, 211), (82, 84, 163),
    (100, 85, 144)], np.uint8)


@dataclasses.dataclass
class SceneMesh:
    """One synthetic room.

    Attributes:
      vertices: f32[V, 3] positions in metres (ScanNet style: unaligned, floor near z=0).
      faces: i32[F, 3] triangles; objects are separate connected pieces of the mesh.
      colors: u8[V, 3] "real" colours.
      nyu40: i32[V] nyu40 id of each vertex, 0 where unannotated.
      object_id: i32[V] index into `categories` of the object owning each vertex.
      categories: raw category (the ScanNet annotation label) of each object, [O].
      annotated: bool[O] whether an annotator labelled the object (ScanNet leaves a few
        objects out; S3DIS puts every point in some file).
      room_type: e.g. "bedroom" or, for S3DIS style, "office".
      spacing: tessellation edge length in metres.
    """
    vertices: np.ndarray
    faces: np.ndarray
    colors: np.ndarray
    nyu40: np.ndarray
    object_id: np.ndarray
    categories: tuple
    annotated: np.ndarray
    room_type: str
    spacing: float

    @property
    def object_nyu40(self) -> np.ndarray:
        """i32[O] nyu40 id of each object's raw category."""
        return np.array([so.RAW_CATEGORIES[c][0] for c in self.categories], np.int32)


def _transform(pose: tuple, v: np.ndarray) -> np.ndarray:
    c, s = np.cos(pose[0]), np.sin(pose[0])
    return v @ np.array([[c, s, 0], [-s, c, 0], [0, 0, 1]]) + np.asarray(pose[1:])


def _to_local(pose: tuple, v: np.ndarray) -> np.ndarray:
    c, s = np.cos(pose[0]), np.sin(pose[0])
    return (v - np.asarray(pose[1:])) @ np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def generate_scene(rng: np.random.Generator, size: str = "small",
                   style: str = "scannet") -> SceneMesh:
    """Lay out, tessellate, occlude and perturb one room (deterministic given rng)."""
    if size not in SIZES:
        raise ValueError(f"generate_scene: size must be one of {sorted(SIZES)}, got {size!r}")
    objs, lay, room_type = layout_room(rng, style)
    for o in objs:  # annotators skip a few objects
        o.annotated = o.raw in so.STRUCTURE or rng.random() > .06
    vmin, vmax, hmin, hmax = SIZES[size]
    total = sum(so.area(p[0]) for o in objs for p in o.parts)
    h = float(np.clip(np.sqrt(total / (rng.uniform(vmin, vmax) * 1.08)), hmin, hmax))

    verts, faces, owner, cols, base = [], [], [], [], 0
    for oi, o in enumerate(objs):
        for part in o.parts:
            v, f = so.tessellate(part[0], h)
            pose = compose(o.pose, part[2]) if len(part) > 2 else o.pose
            verts.append(_transform(pose, v))
            faces.append(f + base)
            owner.append(np.full(len(v), oi, np.int32))
            cols.append(np.broadcast_to(np.asarray(part[1], float), (len(v), 3)))
            base += len(v)
    verts, faces = np.concatenate(verts), np.concatenate(faces)
    owner, cols = np.concatenate(owner), np.concatenate(cols)

    # what a scanner misses: structure hidden by furniture, random patches, object holes
    structure = np.isin(owner, [i for i, o in enumerate(objs)
                                if o.raw in ("wall", "floor", "ceiling")])
    removed = np.zeros(len(verts), bool)
    sidx = np.flatnonzero(structure)
    for o in objs:
        for occ in o.occluders:
            p = _to_local(o.pose, verts[sidx])
            removed[sidx[np.all((p > occ.lo) & (p < occ.hi), axis=1)]] = True
    for _ in range(int(rng.integers(2, 7))):
        c = verts[sidx[rng.integers(len(sidx))]]
        r = max(rng.uniform(.1, .35), 1.2 * h)
        removed[sidx[np.linalg.norm(verts[sidx] - c, axis=1) < r]] = True
    for _ in range(int(rng.integers(0, 4))):
        oi = int(rng.integers(len(objs)))
        mine = np.flatnonzero(owner == oi)
        if len(mine) >= 100 and objs[oi].raw not in so.STRUCTURE:
            d = np.linalg.norm(verts[mine] - verts[mine[rng.integers(len(mine))]], axis=1)
            hit = d < rng.uniform(.08, .2)
            if hit.mean() < .3:
                removed[mine[hit]] = True
    faces = faces[~removed[faces].any(1)]
    used = np.zeros(len(verts), bool)
    used[faces.ravel()] = True
    remap = np.cumsum(used) - 1
    verts, owner, cols, faces = verts[used], owner[used], cols[used], remap[faces]

    # sensor noise, lighting and colour noise
    verts = verts + rng.normal(0, min(.004, .08 * h), verts.shape)
    f = rng.uniform(.5, 1.5, 2)
    ph = rng.uniform(0, 2 * np.pi, 2)
    light = (1 + .08 * np.sin(verts[:, 0] * f[0] + ph[0]) + .08 * np.sin(verts[:, 1] * f[1]
                                                                         + ph[1]))
    cols = np.clip(cols * light[:, None] + rng.normal(0, 5, cols.shape), 0, 255)
    if style == "scannet":  # unaligned scan frame: random heading, positive coordinates
        verts = _transform((rng.uniform(0, 2 * np.pi), 0, 0, 0), verts)
        verts = verts - verts.min(0) + [rng.uniform(.1, .6), rng.uniform(.1, .6), 0]
        verts[:, 2] += rng.uniform(-.05, .05)
    else:  # S3DIS: rooms sit at their place in the area's aligned frame
        verts = verts + [rng.uniform(0, 40), rng.uniform(0, 40), rng.uniform(-.1, .1)]
    # the scan's exposure and white balance; drawn last, so the geometry does not move
    cols = np.clip(cols * rng.uniform(.9, 1.1) * rng.normal(1, .03, 3), 0, 255)
    annotated = np.array([o.annotated for o in objs])
    obj_nyu = np.array([so.RAW_CATEGORIES[o.raw][0] if o.annotated else 0 for o in objs],
                       np.int32)
    return SceneMesh(verts.astype(np.float32), faces.astype(np.int32),
                     np.round(cols).astype(np.uint8), obj_nyu[owner], owner,
                     tuple(o.raw for o in objs), annotated, room_type, h)


# ---------------------------------------------------------------------------------------
# ScanNet layout
def _default_segment_fn():
    from dknet_jax.data.superpoints import segment_mesh
    return segment_mesh


def scannet_seg_groups(scene: SceneMesh, segments: np.ndarray) -> list[dict]:
    """The aggregation's segGroups: per annotated object (in object order), the sorted
    ids of the segments of its vertices. Raises if a segment spans two objects."""
    segments = np.asarray(segments)
    pairs = np.unique(np.stack([segments, scene.object_id.astype(segments.dtype)], 1), axis=0)
    if len(pairs) != len(np.unique(segments)):
        bad = pairs[np.flatnonzero(np.diff(pairs[:, 0]) == 0)[0], 0]
        raise RuntimeError(f"segment {bad} spans several objects; objects must be separate "
                           "mesh components")
    groups = []
    for oi in np.unique(scene.object_id):
        if not scene.annotated[oi]:
            continue
        k = len(groups)
        groups.append({"id": k, "objectId": k, "segments": pairs[pairs[:, 1] == oi, 0]
                       .tolist(), "label": scene.categories[oi]})
    return groups


def _write_ply(path: Path, scene: SceneMesh, colors: np.ndarray, label=None):
    fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"),
              ("blue", "u1"), ("alpha", "u1")] + ([("label", "<u2")] if label is not None
                                                 else [])
    v = np.empty(len(scene.vertices), fields)
    v["x"], v["y"], v["z"] = scene.vertices.T
    v["red"], v["green"], v["blue"] = colors.T
    v["alpha"] = 255
    if label is not None:
        v["label"] = label
    f = np.empty(len(scene.faces), [("vertex_indices", "<i4", (3,))])
    f["vertex_indices"] = scene.faces
    ply = PlyData([PlyElement.describe(v, "vertex"),
                   PlyElement.describe(f, "face", len_types={"vertex_indices": "u1"})],
                  text=False, byte_order="<")
    # plyfile writes list properties row by row (~10 s for a ScanNet-sized mesh); a
    # triangle list row is just (uchar 3, int a, int b, int c), so write the same bytes
    # in one go after plyfile's header.
    rows = np.empty(len(scene.faces), [("n", "u1"), ("i", "<i4", (3,))])
    rows["n"], rows["i"] = 3, scene.faces
    with open(path, "wb") as fh:
        fh.write(ply.header.encode("ascii") + b"\n")
        fh.write(v.tobytes())
        fh.write(rows.tobytes())


def write_scannet_scene(scene: SceneMesh, root, scene_id: str, segment_fn=None) -> Path:
    """Write one scene as root/scans/<scene_id>/ raw ScanNet v2 files; returns the folder.

    segment_fn(vertices f32[V,3], faces i32[F,3], k_thresh, seg_min_verts) -> i64[V]
    defaults to `dknet_jax.data.superpoints.segment_mesh`.
    """
    segment_fn = segment_fn or _default_segment_fn()
    out = Path(root) / "scans" / scene_id
    out.mkdir(parents=True, exist_ok=True)
    seg = np.asarray(segment_fn(scene.vertices, scene.faces, K_THRESH, SEG_MIN_VERTS))
    groups = scannet_seg_groups(scene, seg)
    base = f"{scene_id}_vh_clean_2"
    _write_ply(out / f"{base}.ply", scene, scene.colors)
    label = scene.nyu40.astype(np.uint16)
    _write_ply(out / f"{base}.labels.ply", scene, NYU40_PALETTE[label], label)
    segs_name = f"{base}.0.010000.segs.json"
    with open(out / segs_name, "w") as fh:
        json.dump({"params": {"kThresh": str(K_THRESH), "segMinVerts": str(SEG_MIN_VERTS)},
                   "sceneId": scene_id, "segIndices": seg.astype(np.int64).tolist()}, fh)
    with open(out / f"{scene_id}.aggregation.json", "w") as fh:
        json.dump({"sceneId": f"scannet.{scene_id}", "appId": "Aggregator.v2",
                   "segGroups": groups, "segmentsFile": f"scannet.{segs_name}"}, fh)
    return out


_EIGEN13 = {4: (1, "Bed"), 23: (2, "Books"), 22: (3, "Ceiling"), 5: (4, "Chair"),
            2: (5, "Floor"), 6: (9, "Sofa"), 7: (10, "Table"), 11: (8, "Picture"),
            25: (11, "TV"), 1: (12, "Wall"), 9: (13, "Window")}
_FURNITURE = (3, 10, 12, 14, 15, 17, 32, 39)
LABEL_TABLE_HEADER = ("id", "raw_category", "category", "count", "nyu40id", "eigen13id",
                      "nyuClass", "nyu40class", "eigen13class", "ModelNet40", "ModelNet10",
                      "ShapeNetCore55", "synsetoffset", "wnsynsetid", "wnsynsetkey",
                      "mpcat40", "mpcat40index")
# raw categories in the table that the generator never places (like most of the real file)
_EXTRA_ROWS = {"clothes": 21, "paper": 26, "bag": 37, "blinds": 13, "dresser": 17,
               "shelf": 15, "person": 31, "floor mat": 20}


def write_label_table(path) -> None:
    """scannetv2-labels.combined.tsv: the real 17-column header, CRLF line endings."""
    rows = list({k: v[0] for k, v in so.RAW_CATEGORIES.items()}.items()) \
        + list(_EXTRA_ROWS.items())
    lines = ["\t".join(LABEL_TABLE_HEADER)]
    for i, (raw, nyu) in enumerate(rows):
        e13 = _EIGEN13.get(nyu, (6, "Furniture") if nyu in _FURNITURE else (7, "Objects"))
        name = NYU40_NAMES[nyu]
        lines.append("\t".join([str(i + 1), raw, raw, str(1000 - 7 * i), str(nyu), str(e13[0]),
                                name, name, e13[1], "", "", "", "", "", "",
                                name.replace(" ", "_"), str(nyu)]))
    Path(path).write_bytes(("\r\n".join(lines) + "\r\n").encode())


# ---------------------------------------------------------------------------------------
# S3DIS layout
def write_s3dis_room(scene: SceneMesh, root, area: int, room: str) -> Path:
    """Write root/Area_<area>/<room>/<room>.txt and Annotations/<class>_<k>.txt (one file
    per object, rows `x y z r g b`); returns the room folder."""
    out = Path(root) / f"Area_{area}" / room
    (out / "Annotations").mkdir(parents=True, exist_ok=True)
    rows = np.concatenate([scene.vertices.astype(np.float64), scene.colors], 1)
    fmt = "%.3f %.3f %.3f %d %d %d"
    counts: dict[str, int] = {}
    order = []
    for oi in np.unique(scene.object_id):
        cls = so.RAW_CATEGORIES[scene.categories[oi]][1]
        if cls not in S3DIS_CLASSES:
            raise ValueError(f"write_s3dis_room: {scene.categories[oi]!r} maps to unknown "
                             f"S3DIS class {cls!r}; fix synthetic_objects.RAW_CATEGORIES")
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


def make_dataset(out, scenes: int, seed: int, format: str = "scannet", size: str = "small",
                 val_fraction: float = 0.2, progress: bool = True,
                 segment_fn=None) -> dict[str, list[str]]:
    """Write `scenes` synthetic rooms under `out` in the raw ScanNet or S3DIS layout.

    Scene i is drawn from numpy Generator([seed, i]), so it does not depend on `scenes`
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
        write_label_table(out / "scannetv2-labels.combined.tsv")
        segment_fn = segment_fn or _default_segment_fn()
    rooms_seen: dict[tuple[int, str], int] = {}
    train_areas = (1, 2, 3, 4, 6)
    for i in tqdm(range(scenes), desc=f"synthetic {format}", disable=not progress):
        scene = generate_scene(np.random.default_rng([seed, i]), size, format)
        if format == "scannet":
            name = f"scene{i:04d}_00"
            write_scannet_scene(scene, out, name, segment_fn)
        else:
            area = 5 if is_val[i] else train_areas[int((~is_val[:i]).sum()) % 5]
            k = rooms_seen[(area, scene.room_type)] = rooms_seen.get((area, scene.room_type),
                                                                     0) + 1
            room = f"{scene.room_type}_{k}"
            write_s3dis_room(scene, out, area, room)
            name = f"Area_{area}/{room}"
        split["val" if is_val[i] else "train"].append(name)
    if format == "scannet":
        for key in ("train", "val"):
            (out / f"scannetv2_{key}.txt").write_text("".join(s + "\n" for s in split[key]))
    return split
