"""One synthetic room as a scan-like triangle mesh with per-vertex labels.

`generate_scene(rng, size, style)` turns a furnished room (`rooms.layout_room`) into what
a reconstructed RGB-D scan of it looks like:

1. Annotation: the annotators skip about 6% of the furniture (structure is always
   labelled); skipped objects keep their geometry but get nyu40 id 0.
2. Resolution: the edge length is chosen so that the mesh has about the vertex count of
   ``size`` (`SIZES`), within that size's spacing range.
3. Tessellation: every part of every object becomes its own mesh component, so an
   object never shares a vertex with another one.
4. What the scanner misses: floor, wall and ceiling vertices inside an object's
   occluders (under a cabinet, behind a shelf), a few random holes in the structure and
   a few small holes in furniture. Triangles touching a removed vertex go, then the
   vertices no triangle uses.
5. Sensor and light: position noise, a smooth brightness variation across the room and
   per-vertex colour noise.
6. Frame: ScanNet style turns the room to a random heading and shifts it to positive
   coordinates with the floor near z = 0 (as ScanNet's unaligned scans); S3DIS style
   moves it to a random place in the area's aligned frame.
7. Exposure: one brightness and white-balance change for the whole scan, drawn last so
   that changing it never moves the geometry.

The same generator state gives the same `SceneMesh`, bit for bit.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dknet_jax.synthetic.categories import RAW_CATEGORIES, STRUCTURE_CATEGORIES
from dknet_jax.synthetic.furniture import SceneObject
from dknet_jax.synthetic.primitives import surface_area, tessellate, to_local, to_parent
from dknet_jax.synthetic.rooms import layout_room

# size -> (min vertices, max vertices, min spacing, max spacing in metres)
SIZES = {
    "tiny": (2000, 5000, 0.10, 0.5),
    "small": (20000, 40000, 0.04, 0.15),
    "scannet": (100000, 200000, 0.02, 0.045),
}
# the surfaces that furniture hides from the scanner, and that get random scan holes
_SHELL_CATEGORIES = ("wall", "floor", "ceiling")


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
        """i32[O] nyu40 id of each object's raw category (whether annotated or not)."""
        return np.array([RAW_CATEGORIES[c][0] for c in self.categories], np.int32)


def _choose_spacing(rng, objects: list[SceneObject], size: str) -> float:
    """Edge length giving about a vertex count drawn from the size's range (a closed
    surface of area A tessellated at spacing h has about 1.08 A / h^2 vertices)."""
    vmin, vmax, hmin, hmax = SIZES[size]
    total = sum(surface_area(part.primitive) for o in objects for part in o.parts)
    return float(np.clip(np.sqrt(total / (rng.uniform(vmin, vmax) * 1.08)), hmin, hmax))


def _tessellate_objects(objects: list[SceneObject], spacing: float):
    """(f64[V, 3] room positions, i64[F, 3] triangles, i32[V] owning object index,
    f64[V, 3] base colours) of all objects' parts."""
    verts, faces, owner, cols, base = [], [], [], [], 0
    for oi, o in enumerate(objects):
        for part in o.parts:
            v, f = tessellate(part.primitive, spacing)
            verts.append(to_parent(o.part_pose(part), v))
            faces.append(f + base)
            owner.append(np.full(len(v), oi, np.int32))
            cols.append(np.broadcast_to(np.asarray(part.color, float), (len(v), 3)))
            base += len(v)
    return (
        np.concatenate(verts),
        np.concatenate(faces),
        np.concatenate(owner),
        np.concatenate(cols),
    )


def _unseen_vertices(
    rng, objects: list[SceneObject], verts: np.ndarray, owner: np.ndarray, spacing: float
) -> np.ndarray:
    """bool[V]: the vertices a scanner would not capture (step 4 of the module doc)."""
    shell = np.isin(owner, [i for i, o in enumerate(objects) if o.category in _SHELL_CATEGORIES])
    removed = np.zeros(len(verts), bool)
    shell_idx = np.flatnonzero(shell)
    for o in objects:  # hidden behind or under furniture
        for occ in o.occluders:
            p = to_local(o.pose, verts[shell_idx])
            removed[shell_idx[np.all((p > occ.lo) & (p < occ.hi), axis=1)]] = True
    for _ in range(int(rng.integers(2, 7))):  # holes in the structure
        c = verts[shell_idx[rng.integers(len(shell_idx))]]
        r = max(rng.uniform(0.1, 0.35), 1.2 * spacing)
        removed[shell_idx[np.linalg.norm(verts[shell_idx] - c, axis=1) < r]] = True
    for _ in range(int(rng.integers(0, 4))):  # small holes in furniture
        oi = int(rng.integers(len(objects)))
        mine = np.flatnonzero(owner == oi)
        if len(mine) >= 100 and objects[oi].category not in STRUCTURE_CATEGORIES:
            d = np.linalg.norm(verts[mine] - verts[mine[rng.integers(len(mine))]], axis=1)
            hit = d < rng.uniform(0.08, 0.2)
            if hit.mean() < 0.3:
                removed[mine[hit]] = True
    return removed


def _drop_vertices(removed: np.ndarray, verts, faces, owner, cols):
    """Drop the triangles that touch a removed vertex, then the vertices no triangle
    uses (renumbering the triangles)."""
    faces = faces[~removed[faces].any(1)]
    used = np.zeros(len(verts), bool)
    used[faces.ravel()] = True
    remap = np.cumsum(used) - 1
    return verts[used], remap[faces], owner[used], cols[used]


def _sensor_and_light(rng, verts: np.ndarray, cols: np.ndarray, spacing: float):
    """Position noise, a smooth brightness variation over the floor plan and per-vertex
    colour noise (step 5)."""
    verts = verts + rng.normal(0, min(0.004, 0.08 * spacing), verts.shape)
    freq = rng.uniform(0.5, 1.5, 2)
    phase = rng.uniform(0, 2 * np.pi, 2)
    light = (
        1
        + 0.08 * np.sin(verts[:, 0] * freq[0] + phase[0])
        + 0.08 * np.sin(verts[:, 1] * freq[1] + phase[1])
    )
    cols = np.clip(cols * light[:, None] + rng.normal(0, 5, cols.shape), 0, 255)
    return verts, cols


def _scan_frame(rng, verts: np.ndarray, style: str) -> np.ndarray:
    """The room in its dataset's coordinate frame (step 6)."""
    if style == "scannet":  # unaligned scan frame: random heading, positive coordinates
        verts = to_parent((rng.uniform(0, 2 * np.pi), 0, 0, 0), verts)
        verts = verts - verts.min(0) + [rng.uniform(0.1, 0.6), rng.uniform(0.1, 0.6), 0]
        verts[:, 2] += rng.uniform(-0.05, 0.05)
        return verts
    # S3DIS: rooms sit at their place in the area's aligned frame
    return verts + [rng.uniform(0, 40), rng.uniform(0, 40), rng.uniform(-0.1, 0.1)]


def generate_scene(
    rng: np.random.Generator, size: str = "small", style: str = "scannet"
) -> SceneMesh:
    """Lay out, tessellate, occlude and perturb one room (deterministic given rng).

    Args:
      rng: the room's random generator (`writers.make_dataset` uses
        ``default_rng([seed, scene_index])``).
      size: a `SIZES` key: "tiny" (a few thousand vertices), "small" (20-40k) or
        "scannet" (100-200k, ScanNet's density).
      style: "scannet" (no ceiling, unaligned frame) or "s3dis" (ceiling and beams,
        S3DIS room types, aligned frame).
    """
    if size not in SIZES:
        raise ValueError(f"generate_scene: size must be one of {sorted(SIZES)}, got {size!r}")
    objects, _, room_type = layout_room(rng, style)
    for o in objects:  # annotators skip a few objects
        o.annotated = o.category in STRUCTURE_CATEGORIES or rng.random() > 0.06
    spacing = _choose_spacing(rng, objects, size)
    verts, faces, owner, cols = _tessellate_objects(objects, spacing)
    removed = _unseen_vertices(rng, objects, verts, owner, spacing)
    verts, faces, owner, cols = _drop_vertices(removed, verts, faces, owner, cols)
    verts, cols = _sensor_and_light(rng, verts, cols, spacing)
    verts = _scan_frame(rng, verts, style)
    # the scan's exposure and white balance; drawn last, so the geometry does not move
    cols = np.clip(cols * rng.uniform(0.9, 1.1) * rng.normal(1, 0.03, 3), 0, 255)
    annotated = np.array([o.annotated for o in objects])
    obj_nyu40 = np.array(
        [RAW_CATEGORIES[o.category][0] if o.annotated else 0 for o in objects], np.int32
    )
    return SceneMesh(
        verts.astype(np.float32),
        faces.astype(np.int32),
        np.round(cols).astype(np.uint8),
        obj_nyu40[owner],
        owner,
        tuple(o.category for o in objects),
        annotated,
        room_type,
        spacing,
    )
