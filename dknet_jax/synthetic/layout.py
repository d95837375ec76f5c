"""The floor plan of a synthetic room and collision-free placement in it.

`RoomLayout` holds one room being furnished: its outline (a rectangle, or an L: a
rectangle with one corner notched out), its walls, the objects placed so far and a
registry of occupied *footprints*. A footprint is an oriented rectangle on the floor
(4 corners in room coordinates) with the height range it occupies and an optional tag.

Placement tries random poses until the group's footprint lies inside the room and
overlaps no registered footprint in both plan and height (`RoomLayout.is_free`), so
objects may touch (chairs at a table, books on a shelf, cabinets in a row) but never
intersect, and a shelf may stand under a window sill. Groups go against a wall (back to
it, optionally in a corner) or free-standing (turned by a multiple of 90 degrees plus a
little).

Doors and windows are placed first: each cuts a hole into its wall (`Wall.holes`, later
left out of the wall mesh) and registers a footprint: a door keeps a free passage in
front of it, a window keeps tall furniture away from its height range. A window's
curtains are placed with the window's tag ignored, so they hang in front of it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dknet_jax.synthetic.appearance import draw_color
from dknet_jax.synthetic.furniture import Part, SceneObject, group_bounds, uniform
from dknet_jax.synthetic.primitives import Box, Pose, Sheet, compose_poses


def footprint_corners(pose: Pose, x0: float, x1: float, y0: float, y1: float) -> np.ndarray:
    """f64[4, 2]: the room-plan corners of the local rectangle [x0, x1] x [y0, y1] under a
    pose, counter-clockwise."""
    c, s = np.cos(pose[0]), np.sin(pose[0])
    local = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
    return local @ np.array([[c, s], [-s, c]]) + np.array(pose[1:3])


def quads_overlap(a: np.ndarray, b: np.ndarray, eps: float = 2e-3) -> bool:
    """Whether two convex quads f64[4, 2] overlap (separating-axis test). Quads that only
    touch, or overlap by less than ``eps`` metres, do not."""
    for q in (a, b):
        for k in range(2):
            e = q[k + 1] - q[k]
            n = np.array([-e[1], e[0]]) / (np.linalg.norm(e) + 1e-12)
            pa, pb = a @ n, b @ n
            if pa.max() <= pb.min() + eps or pb.max() <= pa.min() + eps:
                return False
    return True


@dataclasses.dataclass
class Wall:
    """One straight wall of the room outline, from p0 to p1 (the outline runs
    counter-clockwise, so the room lies to the left of p0 -> p1).

    holes: openings ``(s0, s1, z0, z1)``: from s0 to s1 metres along the wall from p0,
      heights z0 to z1.
    """

    p0: np.ndarray  # f64[2]
    p1: np.ndarray  # f64[2]
    holes: list = dataclasses.field(default_factory=list)

    @property
    def length(self) -> float:
        return float(np.linalg.norm(self.p1 - self.p0))

    def pose(self, s: float, gap: float = 0.0) -> Pose:
        """A frame at distance s along the wall and ``gap`` in front of it: local x runs
        along the wall, local +y points into the room."""
        e = (self.p1 - self.p0) / self.length
        p = self.p0 + s * e + gap * np.array([-e[1], e[0]])
        return (float(np.arctan2(e[1], e[0])), float(p[0]), float(p[1]), 0.0)


class RoomLayout:
    """A room being furnished: outline, walls, placed objects and occupied footprints.

    Attributes:
      rng: the room's random generator (every placement draws from it).
      width, depth, height: the bounding rectangle [0, width] x [0, depth] and the
        ceiling height, metres.
      floor_rects: the outline as a union of axis-aligned rectangles (x0, y0, x1, y1).
      notch: (x0, x1, y0, y1) of the corner cut out of an L-shaped room, else None.
      reflex_corner: f64[2] the inner corner of the L, else None.
      walls: the outline's `Wall`s, counter-clockwise.
      objects: placed objects (doors, windows, curtains, furniture) with room poses.
      footprints: (corners f64[4, 2], z0, z1, tag or None) of everything placed.
    """

    def __init__(
        self, rng: np.random.Generator, width: float, depth: float, height: float, l_shaped: bool
    ):
        self.rng, self.width, self.depth, self.height = rng, width, depth, height
        w, d = width, depth
        if l_shaped:
            a, b = w * uniform(rng, 0.3, 0.5), d * uniform(rng, 0.3, 0.5)
            pts = [(0, 0), (w, 0), (w, d - b), (w - a, d - b), (w - a, d), (0, d)]
            self.floor_rects = [(0, 0, w, d - b), (0, 0, w - a, d)]
            self.notch, self.reflex_corner = (w - a, w, d - b, d), np.array([w - a, d - b])
        else:
            pts = [(0, 0), (w, 0), (w, d), (0, d)]
            self.floor_rects, self.notch, self.reflex_corner = [(0, 0, w, d)], None, None
        pts = np.asarray(pts, float)
        self.walls = [Wall(pts[i], pts[(i + 1) % len(pts)]) for i in range(len(pts))]
        self.objects: list[SceneObject] = []
        self.footprints: list[tuple] = []

    # --- geometry tests ---------------------------------------------------------------
    def _inside(self, q: np.ndarray) -> bool:
        """Whether every corner of quad q lies in the outline (and, in an L, the quad
        does not cover the notch's inner corner)."""
        ok = all(
            any(
                x0 - 1e-6 <= x <= x1 + 1e-6 and y0 - 1e-6 <= y <= y1 + 1e-6
                for x0, y0, x1, y1 in self.floor_rects
            )
            for x, y in q
        )
        if ok and self.reflex_corner is not None:
            r = self.reflex_corner
            ok = not quads_overlap(
                q,
                np.array(
                    [r + [-1e-3, -1e-3], r + [1e-3, -1e-3], r + [1e-3, 1e-3], r + [-1e-3, 1e-3]]
                ),
                eps=0.0,
            )
        return ok

    def is_free(self, q: np.ndarray, z0: float, z1: float, ignore=()) -> bool:
        """Whether footprint q f64[4, 2] over heights [z0, z1] lies inside the room and
        overlaps no registered footprint (those tagged with a tag in ``ignore`` aside)."""
        if not self._inside(q):
            return False
        return not any(
            z0 < b1 and b0 < z1 and (t is None or t not in ignore) and quads_overlap(q, c)
            for c, b0, b1, t in self.footprints
        )

    # --- placement --------------------------------------------------------------------
    def _place_at_first_free(self, objects: list[SceneObject], poses, ignore=(), tag=None) -> bool:
        """Place a group at the first of ``poses`` where its bounding footprint is free:
        register the footprint, move the objects into room coordinates, keep them."""
        lo, hi = group_bounds(objects)
        for pose in poses:
            q = footprint_corners(pose, lo[0], hi[0], lo[1], hi[1])
            if self.is_free(q, lo[2], hi[2], ignore):
                self.footprints.append((q, lo[2], hi[2], tag))
                for o in objects:
                    o.pose = compose_poses(pose, o.pose)
                self.objects += objects
                return True
        return False

    def place_against_wall(
        self, objects: list[SceneObject], tries: int = 40, corner: bool = False, gap=(0.0, 0.03)
    ) -> bool:
        """Place a group with its back (local y = 0) against a random wall, ``gap`` metres
        off it; at either end of the wall when ``corner``. False when no try fits."""
        lo, hi = group_bounds(objects)
        rng = self.rng

        def poses():
            for _ in range(tries):
                wall = self.walls[rng.integers(len(self.walls))]
                smin, smax = -lo[0], wall.length - hi[0]
                if smax < smin:
                    continue
                s = float(rng.choice([smin, smax])) if corner else uniform(rng, smin, smax)
                yield wall.pose(s, uniform(rng, *gap) - lo[1])

        return self._place_at_first_free(objects, poses())

    def place_free_standing(self, objects: list[SceneObject], tries: int = 60) -> bool:
        """Place a group anywhere, turned by a multiple of 90 degrees (sometimes plus a
        little). False when no try fits."""
        rng = self.rng

        def poses():
            for _ in range(tries):
                yaw = rng.integers(4) * np.pi / 2 + (
                    rng.normal(0, 0.1) if rng.random() < 0.3 else 0.0
                )
                yield (float(yaw), uniform(rng, 0, self.width), uniform(rng, 0, self.depth), 0.0)

        return self._place_at_first_free(objects, poses())

    # --- doors and windows ------------------------------------------------------------
    def add_door(self) -> bool:
        """Cut a door into a random wall: frame, and a leaf that is closed (flush with
        the wall) or, 30% of the time, swung open into the room. False when none fits."""
        rng = self.rng
        w, door_h = uniform(rng, 0.8, 0.95), uniform(rng, 2.0, min(2.15, self.height - 0.2))
        for _ in range(20):
            wall = self.walls[rng.integers(len(self.walls))]
            if wall.length < w + 0.4:
                continue
            s = uniform(rng, w / 2 + 0.15, wall.length - w / 2 - 0.15)
            pose = wall.pose(s)
            q = footprint_corners(pose, -w / 2 - 0.05, w / 2 + 0.05, 0, w + 0.1)  # swing area
            if not self.is_free(q, 0, door_h):
                continue
            self.footprints.append((q, 0, door_h, "door"))
            wall.holes.append((s - w / 2, s + w / 2, -1.0, door_h))
            leaf, frame = draw_color(rng, "door"), draw_color(rng, "door frame")
            parts = [
                Part(Box((-w / 2 - 0.06, 0, 0), (-w / 2, 0.015, door_h + 0.06), "-z-y"), frame),
                Part(Box((w / 2, 0, 0), (w / 2 + 0.06, 0.015, door_h + 0.06), "-z-y"), frame),
                Part(Box((-w / 2, 0, door_h), (w / 2, 0.015, door_h + 0.06), "-y"), frame),
            ]
            if rng.random() < 0.3:  # open into the room, hinged at the left jamb
                parts.append(
                    Part(
                        Box((0, 0, 0.01), (w - 0.01, 0.04, door_h - 0.01)),
                        leaf,
                        (uniform(rng, 0.5, 1.5), -w / 2, 0.02, 0.0),
                    )
                )
            else:
                parts.append(
                    Part(Box((-w / 2, -0.05, 0.01), (w / 2, -0.01, door_h - 0.01), "-y"), leaf)
                )
            self.objects.append(
                SceneObject(
                    "door",
                    parts,
                    pose=pose,
                    occluders=[
                        Box((-w / 2 - 0.07, -0.1, -0.1), (w / 2 + 0.07, 0.03, door_h + 0.07))
                    ],
                )
            )
            return True
        return False

    def add_window(self, curtains: bool) -> bool:
        """Cut a window into a random wall: frame, glass set back into the wall, a sill
        and optionally curtains. False when none fits."""
        rng = self.rng
        w, sill = uniform(rng, 0.6, 1.6), uniform(rng, 0.7, 1.0)
        top = min(sill + uniform(rng, 1.0, 1.5), self.height - 0.2)
        for _ in range(20):
            wall = self.walls[rng.integers(len(self.walls))]
            if wall.length < w + 0.5:
                continue
            s = uniform(rng, w / 2 + 0.2, wall.length - w / 2 - 0.2)
            pose = wall.pose(s)
            q = footprint_corners(pose, -w / 2 - 0.1, w / 2 + 0.1, 0, 0.3)
            if not self.is_free(q, sill - 0.05, top + 0.05):
                continue
            tag = f"window{len(self.footprints)}"
            self.footprints.append((q, sill - 0.05, top + 0.05, tag))
            wall.holes.append((s - w / 2, s + w / 2, sill, top))
            frame, sill_depth = draw_color(rng, "window frame"), uniform(rng, 0.03, 0.12)
            parts = [
                Part(Box((-w / 2, -0.15, sill), (-w / 2 + 0.05, 0, top)), frame),
                Part(Box((w / 2 - 0.05, -0.15, sill), (w / 2, 0, top)), frame),
                Part(Box((-w / 2 + 0.05, -0.15, top - 0.05), (w / 2 - 0.05, 0, top)), frame),
                Part(
                    Box((-w / 2 + 0.05, -0.1, sill + 0.05), (w / 2 - 0.05, -0.09, top - 0.05)),
                    draw_color(rng, "window glass"),
                ),
                Part(
                    Box((-w / 2 - 0.05, -0.15, sill - 0.03), (w / 2 + 0.05, sill_depth, sill)),
                    frame,
                ),
            ]
            occ = [
                Box(
                    (-w / 2 - 0.06, -0.3, sill - 0.04),
                    (w / 2 + 0.06, sill_depth + 0.01, sill + 0.01),
                )
            ]
            self.objects.append(SceneObject("window", parts, pose=pose, occluders=occ))
            if curtains:
                self._add_curtains(wall, s, w, top, tag)
            return True
        return False

    def _add_curtains(self, wall: Wall, s: float, w: float, top: float, tag: str) -> None:
        """One or two wavy curtains beside a window of width w centred at s on the wall,
        from near the ceiling down to the floor or the sill."""
        rng = self.rng
        ztop = min(top + uniform(rng, 0.05, 0.2), self.height - 0.03)
        z0 = float(rng.choice([uniform(rng, 0.02, 0.1), uniform(rng, 0.5, 0.8)]))
        for side in (-1, 1) if rng.random() < 0.6 else (int(rng.choice([-1, 1])),):
            cw = uniform(rng, 0.35, 0.8)
            x1 = side * (w / 2 + uniform(rng, 0, 0.15))  # outer edge
            x0 = x1 - side * cw
            xa, xb = min(x0, x1), max(x0, x1)
            y = uniform(rng, 0.07, 0.12)
            sheet = Sheet(
                (xb, y, z0),
                (xa - xb, 0, 0),
                (0, 0, ztop - z0),
                wave=(uniform(rng, 0.02, 0.05), uniform(rng, 0.12, 0.25), uniform(rng, 0, 6)),
            )
            obj = SceneObject("curtain", [Part(sheet, draw_color(rng, "curtain"))])
            self._place_at_first_free([obj], [wall.pose(s)], ignore=(tag,))
