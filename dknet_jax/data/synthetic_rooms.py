"""Room layouts for the synthetic scenes: walls, doors, windows and furniture placement.

Place in the data flow: synthetic_objects (primitives, furniture) -> **synthetic_rooms**
(which objects go where) -> synthetic (tessellation, occlusion holes, noise, raw files).

`layout_room(rng, style)` draws a room type and shape (rectangular or L-shaped, about
3 x 3 m to 8 x 6 m, 2.5-3 m high), cuts doors and windows into the walls and places
furniture groups against walls or free-standing. Collisions are tested on oriented 2D
footprints with height ranges, so objects may touch (chairs at a table, books on a
shelf, kitchen cabinets in a row) but never intersect; doors keep a free passage and
windows keep tall furniture away. Sets of like objects (the chairs round a table, a row of
kitchen cabinets, a pair of nightstands) share one finish, as real sets do.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dknet_jax.data import synthetic_objects as so
from dknet_jax.data.synthetic_objects import Box, Obj, Sheet, U


def compose(outer: tuple, inner: tuple) -> tuple:
    """Pose (yaw, tx, ty, tz) of `inner` (given in the frame of `outer`) in outer's parent."""
    c, s = np.cos(outer[0]), np.sin(outer[0])
    return (outer[0] + inner[0], outer[1] + c * inner[1] - s * inner[2],
            outer[2] + s * inner[1] + c * inner[2], outer[3] + inner[3])


def _corners(pose: tuple, x0, x1, y0, y1) -> np.ndarray:
    """f64[4, 2] world corners of a local rectangle under a pose."""
    c, s = np.cos(pose[0]), np.sin(pose[0])
    local = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
    return local @ np.array([[c, s], [-s, c]]) + np.array(pose[1:3])


def _overlap(a: np.ndarray, b: np.ndarray, eps: float = 2e-3) -> bool:
    """Separating-axis test of two convex quads f64[4, 2]; touching is not overlap."""
    for q in (a, b):
        for k in range(2):
            e = q[k + 1] - q[k]
            n = np.array([-e[1], e[0]]) / (np.linalg.norm(e) + 1e-12)
            pa, pb = a @ n, b @ n
            if pa.max() <= pb.min() + eps or pb.max() <= pa.min() + eps:
                return False
    return True


def group_bounds(objs: list[Obj]) -> tuple[np.ndarray, np.ndarray]:
    """(lo f64[3], hi f64[3]) of a group of objects in the group frame."""
    pts = []
    for o in objs:
        for part in o.parts:
            lo, hi = so.bounds(part[0])
            pose = compose(o.pose, part[2]) if len(part) > 2 else o.pose
            box = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1])
                            for z in (lo[2], hi[2])])
            c, s = np.cos(pose[0]), np.sin(pose[0])
            rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
            pts.append(box @ rot.T + np.array(pose[1:]))
    pts = np.concatenate(pts)
    return pts.min(0), pts.max(0)


@dataclasses.dataclass
class Wall:
    p0: np.ndarray  # f64[2] start (the room polygon runs counter-clockwise)
    p1: np.ndarray
    holes: list = dataclasses.field(default_factory=list)  # (s0, s1, z0, z1) from p0

    @property
    def length(self) -> float:
        return float(np.linalg.norm(self.p1 - self.p0))

    def pose(self, s: float, gap: float = 0.0) -> tuple:
        """Frame at distance s along the wall, local +y pointing into the room."""
        e = (self.p1 - self.p0) / self.length
        p = self.p0 + s * e + gap * np.array([-e[1], e[0]])
        return (float(np.arctan2(e[1], e[0])), float(p[0]), float(p[1]), 0.0)


class Layout:
    """A room being furnished: geometry, placed objects and the footprint registry."""

    def __init__(self, rng: np.random.Generator, w: float, d: float, height: float,
                 lshape: bool):
        self.rng, self.w, self.d, self.h = rng, w, d, height
        if lshape:
            a, b = w * U(rng, .3, .5), d * U(rng, .3, .5)
            pts = [(0, 0), (w, 0), (w, d - b), (w - a, d - b), (w - a, d), (0, d)]
            self.rects = [(0, 0, w, d - b), (0, 0, w - a, d)]
            self.notch, self.reflex = (w - a, w, d - b, d), np.array([w - a, d - b])
        else:
            pts = [(0, 0), (w, 0), (w, d), (0, d)]
            self.rects, self.notch, self.reflex = [(0, 0, w, d)], None, None
        pts = np.asarray(pts, float)
        self.walls = [Wall(pts[i], pts[(i + 1) % len(pts)]) for i in range(len(pts))]
        self.objects: list[Obj] = []
        self.registry: list[tuple] = []  # (corners f64[4,2], z0, z1, tag)

    # --- geometry tests ---------------------------------------------------------------
    def _inside(self, q: np.ndarray) -> bool:
        ok = all(any(x0 - 1e-6 <= x <= x1 + 1e-6 and y0 - 1e-6 <= y <= y1 + 1e-6
                     for x0, y0, x1, y1 in self.rects) for x, y in q)
        if ok and self.reflex is not None:  # a convex quad inside the L avoids the notch
            ok = not _overlap(q, np.array([self.reflex + [-1e-3, -1e-3],
                                           self.reflex + [1e-3, -1e-3],
                                           self.reflex + [1e-3, 1e-3],
                                           self.reflex + [-1e-3, 1e-3]]), eps=0.0)
        return ok

    def free(self, q: np.ndarray, z0: float, z1: float, ignore=()) -> bool:
        """Whether footprint q f64[4, 2] over heights [z0, z1] is inside and unoccupied."""
        if not self._inside(q):
            return False
        return not any(z0 < b1 and b0 < z1 and (t is None or t not in ignore)
                       and _overlap(q, c) for c, b0, b1, t in self.registry)

    # --- placement --------------------------------------------------------------------
    def _try(self, objs: list[Obj], poses, ignore=(), tag=None) -> bool:
        lo, hi = group_bounds(objs)
        for pose in poses:
            q = _corners(pose, lo[0], hi[0], lo[1], hi[1])
            if self.free(q, lo[2], hi[2], ignore):
                self.registry.append((q, lo[2], hi[2], tag))
                for o in objs:
                    o.pose = compose(pose, o.pose)
                self.objects += objs
                return True
        return False

    def against_wall(self, objs: list[Obj], tries: int = 40, corner: bool = False,
                     gap=(0.0, 0.03)) -> bool:
        """Place a group with its back (local y = 0) against a random wall."""
        lo, hi = group_bounds(objs)
        rng = self.rng

        def poses():
            for _ in range(tries):
                wall = self.walls[rng.integers(len(self.walls))]
                smin, smax = -lo[0], wall.length - hi[0]
                if smax < smin:
                    continue
                s = float(rng.choice([smin, smax])) if corner else U(rng, smin, smax)
                yield wall.pose(s, U(rng, *gap) - lo[1])
        return self._try(objs, poses())

    def free_standing(self, objs: list[Obj], tries: int = 60) -> bool:
        """Place a group anywhere, turned by a multiple of 90 degrees (+ a little)."""
        rng = self.rng

        def poses():
            for _ in range(tries):
                yaw = rng.integers(4) * np.pi / 2 + (rng.normal(0, .1) if rng.random() < .3
                                                     else 0.0)
                yield (float(yaw), U(rng, 0, self.w), U(rng, 0, self.d), 0.0)
        return self._try(objs, poses())

    # --- doors and windows ------------------------------------------------------------
    def door(self) -> bool:
        rng = self.rng
        w, hd = U(rng, .8, .95), U(rng, 2.0, min(2.15, self.h - .2))
        for _ in range(20):
            wall = self.walls[rng.integers(len(self.walls))]
            if wall.length < w + .4:
                continue
            s = U(rng, w / 2 + .15, wall.length - w / 2 - .15)
            pose = wall.pose(s)
            q = _corners(pose, -w / 2 - .05, w / 2 + .05, 0, w + .1)
            if not self.free(q, 0, hd):
                continue
            self.registry.append((q, 0, hd, "door"))
            wall.holes.append((s - w / 2, s + w / 2, -1.0, hd))
            leaf, frame = so.color(rng, "door"), so.color(rng, "door frame")
            parts = [(Box((-w / 2 - .06, 0, 0), (-w / 2, .015, hd + .06), "-z-y"), frame),
                     (Box((w / 2, 0, 0), (w / 2 + .06, .015, hd + .06), "-z-y"), frame),
                     (Box((-w / 2, 0, hd), (w / 2, .015, hd + .06), "-y"), frame)]
            if rng.random() < .3:  # open into the room, hinged at the left jamb
                parts.append((Box((0, 0, .01), (w - .01, .04, hd - .01)), leaf,
                              (U(rng, .5, 1.5), -w / 2, .02, 0.0)))
            else:
                parts.append((Box((-w / 2, -.05, .01), (w / 2, -.01, hd - .01), "-y"), leaf))
            self.objects.append(Obj("door", parts, pose=pose,
                                    occluders=[Box((-w / 2 - .07, -.1, -.1),
                                                   (w / 2 + .07, .03, hd + .07))]))
            return True
        return False

    def window(self, curtains: bool) -> bool:
        rng = self.rng
        w, sill = U(rng, .6, 1.6), U(rng, .7, 1.0)
        top = min(sill + U(rng, 1.0, 1.5), self.h - .2)
        for _ in range(20):
            wall = self.walls[rng.integers(len(self.walls))]
            if wall.length < w + .5:
                continue
            s = U(rng, w / 2 + .2, wall.length - w / 2 - .2)
            pose = wall.pose(s)
            q = _corners(pose, -w / 2 - .1, w / 2 + .1, 0, .3)
            if not self.free(q, sill - .05, top + .05):
                continue
            tag = f"window{len(self.registry)}"
            self.registry.append((q, sill - .05, top + .05, tag))
            wall.holes.append((s - w / 2, s + w / 2, sill, top))
            frame, sd = so.color(rng, "window frame"), U(rng, .03, .12)
            parts = [(Box((-w / 2, -.15, sill), (-w / 2 + .05, 0, top)), frame),
                     (Box((w / 2 - .05, -.15, sill), (w / 2, 0, top)), frame),
                     (Box((-w / 2 + .05, -.15, top - .05), (w / 2 - .05, 0, top)), frame),
                     (Box((-w / 2 + .05, -.1, sill + .05), (w / 2 - .05, -.09, top - .05)),
                      so.color(rng, "window glass")),
                     (Box((-w / 2 - .05, -.15, sill - .03), (w / 2 + .05, sd, sill)), frame)]
            occ = [Box((-w / 2 - .06, -.3, sill - .04), (w / 2 + .06, sd + .01, sill + .01))]
            self.objects.append(Obj("window", parts, pose=pose, occluders=occ))
            if curtains:
                self._curtains(wall, s, w, top, tag)
            return True
        return False

    def _curtains(self, wall: Wall, s: float, w: float, top: float, tag: str):
        rng = self.rng
        ztop = min(top + U(rng, .05, .2), self.h - .03)
        z0 = float(rng.choice([U(rng, .02, .1), U(rng, .5, .8)]))
        for side in ((-1, 1) if rng.random() < .6 else (int(rng.choice([-1, 1])),)):
            cw = U(rng, .35, .8)
            x1 = side * (w / 2 + U(rng, 0, .15))
            x0 = x1 - side * cw
            xa, xb = min(x0, x1), max(x0, x1)
            y = U(rng, .07, .12)
            sheet = Sheet((xb, y, z0), (xa - xb, 0, 0), (0, 0, ztop - z0),
                          wave=(U(rng, .02, .05), U(rng, .12, .25), U(rng, 0, 6)))
            obj = Obj("curtain", [(sheet, so.color(rng, "curtain"))])
            self._try([obj], [wall.pose(s)], ignore=(tag,))


def _wall_item(lay: Layout, raw: str, z=(1.2, 1.9), w=(.3, 1.0),
               hgt=(.3, .8), t=(.02, .04)) -> bool:
    rng = lay.rng
    ww, hh = U(rng, *w), U(rng, *hgt)
    z0 = U(rng, z[0], max(z[0], min(z[1], lay.h - .1) - hh))
    obj = so.slab(rng, raw, ww, hh, U(rng, *t), z0)
    return lay.against_wall([obj], gap=(.003, .015))


# ---------------------------------------------------------------------------------------
# Furniture groups (objects in a common frame, back at y = 0)
def _at(o: Obj, yaw=0.0, x=0.0, y=0.0, z=0.0) -> Obj:
    o.pose = (yaw, x, y, z)
    return o


def _matching(objs: list[Obj]) -> None:
    """Give a set of like objects (the chairs round a table, a row of kitchen cabinets,
    a pair of nightstands) the colours of the first, part by part, as real sets match.
    Each object still drew its own colours, so the random stream is unchanged."""
    for o in objs[1:]:
        o.parts = [(p[0], ref[1], *p[2:]) for p, ref in zip(o.parts, objs[0].parts,
                                                              strict=True)]


def _chair_facing(rng, office: bool, x: float, y_edge: float, side: int,
                  offset: float) -> Obj:
    """A chair whose front edge is `offset` beyond the line y = y_edge (side=+1: a chair
    in front of that line looking back at it; side=-1: behind it looking forward)."""
    c = so.chair(rng, office)
    d = group_bounds([c])[1][1]
    if side > 0:
        return _at(c, np.pi, x, y_edge + offset + d)
    return _at(c, 0.0, x, y_edge - offset - d)


def g_table(rng, conference: bool = False) -> list[Obj]:
    """A table with chairs on its long sides (tucked in or pulled out) and maybe ends."""
    w = U(rng, 2.0, 3.6) if conference else U(rng, .8, 1.8)
    d = U(rng, 1.0, 1.4) if conference else U(rng, .7, 1.0)
    objs, office = [so.table(rng, w=w, d=d)], conference or rng.random() < .3
    per_side = 1 if w < 1.5 else (2 if w < 2.2 else 3)
    for side, y_edge in ((1, d), (-1, 0.0)):
        for k in range(per_side):
            if rng.random() < .8:
                x = (k + .5) * w / per_side - w / 2 + rng.normal(0, .02)
                objs.append(_chair_facing(rng, office, x, y_edge, side, U(rng, -.12, .1)))
    for sx in (-1, 1):
        if rng.random() < (.6 if conference else .25):
            c = so.chair(rng, office)
            cd = group_bounds([c])[1][1]
            off = U(rng, 0.0, .08)
            objs.append(_at(c, -sx * np.pi / 2, sx * (w / 2 + off + cd), d / 2))
    _matching(objs[1:])
    return objs


def g_desk(rng) -> list[Obj]:
    dk = so.desk(rng)
    lo, hi = group_bounds([dk])
    w, d, ht = hi[0] - lo[0], hi[1], hi[2]
    drawer = len(dk.parts) > 4
    objs = [dk]
    if rng.random() < .85:
        x = (-w / 2 + .03 + w / 2 - .45) / 2 if drawer else 0.0
        objs.append(_chair_facing(rng, True, x, d, 1, U(rng, -.05, .15)))
    if rng.random() < .7:
        objs.append(_at(so.monitor(rng, ht), 0, U(rng, -.1, .1) * w, .04))
    if rng.random() < .4:
        objs.append(_at(so.lamp(rng, ht, floor=False), 0, float(rng.choice([-1, 1]))
                        * (w / 2 - .16), d - .2))
    return objs


def g_bed(rng) -> list[Obj]:
    objs = so.bed(rng)
    w = group_bounds(objs[:1])[1][0] * 2
    for sx in (-1, 1):
        if rng.random() < .6:
            nw, nd, nh = U(rng, .4, .55), U(rng, .35, .45), U(rng, .45, .6)
            x = sx * (w / 2 + U(rng, 0, .03) + nw / 2)
            ns = so.against_wall(so.box_obj(rng, "nightstand", nw, nd, nh), nh)
            objs.append(_at(ns, 0, x, 0))
            if rng.random() < .5:
                objs.append(_at(so.lamp(rng, nh, floor=False), 0, x, nd / 2))
    _matching([o for o in objs if o.raw == "nightstand"])
    return objs


def g_sofa(rng) -> list[Obj]:
    sf = so.sofa(rng)
    lo, hi = group_bounds([sf])
    objs = [sf]
    if rng.random() < .5:  # cushions lean on the back
        for sx in (-1, 1):
            objs.append(Obj("pillow", [(Box((sx * (hi[0] - .6) - .2, .2, .45),
                                            (sx * (hi[0] - .6) + .2, .32, .8), "-z"),
                                        so.color(rng, "cushion"))]))
    if rng.random() < .6:
        objs.append(_at(so.table(rng, "coffee table", w=U(rng, .8, 1.3), d=U(rng, .5, .7)),
                        0, 0, hi[1] + U(rng, .3, .5)))
    return objs


def g_tv(rng) -> list[Obj]:
    w, d, h = U(rng, 1.0, 1.8), U(rng, .35, .5), U(rng, .4, .6)
    stand = so.against_wall(so.box_obj(rng, "tv stand", w, d, h), h)
    tw = min(w, U(rng, .9, 1.4))
    return [stand, so.slab(rng, "tv", tw, tw * .58, .05, h, y0=.08)]


def g_counter(rng) -> list[Obj]:
    """Kitchen cabinets in a row under a counter top, a sink and maybe a microwave."""
    length, ch, cd = U(rng, 1.2, 3.0), .86, U(rng, .55, .6)
    n = int(np.ceil(length / .6))
    cw = length / n
    objs = [_at(so.cabinet(rng, "kitchen cabinets", w=cw - .002, d=cd, hgt=ch), 0,
                -length / 2 + (k + .5) * cw) for k in range(n)]
    _matching(objs)
    top = Obj("kitchen counter" if rng.random() < .5 else "counter",
              [(Box((-length / 2 - .01, 0, ch), (length / 2 + .01, cd + .03, ch + .04), "-y"),
                so.color(rng, "counter"))],
              occluders=[Box((-length / 2 + .03, -.3, ch), (length / 2 - .03, .05, ch + .02))])
    objs.append(top)
    sw = U(rng, .5, .7)
    sx = U(rng, -length / 2 + sw / 2 + .05, length / 2 - sw / 2 - .05)
    objs.append(_at(so.basin(rng, sw, U(rng, .38, .45), ch + .04, .12), 0, sx, .08))
    if rng.random() < .5 and length > 1.6:
        mx = -np.sign(sx) * (length / 2 - .35) if sx else length / 2 - .35
        objs.append(_at(so.box_obj(rng, "microwave", .48, .36, .28, z0=ch + .04),
                        0, mx, .05))
    return objs


def g_sink(rng) -> list[Obj]:
    if rng.random() < .5:
        objs = [so.pedestal_sink(rng)]
        top = .87
    else:
        w, d = U(rng, .6, 1.0), U(rng, .45, .55)
        objs = [so.cabinet(rng, "cabinet", w=w, d=d, hgt=.78),
                so.basin(rng, w - .1, d - .1, .78, .12)]
        objs[1].pose = (0.0, 0.0, .03, 0.0)
        top = .9
    if rng.random() < .7:
        objs.append(so.slab(rng, "mirror", U(rng, .5, .8), U(rng, .6, .9), .02,
                            top + U(rng, .2, .35), y0=.005))
    return objs


def g_boxes(rng) -> list[Obj]:
    objs, z = [], 0.0
    for _ in range(int(rng.integers(1, 4))):
        w, d, h = U(rng, .25, .6), U(rng, .25, .5), U(rng, .2, .45)
        objs.append(_at(so.box_obj(rng, "box", w, d, h), 0, rng.normal(0, .03),
                        rng.normal(0, .03), z))
        objs[-1].occluders = objs[-1].occluders if z == 0 else []
        z += h
        if rng.random() < .5:
            break
    return objs


def g_column(rng, h: float) -> list[Obj]:
    w, d = U(rng, .3, .6), U(rng, .3, .6)
    return [Obj("column", [(Box((-w / 2, 0, 0), (w / 2, d, h), "-z+z-y"),
                            so.color(rng, "wall"))])]


def g_fridge(rng):
    h = U(rng, 1.6, 1.9)
    return [so.against_wall(so.box_obj(rng, "refrigerator", U(rng, .6, .8), U(rng, .65, .75),
                                       h), h)]


def g_backpack(rng):
    return [so.box_obj(rng, "backpack", U(rng, .28, .35), U(rng, .15, .22), U(rng, .35, .45))]


def g_ottoman(rng):
    return [so.box_obj(rng, "ottoman", U(rng, .4, .6), U(rng, .4, .6), U(rng, .35, .45))]


def g_toilet(rng):
    return [so.toilet(rng)]


def _bookshelf(rng):
    return so.bookshelf(rng)


def _cabinet(rng):
    return [so.cabinet(rng, str(rng.choice(["cabinet", "file cabinet"])))]


def _floor_lamp(rng):
    return [so.lamp(rng)]


def _trash(rng):
    return [so.trash_can(rng)]


def _chair(rng):
    return [so.chair(rng, rng.random() < .3)]


def _bathtub(rng):
    return so.bathtub(rng)


def _conference(rng):
    return g_table(rng, conference=True)


# room type -> (width range, depth range, windows, curtain prob, [(group, where, min, max)],
#               [(wall item, min, max)])
_WALL, _FREE, _ANY, _CORNER = "wall", "free", "any", "corner"
ROOMS = {
    "bedroom": ((3, 5), (3, 5), (1, 2), .7,
                [(g_bed, _WALL, 1, 1), (_cabinet, _WALL, 0, 2), (g_desk, _WALL, 0, 1),
                 (_bookshelf, _WALL, 0, 1), (g_boxes, _ANY, 0, 2), (_trash, _ANY, 0, 1),
                 (g_backpack, _ANY, 0, 1), (_floor_lamp, _ANY, 0, 1)],
                [("picture", 0, 3)]),
    "living_room": ((4, 8), (3.5, 6), (1, 3), .6,
                    [(g_sofa, _ANY, 1, 2), (g_tv, _WALL, 0, 1), (_bookshelf, _WALL, 0, 2),
                     (_cabinet, _WALL, 0, 1), (g_table, _FREE, 0, 1), (_chair, _FREE, 0, 2),
                     (g_ottoman, _FREE, 0, 1), (_floor_lamp, _ANY, 0, 1),
                     (g_boxes, _ANY, 0, 1)],
                    [("picture", 1, 3)]),
    "office": ((3, 7), (3, 6), (1, 3), .2,
               [(g_desk, _WALL, 1, 4), (g_table, _FREE, 0, 1), (_bookshelf, _WALL, 0, 2),
                (_cabinet, _WALL, 0, 3), (_trash, _ANY, 0, 2), (g_boxes, _ANY, 0, 3),
                (g_backpack, _ANY, 0, 2), (_chair, _FREE, 0, 1)],
               [("whiteboard", 0, 1), ("picture", 0, 2)]),
    "kitchen": ((3, 6), (3, 5), (1, 2), .3,
                [(g_counter, _WALL, 1, 2), (g_fridge, _WALL, 1, 1), (g_table, _FREE, 0, 1),
                 (_cabinet, _WALL, 0, 1), (_trash, _ANY, 0, 1)],
                [("picture", 0, 1)]),
    "bathroom": ((2.8, 4), (2.8, 3.6), (0, 1), .2,
                 [(_bathtub, _CORNER, 0, 1), (g_toilet, _WALL, 1, 1), (g_sink, _WALL, 1, 2),
                  (_cabinet, _WALL, 0, 1), (_trash, _ANY, 0, 1)],
                 [("towel", 0, 2)]),
    "conference_room": ((5, 8), (4, 6), (1, 3), .4,
                        [(_conference, _FREE, 1, 1), (_cabinet, _WALL, 0, 2),
                         (g_tv, _WALL, 0, 1), (_trash, _ANY, 0, 1), (_chair, _ANY, 0, 2)],
                        [("whiteboard", 0, 1), ("picture", 0, 2)]),
}
ROOM_WEIGHTS = {"office": 1.4, "bedroom": 1.2, "living_room": 1.2, "conference_room": .8}
# S3DIS: mostly offices and hallways, as in the real areas
S3DIS_ROOM_WEIGHTS = {"office": 3.0, "hallway": 1.5, "conferenceRoom": .8, "storage": .6,
                      "WC": .6, "lounge": .4, "pantry": .3}
# S3DIS room types reuse the groups (their desks, toilets, ... become table / clutter)
S3DIS_ROOMS = {
    "office": ROOMS["office"], "conferenceRoom": ROOMS["conference_room"],
    "hallway": ((1.8, 2.6), (5, 9), (0, 1), 0.0,
                [(_cabinet, _WALL, 0, 1), (g_boxes, _ANY, 0, 2), (_bookshelf, _WALL, 0, 1),
                 (_trash, _ANY, 0, 1)], [("whiteboard", 0, 1)]),
    "lounge": ROOMS["living_room"],
    "storage": ((3, 5), (3, 5), (0, 1), 0.0,
                [(_bookshelf, _WALL, 2, 4), (_cabinet, _WALL, 0, 2), (g_boxes, _ANY, 2, 5)],
                []),
    "WC": ROOMS["bathroom"], "pantry": ROOMS["kitchen"],
}
_WALL_ITEMS = {  # z range of the bottom edge, width, height, thickness
    "picture": ((1.1, 1.8), (.3, 1.0), (.3, .8), (.02, .04)),
    "whiteboard": ((.8, 1.0), (1.2, 2.4), (.9, 1.2), (.015, .03)),
    "towel": ((.9, 1.3), (.3, .6), (.4, .7), (.02, .04)),
}


def _place(lay: Layout, objs: list[Obj], where: str) -> bool:
    if where == _ANY:
        where = _WALL if lay.rng.random() < .5 else _FREE
    if where == _FREE:
        return lay.free_standing(objs)
    return lay.against_wall(objs, corner=where == _CORNER)


def _structure(lay: Layout, ceiling: bool) -> list[Obj]:
    """Floor, one object per wall (with the openings cut out), and for S3DIS the ceiling,
    beams and columns."""
    rng, w, d, h = lay.rng, lay.w, lay.d, lay.h
    holes = () if lay.notch is None else ((lay.notch[0], w + 1, lay.notch[2], d + 1),)
    floor = "floor " + str(rng.choice(["wood", "carpet", "tile"]))
    out = [Obj("floor", [(Sheet((0, 0, 0), (w, 0, 0), (0, d, 0), holes),
                          so.color(rng, floor))])]
    wc = so.color(rng, "wall")
    for wall in lay.walls:
        L = wall.length
        wh = tuple((L - s1, L - s0, z0, z1) for s0, s1, z0, z1 in wall.holes)
        out.append(Obj("wall", [(Sheet((*wall.p1, 0.0), (*(wall.p0 - wall.p1), 0.0),
                                       (0, 0, h), wh), wc * U(rng, .95, 1.05))]))
    if ceiling:
        ch = () if lay.notch is None else ((lay.notch[0], w + 1, -1, d - lay.notch[2]),)
        out.append(Obj("ceiling", [(Sheet((0, d, h), (w, 0, 0), (0, -d, 0), ch), wc)]))
        x0, y0, x1, y1 = lay.rects[0]
        for _ in range(int(rng.integers(0, 3)) if rng.random() < .4 else 0):
            bw, bd = U(rng, .3, .5), U(rng, .3, .6)
            yc = U(rng, y0 + .3, y1 - .3 - bw)
            out.append(Obj("beam", [(Box((x0, yc, h - bd), (x1, yc + bw, h), "+z-x+x"), wc)]))
    return out


def layout_room(rng: np.random.Generator, style: str = "scannet") -> tuple[list[Obj], Layout,
                                                                          str]:
    """Draw a room and furnish it.

    Returns:
      (objects with world poses: structure first, then furniture; the Layout; room type).
    """
    if style not in ("scannet", "s3dis"):
        raise ValueError(f"layout_room: style must be 'scannet' or 's3dis', got {style!r}")
    table = ROOMS if style == "scannet" else S3DIS_ROOMS
    names = sorted(table)
    wt = ROOM_WEIGHTS if style == "scannet" else S3DIS_ROOM_WEIGHTS
    weights = np.array([wt.get(n, 1.0) for n in names])
    room_type = str(rng.choice(names, p=weights / weights.sum()))
    (w0, w1), (d0, d1), (n0, n1), curtain_p, steps, items = table[room_type]
    w, d = U(rng, w0, w1), U(rng, d0, d1)
    if rng.random() < .5:
        w, d = d, w
    lshape = min(w, d) >= 3.5 and rng.random() < .35
    lay = Layout(rng, w, d, U(rng, 2.5, 3.0), lshape)
    for _ in range(1 + int(rng.random() < (.6 if room_type == "hallway" else .25))):
        lay.door()
    for _ in range(int(rng.integers(n0, n1 + 1))):
        lay.window(curtains=rng.random() < curtain_p)
    if style == "s3dis" and rng.random() < .4:
        for _ in range(int(rng.integers(1, 3))):
            lay.against_wall(g_column(rng, lay.h), corner=rng.random() < .5, gap=(0, 0))
    for group, where, lo, hi in steps:
        for _ in range(int(rng.integers(lo, hi + 1))):
            # redraw a group that won't fit; a room's must-haves get more chances
            any(_place(lay, group(rng), where) for _ in range(8 if lo else 3))
    for raw, lo, hi in items:
        z, wr, hr, tr = _WALL_ITEMS[raw]
        for _ in range(int(rng.integers(lo, hi + 1))):
            _wall_item(lay, raw, z, wr, hr, tr)
    return _structure(lay, ceiling=style == "s3dis") + lay.objects, lay, room_type
