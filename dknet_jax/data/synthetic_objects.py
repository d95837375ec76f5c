"""Mesh primitives and furniture for the synthetic rooms.

Place in the data flow: **synthetic_objects** (primitives, furniture) -> synthetic (room
layout, scene mesh, raw ScanNet / S3DIS files) -> prepare_scannet / prepare_s3dis -> npz.

Everything is built in an object's *local frame*: x across the object (centred), y from
its back (y = 0, the side that goes against a wall) to its front, z up from the floor.
A primitive is a `Box`, a vertical `Cylinder` or a `Sheet` (a flat or wavy rectangle with
rectangular holes); `tessellate(prim, h)` turns it into a triangle mesh with edges of about
`h` metres whose faces point outwards. Primitives of one object are separate mesh
components that touch; objects never share vertices with each other or with the room.

`RAW_CATEGORIES` is the label table of the generator: raw category -> (nyu40 id, S3DIS
class). Books are their own objects (raw "books", nyu40 23, not a benchmark class), as
ScanNet's annotators mostly labelled them, so a bookshelf instance is the shelf alone.

Appearance. In real scans an object's colour says something about its class: sofas are
upholstered, toilets, sinks and tubs are white ceramic, beds show light bedding, fridges
are white or steel, windows are bright glass in (mostly) white frames, bookshelves are
darker wood, counters stone, office chairs black. It never says everything: chairs,
tables, desks, doors and cabinets can all be wood. `color(rng, kind)` models this in two
levels. `MATERIALS` are shared looks (light / mid / dark wood, white paint, ceramic,
steel, glass, stone, fabrics, leather, ...), each a few swatches with a brightness spread
and a tint. `APPEARANCE` gives every kind of surface (an object class, or a part such as
"door frame", "window glass", "bedding") its own weights over those materials: one
leading material (weight 0.3 to 1) and a tail that overlaps other classes. Each object
draws a material, a swatch, a brightness and a tint, then the scene adds its lighting,
per-point noise and a per-scan exposure and white balance (`synthetic.generate_scene`);
sets of like objects share one finish (`synthetic_rooms._matching`: the chairs round a
table, a row of kitchen cabinets, a pair of nightstands). Walls are painted (white,
off-white, pale tints), floors wood, carpet or tile.

Until this model, colours came from six palettes shared by every class (all wooden
furniture from one "wood" palette, ...), so colour carried almost no class information:
on 48 `small` rooms (seed 0; fit on the 38 train rooms, test on the 10 val rooms, points
of the 18 instance classes) a nearest class-mean RGB classifier scored 16.7% point
accuracy, below always answering the largest class (18.5%), and a 25-nearest-neighbour
RGB classifier 23%. With per-class appearance they score 26% and 34% (96 rooms of seeds
1 and 2: 26-28% and 36-43%, from 11-17% and 31-32%): colour helps, geometry still
decides. `color` takes the same random draws as the old palettes did (one integer, one
uniform, three normals), so every room's geometry and labels are exactly what they were;
only colours changed.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# raw category -> (nyu40 id, S3DIS class). Benchmark classes first, then clutter.
RAW_CATEGORIES: dict[str, tuple[int, str]] = {
    "wall": (1, "wall"), "floor": (2, "floor"), "ceiling": (22, "ceiling"),
    "beam": (38, "beam"), "column": (38, "column"),
    "cabinet": (3, "clutter"), "kitchen cabinets": (3, "clutter"),
    "file cabinet": (3, "clutter"), "bed": (4, "clutter"), "chair": (5, "chair"),
    "office chair": (5, "chair"), "couch": (6, "sofa"), "table": (7, "table"),
    "coffee table": (7, "table"), "door": (8, "door"), "window": (9, "window"),
    "bookshelf": (10, "bookcase"), "picture": (11, "clutter"), "counter": (12, "clutter"),
    "kitchen counter": (12, "clutter"), "desk": (14, "table"), "curtain": (16, "clutter"),
    "refrigerator": (24, "clutter"), "shower curtain": (28, "clutter"),
    "toilet": (33, "clutter"), "sink": (34, "clutter"), "bathtub": (36, "clutter"),
    "trash can": (39, "clutter"), "ottoman": (39, "clutter"), "tv stand": (39, "clutter"),
    # non-benchmark nyu40 classes ("other clutter")
    "nightstand": (32, "clutter"), "pillow": (18, "clutter"), "lamp": (35, "clutter"),
    "box": (29, "clutter"), "books": (23, "clutter"), "monitor": (40, "clutter"),
    "backpack": (37, "clutter"), "tv": (25, "clutter"), "whiteboard": (30, "board"),
    "mirror": (19, "clutter"), "towel": (27, "clutter"), "microwave": (40, "clutter"),
}
STRUCTURE = ("wall", "floor", "ceiling", "beam", "column")

Vec = tuple[float, float, float]


@dataclasses.dataclass(frozen=True)
class Box:
    """Axis-aligned box [lo, hi]; `skip` lists faces left open, e.g. "-z+y"."""
    lo: Vec
    hi: Vec
    skip: str = ""


@dataclasses.dataclass(frozen=True)
class Cylinder:
    """Vertical cylinder around (x, y) from z0 to z1, with optional caps."""
    x: float
    y: float
    z0: float
    z1: float
    r: float
    top: bool = True
    bottom: bool = False


@dataclasses.dataclass(frozen=True)
class Sheet:
    """Rectangle origin + s*u + t*v (s, t in [0, 1]); faces point along u x v.

    holes: rectangles (s0, s1, t0, t1) in metres along u and v whose faces are dropped.
    wave: (amplitude, period, phase) displacement along the normal as a function of s.
    """
    origin: Vec
    u: Vec
    v: Vec
    holes: tuple = ()
    wave: tuple | None = None


def area(p) -> float:
    """Surface area of a primitive in square metres (holes ignored)."""
    if isinstance(p, Box):
        d = np.subtract(p.hi, p.lo)
        faces = {"-x": d[1] * d[2], "+x": d[1] * d[2], "-y": d[0] * d[2],
                 "+y": d[0] * d[2], "-z": d[0] * d[1], "+z": d[0] * d[1]}
        return float(sum(a for k, a in faces.items() if k not in p.skip))
    if isinstance(p, Cylinder):
        return float(2 * np.pi * p.r * (p.z1 - p.z0) + np.pi * p.r**2 * (p.top + p.bottom))
    return float(np.linalg.norm(p.u) * np.linalg.norm(p.v))


def _grid_faces(nu: int, nv: int) -> np.ndarray:
    """i64[2*nu*nv, 3] triangles of an (nu+1) x (nv+1) vertex grid (index i*(nv+1)+j),
    oriented along u x v."""
    i, j = np.meshgrid(np.arange(nu), np.arange(nv), indexing="ij")
    a = (i * (nv + 1) + j).ravel()
    b, c, d = a + nv + 1, a + nv + 2, a + 1
    return np.concatenate([np.stack([a, b, c], 1), np.stack([a, c, d], 1)])


def _box(p: Box, h: float):
    lo, hi = np.asarray(p.lo, float), np.asarray(p.hi, float)
    n = np.maximum(1, np.round((hi - lo) / h)).astype(np.int64)
    lattice, faces, base = [], [], 0
    for axis in range(3):
        for sign, name in ((-1, "-"), (1, "+")):
            if name + "xyz"[axis] in p.skip:
                continue
            ua, va = (axis + 1) % 3, (axis + 2) % 3  # e_ua x e_va = +e_axis
            if sign < 0:
                ua, va = va, ua
            iu, iv = np.meshgrid(np.arange(n[ua] + 1), np.arange(n[va] + 1), indexing="ij")
            lat = np.zeros(iu.shape + (3,), np.int64)
            lat[..., axis] = 0 if sign < 0 else n[axis]
            lat[..., ua], lat[..., va] = iu, iv
            lattice.append(lat.reshape(-1, 3))
            faces.append(_grid_faces(n[ua], n[va]) + base)
            base += iu.size
    if not lattice:
        return np.zeros((0, 3)), np.zeros((0, 3), np.int64)
    lat = np.concatenate(lattice)
    keys = (lat[:, 0] * (n[1] + 1) + lat[:, 1]) * (n[2] + 1) + lat[:, 2]
    uniq, first, inv = np.unique(keys, return_index=True, return_inverse=True)
    verts = lo + lat[first] / n * (hi - lo)
    return verts, inv[np.concatenate(faces)]


def _cylinder(p: Cylinder, h: float):
    na = max(6, int(round(2 * np.pi * p.r / h)))
    nz = max(1, int(round((p.z1 - p.z0) / h)))
    nr = max(1, int(round(p.r / h)))
    ang = 2 * np.pi * np.arange(na) / na
    ring = np.stack([p.x + p.r * np.cos(ang), p.y + p.r * np.sin(ang)], 1)
    z = np.linspace(p.z0, p.z1, nz + 1)
    verts = [np.concatenate([ring[None].repeat(nz + 1, 0),
                             z[:, None, None].repeat(na, 1)], 2).reshape(-1, 3)]
    k = np.arange(na)
    j = np.arange(nz)[:, None]
    a, b = j * na + k, j * na + (k + 1) % na  # side quads, outward normals
    faces = [np.stack([a, b, b + na], -1).reshape(-1, 3), np.stack([a, b + na, a + na], -1)
             .reshape(-1, 3)]
    count = (nz + 1) * na
    for cap, zc, outer, up in ((p.top, p.z1, nz * na, True), (p.bottom, p.z0, 0, False)):
        if not cap:
            continue
        rows = [outer + k]  # ring indices from the rim inwards
        for m in range(nr - 1, 0, -1):
            rr = p.r * m / nr
            verts.append(np.stack([p.x + rr * np.cos(ang), p.y + rr * np.sin(ang),
                                   np.full(na, zc)], 1))
            rows.append(count + k)
            count += na
        verts.append(np.array([[p.x, p.y, zc]]))
        centre = count
        count += 1
        for o, i in zip(rows[:-1], rows[1:], strict=False):
            o2, i2 = np.roll(o, -1), np.roll(i, -1)
            t = [np.stack([o, o2, i2], 1), np.stack([o, i2, i], 1)]
            faces += t if up else [f[:, ::-1] for f in t]
        t = np.stack([rows[-1], np.roll(rows[-1], -1), np.full(na, centre)], 1)
        faces.append(t if up else t[:, ::-1])
    return np.concatenate(verts), np.concatenate(faces)


def _sheet(p: Sheet, h: float):
    u, v, o = (np.asarray(x, float) for x in (p.u, p.v, p.origin))
    lu, lv = np.linalg.norm(u), np.linalg.norm(v)
    nu, nv = max(1, int(round(lu / h))), max(1, int(round(lv / h)))
    s, t = np.meshgrid(np.linspace(0, 1, nu + 1), np.linspace(0, 1, nv + 1), indexing="ij")
    verts = o + s.reshape(-1, 1) * u + t.reshape(-1, 1) * v
    if p.wave is not None:
        amp, period, phase = p.wave
        normal = np.cross(u, v) / (lu * lv)
        verts = verts + amp * np.sin(2 * np.pi * s.reshape(-1, 1) * lu / period + phase) * normal
    faces = _grid_faces(nu, nv)
    if p.holes:
        cs = (faces // (nv + 1)).mean(1) / nu * lu  # face centre along u, metres
        ct = (faces % (nv + 1)).mean(1) / nv * lv
        keep = np.ones(len(faces), bool)
        for s0, s1, t0, t1 in p.holes:
            keep &= ~((cs > s0) & (cs < s1) & (ct > t0) & (ct < t1))
        faces = faces[keep]
    return verts, faces


def tessellate(p, h: float) -> tuple[np.ndarray, np.ndarray]:
    """Triangle mesh of a primitive with edges of about h metres.

    Returns:
      (f64[n, 3] vertices, i64[m, 3] faces) in the primitive's frame.
    """
    if h <= 0:
        raise ValueError(f"tessellate: spacing must be > 0, got {h}")
    fn = {Box: _box, Cylinder: _cylinder, Sheet: _sheet}.get(type(p))
    if fn is None:
        raise TypeError(f"tessellate: unknown primitive {type(p).__name__}")
    return fn(p, h)


# ---------------------------------------------------------------------------------------
# Objects
@dataclasses.dataclass
class Obj:
    """One object: primitives with colours in its local frame and a pose in its group.

    pose: (yaw, tx, ty, tz) local -> parent frame. occluders: boxes in the local frame;
    room-structure vertices inside them are removed (the floor under a cabinet, the wall
    behind it), as a scanner never sees them.
    """
    raw: str
    parts: list  # [(primitive, rgb float[3])] or [(primitive, rgb, part pose)]
    pose: tuple = (0.0, 0.0, 0.0, 0.0)
    occluders: list = dataclasses.field(default_factory=list)
    annotated: bool = True


def bounds(p) -> tuple[np.ndarray, np.ndarray]:
    """(lo f64[3], hi f64[3]): axis-aligned bounds of a primitive in its own frame."""
    if isinstance(p, Box):
        return np.asarray(p.lo, float), np.asarray(p.hi, float)
    if isinstance(p, Cylinder):
        return np.array([p.x - p.r, p.y - p.r, p.z0]), np.array([p.x + p.r, p.y + p.r, p.z1])
    o, u, v = (np.asarray(x, float) for x in (p.origin, p.u, p.v))
    corners = np.stack([o, o + u, o + v, o + u + v])
    pad = abs(p.wave[0]) if p.wave else 0.0
    return corners.min(0) - pad, corners.max(0) + pad


# ---------------------------------------------------------------------------------------
# Appearance: materials and, per kind of surface, a distribution over materials
#
# material -> (swatches: base sRGB colours, brightness spread s: the object's base colour is
# scaled by a factor in [1 - s, 1 + s], tint sd: per-channel Gaussian shift of the object).
MATERIALS: dict[str, tuple[tuple[tuple[int, int, int], ...], float, float]] = {
    "light wood": (((205, 175, 135), (195, 160, 115), (215, 190, 150), (185, 150, 105)),
                   .12, 7),
    "mid wood": (((150, 111, 60), (160, 120, 80), (135, 95, 60), (170, 125, 75)), .12, 7),
    "dark wood": (((95, 65, 45), (80, 55, 40), (110, 75, 50), (65, 45, 35)), .15, 6),
    "white paint": (((232, 232, 226), (220, 220, 214), (238, 234, 222)), .06, 5),
    "off-white": (((225, 215, 190), (215, 205, 185), (230, 222, 200)), .06, 6),
    "ceramic": (((238, 238, 235), (228, 230, 230), (242, 240, 232)), .04, 3),
    "grey": (((150, 150, 152), (120, 120, 122), (175, 175, 175)), .1, 5),
    "black": (((35, 35, 38), (50, 46, 45), (28, 28, 30)), .15, 4),
    "steel": (((180, 182, 186), (160, 162, 166), (200, 202, 205)), .08, 4),
    "grey fabric": (((110, 110, 112), (85, 85, 90), (140, 138, 135)), .12, 6),
    "beige fabric": (((185, 165, 135), (170, 150, 120), (200, 185, 160)), .1, 7),
    "blue fabric": (((60, 75, 125), (45, 60, 100), (90, 110, 150)), .12, 8),
    "red fabric": (((135, 45, 45), (110, 35, 40), (160, 70, 60)), .12, 8),
    "green fabric": (((60, 100, 70), (85, 115, 80), (70, 90, 60)), .12, 8),
    "leather": (((75, 50, 35), (45, 35, 30), (110, 75, 50)), .15, 6),
    "bedding": (((238, 236, 230), (225, 220, 205), (200, 210, 228), (210, 210, 212),
                 (235, 220, 205)), .05, 5),
    "stone": (((120, 115, 110), (70, 70, 72), (200, 190, 172), (165, 160, 152)), .1, 6),
    "glass": (((170, 200, 238), (155, 185, 230), (185, 210, 242), (145, 175, 220)), .1, 8),
    "cardboard": (((175, 135, 90), (190, 155, 110), (160, 125, 85)), .1, 6),
    "colourful": (((200, 60, 50), (60, 120, 200), (230, 200, 60), (90, 170, 90),
                   (240, 240, 240), (180, 90, 160), (240, 140, 60), (40, 40, 60)), .15, 12),
    "plastic": (((60, 110, 190), (60, 150, 80), (200, 50, 50), (230, 200, 60)), .1, 8),
    "carpet": (((115, 110, 105), (85, 95, 120), (150, 135, 115), (90, 70, 65)), .12, 6),
    "tile": (((205, 205, 198), (175, 175, 170), (215, 205, 190)), .06, 5),
    "wall paint": (((236, 234, 228), (225, 225, 220), (230, 220, 200), (210, 220, 225),
                    (220, 228, 212)), .04, 4),
}

# kind of surface -> ((material, weight), ...). A kind is an object class or one part of
# it ("door frame", "office chair base"). Kinds share materials (wood tables, desks,
# chairs and doors; white toilets, sinks, tubs and fridges), so colour is a cue, never a
# label.
APPEARANCE: dict[str, tuple[tuple[str, float], ...]] = {
    # structure
    "wall": (("wall paint", 1.0),),
    "floor wood": (("light wood", .4), ("mid wood", .45), ("dark wood", .15)),
    "floor carpet": (("carpet", 1.0),),
    "floor tile": (("tile", .7), ("grey", .3)),
    # seating
    "chair": (("mid wood", .35), ("dark wood", .25), ("black", .2), ("white paint", .05),
              ("plastic", .05), ("red fabric", .05), ("grey fabric", .05)),
    "office chair": (("black", .65), ("grey fabric", .15), ("blue fabric", .1),
                     ("leather", .1)),
    "office chair base": (("black", .6), ("steel", .4)),
    "couch": (("grey fabric", .3), ("blue fabric", .25), ("beige fabric", .15),
              ("leather", .1), ("green fabric", .1), ("red fabric", .1)),
    "cushion": (("colourful", .4), ("beige fabric", .2), ("grey fabric", .2),
                ("bedding", .2)),
    "ottoman": (("leather", .3), ("grey fabric", .25), ("beige fabric", .25),
                ("blue fabric", .1), ("red fabric", .1)),
    # tables and storage
    "table": (("mid wood", .4), ("light wood", .25), ("white paint", .2), ("black", .15)),
    "coffee table": (("dark wood", .35), ("mid wood", .3), ("black", .2), ("light wood", .1),
                     ("white paint", .05)),
    "desk": (("light wood", .35), ("grey", .3), ("white paint", .2), ("black", .15)),
    "cabinet wood": (("light wood", .75), ("mid wood", .15), ("dark wood", .1)),
    "cabinet painted": (("white paint", .75), ("grey", .15), ("black", .1)),
    "handle": (("steel", .7), ("black", .3)),
    "bookshelf": (("dark wood", .65), ("mid wood", .15), ("white paint", .1),
                  ("black", .1)),
    "books": (("colourful", 1.0),),
    "nightstand": (("mid wood", .35), ("dark wood", .3), ("light wood", .2),
                   ("white paint", .15)),
    "tv stand": (("dark wood", .35), ("black", .3), ("mid wood", .2), ("white paint", .15)),
    "counter": (("stone", .6), ("white paint", .2), ("light wood", .1), ("black", .1)),
    "box": (("cardboard", .8), ("white paint", .1), ("plastic", .1)),
    # bedroom
    "bed frame": (("mid wood", .3), ("dark wood", .3), ("light wood", .15),
                  ("grey fabric", .15), ("white paint", .1)),
    "bedding": (("bedding", .85), ("beige fabric", .1), ("blue fabric", .05)),
    "pillow": (("bedding", .85), ("colourful", .15)),
    # bathroom and kitchen
    "toilet": (("ceramic", .95), ("off-white", .05)),
    "sink": (("ceramic", .7), ("steel", .3)),
    "bathtub": (("ceramic", .85), ("off-white", .15)),
    "shower curtain": (("white paint", .55), ("bedding", .2), ("colourful", .25)),
    "refrigerator": (("steel", .6), ("white paint", .3), ("black", .1)),
    "microwave": (("black", .5), ("steel", .3), ("white paint", .2)),
    "towel": (("white paint", .35), ("blue fabric", .2), ("beige fabric", .2),
              ("red fabric", .1), ("green fabric", .15)),
    "mirror": (("glass", .5), ("steel", .5)),
    # openings and walls
    "door": (("mid wood", .65), ("white paint", .15), ("dark wood", .1), ("light wood", .1)),
    "door frame": (("mid wood", .45), ("white paint", .4), ("dark wood", .15)),
    "window frame": (("white paint", .65), ("steel", .2), ("black", .05), ("mid wood", .1)),
    "window glass": (("glass", .9), ("grey", .1)),
    "curtain": (("off-white", .35), ("beige fabric", .3), ("grey fabric", .1),
                ("blue fabric", .1), ("red fabric", .08), ("green fabric", .07)),
    "picture": (("colourful", .8), ("black", .1), ("mid wood", .1)),
    "whiteboard": (("white paint", 1.0),),
    # electronics, lamps, bins, bags
    "tv": (("black", 1.0),),
    "monitor": (("black", 1.0),),
    "lamp": (("steel", .4), ("black", .4), ("light wood", .2)),
    "lamp shade": (("off-white", .7), ("white paint", .3)),
    "trash can": (("black", .4), ("grey", .25), ("steel", .15), ("plastic", .1),
                  ("white paint", .1)),
    "backpack": (("black", .35), ("blue fabric", .2), ("plastic", .15), ("red fabric", .15),
                 ("grey fabric", .15)),
}


def color(rng: np.random.Generator, kind: str) -> np.ndarray:
    """A per-object base colour f64[3] for a kind of surface (an `APPEARANCE` key).

    Draws a material by the kind's weights, a swatch of it, a brightness factor and a
    per-channel tint. Whatever the kind it takes the same draws (one integer, one uniform,
    three normals), so the colour model never shifts the geometry drawn after it from the
    same stream.
    """
    key = int(rng.integers(1 << 16))  # swatch
    u = float(rng.random())  # material, then brightness within it
    z = rng.standard_normal(3)  # tint
    names, weights = zip(*APPEARANCE[kind], strict=True)
    edges = np.cumsum(weights) / np.sum(weights)
    m = min(int(np.searchsorted(edges, u, side="right")), len(names) - 1)
    lo = edges[m - 1] if m else 0.0
    within = (u - lo) / (edges[m] - lo)  # uniform in [0, 1) given the material
    swatches, spread, tint = MATERIALS[names[m]]
    base = np.asarray(swatches[key % len(swatches)], float)
    return np.clip(base * (1 + spread * (2 * within - 1)) + tint * z, 0, 255)


def U(rng, lo, hi) -> float:
    return float(rng.uniform(lo, hi))


def chair(rng, office: bool = False) -> Obj:
    w, d, sh = U(rng, .42, .52), U(rng, .42, .5), U(rng, .42, .48)
    st, bh, bt, lg = U(rng, .04, .07), U(rng, .35, .5), U(rng, .03, .06), U(rng, .025, .04)
    c = color(rng, "office chair" if office else "chair")
    cl = color(rng, "office chair base")
    parts = [(Box((-w / 2, 0, sh - st), (w / 2, d, sh)), c),
             (Box((-w / 2, 0, sh), (w / 2, bt, sh + bh), "-z"), c)]
    if office:
        parts += [(Cylinder(0, d / 2, .08, sh - st, .03, top=False), cl),
                  (Cylinder(0, d / 2, .02, .08, U(rng, .25, .3)), cl)]
    else:
        for x in (-w / 2, w / 2 - lg):
            for y in (0, d - lg):
                parts.append((Box((x, y, 0), (x + lg, y + lg, sh - st), "-z+z"), c))
    return Obj("office chair" if office else "chair", parts)


def table(rng, kind: str = "table", w=None, d=None) -> Obj:
    w = w or U(rng, .8, 1.8)
    d = d or U(rng, .7, 1.0)
    ht = U(rng, .4, .46) if kind == "coffee table" else U(rng, .72, .76)
    tt, lg, c = U(rng, .03, .05), U(rng, .04, .07), color(rng, kind)
    parts = [(Box((-w / 2, 0, ht - tt), (w / 2, d, ht)), c)]
    for x in (-w / 2 + .03, w / 2 - .03 - lg):
        for y in (.03, d - .03 - lg):
            parts.append((Box((x, y, 0), (x + lg, y + lg, ht - tt), "-z+z"), c))
    return Obj(kind, parts)


def desk(rng) -> Obj:
    w, d, ht, c = U(rng, 1.1, 1.6), U(rng, .6, .8), U(rng, .72, .76), color(rng, "desk")
    parts = [(Box((-w / 2, 0, ht - .03), (w / 2, d, ht)), c),
             (Box((-w / 2, 0, 0), (-w / 2 + .03, d, ht - .03), "-z+z"), c),
             (Box((w / 2 - .03, 0, 0), (w / 2, d, ht - .03), "-z+z"), c),
             (Box((-w / 2 + .03, .02, .35), (w / 2 - .03, .04, ht - .03), "+z"), c)]
    if rng.random() < .5:  # drawer block
        parts.append((Box((w / 2 - .45, .05, 0), (w / 2 - .03, d - .02, ht - .03), "-z+z"), c))
    return Obj("desk", parts, occluders=[Box((-w / 2 + .05, -.3, -.1), (w / 2 - .05, .05, .3))])


def box_obj(rng, raw: str, w, d, hgt, kind=None, z0=0.0, skip="-z") -> Obj:
    """A closed box object (cabinet, fridge, ottoman, ...), back at y = 0, coloured as
    `kind` (an APPEARANCE key; default: raw)."""
    parts = [(Box((-w / 2, 0, z0), (w / 2, d, z0 + hgt), skip), color(rng, kind or raw))]
    occ = [Box((-w / 2 + .03, .03, -.1), (w / 2 - .03, d - .03, .05))] if z0 == 0 else []
    return Obj(raw, parts, occluders=occ)


def against_wall(o: Obj, h: float) -> Obj:
    """Open the back face of a wall-standing object and hide the wall behind it."""
    p, c = o.parts[0]
    if isinstance(p, Box):
        o.parts[0] = (dataclasses.replace(p, skip=p.skip + "-y"), c)
        o.occluders.append(Box((p.lo[0] + .04, -.3, p.lo[2]), (p.hi[0] - .04, .05, h - .04)))
    return o


def cabinet(rng, raw="cabinet", w=None, d=None, hgt=None) -> Obj:
    w, d = w or U(rng, .4, 1.2), d or U(rng, .35, .6)
    hgt = hgt or float(rng.choice([U(rng, .6, 1.0), U(rng, 1.6, 2.0)]))
    kind = "cabinet wood" if rng.random() < .7 else "cabinet painted"
    o = against_wall(box_obj(rng, raw, w, d, hgt, kind), hgt)
    if hgt > 1.8 and rng.random() < .5:  # the top of a tall cabinet is never scanned
        o.parts[0] = (dataclasses.replace(o.parts[0][0], skip=o.parts[0][0].skip + "+z"),
                      o.parts[0][1])
    hx = U(rng, -w / 2 + .05, w / 2 - .08)
    o.parts.append((Box((hx, d, hgt * .5), (hx + .02, d + .025, hgt * .5 + .12), "-y"),
                    color(rng, "handle")))
    return o


def bookshelf(rng) -> list[Obj]:
    """A bookshelf and one "books" object per filled shelf (books touch the shelf)."""
    w, d, hgt, t = U(rng, .6, 1.2), U(rng, .28, .4), U(rng, 1.0, 2.1), .02
    c, ns = color(rng, "bookshelf"), int(rng.integers(2, 6))
    parts = [(Box((-w / 2, 0, 0), (-w / 2 + t, d, hgt), "-z"), c),
             (Box((w / 2 - t, 0, 0), (w / 2, d, hgt), "-z"), c),
             (Box((-w / 2 + t, 0, hgt - t), (w / 2 - t, d, hgt)), c),
             (Box((-w / 2 + t, 0, t), (w / 2 - t, t, hgt - t), "-y"), c)]
    levels = np.linspace(t, hgt - t, ns + 1)[:-1]
    objs = []
    for z in levels:
        parts.append((Box((-w / 2 + t, t, z - t), (w / 2 - t, d, z), "-z"), c))
        if rng.random() < .7:
            gap = (hgt - t) / ns - t
            x, bparts = -w / 2 + t + U(rng, 0, .1), []
            while x < w / 2 - t - .05 and len(bparts) < 30:
                bw = U(rng, .02, .05)
                bparts.append((Box((x, t + .01, z), (x + bw, t + U(rng, .15, d - t),
                                                     z + min(gap - .02, U(rng, .15, .3))), "-z"),
                               color(rng, "books")))
                x += bw
            objs.append(Obj("books", bparts))
    occ = [Box((-w / 2 + .04, -.3, -.1), (w / 2 - .04, .05, hgt - .04))]
    return [Obj("bookshelf", parts, occluders=occ)] + objs


def bed(rng) -> list[Obj]:
    w, length = float(rng.choice([U(rng, .9, 1.0), U(rng, 1.4, 1.8)])), U(rng, 1.9, 2.1)
    hb, hh = U(rng, .45, .6), U(rng, .9, 1.2)
    frame, bedding = color(rng, "bed frame"), color(rng, "bedding")
    parts = [(Box((-w / 2, .06, 0), (w / 2, length, hb), "-z"), bedding),
             (Box((-w / 2, 0, 0), (w / 2, .06, hh), "-z-y"), frame)]
    occ = [Box((-w / 2 + .04, .08, -.1), (w / 2 - .04, length - .04, .05)),
           Box((-w / 2 + .04, -.3, 0), (w / 2 - .04, .05, hh - .04))]
    objs = [Obj("bed", parts, occluders=occ)]
    n = 1 if w < 1.2 else 2
    for k in range(n):
        pw = min(U(rng, .5, .65), w / n - .04)
        x = -w / 2 + (k + .5) * w / n
        objs.append(Obj("pillow", [(Box((x - pw / 2, .1, hb), (x + pw / 2, .1 + U(rng, .3, .4),
                                                                hb + U(rng, .1, .16)), "-z"),
                                    color(rng, "pillow"))]))
    return objs


def sofa(rng) -> Obj:
    w, d, sh, bh = U(rng, 1.5, 2.4), U(rng, .8, .95), U(rng, .4, .46), U(rng, .75, .9)
    bt, at, ah, c = U(rng, .15, .25), U(rng, .12, .22), U(rng, .55, .65), color(rng, "couch")
    parts = [(Box((-w / 2 + at, bt, 0), (w / 2 - at, d, sh), "-z"), c),
             (Box((-w / 2, 0, 0), (w / 2, bt, bh), "-z-y"), c),
             (Box((-w / 2, bt, 0), (-w / 2 + at, d, ah), "-z"), c),
             (Box((w / 2 - at, bt, 0), (w / 2, d, ah), "-z"), c)]
    occ = [Box((-w / 2 + .04, .04, -.1), (w / 2 - .04, d - .04, .05)),
           Box((-w / 2 + .04, -.3, 0), (w / 2 - .04, .05, bh - .04))]
    return Obj("couch", parts, occluders=occ)


def toilet(rng) -> Obj:
    c = color(rng, "toilet")
    bw, tw = U(rng, .2, .26), U(rng, .4, .5)
    return Obj("toilet", [(Box((-tw / 2, 0, .3), (tw / 2, .2, .75), "-y"), c),
                          (Box((-bw / 2, .15, 0), (bw / 2, .55, .3), "-z"), c),
                          (Cylinder(0, .45, .3, .42, U(rng, .17, .2)), c)],
               occluders=[Box((-bw / 2 + .02, .17, -.1), (bw / 2 - .02, .53, .05))])


def basin(rng, w, d, z0, depth=.15, raw="sink") -> Obj:
    """A hollow basin (bottom slab + 4 rims) whose base sits at z0; back at y = 0."""
    t, c = .03, color(rng, "sink")
    z1 = z0 + depth
    return Obj(raw, [(Box((-w / 2, 0, z0), (w / 2, d, z0 + t), "-z"), c),
                     (Box((-w / 2, 0, z0 + t), (-w / 2 + t, d, z1), "-z"), c),
                     (Box((w / 2 - t, 0, z0 + t), (w / 2, d, z1), "-z"), c),
                     (Box((-w / 2 + t, 0, z0 + t), (w / 2 - t, t, z1), "-z"), c),
                     (Box((-w / 2 + t, d - t, z0 + t), (w / 2 - t, d, z1), "-z"), c)])


def pedestal_sink(rng) -> Obj:
    w, d = U(rng, .45, .6), U(rng, .38, .48)
    o = basin(rng, w, d, .72)
    o.parts.append((Cylinder(0, d / 2, 0, .72, U(rng, .06, .09), top=False), o.parts[0][1]))
    return o


def bathtub(rng) -> list[Obj]:
    """A bathtub (floor slab + 4 walls) and, often, a shower curtain along its front."""
    w, d, hgt = U(rng, 1.5, 1.8), U(rng, .7, .8), U(rng, .5, .6)
    t, c = .08, color(rng, "bathtub")
    o = Obj("bathtub", [(Box((-w / 2, 0, 0), (w / 2, d, .1), "-z"), c),
                        (Box((-w / 2, 0, .1), (-w / 2 + t, d, hgt), "-z"), c),
                        (Box((w / 2 - t, 0, .1), (w / 2, d, hgt), "-z"), c),
                        (Box((-w / 2 + t, 0, .1), (w / 2 - t, t, hgt), "-z-y"), c),
                        (Box((-w / 2 + t, d - t, .1), (w / 2 - t, d, hgt), "-z"), c)])
    o.occluders = [Box((-w / 2 + .04, .04, -.1), (w / 2 - .04, d - .04, .05)),
                   Box((-w / 2 + .04, -.3, 0), (w / 2 - .04, .05, hgt - .04))]
    objs = [o]
    if rng.random() < .7:
        cw = w * U(rng, .3, 1.0)
        x0 = -w / 2 if rng.random() < .5 else w / 2 - cw
        objs.append(Obj("shower curtain", [(Sheet((x0 + cw, d - .03, hgt + .1), (-cw, 0, 0),
                                                  (0, 0, U(rng, 1.3, 1.5)),
                                                  wave=(.03, U(rng, .15, .25), U(rng, 0, 6))),
                                            color(rng, "shower curtain"))]))
    return objs


def lamp(rng, z0=0.0, floor=True) -> Obj:
    hp = U(rng, 1.3, 1.7) if floor else U(rng, .25, .45)
    rs, hs, c = U(rng, .12, .22), U(rng, .18, .3), color(rng, "lamp")
    # the pole runs up to the shade's closed top, so the lamp is one connected piece
    return Obj("lamp", [(Cylinder(0, 0, z0, z0 + .03, U(rng, .1, .15)), c),
                        (Cylinder(0, 0, z0 + .03, z0 + hp + hs, .015, top=False), c),
                        (Cylinder(0, 0, z0 + hp, z0 + hp + hs, rs), color(rng, "lamp shade"))])


def trash_can(rng) -> Obj:
    return Obj("trash can", [(Cylinder(0, 0, 0, U(rng, .3, .6), U(rng, .12, .2), top=False),
                              color(rng, "trash can"))])


def slab(rng, raw, w, hgt, t, z0, kind=None, y0=0.0) -> Obj:
    """A thin upright board (picture, whiteboard, mirror, tv), back at y = y0, coloured as
    `kind` (an APPEARANCE key; default: raw)."""
    return Obj(raw, [(Box((-w / 2, y0, z0), (w / 2, y0 + t, z0 + hgt), "-y"),
                      color(rng, kind or raw))])


def monitor(rng, z0) -> Obj:
    w, c = U(rng, .45, .65), color(rng, "monitor")
    hgt = w * U(rng, .55, .65)
    return Obj("monitor", [(Box((-.1, 0, z0), (.1, .18, z0 + .02), "-z"), c),
                           (Box((-.025, .05, z0 + .02), (.025, .08, z0 + .12), "-z"), c),
                           (Box((-w / 2, .08, z0 + .1), (w / 2, .11, z0 + .1 + hgt)), c)])
