"""Single pieces of furniture for the synthetic rooms, built from primitives.

A `SceneObject` is what one annotation instance covers: a raw category (see
`categories.py`), a list of `Part`s (a primitive with its colour, optionally with its own
pose inside the object), a pose in its parent frame, and *occluders*.

Every piece is built in its own local frame: x across the piece (centred on x = 0), y from
its back (y = 0, the side that goes against a wall) to its front, z up from the floor
(z = 0). The parts of one piece touch but are separate mesh components; pieces never
share vertices with each other or with the room, so each is a clean instance.

Occluders are boxes in the piece's frame; the scene removes the room-structure vertices
inside them (the floor under a cabinet, the wall behind a bookshelf), as a scanner never
sees those surfaces. `back_to_wall` opens a piece's back face and adds the occluder for
the wall behind it.

Each builder draws its sizes from plausible ranges (metres) and its colours from
`appearance.draw_color`; the order of the random draws is part of the generator's
output (same seed, same room), so builders must not reorder them.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

from dknet_jax.synthetic.appearance import draw_color
from dknet_jax.synthetic.primitives import (
    Box,
    Cylinder,
    Pose,
    Primitive,
    Sheet,
    compose_poses,
    primitive_bounds,
    to_parent,
)


class Part(NamedTuple):
    """One primitive of an object, its base colour f64[3] (0..255) and, when it is turned
    or shifted against the object's frame (an open door leaf), its pose in that frame."""

    primitive: Primitive
    color: np.ndarray
    pose: Pose | None = None


@dataclasses.dataclass
class SceneObject:
    """One object: its parts in its local frame and its pose in the parent frame.

    category: raw category (a `categories.RAW_CATEGORIES` key).
    parts: the object's `Part`s.
    pose: ``(yaw, tx, ty, tz)`` local frame -> parent frame (its group while a group is
      built, the room once placed).
    occluders: `Box`es in the local frame; room-structure vertices inside them are removed.
    annotated: whether the annotator labelled it (drawn by `scene.generate_scene`).
    """

    category: str
    parts: list[Part]
    pose: Pose = (0.0, 0.0, 0.0, 0.0)
    occluders: list[Box] = dataclasses.field(default_factory=list)
    annotated: bool = True

    def part_pose(self, part: Part) -> Pose:
        """The pose of one of this object's parts in the object's parent frame."""
        return self.pose if part.pose is None else compose_poses(self.pose, part.pose)


def group_bounds(objects: list[SceneObject]) -> tuple[np.ndarray, np.ndarray]:
    """(lo f64[3], hi f64[3]): axis-aligned bounds of objects in their common frame."""
    pts = []
    for o in objects:
        for part in o.parts:
            lo, hi = primitive_bounds(part.primitive)
            corners = np.array(
                [[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])]
            )
            pts.append(to_parent(o.part_pose(part), corners))
    pts = np.concatenate(pts)
    return pts.min(0), pts.max(0)


def uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    """One draw from U(lo, hi), as a Python float."""
    return float(rng.uniform(lo, hi))


# ---------------------------------------------------------------------------------------
# Seating and tables
def chair(rng, office: bool = False) -> SceneObject:
    """A chair facing +y with its backrest at y = 0: four legs, or (office) a column on a
    round foot."""
    w, d, seat_h = uniform(rng, 0.42, 0.52), uniform(rng, 0.42, 0.5), uniform(rng, 0.42, 0.48)
    seat_t, back_h = uniform(rng, 0.04, 0.07), uniform(rng, 0.35, 0.5)
    back_t, leg = uniform(rng, 0.03, 0.06), uniform(rng, 0.025, 0.04)
    c = draw_color(rng, "office chair" if office else "chair")
    base = draw_color(rng, "office chair base")
    parts = [
        Part(Box((-w / 2, 0, seat_h - seat_t), (w / 2, d, seat_h)), c),
        Part(Box((-w / 2, 0, seat_h), (w / 2, back_t, seat_h + back_h), "-z"), c),
    ]
    if office:
        parts += [
            Part(Cylinder(0, d / 2, 0.08, seat_h - seat_t, 0.03, top=False), base),
            Part(Cylinder(0, d / 2, 0.02, 0.08, uniform(rng, 0.25, 0.3)), base),
        ]
    else:
        for x in (-w / 2, w / 2 - leg):
            for y in (0, d - leg):
                parts.append(Part(Box((x, y, 0), (x + leg, y + leg, seat_h - seat_t), "-z+z"), c))
    return SceneObject("office chair" if office else "chair", parts)


def table(rng, kind: str = "table", w: float | None = None, d: float | None = None) -> SceneObject:
    """A four-legged table (kind "table" or the lower "coffee table"), w x d metres
    (drawn when not given), its long side along x."""
    w = w or uniform(rng, 0.8, 1.8)
    d = d or uniform(rng, 0.7, 1.0)
    height = uniform(rng, 0.4, 0.46) if kind == "coffee table" else uniform(rng, 0.72, 0.76)
    top_t, leg, c = uniform(rng, 0.03, 0.05), uniform(rng, 0.04, 0.07), draw_color(rng, kind)
    parts = [Part(Box((-w / 2, 0, height - top_t), (w / 2, d, height)), c)]
    for x in (-w / 2 + 0.03, w / 2 - 0.03 - leg):
        for y in (0.03, d - 0.03 - leg):
            parts.append(Part(Box((x, y, 0), (x + leg, y + leg, height - top_t), "-z+z"), c))
    return SceneObject(kind, parts)


def desk(rng) -> SceneObject:
    """A desk with side panels and a modesty panel at the back, half the time a drawer
    block on the right; its back goes against a wall."""
    w, d = uniform(rng, 1.1, 1.6), uniform(rng, 0.6, 0.8)
    height, c = uniform(rng, 0.72, 0.76), draw_color(rng, "desk")
    top = height - 0.03
    parts = [
        Part(Box((-w / 2, 0, top), (w / 2, d, height)), c),
        Part(Box((-w / 2, 0, 0), (-w / 2 + 0.03, d, top), "-z+z"), c),
        Part(Box((w / 2 - 0.03, 0, 0), (w / 2, d, top), "-z+z"), c),
        Part(Box((-w / 2 + 0.03, 0.02, 0.35), (w / 2 - 0.03, 0.04, top), "+z"), c),
    ]
    if rng.random() < 0.5:  # drawer block
        parts.append(Part(Box((w / 2 - 0.45, 0.05, 0), (w / 2 - 0.03, d - 0.02, top), "-z+z"), c))
    return SceneObject(
        "desk", parts, occluders=[Box((-w / 2 + 0.05, -0.3, -0.1), (w / 2 - 0.05, 0.05, 0.3))]
    )


def sofa(rng) -> SceneObject:
    """A couch: seat block, backrest at y = 0 and two armrests."""
    w, d = uniform(rng, 1.5, 2.4), uniform(rng, 0.8, 0.95)
    seat_h, back_h = uniform(rng, 0.4, 0.46), uniform(rng, 0.75, 0.9)
    back_t, arm_w = uniform(rng, 0.15, 0.25), uniform(rng, 0.12, 0.22)
    arm_h, c = uniform(rng, 0.55, 0.65), draw_color(rng, "couch")
    parts = [
        Part(Box((-w / 2 + arm_w, back_t, 0), (w / 2 - arm_w, d, seat_h), "-z"), c),
        Part(Box((-w / 2, 0, 0), (w / 2, back_t, back_h), "-z-y"), c),
        Part(Box((-w / 2, back_t, 0), (-w / 2 + arm_w, d, arm_h), "-z"), c),
        Part(Box((w / 2 - arm_w, back_t, 0), (w / 2, d, arm_h), "-z"), c),
    ]
    occ = [
        Box((-w / 2 + 0.04, 0.04, -0.1), (w / 2 - 0.04, d - 0.04, 0.05)),
        Box((-w / 2 + 0.04, -0.3, 0), (w / 2 - 0.04, 0.05, back_h - 0.04)),
    ]
    return SceneObject("couch", parts, occluders=occ)


# ---------------------------------------------------------------------------------------
# Boxes, cabinets and shelves
def box_object(
    rng,
    category: str,
    w: float,
    d: float,
    height: float,
    kind: str | None = None,
    z0: float = 0.0,
    skip: str = "-z",
) -> SceneObject:
    """A closed box object (cabinet, fridge, ottoman, ...) from z0 up, back at y = 0,
    coloured as ``kind`` (an `appearance.APPEARANCE` key; default: the category). On the
    floor it hides the floor under it."""
    parts = [
        Part(Box((-w / 2, 0, z0), (w / 2, d, z0 + height), skip), draw_color(rng, kind or category))
    ]
    occ = [Box((-w / 2 + 0.03, 0.03, -0.1), (w / 2 - 0.03, d - 0.03, 0.05))] if z0 == 0 else []
    return SceneObject(category, parts, occluders=occ)


def back_to_wall(o: SceneObject, height: float) -> SceneObject:
    """Open the back face of a piece that stands against a wall (its first part) and hide
    the wall behind it up to just below ``height``."""
    first = o.parts[0]
    p = first.primitive
    if isinstance(p, Box):
        o.parts[0] = first._replace(primitive=dataclasses.replace(p, skip=p.skip + "-y"))
        o.occluders.append(
            Box((p.lo[0] + 0.04, -0.3, p.lo[2]), (p.hi[0] - 0.04, 0.05, height - 0.04))
        )
    return o


def cabinet(
    rng,
    category: str = "cabinet",
    w: float | None = None,
    d: float | None = None,
    height: float | None = None,
) -> SceneObject:
    """A wall cabinet (low or tall, wood or painted) with a handle on its front; the top
    of a tall one is sometimes left unscanned."""
    w, d = w or uniform(rng, 0.4, 1.2), d or uniform(rng, 0.35, 0.6)
    height = height or float(rng.choice([uniform(rng, 0.6, 1.0), uniform(rng, 1.6, 2.0)]))
    kind = "cabinet wood" if rng.random() < 0.7 else "cabinet painted"
    o = back_to_wall(box_object(rng, category, w, d, height, kind), height)
    if height > 1.8 and rng.random() < 0.5:  # the top of a tall cabinet is never scanned
        body = o.parts[0]
        o.parts[0] = body._replace(
            primitive=dataclasses.replace(body.primitive, skip=body.primitive.skip + "+z")
        )
    hx = uniform(rng, -w / 2 + 0.05, w / 2 - 0.08)
    o.parts.append(
        Part(
            Box((hx, d, height * 0.5), (hx + 0.02, d + 0.025, height * 0.5 + 0.12), "-y"),
            draw_color(rng, "handle"),
        )
    )
    return o


def bookshelf_with_books(rng) -> list[SceneObject]:
    """A bookshelf, and one "books" object per filled shelf (a row of upright books
    standing on the shelf board)."""
    w, d = uniform(rng, 0.6, 1.2), uniform(rng, 0.28, 0.4)
    height, t = uniform(rng, 1.0, 2.1), 0.02
    c, n_shelves = draw_color(rng, "bookshelf"), int(rng.integers(2, 6))
    parts = [
        Part(Box((-w / 2, 0, 0), (-w / 2 + t, d, height), "-z"), c),
        Part(Box((w / 2 - t, 0, 0), (w / 2, d, height), "-z"), c),
        Part(Box((-w / 2 + t, 0, height - t), (w / 2 - t, d, height)), c),
        Part(Box((-w / 2 + t, 0, t), (w / 2 - t, t, height - t), "-y"), c),
    ]
    levels = np.linspace(t, height - t, n_shelves + 1)[:-1]
    objs = []
    for z in levels:
        parts.append(Part(Box((-w / 2 + t, t, z - t), (w / 2 - t, d, z), "-z"), c))
        if rng.random() < 0.7:
            gap = (height - t) / n_shelves - t
            x, books = -w / 2 + t + uniform(rng, 0, 0.1), []
            while x < w / 2 - t - 0.05 and len(books) < 30:
                bw = uniform(rng, 0.02, 0.05)
                front = t + uniform(rng, 0.15, d - t)
                top = z + min(gap - 0.02, uniform(rng, 0.15, 0.3))
                books.append(
                    Part(
                        Box((x, t + 0.01, z), (x + bw, front, top), "-z"), draw_color(rng, "books")
                    )
                )
                x += bw
            objs.append(SceneObject("books", books))
    occ = [Box((-w / 2 + 0.04, -0.3, -0.1), (w / 2 - 0.04, 0.05, height - 0.04))]
    return [SceneObject("bookshelf", parts, occluders=occ)] + objs


# ---------------------------------------------------------------------------------------
# Bedroom
def bed_with_pillows(rng) -> list[SceneObject]:
    """A single or double bed (headboard at y = 0, mattress with bedding) and one or two
    pillows on it."""
    w = float(rng.choice([uniform(rng, 0.9, 1.0), uniform(rng, 1.4, 1.8)]))
    length = uniform(rng, 1.9, 2.1)
    mattress_h, head_h = uniform(rng, 0.45, 0.6), uniform(rng, 0.9, 1.2)
    frame, bedding = draw_color(rng, "bed frame"), draw_color(rng, "bedding")
    parts = [
        Part(Box((-w / 2, 0.06, 0), (w / 2, length, mattress_h), "-z"), bedding),
        Part(Box((-w / 2, 0, 0), (w / 2, 0.06, head_h), "-z-y"), frame),
    ]
    occ = [
        Box((-w / 2 + 0.04, 0.08, -0.1), (w / 2 - 0.04, length - 0.04, 0.05)),
        Box((-w / 2 + 0.04, -0.3, 0), (w / 2 - 0.04, 0.05, head_h - 0.04)),
    ]
    objs = [SceneObject("bed", parts, occluders=occ)]
    n = 1 if w < 1.2 else 2
    for k in range(n):
        pw = min(uniform(rng, 0.5, 0.65), w / n - 0.04)
        x = -w / 2 + (k + 0.5) * w / n
        back = 0.1 + uniform(rng, 0.3, 0.4)
        top = mattress_h + uniform(rng, 0.1, 0.16)
        objs.append(
            SceneObject(
                "pillow",
                [
                    Part(
                        Box((x - pw / 2, 0.1, mattress_h), (x + pw / 2, back, top), "-z"),
                        draw_color(rng, "pillow"),
                    )
                ],
            )
        )
    return objs


def lamp(rng, z0: float = 0.0, floor: bool = True) -> SceneObject:
    """A floor lamp, or (floor=False) a table lamp standing at height z0: foot, pole and
    shade. The pole runs up to the shade's closed top, so the lamp is one piece."""
    pole_h = uniform(rng, 1.3, 1.7) if floor else uniform(rng, 0.25, 0.45)
    shade_r, shade_h = uniform(rng, 0.12, 0.22), uniform(rng, 0.18, 0.3)
    c = draw_color(rng, "lamp")
    return SceneObject(
        "lamp",
        [
            Part(Cylinder(0, 0, z0, z0 + 0.03, uniform(rng, 0.1, 0.15)), c),
            Part(Cylinder(0, 0, z0 + 0.03, z0 + pole_h + shade_h, 0.015, top=False), c),
            Part(
                Cylinder(0, 0, z0 + pole_h, z0 + pole_h + shade_h, shade_r),
                draw_color(rng, "lamp shade"),
            ),
        ],
    )


# ---------------------------------------------------------------------------------------
# Bathroom and kitchen
def toilet(rng) -> SceneObject:
    """A toilet: cistern at the wall, bowl block and a round seat."""
    c = draw_color(rng, "toilet")
    bowl_w, tank_w = uniform(rng, 0.2, 0.26), uniform(rng, 0.4, 0.5)
    return SceneObject(
        "toilet",
        [
            Part(Box((-tank_w / 2, 0, 0.3), (tank_w / 2, 0.2, 0.75), "-y"), c),
            Part(Box((-bowl_w / 2, 0.15, 0), (bowl_w / 2, 0.55, 0.3), "-z"), c),
            Part(Cylinder(0, 0.45, 0.3, 0.42, uniform(rng, 0.17, 0.2)), c),
        ],
        occluders=[Box((-bowl_w / 2 + 0.02, 0.17, -0.1), (bowl_w / 2 - 0.02, 0.53, 0.05))],
    )


def basin(
    rng, w: float, d: float, z0: float, depth: float = 0.15, category: str = "sink"
) -> SceneObject:
    """A hollow basin (bottom slab and four rims) whose base sits at z0; back at y = 0."""
    t, c = 0.03, draw_color(rng, "sink")
    z1 = z0 + depth
    return SceneObject(
        category,
        [
            Part(Box((-w / 2, 0, z0), (w / 2, d, z0 + t), "-z"), c),
            Part(Box((-w / 2, 0, z0 + t), (-w / 2 + t, d, z1), "-z"), c),
            Part(Box((w / 2 - t, 0, z0 + t), (w / 2, d, z1), "-z"), c),
            Part(Box((-w / 2 + t, 0, z0 + t), (w / 2 - t, t, z1), "-z"), c),
            Part(Box((-w / 2 + t, d - t, z0 + t), (w / 2 - t, d, z1), "-z"), c),
        ],
    )


def pedestal_sink(rng) -> SceneObject:
    """A basin on a round pedestal."""
    w, d = uniform(rng, 0.45, 0.6), uniform(rng, 0.38, 0.48)
    o = basin(rng, w, d, 0.72)
    o.parts.append(
        Part(Cylinder(0, d / 2, 0, 0.72, uniform(rng, 0.06, 0.09), top=False), o.parts[0].color)
    )
    return o


def bathtub_with_curtain(rng) -> list[SceneObject]:
    """A bathtub (floor slab and four walls) and, often, a shower curtain hanging along
    part of its front."""
    w, d, height = uniform(rng, 1.5, 1.8), uniform(rng, 0.7, 0.8), uniform(rng, 0.5, 0.6)
    t, c = 0.08, draw_color(rng, "bathtub")
    tub = SceneObject(
        "bathtub",
        [
            Part(Box((-w / 2, 0, 0), (w / 2, d, 0.1), "-z"), c),
            Part(Box((-w / 2, 0, 0.1), (-w / 2 + t, d, height), "-z"), c),
            Part(Box((w / 2 - t, 0, 0.1), (w / 2, d, height), "-z"), c),
            Part(Box((-w / 2 + t, 0, 0.1), (w / 2 - t, t, height), "-z-y"), c),
            Part(Box((-w / 2 + t, d - t, 0.1), (w / 2 - t, d, height), "-z"), c),
        ],
    )
    tub.occluders = [
        Box((-w / 2 + 0.04, 0.04, -0.1), (w / 2 - 0.04, d - 0.04, 0.05)),
        Box((-w / 2 + 0.04, -0.3, 0), (w / 2 - 0.04, 0.05, height - 0.04)),
    ]
    objs = [tub]
    if rng.random() < 0.7:
        cw = w * uniform(rng, 0.3, 1.0)
        x0 = -w / 2 if rng.random() < 0.5 else w / 2 - cw
        sheet = Sheet(
            (x0 + cw, d - 0.03, height + 0.1),
            (-cw, 0, 0),
            (0, 0, uniform(rng, 1.3, 1.5)),
            wave=(0.03, uniform(rng, 0.15, 0.25), uniform(rng, 0, 6)),
        )
        objs.append(SceneObject("shower curtain", [Part(sheet, draw_color(rng, "shower curtain"))]))
    return objs


def trash_can(rng) -> SceneObject:
    """An open round bin."""
    return SceneObject(
        "trash can",
        [
            Part(
                Cylinder(0, 0, 0, uniform(rng, 0.3, 0.6), uniform(rng, 0.12, 0.2), top=False),
                draw_color(rng, "trash can"),
            )
        ],
    )


# ---------------------------------------------------------------------------------------
# Boards and screens
def upright_board(
    rng,
    category: str,
    w: float,
    height: float,
    t: float,
    z0: float,
    kind: str | None = None,
    y0: float = 0.0,
) -> SceneObject:
    """A thin upright board (picture, whiteboard, mirror, tv) w x height x t from z0 up,
    back at y = y0, coloured as ``kind`` (an `appearance.APPEARANCE` key; default: the
    category)."""
    return SceneObject(
        category,
        [
            Part(
                Box((-w / 2, y0, z0), (w / 2, y0 + t, z0 + height), "-y"),
                draw_color(rng, kind or category),
            )
        ],
    )


def monitor(rng, z0: float) -> SceneObject:
    """A computer monitor on its foot and neck, standing at height z0."""
    w, c = uniform(rng, 0.45, 0.65), draw_color(rng, "monitor")
    height = w * uniform(rng, 0.55, 0.65)
    return SceneObject(
        "monitor",
        [
            Part(Box((-0.1, 0, z0), (0.1, 0.18, z0 + 0.02), "-z"), c),
            Part(Box((-0.025, 0.05, z0 + 0.02), (0.025, 0.08, z0 + 0.12), "-z"), c),
            Part(Box((-w / 2, 0.08, z0 + 0.1), (w / 2, 0.11, z0 + 0.1 + height)), c),
        ],
    )
